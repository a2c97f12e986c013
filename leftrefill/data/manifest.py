"""Training pair manifests (docs/data.md): the JSON image table and pair manifest, and the original
LeftRefill pickles (``image_dict.pkl`` + ``train_pairs.pkl`` / ``new_train_pairs.pkl``).

``read_pairs`` turns either into a list of :class:`Pair` with ready-to-open image paths; the writers are
what the data-preparation scripts call; ``drop_missing_images`` skips pairs whose images are absent.
The files name a pair's reference image ``source`` (``sources`` in the multi-view manifest), as the
original release did; in code it is ``reference`` everywhere.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldm.pickle_scan import clip
from leftrefill.atomic import write_text_atomic
from leftrefill.prep.safe_pickle import SafePickleError, safe_load, short_repr  # for the original .pkl files

log = logging.getLogger(__name__)

IMAGES_FORMAT = "leftrefill-images"
PAIRS_FORMAT = "leftrefill-pairs"
MULTIVIEW_FORMAT = "leftrefill-multiview-pairs"
VERSION = 1
JSON_SUFFIXES = (".json",)
PICKLE_SUFFIXES = (".pkl", ".pickle")
# A pair row's keys in the file ("source" is the reference); "overlap" is optional (null when unknown).
PAIR_KEYS = ("id", "source", "target", "scene")
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux: a longer string names no file


class ManifestError(ValueError):
    """A manifest or image table is missing, malformed or unsafe; the message names the file."""


@dataclass(frozen=True)
class Pair:
    """One training pair. ``reference`` is the reference image, ``target`` the image to synthesise; both
    are absolute or relative to the current directory, ready to open. ``overlap`` is None when unknown."""

    id: int
    reference: Path
    target: Path
    scene: str
    overlap: float | None


@dataclass(frozen=True)
class MultiViewPair:
    """One target with several references (the multi-view extension): ``references[0]`` is the pair's
    own reference, the others are extra co-visible views of the same target."""

    id: int
    references: tuple[Path, ...]
    target: Path
    scene: str


# ----------------------------------------------------------------------------------------------- reading


def read_pairs(pairs_path: str | Path, images_path: str | Path | None = None) -> list[Pair]:
    """The pairs of a ``.json`` pair manifest or an original ``.pkl`` pair list, in file order.

    ``images_path`` (an image table ``.json`` or an ``image_dict.pkl``) overrides the manifest's ``images``
    field; an original ``.pkl`` pair list has no such field, so there it is required.
    """
    pairs_path = Path(pairs_path)
    suffix = pairs_path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _read_json_pairs(pairs_path, None if images_path is None else Path(images_path))
    if suffix in PICKLE_SUFFIXES:
        if images_path is None:
            raise ManifestError(f"{pairs_path}: an original LeftRefill pair list needs its image_dict.pkl "
                                f"(images_path), which it does not name itself")
        return _read_pickle_pairs(pairs_path, Path(images_path))
    raise ManifestError(f"{pairs_path}: unknown manifest type {suffix!r} "
                        f"(expected {', '.join(JSON_SUFFIXES + PICKLE_SUFFIXES)})")


def read_image_table(path: str | Path) -> dict[int, Path]:
    """{image id: path ready to open} from a JSON image table or an original ``image_dict.pkl``."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle_images(path)
    return _read_json_images(path)


def image_table_of(pairs_path: str | Path) -> Path:
    """The image table a JSON pair manifest names (relative to the manifest's folder, or absolute)."""
    path = Path(pairs_path)
    doc = _load_json(path, PAIRS_FORMAT)
    return _beside(path, _require(doc, "images", str, path, "the manifest"), "'images'")


