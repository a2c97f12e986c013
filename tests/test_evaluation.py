"""test_inpainting.py end to end on data/samples (tiny random model), and its handling of bad test folders."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import test_inpainting
from conftest import ROOT, read_csv
from leftrefill.data import test_pairs
from leftrefill.data.test_pairs import check_pair_images, find_test_pairs
from leftrefill.grid import INPAINTING_LABELS as GRID_LABELS
from leftrefill.grid import labelled_row, strip_height
from leftrefill.images import ImageInputError, load_mask, load_rgb
from leftrefill.pipeline import paste_filled

SAMPLES = ROOT / "data" / "samples"
FAST = ["--model_path", str(ROOT / "checkpoints" / "tiny_random"), "--random_init", "--test_size", "128",
        "--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    """A randomly initialised AlexNet trunk in torchvision's file format (the real weights cannot be fetched)."""
    torch.manual_seed(0)
    features = torchvision.models.alexnet(weights=None).features.state_dict()
    path = tmp_path_factory.mktemp("lpips") / "alexnet-owt-7be5be79.pth"
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    return path


def run(args: list[str], caplog) -> int:
    with caplog.at_level(logging.INFO):
        return test_inpainting.main(args)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, alexnet_file):
    """One CLI run on the bundled samples (batch size 2, LPIPS on): its output folder, exit code and log text."""
    output = tmp_path_factory.mktemp("sample_run") / "out"
    log_text, handler, root = io.StringIO(), None, logging.getLogger()
    handler, level = logging.StreamHandler(log_text), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        code = test_inpainting.main([*FAST, "--test_path", str(SAMPLES), "--output_path", str(output),
                                     "--batch_size", "2", "--lpips_weights", str(alexnet_file),
                                     "--metric_size", "64"])
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return SimpleNamespace(output=output, code=code, log=log_text.getvalue())


def test_cli_end_to_end_on_the_bundled_samples(sample_run):
    output = sample_run.output
    assert sample_run.code == 0
    ids = ["building", "sacre_coeur_a", "sacre_coeur_b"]
    assert sorted(p.name for p in (output / "results").iterdir()) == [f"{i}.png" for i in ids]
    assert sorted(p.name for p in (output / "results_fullsize").iterdir()) == [f"{i}.png" for i in ids]
    assert sorted(p.name for p in (output / "grids").iterdir()) == [f"{i}_RANDOM-WEIGHTS.jpg" for i in ids]
    assert Image.open(output / "results" / "building.png").size == (128, 128)
    rows = read_csv(output / "metrics.csv")
    assert list(rows[0]) == ["id", "seed", "psnr", "ssim", "lpips", "note"]
    assert [row["id"] for row in rows] == ids and [int(row["seed"]) for row in rows] == [42, 43, 44]
    assert all(math.isfinite(float(row[name])) for row in rows for name in ("psnr", "ssim", "lpips"))
    assert [row["note"] for row in rows] == ["", "", ""]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "complete" and "failed_pair" not in summary
    assert summary["random_weights"] is True and "RANDOM WEIGHTS" in summary["warning"]
    assert summary["num_scored"] == 3 and summary["num_pairs_in_test_set"] == 3
    assert summary["settings"]["metric_size"] == 64
    expected_mean = np.mean([float(row["psnr"]) for row in rows])
    assert summary["metrics"]["psnr"] == pytest.approx(expected_mean, abs=1e-5)
    assert {"torch", "lpips", "leftrefill"} <= set(summary["versions"])
    assert "RANDOM WEIGHTS (--random_init)" in sample_run.log
    assert not list(output.rglob("*.tmp*"))  # atomic writes leave no temporary files


def test_summary_records_which_model_files_were_loaded(sample_run, alexnet_file):
    summary = json.loads((sample_run.output / "summary.json").read_text())
    model_dir = ROOT / "checkpoints" / "tiny_random"
    assert summary["loaded"] == {"model_config": str(model_dir / "model_config.yaml"), "base_ckpt": None,
                                 "prompt_tokens": None, "random_init": True, "lpips_weights": str(alexnet_file)}


def test_full_size_results_keep_the_target_outside_the_mask_bit_exactly(sample_run):
    for pair in ("building", "sacre_coeur_a", "sacre_coeur_b"):  # landscape, portrait, 4:3 targets
        target = load_rgb(SAMPLES / pair / "target.jpg")
        hole = load_mask(SAMPLES / pair / "mask.png")
        result = np.asarray(Image.open(sample_run.output / "results_fullsize" / f"{pair}.png"))
        assert result.shape == target.shape
        assert np.array_equal(result[~hole], target[~hole])
        assert hole.any() and not np.array_equal(result[hole], target[hole])  # the hole holds the model's fill


