"""Multi-view reference-guided inpainting: MultiViewPipeline and test_multiview_inpainting.py end to end on a
synthetic folder in the release's layout (tiny random model, 64 px, 2 steps), and their error messages."""

from __future__ import annotations

import json
import logging
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import test_multiview_inpainting
from conftest import ROOT, read_csv
from leftrefill import evaluation
from leftrefill.grid import strip_height
from leftrefill.images import load_mask, load_rgb
from leftrefill.model_dir import TOKEN_KEY
from leftrefill.multiview_inpaint import ViewCountError
from leftrefill.multiview_pipeline import MultiViewPipeline
from leftrefill.pipeline import LeftRefillPipeline, WrongTaskError, paste_filled
from leftrefill.selection import CandidateScore

TINY_MULTIVIEW = ROOT / "checkpoints" / "tiny_random_multiview"  # 2 views: the target and 1 reference
TINY = ROOT / "checkpoints" / "tiny_random"
SIZE = 64
FAST = ["--model_path", str(TINY_MULTIVIEW), "--random_init", "--test_size", str(SIZE), "--steps", "2",
        "--device", "cpu", "--no_lpips"]
IDS = ["0003", "0011"]
TARGET_SHAPE = (60, 90)  # (H, W): neither square nor the model's size


def photo(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth RGB uint8 image (H, W, 3): random colours on a coarse grid, enlarged."""
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize(shape[::-1], Image.BILINEAR))


def write_release_folder(root, ids=IDS, sources=("source.jpg", "source_1.jpg", "source_2.png")):
    """<root>/<id>/ with the given reference files, target.jpg (TARGET_SHAPE) and mask.png (a block)."""
    for i, item in enumerate(ids):
        folder = root / item
        folder.mkdir(parents=True)
        for k, name in enumerate(sources):
            Image.fromarray(photo((48, 64), 10 * i + k)).save(folder / name)
        Image.fromarray(photo(TARGET_SHAPE, 10 * i + 9)).save(folder / "target.jpg")
        hole = np.zeros(TARGET_SHAPE, np.uint8)
        hole[10:40, 20 + 5 * i:70] = 255
        Image.fromarray(hole).save(folder / "mask.png")
    return root


def run(args: list[str], caplog) -> int:
    with caplog.at_level(logging.INFO):
        return test_multiview_inpainting.main(args)


@pytest.fixture(scope="module")
def test_path(tmp_path_factory):
    return write_release_folder(tmp_path_factory.mktemp("multiview") / "test")


@pytest.fixture(scope="module")
def cli_run(test_path, tmp_path_factory):
    """One run with the release's defaults (batch 4, seed 666, cfg 1, eta 0)."""
    output = tmp_path_factory.mktemp("cli") / "out"
    code = test_multiview_inpainting.main([*FAST, "--test_path", str(test_path), "--output_path", str(output)])
    return SimpleNamespace(output=output, code=code)


def test_cli_writes_results_grids_metrics_and_a_summary_with_the_views(cli_run, test_path):
    output = cli_run.output
    assert cli_run.code == 0
    assert sorted(p.name for p in (output / "results").iterdir()) == [f"{i}.png" for i in IDS]
    assert sorted(p.name for p in (output / "results_fullsize").iterdir()) == [f"{i}.png" for i in IDS]
    assert sorted(p.name for p in (output / "grids").iterdir()) == [f"{i}_RANDOM-WEIGHTS.jpg" for i in IDS]
    assert Image.open(output / "results" / "0003.png").size == (SIZE, SIZE)
    rows = read_csv(output / "metrics.csv")
    assert list(rows[0]) == ["id", "seed", "psnr", "ssim", "note"]
    assert [row["id"] for row in rows] == IDS and [int(row["seed"]) for row in rows] == [666, 667]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["task"] == "multiview_inpainting"
    assert summary["num_scored"] == 2 and summary["random_weights"] is True
    assert summary["multiview"]["view_num"] == 2 and summary["multiview"]["num_references"] == 1
    assert summary["multiview"]["references"] == {i: [str(test_path / i / "source.jpg")] for i in IDS}
    settings = summary["settings"]
    assert (settings["view_num"], settings["seed"], settings["cfg"], settings["eta"], settings["batch_size"]) == (
        2, 666, 1.0, 0.0, 4)  # the release's multi-view test defaults


def test_full_size_results_keep_the_target_outside_the_mask(cli_run, test_path):
    for item in IDS:
        target, hole = load_rgb(test_path / item / "target.jpg"), load_mask(test_path / item / "mask.png")
        result = np.asarray(Image.open(cli_run.output / "results_fullsize" / f"{item}.png"))
        assert result.shape == target.shape
        assert np.array_equal(result[~hole], target[~hole]) and not np.array_equal(result[hole], target[hole])
        protocol = np.asarray(Image.open(cli_run.output / "results" / f"{item}.png"))
        assert np.array_equal(result, paste_filled(protocol, target, hole))


def test_grids_show_the_references_the_masked_target_the_result_and_the_truth(cli_run):
    grid = np.asarray(Image.open(cli_run.output / "grids" / "0003_RANDOM-WEIGHTS.jpg"))
    assert grid.shape == (SIZE + strip_height(SIZE), 4 * SIZE, 3)  # 1 reference | masked | result | truth


def test_results_depend_on_the_seed_only_not_the_batch(cli_run, test_path, tmp_path, caplog):
    output = tmp_path / "one_by_one"
    assert run([*FAST, "--test_path", str(test_path), "--output_path", str(output), "--batch_size", "1"], caplog) == 0
    for item in IDS:
        first, again = (np.asarray(Image.open(o / "results" / f"{item}.png")).astype(int)
                        for o in (cli_run.output, output))
        assert np.abs(first - again).max() <= 1


def refuse_to_build_a_model(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was built although the input was bad")

    monkeypatch.setattr(MultiViewPipeline, "from_model_dir", fail)


def refused(args: list[str], tmp_path, caplog) -> str:
    """The one error logged for ``args`` (exit status 2, nothing written)."""
    output = tmp_path / "out"
    assert run([*FAST, "--output_path", str(output), *args], caplog) == 2
    assert not output.exists()
    [error] = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    return error


def model_dir_with_views(tmp_path, num_views: int):
    """A copy of the tiny multi-view model directory whose config has ``num_views`` views."""
    folder = tmp_path / f"tiny_{num_views}_views"
    folder.mkdir()
    config = (TINY_MULTIVIEW / "model_config.yaml").read_text()
    assert "num_views: 2\n" in config
    (folder / "model_config.yaml").write_text(config.replace("num_views: 2\n", f"num_views: {num_views}\n"))
    return folder


def test_three_views_use_two_sources_and_selection_matches_with_every_reference(tmp_path, caplog, monkeypatch):
    test_path = write_release_folder(tmp_path / "test")  # source.jpg, source_1.jpg, source_2.png
    seen = []

    def fake_rank(candidates, references, hole, **options):  # keeps the last candidate
        seen.append([reference.shape for reference in references])
        return [CandidateScore(k, k, (k, 0)) for k in reversed(range(len(candidates)))]

    monkeypatch.setattr(evaluation, "rank_by_matches", fake_rank)
    output = tmp_path / "out"
    assert run([*FAST, "--test_path", str(test_path), "--output_path", str(output), "--model_path",
                str(model_dir_with_views(tmp_path, 3)), "--num_samples", "2", "--select_by_matches",
                "--match_method", "sift"], caplog) == 0
    assert seen == [[(48, 64, 3), (48, 64, 3)]] * 2  # both references of each item, at their own size
    summary = json.loads((output / "summary.json").read_text())
    assert summary["multiview"]["view_num"] == 3
    assert summary["multiview"]["references"]["0011"] == [str(test_path / "0011" / name)
                                                          for name in ("source.jpg", "source_1.jpg")]
    assert [row["sample"] for row in read_csv(output / "metrics.csv")] == ["1", "1"]
    for item in IDS:
        kept = np.asarray(Image.open(output / "results_fullsize" / f"{item}.png"))
        assert np.array_equal(kept, np.asarray(Image.open(output / "candidates" / item / "1.png")))
    grid = np.asarray(Image.open(output / "grids" / "0003_RANDOM-WEIGHTS.jpg"))
    assert grid.shape == (SIZE + strip_height(SIZE), 5 * SIZE, 3)  # 2 references | masked | result | truth


def test_a_view_num_other_than_the_models_is_one_error(test_path, tmp_path, caplog, monkeypatch):
    refuse_to_build_a_model(monkeypatch)
    error = refused(["--test_path", str(test_path), "--view_num", "3"], tmp_path, caplog)
    assert error == (f"--model_path {TINY_MULTIVIEW} was trained for 2 views; --view_num 3 does not match it "
                     f"(leave --view_num out to use the model's)")


def test_fewer_sources_than_the_views_need_names_the_folder(tmp_path, caplog, monkeypatch):
    refuse_to_build_a_model(monkeypatch)
    test_path = write_release_folder(tmp_path / "test", sources=("source.jpg", "source_1.jpg"))
    (test_path / "0011" / "source_1.jpg").unlink()
    model = model_dir_with_views(tmp_path, 4)  # 3 references: no folder has source_2
    error = refused(["--test_path", str(test_path), "--model_path", str(model), "--view_num", "4"], tmp_path, caplog)
    assert error.startswith(f"--test_path {test_path}: 2 folder(s) hold fewer than the 3 source images "
                            f"--view_num 4 asks for")
    assert f"{test_path / '0003'}: 2 source image(s) in order, no source_2.jpg or source_2.png" in error
    assert f"{test_path / '0011'}: 1 source image(s) in order, no source_1.jpg or source_1.png" in error


def test_a_one_reference_model_directory_is_one_line(test_path, tmp_path, caplog, monkeypatch):
    refuse_to_build_a_model(monkeypatch)
    error = refused(["--test_path", str(test_path), "--model_path", str(TINY)], tmp_path, caplog)
    assert error == (f"--model_path {TINY}: the model's cond_stage_model is PromptCLIPEmbedder; multi-view "
                     f"reference-guided inpainting needs leftrefill.multiview_prompt.MultiViewPromptCLIPEmbedder "
                     f"(e.g. checkpoints/multiview_ref_inpainting/model_config.yaml); a one-reference model goes "
                     f"to leftrefill.pipeline.LeftRefillPipeline")


def test_tokens_trained_for_another_number_of_views_are_one_error(test_path, tmp_path, caplog):
    model = tmp_path / "trained"
    (model / "ckpts").mkdir(parents=True)
    shutil.copy(TINY_MULTIVIEW / "model_config.yaml", model / "model_config.yaml")
    tokens = model / "ckpts" / "tokens.safetensors"
    save_file({TOKEN_KEY: torch.randn(20 + 30 * 3, 64)}, tokens)  # a 3-view table for the 2-view config
    error = refused(["--test_path", str(test_path), "--model_path", str(model)], tmp_path, caplog)
    assert error == (f"{tokens}: holds 110 prompt tokens (20 shared + 30 x 3 views), but the model config expects "
                     f"80 prompt tokens (20 shared + 30 x 2 views): the checkpoint was trained for another number "
                     f"of views (num_views in cond_stage_config) or other token counts")


def test_help_shows_the_release_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        test_multiview_inpainting.parse_args(["--help"])
    entries = {entry.split()[0]: " ".join(entry.split()) for entry in re.split(r"\n  (?=--)", capsys.readouterr().out)}
    for flag, default in (("--seed", "666"), ("--cfg", "1.0"), ("--batch_size", "4"), ("--view_num", "None")):
        assert f"(default: {default})" in entries[flag], entries[flag]
    args = test_multiview_inpainting.parse_args(["--test_path", "x"])
    assert args.eta == 0.0  # DDIM's eta: the release's 0
    assert test_multiview_inpainting.parse_args(["--test_path", "x", "--sampler", "dpmpp_2m"]).eta is None


# ------------------------------------------------------------------------------------------ the Python API


@pytest.fixture(scope="module")
def pipe() -> MultiViewPipeline:
    return MultiViewPipeline.from_model_dir(TINY_MULTIVIEW, random_init=True, device="cpu", precision="fp32",
                                            test_size=SIZE)


def views(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    references = torch.rand(2, 1, 3, SIZE, SIZE, generator=g) * 2 - 1
    target = torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, SIZE, SIZE)
    mask[:, :, 16:48, 8:40] = 1
    return references, target, mask


def generators():
    return [torch.Generator().manual_seed(k) for k in (5, 6)]


def test_the_target_depends_on_its_reference_through_the_joint_attention(pipe):
    references, target, mask = views()
    filled = pipe.inpaint(references, target, mask, steps=2, generator=generators())
    again = pipe.inpaint(references, target, mask, steps=2, generator=generators())
    assert torch.equal(filled, again)  # seeded
    other = references.clone()
    other[0] = -other[0]  # sample 0's reference only
    changed = pipe.inpaint(other, target, mask, steps=2, generator=generators())
    hole = mask.bool().expand_as(target)
    assert (changed[0] - filled[0])[hole[0]].abs().max() > 1e-3
    assert torch.equal(changed[1], filled[1])  # sample 1 saw the same reference: its own seed, its own views
    assert torch.equal(changed[~hole], target[~hole])  # outside the mask: the target


def test_call_fills_the_target_at_its_own_size_and_says_once_that_sizes_differ(pipe, caplog):
    target = photo(TARGET_SHAPE, 1)
    hole = np.zeros(TARGET_SHAPE, bool)
    hole[5:30, 10:50] = True
    with caplog.at_level(logging.WARNING, logger="leftrefill.multiview_pipeline"):
        first, second = pipe([photo((40, 50), 2)], target, hole, steps=2, seed=3, num_samples=2)
    [warning] = caplog.records
    assert "90x60" in warning.getMessage() and "50x40" in warning.getMessage()
    for image in (first, second):
        result = np.asarray(image)
        assert result.shape == target.shape and np.array_equal(result[~hole], target[~hole])
    again = pipe(photo((40, 50), 2), target, hole, steps=2, seed=4)[0]  # one image counts as a list of one
    assert np.array_equal(np.asarray(again), np.asarray(second))  # sample k uses seed + k


def test_a_wrong_number_of_references_names_the_models_views(pipe):
    target, hole = photo(TARGET_SHAPE, 1), np.ones(TARGET_SHAPE, bool)
    with pytest.raises(ViewCountError, match=r"^this model was trained for 2 views: give 1 reference, got 2$"):
        pipe([photo((40, 50), 2), photo((40, 50), 3)], target, hole)
    with pytest.raises(ValueError, match=r"give 1 reference, got 0$"):
        pipe([], target, hole)
    with pytest.raises(ViewCountError, match="trained for 2 views, i.e. 1 reference"):
        pipe.inpaint(torch.zeros(1, 2, 3, SIZE, SIZE), torch.zeros(1, 3, SIZE, SIZE), torch.ones(1, 1, SIZE, SIZE))


def test_each_pipeline_refuses_the_other_ones_model_directory():
    with pytest.raises(WrongTaskError) as one_reference:
        MultiViewPipeline.from_model_dir(TINY, random_init=True, device="cpu", test_size=SIZE)
    assert "a one-reference model goes to leftrefill.pipeline.LeftRefillPipeline" in str(one_reference.value)
    with pytest.raises(WrongTaskError) as multiview:
        LeftRefillPipeline.from_model_dir(TINY_MULTIVIEW, random_init=True, device="cpu", test_size=SIZE)
    assert str(multiview.value) == (
        "the model's cond_stage_model is MultiViewPromptCLIPEmbedder, a multi-view model trained for 2 views; it "
        "fills a target from all its references at once: use leftrefill.multiview_pipeline.MultiViewPipeline "
        "(test_multiview_inpainting.py)")
