"""test_inpainting.py end to end on data/samples (tiny random model), and its handling of bad test folders."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import test_inpainting
from conftest import ROOT
from leftrefill.data.test_pairs import find_test_pairs

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


def read_rows(output):
    with open(output / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_cli_end_to_end_on_the_bundled_samples(tmp_path, alexnet_file, caplog):
    output = tmp_path / "out"
    code = run([*FAST, "--test_path", str(SAMPLES), "--output_path", str(output), "--batch_size", "2",
                "--lpips_weights", str(alexnet_file), "--metric_size", "64"], caplog)
    assert code == 0
    ids = ["building", "sacre_coeur_a", "sacre_coeur_b"]
    assert sorted(p.name for p in (output / "results").iterdir()) == [f"{i}.png" for i in ids]
    assert sorted(p.name for p in (output / "grids").iterdir()) == [f"{i}_RANDOM-WEIGHTS.jpg" for i in ids]
    assert Image.open(output / "results" / "building.png").size == (128, 128)
    assert Image.open(output / "grids" / "building_RANDOM-WEIGHTS.jpg").size == (4 * 128, 128)
    rows = read_rows(output)
    assert [row["id"] for row in rows] == ids and [int(row["seed"]) for row in rows] == [42, 43, 44]
    assert all(math.isfinite(float(row[name])) for row in rows for name in ("psnr", "ssim", "lpips"))
    summary = json.loads((output / "summary.json").read_text())
    assert summary["random_weights"] is True and "RANDOM WEIGHTS" in summary["warning"]
    assert summary["num_scored"] == 3 and summary["settings"]["metric_size"] == 64
    expected_mean = np.mean([float(row["psnr"]) for row in rows])
    assert summary["metrics"]["psnr"] == pytest.approx(expected_mean, abs=1e-5)
    assert {"torch", "lpips", "leftrefill"} <= set(summary["versions"])
    assert "RANDOM WEIGHTS (--random_init)" in caplog.text
    assert not list(output.rglob("*.tmp*"))  # atomic writes leave no temporary files


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


def test_truncated_image_is_named_and_nothing_half_written(tmp_path, caplog):
    test_path = copy_samples(tmp_path)
    target = test_path / "sacre_coeur_b" / "target.jpg"
    target.write_bytes(target.read_bytes()[:5000])
    output = tmp_path / "out"
    code = run([*FAST, "--test_path", str(test_path), "--output_path", str(output), "--no_lpips"], caplog)
    assert code == 2
    assert f"target: {target} cannot be decoded" in caplog.text
    assert len(read_rows(output)) == 2  # the pairs before it are complete
    assert not list(output.rglob("*.tmp*"))


def test_empty_mask_pair_is_copied_and_left_out_of_the_metrics(tmp_path, caplog):
    test_path = copy_samples(tmp_path)
    mask = test_path / "building" / "mask.png"
    Image.new("L", Image.open(mask).size, 0).save(mask)
    output = tmp_path / "out"
    assert run([*FAST, "--test_path", str(test_path), "--output_path", str(output), "--no_lpips"], caplog) == 0
    assert "pair building: the mask is empty" in caplog.text
    rows = read_rows(output)
    assert rows[0]["psnr"] == "nan" and float(rows[1]["psnr"]) > 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["empty_masks"] == ["building"] and summary["num_scored"] == 2
    assert math.isfinite(summary["metrics"]["psnr"])


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