def test_full_size_hole_is_the_protocol_result_resized(sample_run):
    # The fill is the test_size result enlarged to the target (bicubic), the same as pipe(...) pastes.
    result = np.asarray(Image.open(sample_run.output / "results" / "building.png"))
    target, hole = load_rgb(SAMPLES / "building" / "target.jpg"), load_mask(SAMPLES / "building" / "mask.png")
    expected = paste_filled(result, target, hole)
    assert np.array_equal(np.asarray(Image.open(sample_run.output / "results_fullsize" / "building.png")), expected)


def test_grids_carry_a_label_strip_above_the_panels(sample_run):
    grid = np.asarray(Image.open(sample_run.output / "grids" / "building_RANDOM-WEIGHTS.jpg")).astype(int)
    strip = strip_height(128)
    assert grid.shape == (128 + strip, 4 * 128, 3)
    result = np.asarray(Image.open(sample_run.output / "results" / "building.png")).astype(int)
    distances = [np.abs(grid[strip:, c * 128:(c + 1) * 128] - result).mean() for c in range(4)]
    assert np.argmin(distances) == 2 and distances[2] < 8  # the panel under "result", up to JPEG loss
    for column in range(4):
        header = grid[:strip, column * 128:(column + 1) * 128]
        assert header.max() - header.min() > 100  # white text on black in every header


def test_labelled_row_puts_a_text_strip_over_unchanged_panels():
    panels = [np.full((40, 50, 3), value, np.uint8) for value in (30, 90, 150, 210)]
    grid = labelled_row(panels, GRID_LABELS)
    strip = strip_height(40)
    assert strip == 16 and grid.shape == (40 + strip, 200, 3)
    assert np.array_equal(grid[strip:], np.concatenate(panels, axis=1))
    header = grid[:strip]
    assert len(np.unique(header)) > 1 and header.max() == 255 and header.min() == 0
    assert (grid[:strip, :50] != grid[:strip, 50:100]).any()  # different words in different headers
    with pytest.raises(ValueError, match="need one label per panel, got 4 panels and 3 labels"):
        labelled_row(panels, GRID_LABELS[:3])
    with pytest.raises(ValueError, match="panels must share one height"):
        labelled_row([panels[0], np.zeros((41, 50, 3), np.uint8)], ["a", "b"])


def test_results_do_not_depend_on_the_batch_size(tmp_path, caplog):
    outputs = {}
    for batch_size in ("1", "3"):
        output = tmp_path / batch_size
        assert run([*FAST, "--test_path", str(SAMPLES), "--output_path", str(output), "--batch_size", batch_size,
                    "--no_lpips"], caplog) == 0
        outputs[batch_size] = output
    for pair in ("building", "sacre_coeur_b"):
        one, three = (np.asarray(Image.open(outputs[b] / "results" / f"{pair}.png")).astype(int) for b in ("1", "3"))
        assert np.abs(one - three).max() <= 1


def copy_samples(tmp_path):
    test_path = tmp_path / "pairs"
    shutil.copytree(SAMPLES, test_path, ignore=shutil.ignore_patterns("*.md"))
    return test_path


def test_missing_files_in_a_pair_folder_are_named(tmp_path, caplog):
    test_path = copy_samples(tmp_path)
    (test_path / "building" / "source.jpg").unlink()
    (test_path / "sacre_coeur_a" / "mask.png").unlink()
    code = run([*FAST, "--test_path", str(test_path), "--output_path", str(tmp_path / "out"), "--no_lpips"], caplog)
    assert code == 2
    assert "2 incomplete pair folder(s)" in caplog.text
    assert f"{test_path / 'building'}: no source.jpg or source.png" in caplog.text
    assert f"{test_path / 'sacre_coeur_a'}: no mask.png" in caplog.text
    assert not (tmp_path / "out").exists()


def refuse_to_build_a_model(monkeypatch):
    from leftrefill.pipeline import LeftRefillPipeline

    def fail(*args, **kwargs):
        raise AssertionError("the model was built although the data was bad")

    monkeypatch.setattr(LeftRefillPipeline, "from_model_dir", fail)


