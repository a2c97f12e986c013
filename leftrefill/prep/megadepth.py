"""MegaDepth pair mining from LoFTR's scene index files (METHOD 1.11), and the multi-view extension.

A LoFTR index file ``<scene>_<lo>_<hi>.npz`` holds ``image_paths`` (paths relative to the MegaDepth root,
some None) and ``pair_infos`` (entries ``((i, j), overlap, central_matches)``), both numpy object
arrays, i.e. pickles. ``read_scene_index`` unpickles them with ``leftrefill.prep.safe_pickle``: the pickle
may name only checked stand-ins for numpy's dtype, array and scalar rebuilders (simple dtypes, arrays whose
data matches their shape), never a numpy function or any other global, and the result must be the object
array that the ``.npy`` header announces.
"""

from __future__ import annotations

import logging
import math
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leftrefill.prep.safe_pickle import SafePickleError, safe_load

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("image_paths", "pair_infos")


class IndexFileError(ValueError):
    """A scene index file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class SceneIndex:
    path: Path
    image_paths: list[str | None]  # relative to the MegaDepth root
    pairs: list[tuple[int, int, float]]  # (i, j, overlap)


def read_npz_array(archive: zipfile.ZipFile, key: str, path: Path) -> np.ndarray:
    """One array of an ``.npz``; object arrays through :func:`safe_load`, checked against the header.
    Every failure is an IndexFileError naming ``path`` and ``key``."""
    try:
        info = archive.getinfo(f"{key}.npy")
        with archive.open(info) as member:
            shape, dtype = npy_header(member)
            if not dtype.hasobject:
                if math.prod(shape) * dtype.itemsize > info.file_size:  # read_array allocates this first
                    raise IndexFileError(f"{path}: '{key}': the header announces a {dtype} array of shape "
                                         f"{shape}, more data than the file holds")
                member.seek(0)
                return np.lib.format.read_array(member, allow_pickle=False)
            array = safe_load(member)
    except IndexFileError:
        raise
    except SafePickleError as err:
        raise IndexFileError(f"{path}: '{key}' is not a plain numpy array: {err}") from None
    except Exception as err:  # noqa: BLE001  (a corrupt member fails in many ways; all mean "bad file")
        raise IndexFileError(f"{path}: '{key}' cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(array, np.ndarray) or array.dtype != object or array.shape != shape:
        found = (f"an array {array.dtype} {array.shape}" if isinstance(array, np.ndarray)
                 else f"a {type(array).__name__}")
        raise IndexFileError(f"{path}: '{key}': the .npy header announces an object array of shape {shape}, "
                             f"but its pickle holds {found}")
    return array


def npy_header(member: Any) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of the ``.npy`` stream ``member``, left just after the header."""
    version = np.lib.format.read_magic(member)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(member)
    return shape, dtype


