"""Objaverse object lists for novel view synthesis (METHOD 2.2): scan the Zero-1-to-3 renders, keep the
complete objects, split them into train and test.

Layout (the Zero-1-to-3 render release): ``views_release/<uid>/000.png ... 011.png`` (RGBA renders) and
``000.npy ... 011.npy`` (3x4 world-to-camera [R | t] matrices). An object is *complete* when, for every
view index 0 .. num_views - 1, both files exist, the camera's ``.npy`` header announces a real (3, 4)
array (checked before any data is read, so a header claiming a huge array costs nothing), the array
loads with ``allow_pickle=False`` and is finite, and the image is a PNG whose chunks pass PIL's
``verify`` (pixels are not decoded, which keeps a scan of ~800k objects I/O-bound; a header claiming more
pixels than PIL's decompression-bomb limit is unreadable). Other objects are skipped with a reason.

Split rule (hash-based, so that it is stable when objects are added or removed): each uid gets
``u = int(sha256(f"{seed}:{uid}")[:8 bytes], big endian) / 2**64`` in [0, 1). With ``test_fraction`` the
uid is a test object iff ``u < test_fraction``, a decision that depends on the uid and the seed alone.
With ``num_test`` the test objects are the ``num_test`` uids of lowest ``u`` (ties by uid); adding
objects can then only push boundary objects from test to train, never the other way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from leftrefill.atomic import write_text_atomic

log = logging.getLogger(__name__)

NUM_VIEWS = 12
TRAIN_LIST = "obj_train.txt"
TEST_LIST = "obj_test.txt"
REPORT = "objaverse_report.json"
REPORT_FORMAT = "leftrefill-objaverse-report"
VERSION = 1
MAX_EXAMPLES = 10  # skipped uids listed per reason in the report
PROGRESS_EVERY = 50_000
# Checked in this order; an object is skipped for the first failure found.
SKIP_REASONS = ("bad_uid", "missing_png", "missing_npy", "unreadable_npy", "bad_camera_dtype",
                "bad_camera_shape", "nonfinite_camera", "unreadable_png")
_NPY_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)
# PIL raises SyntaxError for broken PNG chunks, DecompressionBombError (not an OSError) for huge headers.
_PNG_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ObjaverseError(ValueError):
    """The views folder or a split setting is unusable; the message names the folder or setting."""


class NoCompleteObjects(ObjaverseError):
    """Object folders were found but none is complete; the report says why each was skipped."""


@dataclass(frozen=True)
class ObjectCheck:
    """Outcome of checking one ``<uid>`` folder: ``reason`` is None for a complete object, otherwise one
    of SKIP_REASONS, with ``detail`` naming the offending file (e.g. ``"005.png: missing"``)."""

    uid: str
    reason: str | None = None
    detail: str = ""

    @property
    def complete(self) -> bool:
        return self.reason is None


# ---------------------------------------------------------------------------------------------- scanning


def scan_views(views_root: str | Path, num_views: int = NUM_VIEWS, workers: int = 1) -> list[ObjectCheck]:
    """Check every ``<uid>`` folder of ``views_root``; returns one ObjectCheck per folder, sorted by uid.

    Hidden entries (name starting with ".") and plain files are not objects. ``workers`` > 1 checks
    objects in that many threads (the work is file reads); the result does not depend on it.
    """
    views_root = Path(views_root)
    if not views_root.is_dir():
        raise ObjaverseError(f"{views_root}: views_root is not a folder")
    if num_views < 1 or workers < 1:
        raise ObjaverseError(f"num_views and workers must be >= 1, got {num_views} and {workers}")
    folders = sorted((p for p in views_root.iterdir() if not p.name.startswith(".") and p.is_dir()),
                     key=lambda p: p.name)
    log.info("checking %d object folders in %s", len(folders), views_root)
    checks = []
    for check in _check_all(folders, num_views, workers):
        checks.append(check)
        if len(checks) % PROGRESS_EVERY == 0:
            log.info("checked %d / %d objects", len(checks), len(folders))
    return checks


def _check_all(folders: Sequence[Path], num_views: int, workers: int) -> Iterator[ObjectCheck]:
    """check_object of each folder, in the order of ``folders``."""
    check = functools.partial(check_object, num_views=num_views)
    if workers == 1:
        yield from map(check, folders)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:  # map keeps the input order
        yield from pool.map(check, folders)


def check_object(folder: str | Path, num_views: int = NUM_VIEWS) -> ObjectCheck:
    """Whether ``folder`` (``views_release/<uid>``) holds a complete object; see the module docstring."""
    folder = Path(folder)
    uid = folder.name
    if not uid.isprintable() or any(ch.isspace() for ch in uid):
        # A uid is one line of obj_train.txt / obj_test.txt, so it must not contain whitespace.
        return ObjectCheck(uid, "bad_uid", f"{uid!r}: whitespace or unprintable characters")
    names = [f"{index:03d}" for index in range(num_views)]
    # Cheapest checks first: existence of every file, then the small cameras, then the images.
    for name in names:
        for suffix in (".png", ".npy"):
            if not (folder / f"{name}{suffix}").is_file():
                return ObjectCheck(uid, f"missing_{suffix[1:]}", f"{name}{suffix}: missing")
    for name in names:
        problem = _camera_problem(folder / f"{name}.npy")
        if problem is not None:
            return ObjectCheck(uid, problem[0], f"{name}.npy: {problem[1]}")
    for name in names:
        problem = _png_problem(folder / f"{name}.png")
        if problem is not None:
            return ObjectCheck(uid, "unreadable_png", f"{name}.png: {problem}")
    return ObjectCheck(uid)


def _camera_problem(path: Path) -> tuple[str, str] | None:
    """(reason, detail) when ``path`` is not a finite real (3, 4) world-to-camera matrix, else None.
    The header is checked first, so that no array of another shape or dtype is ever allocated."""
    try:
        with open(path, "rb") as file:
            shape, dtype = npy_header(file)
            if dtype.kind not in "iuf":
                return "bad_camera_dtype", f"dtype {dtype}, expected real numbers"
            if shape != (3, 4):
                return "bad_camera_shape", f"shape {shape}, expected (3, 4)"
            file.seek(0)
            camera = np.lib.format.read_array(file, allow_pickle=False)
    except _NPY_ERRORS as error:
        return "unreadable_npy", _one_line(error)
    if not np.isfinite(camera).all():
        return "nonfinite_camera", "NaN or infinite entries"
    return None


def npy_header(file: BinaryIO) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) announced by the header of the ``.npy`` stream ``file`` (ValueError if it has none)."""
    version = np.lib.format.read_magic(file)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not read here")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(file)
    return shape, dtype