def test_every_unreadable_image_is_listed_before_the_model_is_built(tmp_path, caplog, monkeypatch):
    refuse_to_build_a_model(monkeypatch)
    test_path = copy_samples(tmp_path)
    truncated = test_path / "sacre_coeur_b" / "target.jpg"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    empty = test_path / "building" / "source.jpg"
    empty.write_bytes(b"")
    text = test_path / "sacre_coeur_a" / "mask.png"
    text.write_text("not a mask")
    output = tmp_path / "out"
    code = run([*FAST, "--test_path", str(test_path), "--output_path", str(output), "--no_lpips"], caplog)
    assert code == 2
    assert "3 of the 9 test image files cannot be read, nothing was run:" in caplog.text
    assert f"\n  {empty}: empty file (0 bytes)\n" in caplog.text
    assert f"\n  {text}: not an image file Pillow can read\n" in caplog.text
    assert f"\n  {truncated}: cannot be decoded (truncated or corrupt?): image file is truncated" in caplog.text
    assert not output.exists()


def test_the_list_of_unreadable_images_is_bounded(tmp_path):
    pairs = []
    for i in range(5):  # 5 pairs x 3 empty files = 15 problems
        folder = tmp_path / f"pair{i}"
        folder.mkdir()
        files = [folder / name for name in ("source.jpg", "target.jpg", "mask.png")]
        for path in files:
            path.write_bytes(b"")
        pairs.append(test_pairs.TestPair(folder.name, *files))
    with pytest.raises(ImageInputError) as caught:
        check_pair_images(pairs)
    lines = str(caught.value).splitlines()
    assert lines[0] == "15 of the 15 test image files cannot be read, nothing was run:"
    assert lines[1] == f"  {tmp_path / 'pair0' / 'source.jpg'}: empty file (0 bytes)"
    assert len(lines) == 1 + 10 + 1 and lines[-1] == "  (+5 more)"


def test_a_shared_mask_is_checked_once_and_good_files_pass(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "only.png").write_bytes(b"")
    pairs = find_test_pairs(SAMPLES, masks)
    assert check_pair_images(find_test_pairs(SAMPLES)) is None
    with pytest.raises(ImageInputError, match=r"^1 of the 7 test image files cannot be read, nothing was run:\n  "
                                              rf"{re.escape(str(masks / 'only.png'))}: empty file \(0 bytes\)$"):
        check_pair_images(pairs)


def test_a_pair_failing_mid_run_is_named_in_a_failed_summary(tmp_path, caplog, monkeypatch):
    original = test_pairs.TestPairDataset.__getitem__

    def vanishing(self, index):
        if index == 1:  # the file was fine when checked, then went away
            raise ImageInputError(f"target: file not found: {self.pairs[index].target}")
        return original(self, index)

    monkeypatch.setattr(test_pairs.TestPairDataset, "__getitem__", vanishing)
    output = tmp_path / "out"
    code = run([*FAST, "--test_path", str(SAMPLES), "--output_path", str(output), "--no_lpips"], caplog)
    assert code == 2
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_pair"] == "sacre_coeur_a"
    assert summary["error"] == f"ImageInputError: target: file not found: {SAMPLES / 'sacre_coeur_a' / 'target.jpg'}"
    assert "failed_batch" not in summary
    assert summary["num_pairs"] == 1 and summary["num_pairs_in_test_set"] == 3
    assert [row["id"] for row in read_csv(output / "metrics.csv")] == ["building"]
    assert f"the run stopped at pair sacre_coeur_a; {output / 'summary.json'} records it as failed" in caplog.text
    assert "target: file not found" in caplog.text


def test_a_failing_batch_is_named_and_the_error_raised_again(tmp_path, caplog, monkeypatch):
    from leftrefill.pipeline import LeftRefillPipeline

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(LeftRefillPipeline, "inpaint", broken)
    output = tmp_path / "out"
    with pytest.raises(RuntimeError, match="^boom$"):
        run([*FAST, "--test_path", str(SAMPLES), "--output_path", str(output), "--no_lpips", "--batch_size", "2"],
            caplog)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: boom"
    assert summary["failed_pair"] == "building" and summary["failed_batch"] == ["building", "sacre_coeur_a"]
    assert summary["num_pairs"] == 0 and summary["metrics"] == {"psnr": None, "ssim": None}
    assert summary["metrics_null_reason"] == {"psnr": "no pair was scored", "ssim": "no pair was scored"}


def forbid_nan(constant):
    raise AssertionError(f"summary.json holds {constant}, which strict JSON does not allow")


