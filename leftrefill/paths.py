"""Where default files are found: model directories, the SD2 checkpoint, training configs, LPIPS weights.

The defaults are the bare names of :data:`DEFAULT_NAMES` (``ref_guided_inpainting``, ``512-inpainting-ema.ckpt``,
``realfill.yaml``, ...), never paths relative to the working directory. They are looked up in this order, the
first hit wins:

1. ``$LEFTREFILL_HOME/<kind>/<name>``: a folder laid out as the project (``checkpoints/``,
   ``pretrained_models/``, ``configs/``), for weights kept outside the code;
2. ``<project>/<kind>/<name>``: the project folder, the source checkout this package is imported from (the
   folder holding ``pyproject.toml`` beside ``leftrefill/``); absent for an installed wheel;
3. ``leftrefill/resources/<kind>/<name>``: the copies installed with the package: every model directory's
   ``model_config.yaml``, the released prompt tokens in ``ref_guided_inpainting``, the training configs;
4. ``./<name>``: the working directory, last.

Any other relative path (a name or path the user typed: ``my_run``, ``checkpoints/my_run``, ``tiny_random``) is
first what it means to the working directory; when that does not exist it is looked up as 1 to 3 say (a bare
name under ``<kind>/``, ``checkpoints/<name>`` and ``configs/<name>`` under the installed copies too), so the
documented commands work from any folder. An absolute path is used as it is. ``<kind>`` is ``checkpoints``
(model directories), ``pretrained_models`` (the SD2 checkpoint, LPIPS' AlexNet) or ``configs``.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_VARIABLE = "LEFTREFILL_HOME"
KINDS = ("checkpoints", "pretrained_models", "configs")
# The defaults of the scripts and pipelines, by kind: the roots before the working directory (module docstring)
DEFAULT_NAMES = {
    "checkpoints": ("ref_guided_inpainting", "nvs_objaverse", "multiview_ref_inpainting"),
    "pretrained_models": ("512-inpainting-ema.ckpt",),
    "configs": ("realfill.yaml",),
}
PACKAGE = Path(__file__).resolve().parent
RESOURCES = PACKAGE / "resources"  # installed with the package (pyproject.toml [tool.setuptools.package-data])


def project_folder() -> Path | None:
    """The source checkout this package is imported from, or None (an installed wheel)."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "checkpoints").is_dir() else None


def sample_folder(name: str) -> Path | None:
    """The project folder's ``data/<name>`` (the demo's examples), or None: an installed wheel ships no photos."""
    root = project_folder()
    return root / "data" / name if root is not None and (root / "data" / name).is_dir() else None


def home_folder() -> Path | None:
    """``$LEFTREFILL_HOME`` when set (it need not exist yet), else None."""
    value = os.environ.get(HOME_VARIABLE, "").strip()
    return Path(value).expanduser() if value else None


def search_roots() -> list[Path]:
    """The folders searched before the installed copies: ``$LEFTREFILL_HOME``, then the project folder."""
    return [root for root in (home_folder(), project_folder()) if root is not None]


def candidates(path: str | Path, kind: str) -> list[Path]:
    """Every place ``path`` is looked for, in order (module docstring); the working directory's entries are
    relative paths."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path).expanduser()
    if path.is_absolute():
        return [path]
    bundled_kind = (RESOURCES / kind) if kind != "pretrained_models" else None
    if len(path.parts) == 1:  # a bare name: under <kind>/ of each root
        roots = [root / kind / path for root in search_roots()] + ([bundled_kind / path] if bundled_kind else [])
        return roots + [path] if str(path) in DEFAULT_NAMES[kind] else [path, *roots]
    found = [path] + [root / path for root in search_roots()]
    if bundled_kind is not None and path.parts[0] == kind:
        found.append(RESOURCES.joinpath(*path.parts))
    return found


def locate(path: str | Path, kind: str) -> Path:
    """The first existing place of ``path`` (``candidates``); when none exists, ``path`` itself, so the
    caller's own "not found" message names what the user gave (``searched`` lists where it looked)."""
    for candidate in candidates(path, kind):
        if candidate.exists():
            return candidate
    return Path(path).expanduser()


def looked_in(path: str | Path, kind: str) -> str:
    """Where ``path`` was looked for, for an error message: ``" (looked in: a, b, c)"`` (absolute paths), or
    ``""`` for an absolute path (the only place is the path itself)."""
    if Path(path).expanduser().is_absolute():
        return ""
    return f" (looked in: {', '.join(str(p.absolute()) for p in candidates(path, kind))})"
