"""test_nvs.py end to end on data/samples_nvs (tiny random NVS model), and its refusal of bad input."""

from __future__ import annotations

import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import test_nvs
from conftest import ROOT, read_csv
from leftrefill.data.objaverse_nvs import load_view
from leftrefill.grid import strip_height
from leftrefill.images import load_mask
from leftrefill.metrics import psnr

SAMPLES = ROOT / "data" / "samples_nvs"
VIEWS = SAMPLES / "views_release"
UIDS = ["proc_box_stripes", "proc_sphere_checker", "proc_totem"]
SIZE = 64
FAST = ["--model_path", str(ROOT / "checkpoints" / "tiny_random_nvs"), "--random_init", "--test_size", str(SIZE),
        "--steps", "2", "--device", "cpu"]


def run(args: list[str], caplog) -> int:
    with caplog.at_level(logging.INFO):
        return test_nvs.main(args)


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    """A randomly initialised AlexNet trunk in torchvision's file format (the real weights cannot be fetched)."""
    torch.manual_seed(0)
    features = torchvision.models.alexnet(weights=None).features.state_dict()
    path = tmp_path_factory.mktemp("lpips") / "alexnet-owt-7be5be79.pth"
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    return path


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, alexnet_file):
    """One run on the three bundled objects, default views (2 -> 0) and mask mode (reference), LPIPS on."""
    output = tmp_path_factory.mktemp("nvs_run") / "out"
    code = test_nvs.main([*FAST, "--test_path", str(VIEWS), "--output_path", str(output),
                          "--lpips_weights", str(alexnet_file)])
    return output, code


def test_cli_writes_results_grids_metrics_and_a_complete_summary(sample_run):
    output, code = sample_run
    assert code == 0
    assert sorted(p.name for p in (output / "results").iterdir()) == [f"{uid}.png" for uid in UIDS]
    assert sorted(p.name for p in (output / "grids").iterdir()) == [f"{uid}_RANDOM-WEIGHTS.jpg" for uid in UIDS]
    assert not (output / "results_fullsize").exists()  # inpainting only: a render has no "own size" to paste into
    assert Image.open(output / "results" / "proc_totem.png").size == (SIZE, SIZE)
    rows = read_csv(output / "metrics.csv")
    assert list(rows[0]) == ["id", "seed", "psnr", "ssim", "lpips", "note"]
    assert [row["id"] for row in rows] == UIDS and [int(row["seed"]) for row in rows] == [42, 43, 44]
    assert all(math.isfinite(float(row[name])) for row in rows for name in ("psnr", "ssim", "lpips"))
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["task"] == "nvs" and summary["num_scored"] == 3
    assert summary["random_weights"] is True
    assert summary["nvs"] == {"views_root": str(VIEWS), "reference_view": 2, "target_view": 0,
                              "mask_mode": "reference", "mask_path": None,
                              "metric_region": "the whole generated view, not blended with the ground truth"}
    assert summary["settings"]["eta"] is None and summary["settings"]["test_size"] == SIZE
    assert summary["metrics"]["psnr"] == pytest.approx(np.mean([float(row["psnr"]) for row in rows]), abs=1e-5)
    assert summary["loaded"]["model_config"] == str(ROOT / "checkpoints" / "tiny_random_nvs" / "model_config.yaml")


def test_metrics_compare_the_whole_generated_view_with_the_ground_truth_render(sample_run):
    output, _ = sample_run
    for row in read_csv(output / "metrics.csv"):
        result = torch.from_numpy(image(output / "results" / f"{row['id']}.png")).permute(2, 0, 1)[None] / 255
        truth = (load_view(VIEWS / row["id"] / "000.png", SIZE)[0][None] + 1) / 2
        # from the saved 8-bit result: equal up to its rounding, which the metric does not see
        assert float(psnr(result, truth)[0]) == pytest.approx(float(row["psnr"]), abs=0.05)


def test_the_grid_is_labelled_and_shows_what_the_model_saw(sample_run):
    output, _ = sample_run
    grid = image(output / "grids" / "proc_totem_RANDOM-WEIGHTS.jpg")
    strip = strip_height(SIZE)
    assert grid.shape == (SIZE + strip, 4 * SIZE, 3)  # taller than the panels: the label strip
    assert all(np.ptp(grid[:strip, c * SIZE:(c + 1) * SIZE]) > 100 for c in range(4))  # text in every header
    panels = [grid[strip:, c * SIZE:(c + 1) * SIZE] for c in range(4)]
    distances = [np.abs(panel - image(output / "results" / "proc_totem.png")).mean() for panel in panels]
    assert np.argmin(distances) == 2 and distances[2] < 16  # the panel under "result", up to JPEG loss of noise
    silhouette = load_view(VIEWS / "proc_totem" / "002.png", SIZE)[1][0].numpy() > 0
    seen = panels[1].mean(axis=-1)  # mask "reference": white target, the reference's silhouette mid-gray
    assert np.abs(seen[silhouette] - 128).mean() < 10 and np.abs(seen[~silhouette] - 255).mean() < 10