def _png_problem(path: Path) -> str | None:
    """A description of what is wrong with the PNG at ``path``, or None when its chunks verify."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return f"not a PNG ({image.format})"
            image.verify()  # reads every chunk and checks its CRC; does not decode the pixels
    except _PNG_ERRORS as error:
        return _one_line(error)
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# --------------------------------------------------------------------------------------------- splitting


def split_key(uid: str, seed: int) -> float:
    """The uid's seeded hash position u in [0, 1): sha256 of ``f"{seed}:{uid}"``, first 8 bytes / 2**64."""
    digest = hashlib.sha256(f"{seed}:{uid}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_uids(uids: Iterable[str], seed: int = 0, test_fraction: float | None = None,
               num_test: int | None = None) -> tuple[list[str], list[str]]:
    """(train uids, test uids), each sorted; give exactly one of ``test_fraction`` (in [0, 1]) and
    ``num_test`` (in [0, number of uids]). The rule is in the module docstring."""
    unique = sorted(set(uids))
    _check_split_settings(test_fraction, num_test)
    if test_fraction is not None:
        test = {uid for uid in unique if split_key(uid, seed) < test_fraction}
    else:
        if num_test > len(unique):
            raise ObjaverseError(f"num_test {num_test} exceeds the {len(unique)} complete objects")
        test = set(sorted(unique, key=lambda uid: (split_key(uid, seed), uid))[:num_test])
    return [uid for uid in unique if uid not in test], [uid for uid in unique if uid in test]


# ------------------------------------------------------------------------------------------------ output


