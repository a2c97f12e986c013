"""The package as users install it: a wheel built from the package files alone, installed into a fresh virtual
environment, works from an unrelated folder (library, console script, ``python -m leftrefill``, the shipped
model configs and released tokens), and its metadata uses the PEP 639 licence fields.

The fresh environment borrows the test environment's dependencies (torch, ...) through a ``.pth`` line, which
does not run the test environment's own ``.pth`` files: the editable install of this checkout stays out.
"""

from __future__ import annotations

import email
import hashlib
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FILES = ("pyproject.toml", "README.md", "LICENSE", "requirements.txt", "ldm", "leftrefill")
RELEASED = "leftrefill/resources/checkpoints/ref_guided_inpainting/ckpts/epoch=7-step=6039.ckpt"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built without build isolation (no download) from a copy of the files packaging reads."""
    source = tmp_path_factory.mktemp("source")
    for name in PACKAGE_FILES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copyfile
        kwargs = {"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}
        copy(ROOT / name, source / name, **kwargs)
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-q", "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = out.glob("leftrefill-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh(wheel, tmp_path_factory) -> Path:
    """A new virtual environment with the wheel installed; returns its bin/ folder."""
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    (purelib,) = env.glob("lib/python*/site-packages")
    (purelib / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install",
                             "--no-deps", "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return env / "bin"


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """An unrelated working directory holding a reference, a target and a mask."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "reference.png")
    Image.fromarray(rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)).save(tmp_path / "target.png")
    mask = np.zeros((48, 56), np.uint8)
    mask[10:30, 15:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path


def _run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}  # no PYTHONPATH, no $LEFTREFILL_HOME
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_holds_the_code_the_configs_the_released_tokens_and_pep_639_metadata(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(f"{dist_info}/METADATA"))
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
        released = archive.read(RELEASED)
    assert {"ldm/unet.py", "leftrefill/commands.py", "leftrefill/paths.py", RELEASED,
            "leftrefill/resources/configs/realfill.yaml", "leftrefill/resources/configs/sd2_inpainting.yaml",
            "leftrefill/resources/checkpoints/ref_guided_inpainting/SOURCES.md"} <= names
    model_configs = {n.split("/")[3] for n in names if n.endswith("/model_config.yaml")}
    assert model_configs == {p.parent.name for p in (ROOT / "checkpoints").glob("*/model_config.yaml")}
    assert not any(n.startswith(("tests/", "data/", "scripts/", "checkpoints/")) for n in names)
    assert hashlib.sha256(released).hexdigest() == hashlib.sha256((ROOT / RELEASED).read_bytes()).hexdigest()
    assert metadata["License-Expression"] == "Apache-2.0" and metadata["License-File"] == "LICENSE"
    assert f"{dist_info}/licenses/LICENSE" in names
    assert "leftrefill = leftrefill.commands:main" in entry_points


def test_the_installed_library_finds_its_shipped_files_from_any_folder(fresh, elsewhere):
    code = ("import leftrefill, leftrefill.paths as p; from leftrefill.model_dir import resolve_model_dir;"
            "m = resolve_model_dir('ref_guided_inpainting'); t = resolve_model_dir('tiny_random');"
            "print(leftrefill.__file__, p.project_folder(), m.config, m.weights.name, t.weights, p.sample_folder('samples'),"
            " sep='\\n')")
    result = _run([fresh / "python", "-c", code], elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    module, project, config, weights, tiny, samples = result.stdout.split()
    resources = Path(module).parent / "resources" / "checkpoints"
    assert Path(module).is_relative_to(fresh.parent) and project == samples == "None"  # no demo photos shipped
    assert Path(config) == resources / "ref_guided_inpainting" / "model_config.yaml"
    assert (weights, tiny) == ("epoch=7-step=6039.ckpt", "None")


def test_the_console_script_fills_a_pair_from_any_folder(fresh, elsewhere):
    for command in ([fresh / "leftrefill", "--help"], [fresh / "python", "-m", "leftrefill", "fill", "--help"]):
        result = _run(command, elsewhere)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-3000:]
    inputs = ["--reference", "reference.png", "--target", "target.png", "--mask", "mask.png"]
    result = _run([fresh / "leftrefill", "fill", *inputs, "-o", "out.png", "--model_path", "tiny_random",
                   "--random_init", "--device", "cpu", "--steps", "2", "--test_size", "64"], elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(elsewhere / "out.png").size == (56, 48)
    # the default model is the shipped one (released tokens); the SD2 checkpoint is the user's to supply
    result = _run([fresh / "leftrefill", "fill", *inputs, "-o", "default.png", "--device", "cpu"], elsewhere)
    assert result.returncode == 2 and not (elsewhere / "default.png").exists()
    assert "base SD2 checkpoint not found: 512-inpainting-ema.ckpt (looked in: " in result.stderr
    assert "$LEFTREFILL_HOME" in result.stderr and "Traceback" not in result.stderr