def read_multiview_pairs(path: str | Path) -> list[MultiViewPair]:
    """The entries of an extended multi-view manifest (docs/data.md), in file order."""
    path = Path(path)
    doc = _load_json(path, MULTIVIEW_FORMAT)
    images_path = _beside(path, _require(doc, "images", str, path, "the manifest"), "'images'")
    images = read_image_table(images_path)
    pairs = []
    for index, entry in enumerate(_require(doc, "pairs", list, path, "the manifest")):
        where = f"pair {index}"
        if not isinstance(entry, dict):
            raise ManifestError(f"{path}: {where} is a {type(entry).__name__}, not an object")
        reference_ids = _require(entry, "sources", list, path, where)
        if not reference_ids:
            raise ManifestError(f"{path}: {where}: 'sources' is empty")
        references = tuple(_image(images, _as_id(i, path, f"{where}: source"), path, where, images_path)
                           for i in reference_ids)
        target = _image(images, _require_int(entry, "target", path, where), path, where, images_path)
        pairs.append(MultiViewPair(_require_int(entry, "id", path, where), references, target,
                                   _require(entry, "scene", str, path, where)))
    return pairs


def _read_json_pairs(path: Path, images_path: Path | None) -> list[Pair]:
    doc = _load_json(path, PAIRS_FORMAT)
    if images_path is None:
        images_path = _beside(path, _require(doc, "images", str, path, "the manifest"), "'images'")
    images = read_image_table(images_path)
    entries = _require(doc, "pairs", list, path, "the manifest")
    pairs, seen = [], {}
    for index, entry in enumerate(entries):
        pair = _json_pair(entry, index, images, path, images_path)
        if pair.id in seen:
            raise ManifestError(f"{path}: pairs {seen[pair.id]} and {index} have the same id {pair.id}")
        seen[pair.id] = index
        pairs.append(pair)
    return pairs


def _json_pair(entry: Any, index: int, images: Mapping[int, Path], path: Path, images_path: Path) -> Pair:
    where = f"pair {index}"
    if not isinstance(entry, dict):
        raise ManifestError(f"{path}: {where} is a {type(entry).__name__}, not an object")
    pair_id = _require_int(entry, "id", path, where)
    reference = _image(images, _require_int(entry, "source", path, where), path, where, images_path)
    target = _image(images, _require_int(entry, "target", path, where), path, where, images_path)
    scene = _require(entry, "scene", str, path, where)
    overlap = entry.get("overlap")
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, (int, float))):
        raise ManifestError(f"{path}: {where}: 'overlap' must be a number or null, got {short_repr(overlap)}")
    return Pair(pair_id, reference, target, scene, None if overlap is None else float(overlap))


def _read_json_images(path: Path) -> dict[int, Path]:
    doc = _load_json(path, IMAGES_FORMAT)
    root = _beside(path, _require(doc, "root", str, path, "the image table"), "'root'")
    table = _require(doc, "images", dict, path, "the image table")
    images: dict[int, Path] = {}
    for key, rel in table.items():
        try:
            image_id = int(key)
        except ValueError:  # also for more digits than Python converts (4300)
            raise ManifestError(f"{path}: image id {short_repr(key)} is not an integer") from None
        if image_id in images:
            raise ManifestError(f"{path}: image id {short_repr(key)} is listed twice")
        if not isinstance(rel, str):
            raise ManifestError(f"{path}: image {short_repr(key)}: the path must be a string, "
                                f"got {short_repr(rel)}")
        images[image_id] = root / _path_text(rel, path, "image", key)
    return images