def test_two_runs_give_identical_results_whatever_the_batch_size(sample_run, tmp_path, caplog):
    output, _ = sample_run
    again = tmp_path / "again"
    assert run([*FAST, "--test_path", str(VIEWS), "--output_path", str(again), "--no_lpips", "--batch_size", "3"],
               caplog) == 0
    for uid in UIDS:
        assert np.abs(image(again / "results" / f"{uid}.png") - image(output / "results" / f"{uid}.png")).max() <= 1
    psnrs = [[float(row["psnr"]) for row in read_csv(folder / "metrics.csv")] for folder in (again, output)]
    assert psnrs[0] == pytest.approx(psnrs[1], abs=1e-3)
    rerun = tmp_path / "rerun"
    assert run([*FAST, "--test_path", str(VIEWS), "--output_path", str(rerun), "--no_lpips", "--batch_size", "3"],
               caplog) == 0
    for uid in UIDS:
        assert (rerun / "results" / f"{uid}.png").read_bytes() == (again / "results" / f"{uid}.png").read_bytes()


def test_fixed_masks_show_the_target_outside_the_mask_and_nothing_is_blended(tmp_path, caplog):
    output = tmp_path / "fixed"
    assert run([*FAST, "--test_path", str(VIEWS), "--object_list", str(SAMPLES / "obj_test.txt"), "--mask_mode",
                "fixed", "--mask_path", str(SAMPLES / "masks"), "--output_path", str(output), "--no_lpips"],
               caplog) == 0
    assert [row["id"] for row in read_csv(output / "metrics.csv")] == ["proc_sphere_checker"]  # obj_test.txt
    summary = json.loads((output / "summary.json").read_text())
    assert summary["nvs"]["mask_mode"] == "fixed" and summary["nvs"]["mask_path"] == str(SAMPLES / "masks")
    assert summary["masks_resized"] == 1  # the 128 px mask file at test_size 64
    grid = image(output / "grids" / "proc_sphere_checker_RANDOM-WEIGHTS.jpg")
    seen = grid[strip_height(SIZE):, SIZE:2 * SIZE]
    mask = np.asarray(Image.fromarray(load_mask(SAMPLES / "masks" / "proc_sphere_checker" / "000.png")).resize(
        (SIZE, SIZE), Image.NEAREST))
    truth = (load_view(VIEWS / "proc_sphere_checker" / "000.png", SIZE)[0].permute(1, 2, 0).numpy() + 1) * 127.5
    assert np.abs(seen[~mask] - truth[~mask]).mean() < 8  # the ground truth outside the mask
    result = image(output / "results" / "proc_sphere_checker.png")
    assert np.abs(result[~mask] - truth[~mask]).mean() > 20  # the whole generated view, not pasted into it


def test_complete_mask_mode_generates_the_whole_view(tmp_path, caplog):
    output = tmp_path / "complete"
    assert run([*FAST, "--test_path", str(VIEWS), "--mask_mode", "complete", "--limit", "1", "--output_path",
                str(output), "--no_lpips"], caplog) == 0
    assert [row["id"] for row in read_csv(output / "metrics.csv")] == ["proc_box_stripes"]
    seen = image(output / "grids" / "proc_box_stripes_RANDOM-WEIGHTS.jpg")[strip_height(SIZE):, SIZE:2 * SIZE]
    assert np.abs(seen - 128).mean() < 3  # all mid-gray (up to JPEG bleed at the edges): nothing of the target
    assert json.loads((output / "summary.json").read_text())["nvs"]["mask_mode"] == "complete"


# -------------------------------------------------------------------------------------------- bad input


def refuse_to_build_a_model(monkeypatch):
    from leftrefill.nvs_pipeline import NVSPipeline

    def fail(*args, **kwargs):
        raise AssertionError("the model was built although the input was bad")

    monkeypatch.setattr(NVSPipeline, "from_model_dir", fail)


def refused(args: list[str], tmp_path, caplog) -> str:
    """The one error logged for ``args`` (exit status 2, nothing written)."""
    output = tmp_path / "out"
    assert run([*FAST, "--output_path", str(output), "--no_lpips", *args], caplog) == 2
    assert not output.exists()
    [error] = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    return error


def copy_views(tmp_path):
    views = tmp_path / "views_release"
    shutil.copytree(VIEWS, views)
    return views


def test_a_missing_views_folder_is_named(tmp_path, caplog, monkeypatch):
    refuse_to_build_a_model(monkeypatch)
    error = refused(["--test_path", str(tmp_path / "absent")], tmp_path, caplog)
    assert error.startswith(f"views folder {tmp_path / 'absent'}: no such folder")


