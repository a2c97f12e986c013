"""Pair manifests: JSON round trip, error messages, original pickles, the restricted unpickler, missing images."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from leftrefill.data.manifest import (
    ManifestError,
    Pair,
    drop_missing_images,
    read_pairs,
    restricted_load,
    write_image_table,
    write_pairs_manifest,
)

PAIRS = [
    {"id": 7, "source": 0, "target": 1, "scene": "0015", "overlap": 0.53},
    {"id": 3, "source": 2, "target": 0, "scene": "0022", "overlap": None},
]
IMAGES = {0: "0015/images/a.jpg", 1: "0015/images/b.jpg", 2: "0022/images/c.jpg"}


def _write_json_dataset(tmp_path: Path) -> tuple[Path, Path, Path]:
    """data/<images>, lists/images.json (root ../data), lists/pairs/train_pairs.json -> ../images.json."""
    root = tmp_path / "data"
    table = tmp_path / "lists" / "images.json"
    manifest = tmp_path / "lists" / "pairs" / "train_pairs.json"
    write_image_table(table, root, IMAGES)
    write_pairs_manifest(manifest, table, PAIRS)
    return root, table, manifest


def test_json_round_trip_resolves_paths_relative_to_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, table, manifest = _write_json_dataset(tmp_path)
    assert json.loads(table.read_text())["root"] == "../data"
    assert json.loads(manifest.read_text())["images"] == "../images.json"
    monkeypatch.chdir(tmp_path / "lists")  # paths must not depend on the current directory
    pairs = read_pairs(manifest)
    assert [p.id for p in pairs] == [3, 7]  # written in id order
    by_id = {p.id: p for p in pairs}
    assert by_id[7] == Pair(7, by_id[7].reference, by_id[7].target, "0015", 0.53)
    assert by_id[7].reference.resolve() == (root / IMAGES[0]).resolve()
    assert by_id[7].target.resolve() == (root / IMAGES[1]).resolve()
    assert by_id[3].reference.resolve() == (root / IMAGES[2]).resolve()
    assert by_id[3].overlap is None and by_id[3].scene == "0022"


def test_json_absolute_root_and_images_path_override(tmp_path: Path) -> None:
    root = tmp_path / "elsewhere"
    table = tmp_path / "other_table.json"
    table.write_text(json.dumps({"format": "leftrefill-images", "version": 1, "root": str(root),
                                 "images": {str(k): v for k, v in IMAGES.items()}}))
    _, _, manifest = _write_json_dataset(tmp_path)
    pairs = read_pairs(manifest, images_path=table)
    assert {p.reference for p in pairs} == {root / IMAGES[0], root / IMAGES[2]}


def test_writes_are_atomic_and_sorted(tmp_path: Path) -> None:
    _, table, manifest = _write_json_dataset(tmp_path)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p not in (table, manifest)]
    assert leftovers == []
    doc = json.loads(table.read_text())
    assert list(doc["images"]) == ["0", "1", "2"]
    assert doc["format"] == "leftrefill-images" and doc["version"] == 1


def test_failed_write_keeps_previous_file(tmp_path: Path) -> None:
    _, _, manifest = _write_json_dataset(tmp_path)
    before = manifest.read_text()
    with pytest.raises(ManifestError, match="overlap"):
        write_pairs_manifest(manifest, tmp_path / "lists" / "images.json",
                             [{"id": 0, "source": 0, "target": 1, "scene": "s", "overlap": float("nan")}])
    assert manifest.read_text() == before
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["train_pairs.json"]


def _edit_manifest(manifest: Path, edit) -> None:
    doc = json.loads(manifest.read_text())
    edit(doc)
    manifest.write_text(json.dumps(doc))


def test_missing_key_names_key_and_pair(tmp_path: Path) -> None:
    _, _, manifest = _write_json_dataset(tmp_path)
    _edit_manifest(manifest, lambda doc: doc["pairs"][1].pop("scene"))
    with pytest.raises(ManifestError, match=r"train_pairs\.json: pair 1 has no 'scene' key"):
        read_pairs(manifest)


def test_unknown_image_id_names_pair_and_id(tmp_path: Path) -> None:
    _, _, manifest = _write_json_dataset(tmp_path)
    _edit_manifest(manifest, lambda doc: doc["pairs"][0].update(target=99))
    with pytest.raises(ManifestError, match=r"train_pairs\.json: pair 0: image id 99 is not in"):
        read_pairs(manifest)


def test_duplicate_pair_id(tmp_path: Path) -> None:
    _, _, manifest = _write_json_dataset(tmp_path)
    _edit_manifest(manifest, lambda doc: doc["pairs"][1].update(id=doc["pairs"][0]["id"]))
    with pytest.raises(ManifestError, match=r"pairs 0 and 1 have the same id 3"):
        read_pairs(manifest)


def test_wrong_format_tag_and_version(tmp_path: Path) -> None:
    _, table, manifest = _write_json_dataset(tmp_path)
    _edit_manifest(table, lambda doc: doc.update(format="leftrefill-pairs"))
    with pytest.raises(ManifestError, match=r"images\.json: format is 'leftrefill-pairs', expected 'leftrefill-images'"):
        read_pairs(manifest)
    _edit_manifest(manifest, lambda doc: doc.update(version=2))
    with pytest.raises(ManifestError, match=r"train_pairs\.json: leftrefill-pairs version 2 is not supported"):
        read_pairs(manifest)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"nothing\.json: no such file"):
        read_pairs(tmp_path / "nothing.json")
    _, table, manifest = _write_json_dataset(tmp_path)
    table.unlink()
    with pytest.raises(ManifestError, match=r"images\.json: no such file"):
        read_pairs(manifest)


def test_writer_rejects_missing_key_and_duplicates(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"pair 0 has no 'scene'"):
        write_pairs_manifest(tmp_path / "p.json", tmp_path / "i.json", [{"id": 0, "source": 0, "target": 1}])
    with pytest.raises(ManifestError, match="pair id 1 is given twice"):
        write_pairs_manifest(tmp_path / "p.json", tmp_path / "i.json",
                             [{"id": 1, "source": 0, "target": 1, "scene": "s"}] * 2)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ original pickles


def _write_original(tmp_path: Path, as_numpy: bool = False, protocol: int = pickle.DEFAULT_PROTOCOL
                    ) -> tuple[Path, Path]:
    ints = np.int64 if as_numpy else int
    image_dict = {ints(0): "/data/MegaDepth/Undistorted_SfM/0015/images/1.jpg",
                  ints(1): "/data/MegaDepth/Undistorted_SfM/0015/images/2.jpg",
                  ints(2): "MegaDepth/Undistorted_SfM/0022/images/3.jpg"}
    pairs = [{"source": ints(0), "target": ints(1), "prompt": "a photo"},
             {"source": ints(2), "target": ints(0), "prompt": ""}]
    images_path, pairs_path = tmp_path / "image_dict.pkl", tmp_path / "train_pairs.pkl"
    images_path.write_bytes(pickle.dumps(image_dict, protocol=protocol))
    pairs_path.write_bytes(pickle.dumps(pairs, protocol=protocol))
    return images_path, pairs_path


@pytest.mark.parametrize("as_numpy", [False, True])
def test_original_pickles(tmp_path: Path, as_numpy: bool) -> None:
    images_path, pairs_path = _write_original(tmp_path, as_numpy)
    pairs = read_pairs(pairs_path, images_path)
    assert pairs == [
        Pair(0, Path("/data/MegaDepth/Undistorted_SfM/0015/images/1.jpg"),
             Path("/data/MegaDepth/Undistorted_SfM/0015/images/2.jpg"), "0015", None),
        Pair(1, Path("MegaDepth/Undistorted_SfM/0022/images/3.jpg"),
             Path("/data/MegaDepth/Undistorted_SfM/0015/images/1.jpg"), "0022", None),
    ]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_load_converts_numpy_scalars(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "ids.pkl"
    path.write_bytes(pickle.dumps({np.int64(5): [np.int32(2), np.float32(0.5), np.uint8(7), b"", b"\xff"]},
                                  protocol=protocol))
    loaded = restricted_load(path)
    assert loaded == {5: [2, 0.5, 7, b"", b"\xff"]}
    key = next(iter(loaded))
    assert type(key) is int and type(loaded[5][0]) is int and type(loaded[5][1]) is float


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_original_pickles_with_numpy_ids_in_every_protocol(tmp_path: Path, protocol: int) -> None:
    images_path, pairs_path = _write_original(tmp_path, as_numpy=True, protocol=protocol)
    assert [(p.reference.name, p.target.name, p.scene) for p in read_pairs(pairs_path, images_path)] == [
        ("1.jpg", "2.jpg", "0015"), ("3.jpg", "1.jpg", "0022")]


def test_cyclic_nested_and_array_pickles_are_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "cyclic.pkl"
    loop: list = []
    loop.append({"source": 0, "target": loop})
    path.write_bytes(pickle.dumps(loop))
    with pytest.raises(ManifestError, match=r"cyclic\.pkl: the pickle holds a list that contains itself"):
        restricted_load(path)
    nested: list = []
    for _ in range(200):
        nested = [nested]
    path.write_bytes(pickle.dumps(nested))
    with pytest.raises(ManifestError, match=r"cyclic\.pkl: the pickle is nested deeper than 100 levels"):
        restricted_load(path)
    path.write_bytes(pickle.dumps({0: np.arange(3)}, protocol=3))
    with pytest.raises(ManifestError, match=r"cyclic\.pkl: the pickle holds a numpy array, which is not expected"):
        restricted_load(path)


def test_pickle_pairs_need_images_path(tmp_path: Path) -> None:
    _, pairs_path = _write_original(tmp_path)
    with pytest.raises(ManifestError, match=r"train_pairs\.pkl: .*image_dict\.pkl"):
        read_pairs(pairs_path)


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _CustomClass:
    pass


@pytest.mark.parametrize("payload, refused", [
    ("system", r"(posix|nt|os)\.system"),
    ("ordered", r"collections\.OrderedDict"),
    ("custom", r"test_manifest\._CustomClass"),
])
def test_malicious_pickle_is_refused(tmp_path: Path, payload: str, refused: str) -> None:
    from collections import OrderedDict

    marker = tmp_path / "payload_ran"
    obj = {"system": lambda: [_RunsCommand(marker)], "ordered": lambda: OrderedDict(a=1),
           "custom": lambda: {0: _CustomClass()}}[payload]()
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(obj))
    with pytest.raises(ManifestError, match=rf"evil\.pkl: refused to load the global {refused}"):
        restricted_load(evil)
    images_path, _ = _write_original(tmp_path)
    with pytest.raises(ManifestError, match=rf"evil\.pkl: refused .*{refused}"):
        read_pairs(evil, images_path)
    assert not marker.exists()


def test_corrupt_pickle(tmp_path: Path) -> None:
    path = tmp_path / "broken.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3])[:-3])
    with pytest.raises(ManifestError, match=r"broken\.pkl: not a readable pickle"):
        restricted_load(path)


# ------------------------------------------------------------------------------------------ missing images


def _pairs_on_disk(tmp_path: Path, n_images: int, missing: set[int]) -> list[Pair]:
    paths = [tmp_path / f"{i}.jpg" for i in range(n_images)]
    for i, path in enumerate(paths):
        if i not in missing:
            path.write_bytes(b"")
    return [Pair(i, paths[i], paths[(i + 1) % n_images], "s", None) for i in range(n_images)]


def test_drop_missing_images_skips_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pairs = _pairs_on_disk(tmp_path, 200, missing={10})
    with caplog.at_level(logging.WARNING, logger="leftrefill.data.manifest"):
        kept = drop_missing_images(pairs, max_missing_fraction=0.01, source="train_pairs.json")
    assert [p.id for p in kept] == [i for i in range(200) if i not in (9, 10)]
    assert "skipping 2 of 200 pairs: 1 of 200 images are missing" in caplog.text
    assert "10.jpg" in caplog.text and "train_pairs.json" in caplog.text


def test_drop_missing_images_no_warning_when_complete(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pairs = _pairs_on_disk(tmp_path, 5, missing=set())
    with caplog.at_level(logging.WARNING):
        assert drop_missing_images(pairs) == pairs
    assert caplog.text == ""


def test_drop_missing_images_raises_above_threshold(tmp_path: Path) -> None:
    pairs = _pairs_on_disk(tmp_path, 100, missing={1, 2})
    with pytest.raises(ManifestError, match=r"2 of 100 images listed in train_pairs\.json are missing, "
                                            r"e\.g\. .*1\.jpg.*; is the data root right\?"):
        drop_missing_images(pairs, max_missing_fraction=0.01, source="train_pairs.json")
