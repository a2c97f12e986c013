"""Default paths (leftrefill.paths): the documented search order, never the working directory alone, and the
copies installed with the package standing in for a missing project folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ldm.checkpoint import CheckpointError
from leftrefill import paths
from leftrefill.model_dir import resolve_model_dir
import test_multiview_inpainting
from leftrefill.nvs_pipeline import DEFAULT_MODEL_DIR as NVS_MODEL_DIR
from leftrefill.pipeline import DEFAULT_BASE_CKPT, DEFAULT_MODEL_DIR, LeftRefillPipeline
from leftrefill.realfill_training import DEFAULT_CONFIG
from leftrefill.train_config import load_training_config
from ldm.util import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RELEASED = "epoch=7-step=6039.ckpt"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """The working directory is an empty folder; $LEFTREFILL_HOME is unset."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv(paths.HOME_VARIABLE, raising=False)
    return work


def _model_dir(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model_config.yaml").write_text((ROOT / "checkpoints/tiny_random/model_config.yaml").read_text())
    return folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_default_name_is_searched_home_then_project_then_installed_copies_then_working_directory(
        elsewhere, tmp_path, monkeypatch):
    name = str(DEFAULT_MODEL_DIR)
    assert paths.locate(name, "checkpoints") == ROOT / "checkpoints" / name  # the project folder
    _model_dir(elsewhere / name)  # the working directory comes last: the project's copy still wins
    assert paths.locate(name, "checkpoints") == ROOT / "checkpoints" / name
    home = tmp_path / "home"
    monkeypatch.setenv(paths.HOME_VARIABLE, str(home))
    _model_dir(home / "checkpoints" / name)
    assert paths.locate(name, "checkpoints") == home / "checkpoints" / name  # $LEFTREFILL_HOME first
    monkeypatch.delenv(paths.HOME_VARIABLE)
    monkeypatch.setattr(paths, "project_folder", lambda: None)  # an installed wheel: no project folder
    assert paths.locate(name, "checkpoints") == paths.RESOURCES / "checkpoints" / name


def test_every_default_is_a_default_name():
    assert {str(DEFAULT_MODEL_DIR), str(NVS_MODEL_DIR), test_multiview_inpainting.DEFAULT_MODEL_DIR} == set(
        paths.DEFAULT_NAMES["checkpoints"])
    assert paths.DEFAULT_NAMES["pretrained_models"] == (str(DEFAULT_BASE_CKPT),)
    assert paths.DEFAULT_NAMES["configs"] == (str(DEFAULT_CONFIG),)


def test_a_typed_name_is_the_working_directorys_first_then_searched(elsewhere, tmp_path, monkeypatch):
    name = "tiny_random"  # e.g. a training run written to ./tiny_random
    assert paths.locate(name, "checkpoints") == ROOT / "checkpoints" / name  # not here: the project folder's
    _model_dir(elsewhere / name)
    assert paths.locate(name, "checkpoints") == Path(name)  # what the user typed, as typed
    (elsewhere / name / "model_config.yaml").unlink()
    (elsewhere / name).rmdir()
    home = tmp_path / "home"
    monkeypatch.setenv(paths.HOME_VARIABLE, str(home))
    _model_dir(home / "checkpoints" / name)
    assert paths.locate(name, "checkpoints") == home / "checkpoints" / name  # then $LEFTREFILL_HOME
    monkeypatch.delenv(paths.HOME_VARIABLE)
    assert paths.sample_folder("samples") == ROOT / "data" / "samples" and paths.sample_folder("none") is None
    monkeypatch.setattr(paths, "project_folder", lambda: None)  # an installed wheel: no project folder
    assert paths.locate(name, "checkpoints") == paths.RESOURCES / "checkpoints" / name
    assert paths.sample_folder("samples") is None
    assert paths.locate("only_here", "checkpoints") == Path("only_here")  # nowhere else: the working directory
    _model_dir(elsewhere / "only_here")
    assert resolve_model_dir("only_here").config == Path("only_here/model_config.yaml")


def test_a_path_with_a_folder_is_used_as_given_then_searched_under_the_roots(elsewhere, tmp_path, monkeypatch):
    given = Path("checkpoints/tiny_random")
    assert paths.locate(given, "checkpoints") == ROOT / given  # the documented command from another folder
    _model_dir(elsewhere / given)
    assert paths.locate(given, "checkpoints") == given  # the working directory has it: as typed
    absolute = tmp_path / "nowhere" / "model"
    assert paths.candidates(absolute, "checkpoints") == [absolute]
    monkeypatch.setattr(paths, "project_folder", lambda: None)
    # the working directory's checkpoints/ lacks it, there is no project folder: the installed copy
    assert paths.locate("checkpoints/ref_guided_inpainting", "checkpoints") == (
        paths.RESOURCES / "checkpoints" / "ref_guided_inpainting")
    assert paths.locate("configs/realfill.yaml", "configs") == paths.RESOURCES / "configs" / "realfill.yaml"
    with pytest.raises(ValueError, match="kind must be one of"):
        paths.candidates("x", "weights")


def test_the_default_model_resolves_from_any_folder_with_the_released_tokens(elsewhere, monkeypatch):
    shipped = resolve_model_dir(DEFAULT_MODEL_DIR)
    assert shipped.config == ROOT / "checkpoints" / "ref_guided_inpainting" / "model_config.yaml"
    assert shipped.weights.name == RELEASED
    monkeypatch.setattr(paths, "project_folder", lambda: None)
    installed = resolve_model_dir(DEFAULT_MODEL_DIR)
    assert installed.config.is_relative_to(paths.RESOURCES)
    assert _sha256(installed.weights) == _sha256(shipped.weights)


def test_every_model_directory_and_config_of_the_project_is_an_installed_copy():
    """checkpoints/<name>/model_config.yaml and configs/ point into leftrefill/resources (one copy, shipped)."""
    configs = sorted((ROOT / "checkpoints").glob("*/model_config.yaml"))
    assert len(configs) == 10
    for config in configs:
        assert config.is_symlink() and config.resolve() == paths.RESOURCES / "checkpoints" / config.parent.name / (
            "model_config.yaml")
    assert (ROOT / "configs").resolve() == paths.RESOURCES / "configs"
    released = ROOT / "checkpoints" / "ref_guided_inpainting" / "ckpts" / RELEASED
    assert released.resolve() == paths.RESOURCES / "checkpoints" / "ref_guided_inpainting" / "ckpts" / RELEASED


def test_missing_files_name_every_place_searched(elsewhere, tmp_path, monkeypatch):
    home, project = tmp_path / "home", tmp_path / "project"  # a project folder without an SD2 checkpoint, even
    (project / "checkpoints").mkdir(parents=True)             # where this checkout has one
    monkeypatch.setenv(paths.HOME_VARIABLE, str(home))
    monkeypatch.setattr(paths, "project_folder", lambda: project)
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_dir("no_such_model")
    message = str(info.value)
    assert message == (f"--model_path no_such_model: no such model directory (looked in: {elsewhere / 'no_such_model'}, "
                       f"{home / 'checkpoints/no_such_model'}, {project / 'checkpoints/no_such_model'}, "
                       f"{paths.RESOURCES / 'checkpoints/no_such_model'})")
    with pytest.raises(CheckpointError) as info:
        LeftRefillPipeline.from_model_dir(device="cpu")  # the released tokens, no SD2 checkpoint anywhere
    message = str(info.value)
    assert message.startswith(f"base SD2 checkpoint not found: {DEFAULT_BASE_CKPT} (looked in: ")
    assert str(home / "pretrained_models" / DEFAULT_BASE_CKPT) in message
    assert str(project / "pretrained_models" / DEFAULT_BASE_CKPT) in message and "$LEFTREFILL_HOME" in message
    with pytest.raises(ConfigError, match=r"training config not found: nothing\.yaml \(looked in: .*home/configs"):
        load_training_config("nothing.yaml")


def test_the_realfill_training_config_loads_by_name_from_any_folder(elsewhere, monkeypatch):
    scene = ["data.params.scene=scene"]
    assert load_training_config(DEFAULT_CONFIG, scene).model.config == "checkpoints/realfill/model_config.yaml"
    monkeypatch.setattr(paths, "project_folder", lambda: None)
    assert load_training_config(DEFAULT_CONFIG, scene).trainer.max_steps == 2000