def test_every_incomplete_object_folder_is_listed(tmp_path, caplog, monkeypatch):
    refuse_to_build_a_model(monkeypatch)
    views = copy_views(tmp_path)
    (views / "proc_totem" / "002.png").unlink()
    (views / "proc_box_stripes" / "000.npy").unlink()
    error = refused(["--test_path", str(views)], tmp_path, caplog)
    assert error.splitlines() == [
        f"views_root {views}: 2 of 3 object folders are incomplete (each needs 000.png, 000.npy ... 002.npy):",
        "  proc_box_stripes: missing 000.npy", "  proc_totem: missing 002.png"]


def test_bad_cameras_of_the_chosen_views_are_listed_before_the_model_loads(tmp_path, caplog, monkeypatch):
    refuse_to_build_a_model(monkeypatch)
    views = copy_views(tmp_path)
    np.save(views / "proc_totem" / "002.npy", np.eye(4, dtype=np.float32))
    camera = np.load(views / "proc_box_stripes" / "000.npy")
    camera[0, 3] = np.inf
    np.save(views / "proc_box_stripes" / "000.npy", camera)
    camera = np.load(views / "proc_sphere_checker" / "002.npy")
    camera[:, 0] *= -1  # a reflection
    np.save(views / "proc_sphere_checker" / "002.npy", camera)
    np.save(views / "proc_sphere_checker" / "005.npy", np.zeros((3, 4)))  # not a chosen view: not read
    error = refused(["--test_path", str(views)], tmp_path, caplog)
    assert error.splitlines() == [
        "3 test files of 3 objects cannot be used, nothing was run:",
        f"  camera {views / 'proc_box_stripes' / '000.npy'}: NaN or infinite entries",
        f"  camera {views / 'proc_sphere_checker' / '002.npy'}: R is a reflection (det R < 0), not a rotation",
        f"  camera {views / 'proc_totem' / '002.npy'}: shape (4, 4), expected a 3x4 world-to-camera [R | t]"]


def test_one_bad_file_is_one_line(tmp_path, caplog, monkeypatch):
    refuse_to_build_a_model(monkeypatch)
    views = copy_views(tmp_path)
    camera = np.load(views / "proc_totem" / "000.npy")
    np.save(views / "proc_totem" / "000.npy", camera * 2)
    (views / "proc_box_stripes" / "002.png").write_bytes(b"")
    error = refused(["--test_path", str(views), "--object_list", str(tmp_path / "list.txt")], tmp_path, caplog)
    assert error.startswith(f"object list {tmp_path / 'list.txt'}: cannot be read")
    (tmp_path / "list.txt").write_text("proc_totem\n")
    caplog.clear()
    error = refused(["--test_path", str(views), "--object_list", str(tmp_path / "list.txt")], tmp_path, caplog)
    assert error == (f"camera {views / 'proc_totem' / '000.npy'}: R is not orthonormal (max |R R^T - I| = 3 > "
                     f"0.001) (nothing was run)")
    (tmp_path / "list.txt").write_text("proc_box_stripes\n")
    caplog.clear()
    error = refused(["--test_path", str(views), "--object_list", str(tmp_path / "list.txt")], tmp_path, caplog)
    assert error == f"{views / 'proc_box_stripes' / '002.png'}: empty file (0 bytes) (nothing was run)"


def test_fixed_masks_must_be_given_and_present(tmp_path, caplog, monkeypatch, capsys):
    refuse_to_build_a_model(monkeypatch)
    masks = SAMPLES / "masks"
    error = refused(["--test_path", str(VIEWS), "--mask_mode", "fixed", "--mask_path", str(masks)], tmp_path, caplog)
    assert error.splitlines() == [
        f"--mask_path {masks}: 2 of 3 test mask files are missing (expected <mask_path>/<uid>/000.png):",
        f"  {masks / 'proc_box_stripes' / '000.png'}", f"  {masks / 'proc_totem' / '000.png'}"]
    bad_mask = tmp_path / "masks" / "proc_sphere_checker" / "000.png"
    bad_mask.parent.mkdir(parents=True)
    bad_mask.write_text("not a mask")
    caplog.clear()
    error = refused(["--test_path", str(VIEWS), "--object_list", str(SAMPLES / "obj_test.txt"), "--mask_mode",
                     "fixed", "--mask_path", str(tmp_path / "masks")], tmp_path, caplog)
    assert error == f"{bad_mask}: not an image file Pillow can read (nothing was run)"