def build_report(checks: Sequence[ObjectCheck], train: Sequence[str], test: Sequence[str], *,
                 views_root: str | Path, num_views: int, seed: int, test_fraction: float | None,
                 num_test: int | None, max_examples: int = MAX_EXAMPLES) -> dict[str, Any]:
    """The ``objaverse_report.json`` content: settings, counts, skips by reason and a few skipped uids."""
    skipped = [check for check in checks if not check.complete]
    by_reason = {reason: [c for c in skipped if c.reason == reason] for reason in SKIP_REASONS}
    return {
        "format": REPORT_FORMAT,
        "version": VERSION,
        "views_root": str(views_root),
        "num_views": num_views,
        "split": {"rule": "sha256(f'{seed}:{uid}')[:8] / 2**64, test if below test_fraction "
                          "(or among the num_test lowest)",
                  "seed": seed, "test_fraction": test_fraction, "num_test": num_test},
        "counts": {"found": len(checks), "complete": len(checks) - len(skipped), "skipped": len(skipped),
                   "train": len(train), "test": len(test)},
        "skipped_by_reason": {reason: len(items) for reason, items in by_reason.items()},
        "skipped_examples": {reason: [{"uid": c.uid, "detail": c.detail} for c in items[:max_examples]]
                             for reason, items in by_reason.items() if items},
    }


def write_lists(out_dir: str | Path, train: Sequence[str], test: Sequence[str]) -> tuple[Path, Path]:
    """Write ``obj_train.txt`` and ``obj_test.txt`` (one uid per line) atomically; returns their paths."""
    out_dir = Path(out_dir)
    paths = (out_dir / TRAIN_LIST, out_dir / TEST_LIST)
    for path, uids in zip(paths, (train, test)):
        write_text_atomic(path, "".join(f"{uid}\n" for uid in uids))
    return paths


def write_report(out_dir: str | Path, report: dict[str, Any]) -> Path:
    """Write ``objaverse_report.json`` atomically; returns its path."""
    path = Path(out_dir) / REPORT
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    return path


def make_lists(views_root: str | Path, out_dir: str | Path, seed: int = 0, test_fraction: float | None = None,
               num_test: int | None = None, num_views: int = NUM_VIEWS, workers: int = 1) -> dict[str, Any]:
    """Scan, split and write the two lists and the report into ``out_dir``; returns the report.

    ``test_fraction`` defaults to 0.01 when ``num_test`` is not given either. Raises ObjaverseError for
    bad settings (before scanning), when ``views_root`` has no object folder and when ``num_test``
    exceeds the complete objects (nothing is written in these cases); NoCompleteObjects when no object
    is complete (only the report is written, earlier lists stay).
    """
    if test_fraction is None and num_test is None:
        test_fraction = 0.01
    _check_split_settings(test_fraction, num_test)
    checks = scan_views(views_root, num_views, workers)
    if not checks:
        raise ObjaverseError(f"{views_root}: no object folders found")
    complete = [check.uid for check in checks if check.complete]
    settings = dict(views_root=views_root, num_views=num_views, seed=seed, test_fraction=test_fraction,
                    num_test=num_test)
    if not complete:
        write_report(out_dir, build_report(checks, [], [], **settings))
        raise NoCompleteObjects(f"{views_root}: none of the {len(checks)} objects is complete "
                             f"(see {Path(out_dir) / REPORT})")
    train, test = split_uids(complete, seed, test_fraction, num_test)
    report = build_report(checks, train, test, **settings)
    write_lists(out_dir, train, test)
    write_report(out_dir, report)
    return report


def _check_split_settings(test_fraction: float | None, num_test: int | None) -> None:
    """The checks of split_uids that do not need the uids, so that bad settings fail before a long scan."""
    if (test_fraction is None) == (num_test is None):
        raise ObjaverseError("give exactly one of test_fraction and num_test")
    if test_fraction is not None and not 0.0 <= test_fraction <= 1.0:
        raise ObjaverseError(f"test_fraction must be in [0, 1], got {test_fraction}")
    if num_test is not None and num_test < 0:
        raise ObjaverseError(f"num_test must be >= 0, got {num_test}")