def _load_json(path: Path, expected_format: str) -> dict:
    """The JSON object in ``path``, checked to carry ``format`` == ``expected_format`` and ``version`` 1."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot read it ({clip(str(err))})") from None
    except RecursionError:  # json's parser recurses once per nested array or object
        raise ManifestError(f"{path}: not valid JSON for this reader: arrays or objects are nested thousands "
                            f"of levels deep") from None
    except ValueError as err:  # JSONDecodeError, and integers of more digits than Python converts
        raise ManifestError(f"{path}: not valid JSON ({clip(str(err))})") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: expected a JSON object with format {expected_format!r}, "
                            f"got a {type(doc).__name__}")
    if doc.get("format") != expected_format:
        raise ManifestError(f"{path}: format is {short_repr(doc.get('format'))}, expected {expected_format!r}")
    if doc.get("version") != VERSION:
        raise ManifestError(f"{path}: {expected_format} version {short_repr(doc.get('version'))} is not "
                            f"supported (this code reads version {VERSION})")
    return doc


def _require(doc: Mapping, key: str, kind: type, path: Path, where: str) -> Any:
    if key not in doc:
        raise ManifestError(f"{path}: {where} has no {key!r} key")
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ManifestError(f"{path}: {where}: {key!r} must be a {kind.__name__}, got {short_repr(value)}")
    return value


def _require_int(doc: Mapping, key: str, path: Path, where: str) -> int:
    return _require(doc, key, int, path, where)


def _image(images: Mapping[int, Path], image_id: int, path: Path, where: str, images_path: Path) -> Path:
    try:
        return images[image_id]
    except KeyError:
        raise ManifestError(f"{path}: {where}: image id {short_repr(image_id)} is not in the image table "
                            f"{images_path}") from None


def _beside(path: Path, name: str, what: str) -> Path:
    """``name`` (the field ``what`` of ``path``) as written in ``path``: relative to that file's folder, or
    absolute."""
    return path.parent / _path_text(name, path, what)  # an absolute ``name`` replaces the folder


def _path_text(text: str, path: Path, where: str, image_id: Any = None) -> str:
    """``text``, a file name read from ``path`` (at ``where``, or at image ``image_id``), checked to be short
    enough to name a file at all."""
    if len(text) > MAX_PATH_CHARS:
        where = where if image_id is None else f"image {short_repr(image_id, 60)}"
        raise ManifestError(f"{path}: {where}: a path of {len(text)} characters ({short_repr(text, 60)}) is "
                            f"longer than any file system allows ({MAX_PATH_CHARS})")
    return text


# ------------------------------------------------------------------------------- original pickle files


def _read_pickle_pairs(path: Path, images_path: Path) -> list[Pair]:
    images = read_image_table(images_path)
    entries = restricted_load(path)
    if not isinstance(entries, list):
        raise ManifestError(f"{path}: expected a list of {{'source', 'target', 'prompt'}} dicts, "
                            f"got a {type(entries).__name__}")
    pairs = []
    for index, entry in enumerate(entries):
        where = f"pair {index}"
        if not isinstance(entry, dict):
            raise ManifestError(f"{path}: {where} is a {type(entry).__name__}, not a dict")
        reference = _image(images, _require_int(entry, "source", path, where), path, where, images_path)
        target = _image(images, _require_int(entry, "target", path, where), path, where, images_path)
        pairs.append(Pair(index, reference, target, _scene_of(reference, path, where), None))
    return pairs


def _read_pickle_images(path: Path) -> dict[int, Path]:
    table = restricted_load(path)
    if not isinstance(table, dict):
        raise ManifestError(f"{path}: expected a dict {{image id: path}}, got a {type(table).__name__}")
    images = {}
    for key, value in table.items():
        if not isinstance(key, int) or isinstance(key, bool) or not isinstance(value, str):
            raise ManifestError(f"{path}: expected {{int id: path string}}, found {short_repr(key, 60)}: "
                                f"{short_repr(value)}")
        images[key] = Path(_path_text(value, path, "image", key))  # absolute, or relative to the current folder
    return images


def _scene_of(image: Path, path: Path, where: str) -> str:
    """The ``<scene>`` of ``.../<scene>/images/<file>``, as the original sampler's ``split('/')[-3]``."""
    if len(image.parts) < 3:
        raise ManifestError(f"{path}: {where}: cannot take the scene from reference image "
                            f"{clip(str(image))} (expected .../<scene>/images/<file>)")
    return image.parts[-3]