@pytest.mark.parametrize(("flags", "message"), [
    (["--mask_mode", "fixed"], "--mask_mode fixed needs --mask_path"),
    (["--mask_path", "masks"], "--mask_path is for --mask_mode fixed only; --mask_mode reference makes its own masks"),
    (["--mask_mode", "partial"], "argument --mask_mode: invalid choice: 'partial'"),
    (["--reference_view", "0"], "--reference_view and --target_view must differ, both are 0"),
    (["--target_view", "12"], "--target_view 12 is outside [0, 12): the renders are 000.png ... 011.png"),
    (["--reference_view", "-1"], "--reference_view -1 is outside [0, 12)"),
    (["--steps", "0"], "--steps must be an integer in [1, 999], got 0"),
    (["--cfg", "nan"], "--cfg must be a finite number >= 0, got nan"),
    (["--sampler", "dpmpp_2m", "--eta", "0.5"], "--eta applies to the samplers ddim, not dpmpp_2m"),
    (["--seed", str(2**63 - 2)], "so that seed + 2 (the last item's seed) fits"),  # three objects
    (["--test_size", "100"], "--test_size must be a positive multiple of 64"),
    (["--strength", "0.5"], "unrecognized arguments: --strength 0.5"),  # the target is unknown: no SDEdit start
])
def test_bad_flags_are_one_parser_error_naming_the_flag(flags, message, tmp_path, capsys, monkeypatch):
    refuse_to_build_a_model(monkeypatch)
    with pytest.raises(SystemExit) as caught:
        test_nvs.main([*FAST, "--test_path", str(VIEWS), "--output_path", str(tmp_path / "out"), *flags])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_an_inpainting_model_directory_is_one_line(tmp_path, caplog):
    error = refused(["--test_path", str(VIEWS), "--model_path", str(ROOT / "checkpoints" / "tiny_random")], tmp_path,
                    caplog)
    assert error == (f"--model_path {ROOT / 'checkpoints' / 'tiny_random'}: the model's cond_stage_model is "
                     f"PromptCLIPEmbedder; novel view synthesis needs leftrefill.pose_prompt.PosePromptCLIPEmbedder "
                     f"(e.g. checkpoints/nvs_objaverse/model_config.yaml)")


def test_a_model_directory_without_nvs_weights_says_how_to_try_it(tmp_path, caplog):
    output = tmp_path / "out"
    args = ["--test_path", str(VIEWS), "--output_path", str(output), "--no_lpips", "--device", "cpu",
            "--model_path", str(ROOT / "checkpoints" / "nvs_objaverse")]
    assert run(args, caplog) == 2  # the default checkpoints/nvs_objaverse holds a config, no trained weights
    assert "--random_init" in caplog.text and not output.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_error(tmp_path, caplog):
    error = refused(["--test_path", str(VIEWS), "--device", "cuda"], tmp_path, caplog)
    assert error == "device cuda: CUDA is not available on this machine (use cpu)"


def test_an_empty_reference_silhouette_generates_and_scores_the_whole_view(tmp_path, caplog):
    """Mask mode "reference" with a fully transparent reference: the whole view is generated (as NVSPipeline
    does) and scored; the ground truth is never copied into results/."""
    views = copy_views(tmp_path)
    Image.fromarray(np.zeros((128, 128, 4), np.uint8)).save(views / "proc_totem" / "002.png")
    output = tmp_path / "out"
    assert run([*FAST, "--test_path", str(views), "--output_path", str(output), "--no_lpips"], caplog) == 0
    [row] = [row for row in read_csv(output / "metrics.csv") if row["id"] == "proc_totem"]
    assert row["note"] == "" and math.isfinite(float(row["psnr"]))
    result = image(output / "results" / "proc_totem.png")
    target = load_view(views / "proc_totem" / "000.png", SIZE)[0]  # (3, S, S) in [-1, 1]
    assert np.abs(result - (target.permute(1, 2, 0).numpy() + 1) * 127.5).mean() > 5  # not the ground truth
    assert "proc_totem: the reference has an empty silhouette" in caplog.text


def test_an_output_path_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    refuse_to_build_a_model(monkeypatch)
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(SystemExit) as caught:
        test_nvs.main([*FAST, "--test_path", str(VIEWS), "--output_path", str(tmp_path / "out")])
    assert caught.value.code == 2
    assert f"--output_path {tmp_path / 'out'} is a file; results go into a folder" in capsys.readouterr().err


def test_a_uid_listed_twice_is_refused_naming_both_lines(tmp_path, caplog, monkeypatch):
    refuse_to_build_a_model(monkeypatch)
    listing = tmp_path / "obj_test.txt"
    listing.write_text("proc_totem\n# a comment\nproc_box_stripes\nproc_totem\n")
    error = refused(["--test_path", str(VIEWS), "--object_list", str(listing)], tmp_path, caplog)
    assert error == f"object list {listing}, line 4: 'proc_totem' is listed again (first on line 1)"