def read_scene_index(path: str | Path) -> SceneIndex:
    """``image_paths`` and ``(i, j, overlap)`` pairs of one LoFTR scene index file."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise IndexFileError(f"{path}: not a readable .npz file ({err})") from None
    with archive:
        names = {name.removesuffix(".npy") for name in archive.namelist()}
        missing = [key for key in REQUIRED_KEYS if key not in names]
        if missing:
            raise IndexFileError(f"{path}: no {', '.join(missing)} in it (a LoFTR scene index holds "
                                 f"image_paths and pair_infos; found {', '.join(sorted(names)) or 'nothing'})")
        image_paths = [None if p is None else str(p) for p in read_npz_array(archive, "image_paths", path)]
        pairs = [_pair_info(row, path, image_paths) for row in read_npz_array(archive, "pair_infos", path)]
    return SceneIndex(path, image_paths, pairs)


def _pair_info(row: Any, path: Path, image_paths: list) -> tuple[int, int, float]:
    """(i, j, overlap) of one pair_infos entry: a tuple, or a row of an (N, 3) object array."""
    try:
        (i, j), overlap = row[0], row[1]
        i, j, overlap = int(i), int(j), float(overlap)
    except (TypeError, ValueError, IndexError, OverflowError):
        raise IndexFileError(f"{path}: a pair_infos entry is not ((i, j), overlap, ...): {row!r:.80}") from None
    if not (0 <= i < len(image_paths) and 0 <= j < len(image_paths)):
        raise IndexFileError(f"{path}: pair ({i}, {j}) points outside image_paths ({len(image_paths)} images)")
    if not math.isfinite(overlap):  # NaN passes every range test; the JSON manifests cannot hold it
        raise IndexFileError(f"{path}: pair ({i}, {j}) has overlap {overlap}, not a finite number")
    return i, j, overlap


# -- mining --------------------------------------------------------------------------------------------
@dataclass
class MinedPairs:
    """Image table and pairs, in the layout of docs/data.md; ids in order of first appearance."""
    images: dict[int, str] = field(default_factory=dict)  # id -> path relative to the MegaDepth root
    # split -> pair rows in the manifest's keys {id, source (the reference), target, scene, overlap}
    pairs: dict[str, list[dict]] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    missing_examples: list[str] = field(default_factory=list)
    _ids: dict[str, int] = field(default_factory=dict)

    def note_missing(self, paths: list[str], keep: int = 20) -> None:
        for path in paths:
            if len(self.missing_examples) < keep and path not in self.missing_examples:
                self.missing_examples.append(path)

    def image_id(self, relative: str) -> int:
        if relative not in self._ids:
            self._ids[relative] = len(self._ids)
            self.images[self._ids[relative]] = relative
        return self._ids[relative]


def scene_of(relative: str) -> str:
    """``Undistorted_SfM/<scene>/images/<file>`` -> ``<scene>`` (the original sampler's key)."""
    parts = Path(relative).parts
    return parts[-3] if len(parts) >= 3 else ""


def mine_pairs(mined: MinedPairs, split: str, index_files: Iterable[Path], root: Path,
               overlap_range: tuple[float, float] | None) -> None:
    """Add the pairs of ``index_files`` to ``mined[split]``: overlap within ``overlap_range`` (inclusive;
    None keeps every pair), both images known and present under ``root``."""
    rows = mined.pairs.setdefault(split, [])
    exists: dict[str, bool] = {}
    for index_file in index_files:
        index = read_scene_index(index_file)
        for i, j, overlap in index.pairs:
            if overlap_range is not None and not overlap_range[0] <= overlap <= overlap_range[1]:
                mined.skipped[f"{split}: overlap outside range"] += 1
                continue
            reference, target = index.image_paths[i], index.image_paths[j]
            if reference is None or target is None:
                mined.skipped[f"{split}: image path is None"] += 1
                continue
            absent = [p for p in (reference, target) if not exists.setdefault(p, (root / p).is_file())]
            if absent:
                mined.skipped[f"{split}: image missing on disk"] += 1
                mined.note_missing(absent)
                continue
            rows.append({"id": len(rows), "source": mined.image_id(reference), "target": mined.image_id(target),
                         "scene": scene_of(target), "overlap": round(overlap, 6)})


def scene_counts(rows: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(row["scene"] for row in rows).items()))


def drop_small_scenes(rows: list[dict], minimum: int) -> tuple[list[dict], list[str]]:
    """Rows of the scenes with at least ``minimum`` pairs (ids renumbered from 0), and the dropped scenes."""
    counts = Counter(row["scene"] for row in rows)
    small = sorted(scene for scene, count in counts.items() if count < minimum)
    kept = [row for row in rows if counts[row["scene"]] >= minimum]
    return [{**row, "id": new_id} for new_id, row in enumerate(kept)], small


# -- multi-view extension (METHOD 1.11, extend_data_for_multiview) ---------------------------------------
def covisible_neighbours(index_files: Iterable[Path], min_overlap: float,
                         root: Path | None = None) -> dict[str, dict[str, float]]:
    """{image path: {other image path: overlap}} over every index pair with overlap >= ``min_overlap``,
    in both directions (the index lists each unordered pair once). With ``root``, images that are not
    on disk under it are left out."""
    neighbours: dict[str, dict[str, float]] = defaultdict(dict)
    exists: dict[str, bool] = {}
    for index_file in index_files:
        index = read_scene_index(index_file)
        for i, j, overlap in index.pairs:
            a, b = index.image_paths[i], index.image_paths[j]
            if a is None or b is None or overlap < min_overlap:
                continue
            if root is not None and not all(exists.setdefault(p, (root / p).is_file()) for p in (a, b)):
                continue
            neighbours[a][b] = max(overlap, neighbours[a].get(b, 0.0))
            neighbours[b][a] = max(overlap, neighbours[b].get(a, 0.0))
    return neighbours


def extend_pair(reference: str, target: str, neighbours: dict[str, dict[str, float]], rng: np.random.Generator,
                num_extra: int = 3) -> list[str]:
    """Up to ``num_extra`` extra references of ``target``: co-visible images other than the pair's own,
    drawn without replacement (sorted candidates, so the draw depends only on the seed)."""
    candidates = sorted(p for p in neighbours.get(target, {}) if p not in (reference, target))
    if len(candidates) <= num_extra:
        return candidates
    return [candidates[k] for k in sorted(rng.choice(len(candidates), size=num_extra, replace=False))]
