"""The one-pair command line (leftrefill.commands): ``leftrefill fill|nvs|realfill`` on the tiny random models."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leftrefill.commands import main, output_paths

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--random_init", "--device", "cpu", "--steps", "2", "--test_size", "64"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """A reference, a 96x80 target (not square, not the model size) and a mask with a hole in the middle."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    paths = {name: folder / f"{name}.png" for name in ("reference", "reference_2", "target", "mask")}
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(paths["reference"])
    Image.fromarray(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(paths["reference_2"])
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(paths["target"])
    mask = np.zeros((80, 96), np.uint8)
    mask[20:50, 30:70] = 255
    Image.fromarray(mask).save(paths["mask"])
    return paths


def fill(images: dict[str, Path], output: Path, *extra: str, model: str = "tiny_random",
         references: tuple[str, ...] = ("reference",)) -> int:
    flags = [arg for name in references for arg in ("--reference", str(images[name]))]
    return main(["fill", *flags, "--target", str(images["target"]), "--mask", str(images["mask"]), "-o", str(output),
                 "--model_path", str(ROOT / "checkpoints" / model), *TINY, *extra])


def test_fill_keeps_the_targets_size_and_every_pixel_outside_the_mask(images, tmp_path):
    output = tmp_path / "new" / "folder" / "out.png"  # parent folders are created
    assert fill(images, output) == 0
    result = np.asarray(Image.open(output))
    target = np.asarray(Image.open(images["target"]))
    hole = np.asarray(Image.open(images["mask"])) > 127
    assert result.shape == target.shape
    assert np.array_equal(result[~hole], target[~hole])
    assert not np.array_equal(result[hole], target[hole])
    assert [p.name for p in output.parent.iterdir()] == ["out.png"]  # no temporary file left behind


def test_same_seed_gives_the_same_bytes(images, tmp_path):
    assert fill(images, tmp_path / "a.png", "--seed", "7") == 0
    assert fill(images, tmp_path / "b.png", "--seed", "7") == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_num_samples_writes_stem_k_files_that_differ(images, tmp_path):
    assert fill(images, tmp_path / "out.jpg", "--num_samples", "2") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_0.jpg", "out_1.jpg"]  # out.jpg itself is not written
    first, second = (Image.open(tmp_path / f"out_{k}.jpg") for k in range(2))
    assert first.format == "JPEG" and first.size == (96, 80)
    assert not np.array_equal(np.asarray(first), np.asarray(second))


def test_output_paths_rule():
    assert output_paths("a/out.png", 1) == [Path("a/out.png")]
    assert output_paths("a/out.png", 3) == [Path(f"a/out_{k}.png") for k in range(3)]


def test_two_references_with_a_one_reference_model_are_training_free_multi_reference(images, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="leftrefill")
    assert fill(images, tmp_path / "out.png", references=("reference", "reference_2")) == 0
    assert Image.open(tmp_path / "out.png").size == (96, 80)
    assert "2 references: training-free multi-reference" in caplog.text


def test_a_multiview_model_directory_takes_the_multiview_pipeline(images, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="leftrefill")
    assert fill(images, tmp_path / "one.png", model="tiny_random_multiview") == 0  # 2 views: 1 reference
    assert "multi-view model (2 views)" in caplog.text
    code = fill(images, tmp_path / "two.png", model="tiny_random_multiview", references=("reference", "reference_2"))
    assert code == 2 and "give 1 reference, got 2" in caplog.text
    assert not (tmp_path / "two.png").exists()


def test_a_model_of_another_task_is_one_error(images, tmp_path, caplog):
    assert fill(images, tmp_path / "out.png", model="tiny_random_nvs") == 2
    assert "PromptCLIPEmbedder" in caplog.records[-1].getMessage()
    assert not (tmp_path / "out.png").exists()


def test_missing_mask_file_is_named_with_status_2(images, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fill", "--reference", str(images["reference"]), "--target", str(images["target"]),
              "--mask", str(tmp_path / "nope.png"), "-o", str(tmp_path / "out.png")])
    assert exit_info.value.code == 2
    assert f"leftrefill fill: error: --mask {tmp_path / 'nope.png'}: file not found" in capsys.readouterr().err


@pytest.mark.parametrize("steps, message", [("0", "--steps must be an integer in [1, 999], got 0"),
                                            ("ten", "argument --steps: invalid int value: 'ten'")])
def test_bad_steps_value_is_named_with_status_2(images, tmp_path, capsys, steps, message):
    with pytest.raises(SystemExit) as exit_info:
        fill(images, tmp_path / "out.png", "--steps", steps)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("flags, message", [(["-o", "out.gif"], "the suffix picks the format"),
                                            (["--test_size", "100"], "--test_size must be a positive multiple of 64"),
                                            (["--num_samples", "0"], "--num_samples must be at least 1")])
def test_bad_output_and_sizes_are_named(images, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["fill", "--reference", str(images["reference"]), "--target", str(images["target"]),
              "--mask", str(images["mask"]), "-o", "out.png", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_unreadable_image_is_named(images, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(SystemExit):
        main(["fill", "--reference", str(broken), "--target", str(images["target"]), "--mask", str(images["mask"]),
              "-o", str(tmp_path / "out.png")])
    assert f"--reference {broken}: not an image file Pillow can read" in capsys.readouterr().err


def test_nvs_writes_a_test_size_view(images, tmp_path):
    output = tmp_path / "view.png"
    code = main(["nvs", "--reference", str(images["reference"]), "--pose", "0", "-30", "0", "-o", str(output),
                 "--model_path", str(ROOT / "checkpoints" / "tiny_random_nvs"), *TINY])
    assert code == 0
    assert Image.open(output).size == (64, 64)


def test_realfill_fills_at_the_targets_size(images, tmp_path):
    output = tmp_path / "filled.png"
    code = main(["realfill", "--target", str(images["target"]), "--mask", str(images["mask"]), "-o", str(output),
                 "--model_path", str(ROOT / "checkpoints" / "tiny_random_realfill"), "--random_init", "--device", "cpu",
                 "--steps", "2", "--resolution", "64"])
    assert code == 0
    assert Image.open(output).size == (96, 80)


def test_realfill_needs_its_run_directory(images, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["realfill", "--target", str(images["target"]), "--mask", str(images["mask"]), "-o", "out.png"])
    assert exit_info.value.code == 2 and "--model_path" in capsys.readouterr().err


def test_python_m_leftrefill_help_lists_the_subcommands():
    result = subprocess.run([sys.executable, "-m", "leftrefill", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    assert "{fill,nvs,realfill}" in result.stdout and "out_k.png" in result.stdout