def restricted_load(path: str | Path) -> Any:
    """Unpickle ``path`` with :func:`leftrefill.prep.safe_pickle.safe_load`, arrays not allowed. The pair
    and image pickles come from other people, and unpickling a global is how a pickle runs code, so the
    pickle may name only checked stand-ins for numpy's dtype and scalar rebuilders (ids saved as numpy
    ints) and the latin1 ``_codecs.encode`` of old protocols; the result holds only plain containers,
    numbers (numpy scalars become Python numbers) and strings. ManifestError, naming the file, for a
    missing, unreadable, corrupt, cyclic or unsafe pickle, and for one whose shared lists would outgrow the
    file (safe_pickle's item limit); messages quote at most a few hundred characters of the data."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            return safe_load(file, allow_arrays=False)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except OSError as err:
        raise ManifestError(f"{path}: cannot read it ({err})") from None
    except SafePickleError as err:
        raise ManifestError(f"{path}: {err}") from None


# ----------------------------------------------------------------------------------------------- writing


def write_image_table(path: str | Path, root: str | Path, images: Mapping[int, str | os.PathLike]) -> None:
    """Write the image table ``path`` atomically: ``images`` {id: path relative to ``root``} in id order;
    ``root`` (absolute or relative to the current directory) is written relative to the table's folder
    when it can be, else absolute."""
    write_text_atomic(path, image_table_text(path, root, images))


def image_table_text(path: str | Path, root: str | Path, images: Mapping[int, str | os.PathLike]) -> str:
    """The text :func:`write_image_table` writes to ``path`` (ManifestError for bad ids), so that a script
    can check every output before writing any."""
    path = Path(path)
    rows = {}
    for key, rel in images.items():
        image_id = _as_id(key, path, "image id")
        if str(image_id) in rows:
            raise ManifestError(f"{path}: image id {image_id} is given twice")
        rows[str(image_id)] = Path(rel).as_posix()
    ordered = sorted(rows.items(), key=lambda item: int(item[0]))
    header = {"format": IMAGES_FORMAT, "version": VERSION, "root": _relative_to_folder(root, path)}
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in ordered]
    return _json_with_rows(header, "images", lines, "{", "}")


def write_pairs_manifest(path: str | Path, images_table_path: str | Path, pairs: Iterable[Mapping]) -> None:
    """Write the pair manifest ``path`` atomically, one pair per line in id order. ``pairs`` are mappings
    with the file's row keys: id, source (the reference), target (image ids), scene and optionally overlap
    (float or None);
    ``images_table_path`` is written relative to the manifest's folder when it can be."""
    write_text_atomic(path, pairs_manifest_text(path, images_table_path, pairs))


def pairs_manifest_text(path: str | Path, images_table_path: str | Path, pairs: Iterable[Mapping]) -> str:
    """The text :func:`write_pairs_manifest` writes to ``path`` (ManifestError for a bad pair)."""
    path = Path(path)
    rows = (_pair_row(pair, index, path) for index, pair in enumerate(pairs))
    return _rows_text(path, PAIRS_FORMAT, images_table_path, rows)


def write_multiview_manifest(path: str | Path, images_table_path: str | Path, pairs: Iterable[Mapping]) -> None:
    """Write an extended multi-view manifest atomically: mappings with the file's row keys id, target,
    sources (the references' image ids, the pair's own first) and scene, one per line in id order."""
    path = Path(path)
    rows = ({"id": _as_id(pair["id"], path, f"pair {index}: id"),
             "target": _as_id(pair["target"], path, f"pair {index}: target"),
             "sources": [_as_id(i, path, f"pair {index}: source") for i in pair["sources"]],
             "scene": str(pair["scene"])} for index, pair in enumerate(pairs))
    write_text_atomic(path, _rows_text(path, MULTIVIEW_FORMAT, images_table_path, rows))


def _rows_text(path: Path, format_: str, images_table_path: str | Path, rows: Iterable[dict]) -> str:
    by_id = {}
    for row in rows:
        if row["id"] in by_id:
            raise ManifestError(f"{path}: pair id {row['id']} is given twice")
        by_id[row["id"]] = row
    header = {"format": format_, "version": VERSION, "images": _relative_to_folder(images_table_path, path)}
    lines = [f"  {json.dumps(by_id[pair_id])}" for pair_id in sorted(by_id)]
    return _json_with_rows(header, "pairs", lines, "[", "]")