def test_empty_mask_pair_is_copied_and_left_out_of_the_metrics(tmp_path, caplog):
    test_path = copy_samples(tmp_path)
    mask = test_path / "building" / "mask.png"
    Image.new("L", Image.open(mask).size, 0).save(mask)
    output = tmp_path / "out"
    assert run([*FAST, "--test_path", str(test_path), "--output_path", str(output), "--no_lpips"], caplog) == 0
    assert "pair building: the mask is empty" in caplog.text
    rows = read_csv(output / "metrics.csv")
    assert rows[0]["psnr"] == "" and rows[0]["ssim"] == ""
    assert rows[0]["note"] == "empty mask: target copied unchanged, not scored"
    assert float(rows[1]["psnr"]) > 0 and rows[1]["note"] == ""
    summary = json.loads((output / "summary.json").read_text())
    assert summary["empty_masks"] == ["building"] and summary["num_scored"] == 2
    assert math.isfinite(summary["metrics"]["psnr"]) and "metrics_null_reason" not in summary
    fullsize = np.asarray(Image.open(output / "results_fullsize" / "building.png"))
    assert np.array_equal(fullsize, load_rgb(test_path / "building" / "target.jpg"))  # copied, at its own size


def test_summary_is_strict_json_when_no_pair_can_be_scored(tmp_path, caplog):
    test_path = copy_samples(tmp_path)
    mask = test_path / "building" / "mask.png"
    Image.new("L", Image.open(mask).size, 0).save(mask)
    output = tmp_path / "out"
    assert run([*FAST, "--test_path", str(test_path), "--output_path", str(output), "--no_lpips", "--limit", "1"],
               caplog) == 0
    text = (output / "summary.json").read_text()
    summary = json.loads(text, parse_constant=forbid_nan)
    assert summary["metrics"] == {"psnr": None, "ssim": None} and summary["num_scored"] == 0
    assert summary["metrics_null_reason"] == {"psnr": "no pair was scored", "ssim": "no pair was scored"}
    assert "nan" not in (output / "metrics.csv").read_text().lower()
    assert "0 pairs scored: psnr n/a, ssim n/a" in caplog.text


def test_a_zero_one_mask_is_filled_not_taken_as_empty(tmp_path, caplog):
    test_path = copy_samples(tmp_path)
    mask = test_path / "building" / "mask.png"
    zero_one = (np.asarray(Image.open(mask)) > 127).astype(np.uint8)  # values 0 / 1, as numpy exports
    Image.fromarray(zero_one).save(mask)
    output = tmp_path / "out"
    assert run([*FAST, "--test_path", str(test_path), "--output_path", str(output), "--no_lpips", "--limit", "1"],
               caplog) == 0
    assert caplog.text.count(f"mask {mask} holds only the values 0 and 1: read as a 0/1 mask with 1 = hole") == 1
    summary = json.loads((output / "summary.json").read_text())
    assert summary["empty_masks"] == [] and summary["num_scored"] == 1


def test_non_finite_results_are_reported_not_counted_as_empty(tmp_path, caplog, monkeypatch):
    from leftrefill.pipeline import LeftRefillPipeline

    original = LeftRefillPipeline.inpaint

    def overflowing(self, *args, **kwargs):
        filled = original(self, *args, **kwargs)
        filled[0, :, :4, :4] = float("nan")  # the first item of every batch
        return filled

    monkeypatch.setattr(LeftRefillPipeline, "inpaint", overflowing)
    output = tmp_path / "out"
    code = run([*FAST, "--test_path", str(SAMPLES), "--output_path", str(output), "--no_lpips", "--batch_size", "3"],
               caplog)
    assert code == 1 and "pair building: the result holds NaN" in caplog.text
    summary = json.loads((output / "summary.json").read_text())
    assert summary["non_finite_outputs"] == ["building"] and summary["empty_masks"] == []
    assert summary["num_scored"] == 2 and math.isfinite(summary["metrics"]["psnr"])


def test_lpips_without_weights_says_how_to_provide_them(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.chdir(tmp_path)
    code = run([*FAST, "--test_path", str(SAMPLES), "--output_path", str(tmp_path / "out")], caplog)
    assert code == 2
    assert "alexnet-owt-7be5be79.pth" in caplog.text and "--no_lpips" in caplog.text


def test_masks_from_mask_path_are_cycled_and_resizing_is_reported(tmp_path, caplog):
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("L", (512, 512), 255).save(masks / name)
    pairs = find_test_pairs(SAMPLES, masks)
    assert [p.mask.name for p in pairs] == ["a.png", "b.png", "a.png"]
    output = tmp_path / "out"
    assert run([*FAST, "--test_path", str(SAMPLES), "--mask_path", str(masks), "--output_path", str(output),
                "--no_lpips", "--limit", "2"], caplog) == 0
    assert "mask has another size than the target image" in caplog.text
    assert json.loads((output / "summary.json").read_text())["masks_resized"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_error(tmp_path, caplog):
    args = [*FAST, "--device", "cuda", "--test_path", str(SAMPLES), "--output_path", str(tmp_path), "--no_lpips"]
    assert run(args, caplog) == 2
    assert "device cuda: CUDA is not available on this machine" in caplog.text


def test_bad_flag_values_are_rejected_by_name(capsys):
    with pytest.raises(SystemExit):
        test_inpainting.parse_args(["--test_path", "x", "--test_size", "500"])
    assert "--test_size must be a positive multiple of 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        test_inpainting.parse_args(["--test_path", "x", "--metric_size", "1024"])
    assert "--metric_size must be in [7, test_size]" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--steps", "0"], "--steps must be an integer in [1, 999], got 0"),
    (["--cfg", "nan"], "--cfg must be a finite number >= 0, got nan"),
    (["--cfg", "inf"], "--cfg must be a finite number >= 0, got inf"),
    (["--eta", "-0.5"], "--eta must be a finite number >= 0, got -0.5"),
    (["--seed", "-1"], "--seed must be an integer in [0, 9223372036854775807], got -1"),
    (["--seed", str(2**63 - 2)],  # 3 pairs: the last one would need seed 2^63
     "--seed must be an integer in [0, 9223372036854775805] so that seed + 2 (the last item's seed) fits, "
     "got 9223372036854775806"),
])
def test_bad_sampling_options_are_one_parser_error(flags, message, tmp_path, capsys, monkeypatch):
    refuse_to_build_a_model(monkeypatch)
    with pytest.raises(SystemExit) as caught:
        test_inpainting.main([*FAST, "--test_path", str(SAMPLES), "--output_path", str(tmp_path / "out"), *flags])
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")
    assert not (tmp_path / "out").exists()


def test_the_last_pair_seed_counts_only_the_pairs_that_run(tmp_path, capsys):
    # seed 2^63 - 1 fits one pair (--limit 1) but not three
    assert test_inpainting.parse_args(["--test_path", "x", "--seed", str(2**63 - 1), "--limit", "1"]).seed == 2**63 - 1
    with pytest.raises(SystemExit):
        test_inpainting.parse_args(["--test_path", "x", "--seed", str(2**63 - 1), "--limit", "3"])
    assert "so that seed + 2 (the last item's seed) fits" in capsys.readouterr().err


def test_help_keeps_the_example_lines_and_every_flag_is_explained():
    parser = test_inpainting.build_parser()
    flags = [action for action in parser._actions if action.option_strings]
    assert all(action.help and len(action.help) > 10 for action in flags)
    text = parser.format_help()
    example = "python test_inpainting.py --model_path checkpoints/ref_guided_inpainting --test_path data/samples \\"
    assert f"\n    {example}\n        --output_path" in text  # the example's line breaks are kept
    assert "sampler steps, in [1, 999] (default: 50)" in " ".join(text.split())


def test_ddim_steps_show_under_the_pair_bar_and_logs_go_through_tqdm(tmp_path, capsys, monkeypatch):
    import tqdm.auto

    from leftrefill.pipeline import LeftRefillPipeline

    original, seen, written = LeftRefillPipeline.inpaint, {}, []

    def logging_inpaint(self, *args, **kwargs):
        seen["progress"] = kwargs["progress"]
        logging.getLogger("leftrefill.test").warning("a log line during sampling")
        return original(self, *args, **kwargs)

    def write(cls, message, file=None, end="\n", nolock=False):
        written.append(message)

    monkeypatch.setattr(LeftRefillPipeline, "inpaint", logging_inpaint)
    monkeypatch.setattr(tqdm.auto.tqdm, "write", classmethod(write))
    console = logging.StreamHandler(sys.stderr)  # what logging.basicConfig installs outside pytest
    logging.getLogger().addHandler(console)
    try:
        assert test_inpainting.main([*FAST, "--test_path", str(SAMPLES), "--output_path", str(tmp_path / "out"),
                                     "--no_lpips", "--limit", "1"]) == 0
    finally:
        logging.getLogger().removeHandler(console)
    assert seen["progress"] is True
    assert written == ["a log line during sampling"]  # printed above the bars by tqdm, not across them
    err = capsys.readouterr().err
    assert "a log line during sampling" not in err  # the console handler was swapped out during the run
    assert "pairs:" in err and "DDIM:   0%" in err and "0/2 [" in err  # the step bar, cleared when the batch ends