def _pair_row(pair: Mapping, index: int, path: Path) -> dict[str, Any]:
    missing = [key for key in PAIR_KEYS if key not in pair]
    if missing:
        raise ManifestError(f"{path}: pair {index} has no {', '.join(map(repr, missing))}")
    scene, overlap = pair["scene"], pair.get("overlap")
    if not isinstance(scene, str):
        raise ManifestError(f"{path}: pair {index}: scene must be a string, got {short_repr(scene)}")
    if overlap is not None:
        overlap = float(overlap)
        if not math.isfinite(overlap):  # JSON has no NaN / infinity
            raise ManifestError(f"{path}: pair {index}: overlap must be finite, got {overlap}")
    return {"id": _as_id(pair["id"], path, f"pair {index}: id"),
            "source": _as_id(pair["source"], path, f"pair {index}: source"),
            "target": _as_id(pair["target"], path, f"pair {index}: target"),
            "scene": scene, "overlap": overlap}


def _as_id(value: Any, path: Path, what: str) -> int:
    """An integer id; numpy integers are accepted, bools and floats are not."""
    if isinstance(value, (bool, np.bool_)):
        raise ManifestError(f"{path}: {what} must be an integer, got {short_repr(value)}")
    try:
        return operator.index(value)
    except TypeError:
        raise ManifestError(f"{path}: {what} must be an integer, got {short_repr(value)}") from None


def _relative_to_folder(target: str | Path, path: Path) -> str:
    """``target`` (absolute or relative to the current directory) as written in the file ``path``."""
    try:
        return Path(os.path.relpath(os.path.abspath(target), os.path.abspath(path.parent))).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return Path(os.path.abspath(target)).as_posix()


def _json_with_rows(header: Mapping[str, Any], key: str, rows: Sequence[str], open_: str, close: str) -> str:
    """A JSON object of ``header`` then ``key`` holding ``rows`` (already-encoded entries), one per line
    so that large tables stay readable and diff well."""
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in header.items()]
    if not rows:
        return "\n".join(lines + [f" {json.dumps(key)}: {open_}{close}", "}"]) + "\n"
    body = ",\n".join(rows)
    return "\n".join(lines + [f" {json.dumps(key)}: {open_}", body, f" {close}", "}"]) + "\n"


# ------------------------------------------------------------------------------------------------ checks


def drop_missing_images(pairs: Sequence[Pair], max_missing_fraction: float = 0.01, source: str | None = None,
                        images_of: Callable[[Any], Iterable[Path]] = lambda pair: (pair.reference, pair.target)
                        ) -> list:
    """The pairs whose images (``images_of(pair)``: the reference and the target; every reference of a
    multi-view pair) all exist, in order. Skipping is logged as a warning; when more than
    ``max_missing_fraction`` of the distinct images are missing the data root is most likely wrong, so
    ManifestError is raised instead. ``source`` names the manifest in messages."""
    paths = sorted({path for pair in pairs for path in images_of(pair)})
    missing = {p for p in paths if not os.path.isfile(p)}  # False, not OSError, for names too long
    if not missing:
        return list(pairs)
    where = source or "the pair list"
    examples = ", ".join(clip(str(p)) for p in sorted(missing)[:3])
    if len(missing) > max_missing_fraction * len(paths):
        raise ManifestError(f"{len(missing)} of {len(paths)} images listed in {where} are missing, "
                            f"e.g. {examples}; is the data root right?")
    kept = [pair for pair in pairs if missing.isdisjoint(images_of(pair))]
    log.warning("%s: skipping %d of %d pairs: %d of %d images are missing, e.g. %s",
                where, len(pairs) - len(kept), len(pairs), len(missing), len(paths), examples)
    return kept
