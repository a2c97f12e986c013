"""Data preparation on a synthetic MegaDepth tree: pair mining, safe index reading, multi-view extension,
test folders and fixed mask sets."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import extend_multiview  # noqa: E402
import make_masks  # noqa: E402
import make_test_set  # noqa: E402
import megadepth_pairs  # noqa: E402
import synthetic_megadepth  # noqa: E402
from conftest import ROOT  # noqa: E402
from leftrefill.data.manifest import read_multiview_pairs, read_pairs  # noqa: E402
from leftrefill.prep.megadepth import IndexFileError, read_scene_index  # noqa: E402
from leftrefill.prep.safe_pickle import SafePickleError, safe_load  # noqa: E402


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    root = synthetic_megadepth.build(tmp_path_factory.mktemp("megadepth"))
    out = root.parent / "pairs"
    assert megadepth_pairs.main(["--data_root", str(root), "--out_dir", str(out), "--n_sample_per_scene", "3"]) == 0
    return root, out


def test_training_pairs_are_filtered_by_overlap_and_ids_follow_first_appearance(mined):
    root, out = mined
    train = read_pairs(out / "train_pairs.json")
    assert [(p.reference.name, p.target.name, p.scene, p.overlap) for p in train] == [
        ("0000.jpg", "0002.jpg", "0001", 0.45), ("0000.jpg", "0003.jpg", "0001", 0.42),
        ("0001.jpg", "0004.jpg", "0001", 0.5), ("0003.jpg", "0004.jpg", "0001", 0.6),
        ("0000.jpg", "0001.jpg", "0002", 0.41), ("0001.jpg", "0002.jpg", "0002", 0.44)]
    assert [p.id for p in train] == list(range(6))
    assert all(p.reference.is_file() and p.target.is_file() for p in train)
    table = json.loads((out / "images.json").read_text())["images"]
    assert table["0"] == "Undistorted_SfM/0001/images/0000.jpg" and table["1"] == "Undistorted_SfM/0001/images/0002.jpg"
    assert len(table) == 9


def test_test_pairs_keep_every_overlap_and_the_report_counts_everything(mined):
    _, out = mined
    test = read_pairs(out / "test_pairs.json")
    assert [(p.reference.name, p.target.name, p.overlap) for p in test] == [("0000.jpg", "0001.jpg", 0.3),
                                                                        ("0001.jpg", "0003.jpg", 0.9)]
    report = json.loads((out / "scene_report.json").read_text())
    assert report["train_pairs_per_scene"] == {"0001": 4, "0002": 2}
    assert report["skipped_pairs"] == {"train: overlap outside range": 4, "train: image missing on disk": 3,
                                       "train: image path is None": 1}
    assert report["scenes_below_n_sample_per_scene"] == ["0002"]
    assert report["missing_images_examples"] == ["Undistorted_SfM/0001/images/0005.jpg"]


def test_small_scenes_can_be_dropped(mined, tmp_path):
    root, _ = mined
    assert megadepth_pairs.main(["--data_root", str(root), "--out_dir", str(tmp_path), "--n_sample_per_scene", "3",
                                 "--drop_small_scenes"]) == 0
    train = read_pairs(tmp_path / "train_pairs.json")
    assert {p.scene for p in train} == {"0001"} and [p.id for p in train] == [0, 1, 2, 3]
    report = json.loads((tmp_path / "scene_report.json").read_text())
    assert report["train_pairs_per_scene"] == {"0001": 4} and report["train_pairs"] == 4  # as written
    assert report["dropped_scenes"] == ["0002"] and report["scenes_below_n_sample_per_scene"] == ["0002"]


def test_nothing_is_written_when_an_output_cannot_be_built(mined, tmp_path, monkeypatch, caplog):
    from leftrefill.data.manifest import ManifestError

    def refuse(path, *args):
        if path.name == "test_pairs.json":
            raise ManifestError(f"{path}: refused for the test")
        return real(path, *args)

    real = megadepth_pairs.pairs_manifest_text
    monkeypatch.setattr(megadepth_pairs, "pairs_manifest_text", refuse)
    root, _ = mined
    with caplog.at_level(logging.ERROR):
        assert megadepth_pairs.main(["--data_root", str(root), "--out_dir", str(tmp_path / "out")]) == 2
    assert "test_pairs.json: refused for the test" in caplog.text and not (tmp_path / "out").exists()


@pytest.mark.parametrize("overlap", [float("nan"), float("inf")])
def test_non_finite_overlap_is_refused_and_nothing_is_written(tmp_path, overlap, caplog):
    root = synthetic_megadepth.build(tmp_path / "megadepth")
    synthetic_megadepth.write_index(root / "index" / "scene_info_0.1_0.7" / "0002_0.3_0.5.npz", "0002",
                                    [(0, 1, 0.41), (1, 2, overlap)])
    message = rf"0002_0\.3_0\.5\.npz: pair \(1, 2\) has overlap {overlap}, not a finite number"
    with pytest.raises(IndexFileError, match=message):
        read_scene_index(root / "index" / "scene_info_0.1_0.7" / "0002_0.3_0.5.npz")
    with caplog.at_level(logging.ERROR):
        assert megadepth_pairs.main(["--data_root", str(root), "--out_dir", str(tmp_path / "out")]) == 2
    assert "not a finite number" in caplog.text and not (tmp_path / "out").exists()


def test_index_files_never_run_pickled_code(tmp_path, caplog):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "index" / "scene_info_0.1_0.7" / "0001_evil.npz"
    evil.parent.mkdir(parents=True)
    payload = np.empty(1, dtype=object)
    payload[0] = Payload()
    np.savez(evil, image_paths=payload, pair_infos=np.empty(0, dtype=object))
    with pytest.raises(IndexFileError, match="refused to load the global .*system"):
        read_scene_index(evil)
    assert not marker.exists()
    (tmp_path / "index" / "scene_info_val_1500").mkdir()
    with caplog.at_level(logging.ERROR):
        assert megadepth_pairs.main(["--data_root", str(tmp_path), "--out_dir", str(tmp_path / "out")]) == 2
    assert str(evil) in caplog.text and not (tmp_path / "out").exists()


def test_index_without_the_expected_keys_is_named(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, poses=np.eye(4))
    with pytest.raises(IndexFileError, match="no image_paths, pair_infos in it"):
        read_scene_index(path)
    path.write_bytes(b"garbage")
    with pytest.raises(IndexFileError, match="not a readable .npz"):
        read_scene_index(path)


def test_empty_overlap_range_is_rejected(capsys):
    with pytest.raises(SystemExit):
        megadepth_pairs.main(["--data_root", "x", "--out_dir", "y", "--min_overlap", "0.7", "--max_overlap", "0.4"])
    assert "empty or invalid overlap range [0.7, 0.4]" in capsys.readouterr().err


def test_multiview_extension_adds_covisible_views_only(mined):
    root, out = mined
    extended = out / "extended_train_pairs.json"
    args = ["--pairs", str(out / "train_pairs.json"), "--index_dir", str(root / "index" / "scene_info_0.1_0.7"),
            "--data_root", str(root), "--out", str(extended), "--num_extra", "2", "--min_extra", "1"]
    assert extend_multiview.main(args) == 0
    pairs = read_multiview_pairs(extended)
    index = {}
    for name, rows in synthetic_megadepth.TRAIN_INDEX.items():
        for i, j, overlap in rows:
            if overlap is not None and overlap >= 0.2:
                index.setdefault((name[:4], i), set()).add(j)
                index.setdefault((name[:4], j), set()).add(i)
    original = {p.id: p for p in read_pairs(out / "train_pairs.json")}
    assert pairs and all(1 <= len(p.references) - 1 <= 2 for p in pairs)
    for pair in pairs:
        assert pair.references[0] == original[pair.id].reference and pair.target == original[pair.id].target
        target_k = int(pair.target.stem)
        for extra in pair.references[1:]:
            assert int(extra.stem) in index[(pair.scene, target_k)] and extra not in (pair.references[0], pair.target)
            assert extra.is_file()  # views listed in the index but missing on disk are never used
    assert extend_multiview.main(args) == 0
    assert read_multiview_pairs(extended) == pairs  # deterministic for the seed

    assert json.loads(extended.read_text())["images"] == "extended_train_pairs_images.json"

    test_set = out / "multiview_test"
    assert make_test_set.main(["--multiview", "--pairs", str(extended), "--out_dir", str(test_set)]) == 0
    two_extra = next(p for p in pairs if len(p.references) == 3)
    assert sorted(f.name for f in (test_set / f"{two_extra.id:06d}").iterdir()) == [
        "mask.png", "source.jpg", "source_1.jpg", "source_2.jpg", "target.jpg"]


def test_train_and_test_extended_into_one_folder_keep_their_own_tables(mined, tmp_path):
    root, out = mined
    manifests = {}
    for split, index in (("train", "scene_info_0.1_0.7"), ("test", "scene_info_val_1500")):
        manifests[split] = tmp_path / f"extended_{split}_pairs.json"
        assert extend_multiview.main(["--pairs", str(out / f"{split}_pairs.json"), "--index_dir",
                                      str(root / "index" / index), "--data_root", str(root),
                                      "--out", str(manifests[split]), "--min_extra", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "extended_test_pairs.json", "extended_test_pairs_images.json",
        "extended_train_pairs.json", "extended_train_pairs_images.json"]
    for split, manifest in manifests.items():
        original = {p.id: (p.reference.resolve(), p.target.resolve()) for p in read_pairs(out / f"{split}_pairs.json")}
        extended = read_multiview_pairs(manifest)
        assert extended and all((p.references[0].resolve(), p.target.resolve()) == original[p.id] for p in extended)
        assert all(reference.is_file() for p in extended for reference in p.references)


def test_extension_refuses_images_outside_the_data_root_and_reports_no_extension(mined, tmp_path, caplog):
    root, out = mined
    args = ["--pairs", str(out / "train_pairs.json"), "--index_dir", str(root / "index" / "scene_info_0.1_0.7"),
            "--out", str(tmp_path / "extended.json")]
    with caplog.at_level(logging.ERROR):
        assert extend_multiview.main(args + ["--data_root", str(root / "Undistorted_SfM" / "0001")]) == 2
    assert "is not under --data_root" in caplog.text and "images.json" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # 0.95: no index pair is that co-visible
        assert extend_multiview.main(args + ["--data_root", str(root), "--min_overlap", "0.95",
                                             "--min_extra", "1"]) == 1
    assert "none of the 6 pairs could be extended" in caplog.text and not any(tmp_path.iterdir())


def test_test_folders_have_the_layout_and_masks_sized_like_their_target(tmp_path):
    out = tmp_path / "test_set"
    args = ["--pairs", str(ROOT / "data" / "samples" / "train_pairs.json"), "--out_dir", str(out), "--num_pairs", "3"]
    assert make_test_set.main(args) == 0
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 3
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == ["mask.png", "source.jpg", "target.jpg"]
        mask = np.asarray(Image.open(folder / "mask.png"))
        assert mask.shape == np.asarray(Image.open(folder / "target.jpg")).shape[:2]
        assert set(np.unique(mask)) == {0, 255} and 0.01 < (mask > 0).mean() < 0.6
    report = json.loads((out / "test_set_report.json").read_text())
    assert report["masks"] == {"irregular: no --match_dir": 3}
    first = (folders[0] / "mask.png").read_bytes()
    assert make_test_set.main(args) == 0 and (folders[0] / "mask.png").read_bytes() == first  # deterministic


def test_fixed_mask_set_is_deterministic_and_extends(tmp_path):
    assert make_masks.main(["--out_dir", str(tmp_path / "a"), "--count", "4", "--size", "64"]) == 0
    assert make_masks.main(["--out_dir", str(tmp_path / "b"), "--count", "6", "--size", "64"]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["mask_0000.png", "mask_0001.png", "mask_0002.png", "mask_0003.png"]  # 4 digits always
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert np.asarray(Image.open(tmp_path / "a" / name)).max() == 255
    assert make_masks.main(["--out_dir", str(tmp_path / "c"), "--count", "12", "--size", "64"]) == 0
    assert (tmp_path / "c" / "mask_0003.png").read_bytes() == (tmp_path / "a" / "mask_0003.png").read_bytes()


def test_mask_count_is_limited_to_the_name_width(tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_masks.main(["--out_dir", str(tmp_path), "--count", "10001"])
    assert "--count must be from 1 to 10000" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_test_set_exit_status_and_num_pairs(tmp_path, capsys):
    from leftrefill.data.manifest import write_image_table, write_pairs_manifest

    with pytest.raises(SystemExit):
        make_test_set.main(["--pairs", "x.json", "--out_dir", str(tmp_path), "--num_pairs", "0"])
    assert "--num_pairs must be at least 1" in capsys.readouterr().err
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    write_image_table(tmp_path / "images.json", tmp_path, {0: "broken.jpg", 1: "absent.jpg"})
    write_pairs_manifest(tmp_path / "pairs.json", tmp_path / "images.json",
                         [{"id": 0, "source": 0, "target": 1, "scene": "s"},
                          {"id": 1, "source": 1, "target": 0, "scene": "s"}])
    out = tmp_path / "test_set"
    assert make_test_set.main(["--pairs", str(tmp_path / "pairs.json"), "--out_dir", str(out)]) == 1
    report = json.loads((out / "test_set_report.json").read_text())
    assert report["pairs_written"] == 0 and report["skipped"] == 2


def test_matched_pairs_get_matching_based_masks_over_their_matches(tmp_path):
    import match_pairs
    from leftrefill.data.manifest import write_image_table, write_pairs_manifest
    from leftrefill.prep.matching import Matches

    samples = ROOT / "data" / "samples"
    write_image_table(tmp_path / "images.json", samples, {0: "building/source.jpg", 1: "building/target.jpg"})
    write_pairs_manifest(tmp_path / "pairs.json", tmp_path / "images.json",
                         [{"id": 7, "source": 0, "target": 1, "scene": "building"}])
    matches_dir, out = tmp_path / "matches", tmp_path / "test_set"
    assert match_pairs.main(["--pairs", str(tmp_path / "pairs.json"), "--out_dir", str(matches_dir),
                             "--workers", "1", "--max_side", "640"]) == 0
    assert make_test_set.main(["--pairs", str(tmp_path / "pairs.json"), "--match_dir", str(matches_dir),
                               "--out_dir", str(out)]) == 0
    report = json.loads((out / "test_set_report.json").read_text())
    assert report["masks"] == {"matching": 1}
    mask = np.asarray(Image.open(out / "000007" / "mask.png")) > 0
    assert mask.shape == (682, 1024) and 0.02 < mask.mean() < 0.6
    matches = Matches.load(matches_dir / "00000007.npz")
    confident = matches.target_points[matches.confidence > 0.8 * matches.confidence.max()]
    x, y = np.round(confident).astype(int).T
    assert mask[y.clip(0, 681), x.clip(0, 1023)].mean() > 0.1  # the mask is drawn through matched points

    # A matching file made for another size of the target (e.g. before it was replaced) is not used.
    Matches(matches.target_points, matches.reference_points, matches.confidence, (512, 341),
            matches.reference_size).save(matches_dir / "00000007.npz")
    assert make_test_set.main(["--pairs", str(tmp_path / "pairs.json"), "--match_dir", str(matches_dir),
                               "--out_dir", str(out)]) == 0
    report = json.loads((out / "test_set_report.json").read_text())
    assert report["masks"] == {"irregular: matching file is for another image size": 1}


# -- safe reading of the pickled object arrays in index files -------------------------------------------

# numpy's own functions, only to write test pickles that name them
RECONSTRUCT = np.zeros(1).__reduce__()[0]
SCALAR = np.float64(1).__reduce__()[0]


class Forge:
    """An object that pickles as the given reduce tuple, to write the crafted pickles an attacker could."""

    def __init__(self, *reduce):
        self.reduce = reduce


class _ForgingPickler(pickle.Pickler):
    def reducer_override(self, obj):
        return obj.reduce if isinstance(obj, Forge) else NotImplemented


def forged_pickle(obj, protocol: int = 3) -> bytes:
    buffer = io.BytesIO()
    _ForgingPickler(buffer, protocol=protocol).dump(obj)
    return buffer.getvalue()


def forged_array(shape, dtype, data, fortran: bool = False) -> Forge:
    return Forge(RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, shape, dtype, fortran, data))


def write_npz(path: Path, members: dict[str, tuple[tuple, bytes]]) -> Path:
    """An .npz whose members are object-array .npy files: {key: (header shape, pickle bytes)}."""
    with zipfile.ZipFile(path, "w") as archive:
        for key, (shape, pickled) in members.items():
            npy = io.BytesIO()
            np.lib.format.write_array_header_1_0(npy, {"descr": "|O", "fortran_order": False, "shape": shape})
            archive.writestr(f"{key}.npy", npy.getvalue() + pickled)
    return path


def index_npz(path: Path, image_paths: np.ndarray, pair_infos: np.ndarray, protocol: int,
              numpy1_names: bool = False) -> Path:
    """A LoFTR-style index whose object arrays are pickled with ``protocol``; ``numpy1_names`` writes the
    module names of numpy 1.x (numpy.core.multiarray), as the real index files have them."""
    members = {}
    for key, array in (("image_paths", image_paths), ("pair_infos", pair_infos)):
        pickled = pickle.dumps(array, protocol=protocol)
        if numpy1_names:
            assert protocol <= 3  # GLOBAL opcodes spell the module as a text line
            pickled = pickled.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            assert b"numpy._core" not in pickled
        members[key] = (array.shape, pickled)
    return write_npz(path, members)


def loftr_arrays(layout: str) -> tuple[np.ndarray, np.ndarray]:
    image_paths = np.array(["Undistorted_SfM/0001/images/a.jpg", None, "Undistorted_SfM/0001/images/c.jpg",
                            np.str_("Undistorted_SfM/0001/images/d.jpg")], dtype=object)
    rows = [((np.int64(0), np.int64(2)), np.float64(0.45), np.arange(8, dtype=np.float32).reshape(4, 2)),
            ((2, np.int32(3)), np.float32(0.5), np.zeros((0, 2), dtype=">f8")),
            ((0, 3), 0.625, None)]
    if layout == "tuples":  # (N,) of ((i, j), overlap, central_matches)
        infos = np.empty(len(rows), dtype=object)
        for n, row in enumerate(rows):
            infos[n] = row
    else:  # (N, 3) object array
        infos = np.empty((len(rows), 3), dtype=object)
        for n, row in enumerate(rows):
            for k, value in enumerate(row):
                infos[n, k] = value
    return image_paths, infos


@pytest.mark.parametrize("layout", ["tuples", "rows"])
@pytest.mark.parametrize("protocol, numpy1_names", [(0, True), (1, True), (2, True), (3, True), (2, False), (3, False),
                                                    (4, False)])
def test_loftr_object_arrays_load_in_both_layouts(tmp_path, layout, protocol, numpy1_names):
    image_paths, infos = loftr_arrays(layout)
    index = read_scene_index(index_npz(tmp_path / "0001_0.1_0.3.npz", image_paths, infos, protocol, numpy1_names))
    assert index.image_paths == ["Undistorted_SfM/0001/images/a.jpg", None, "Undistorted_SfM/0001/images/c.jpg",
                                 "Undistorted_SfM/0001/images/d.jpg"]
    assert index.pairs == [(0, 2, 0.45), (2, 3, 0.5), (0, 3, 0.625)]
    with zipfile.ZipFile(tmp_path / "0001_0.1_0.3.npz") as archive, archive.open("pair_infos.npy") as member:
        np.lib.format.read_magic(member)
        np.lib.format.read_array_header_1_0(member)
        loaded = safe_load(member)
    first = loaded[0] if layout == "tuples" else tuple(loaded[0])
    assert loaded.shape == infos.shape and loaded.dtype == object
    assert first[0] == (0, 2) and type(first[0][0]) is int and type(first[1]) is float
    assert np.array_equal(first[2], np.arange(8).reshape(4, 2)) and first[2].dtype == np.float32
    second = loaded[1] if layout == "tuples" else tuple(loaded[1])
    assert second[2].shape == (0, 2) and second[2].dtype == np.dtype(">f8")


def test_safe_load_keeps_fortran_order_and_byte_order():
    numbers = np.asfortranarray(np.arange(12, dtype=">i4").reshape(3, 4))
    objects = np.asfortranarray(np.array([[1, "b"], [None, (2, 3)]], dtype=object))
    for protocol in (2, 3, 4):
        loaded = safe_load(io.BytesIO(pickle.dumps([numbers, objects, np.array(["ab", "cde"])], protocol)))
        assert np.array_equal(loaded[0], numbers) and loaded[0].dtype == numbers.dtype
        assert loaded[0].flags.f_contiguous and loaded[1].flags.f_contiguous
        assert loaded[1].tolist() == objects.tolist() and loaded[2].tolist() == ["ab", "cde"]


def test_forged_dtype_state_is_refused(tmp_path):
    # numpy itself would take flags=0 to mean "holds no objects" and read these bytes as object pointers.
    forged_object = Forge(np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 0))
    pickled = forged_pickle(forged_array((1,), forged_object, b"\x41" * 8))
    path = write_npz(tmp_path / "0001_forged.npz", {"image_paths": ((1,), pickled),
                                                    "pair_infos": ((0,), pickle.dumps(np.empty(0, object)))})
    with pytest.raises(IndexFileError, match=r"0001_forged\.npz: 'image_paths' is not a plain numpy array: "
                                             r"an object array of shape \(1,\) needs a list of 1 items"):
        read_scene_index(path)
    structured = Forge(np.dtype, ("V8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 63))
    bad_order = Forge(np.dtype, ("f8", False, True), (3, "?", None, None, None, -1, -1, 0))
    with_fields = Forge(np.dtype, ("O8", False, True), (3, "|", None, ("a",), None, -1, -1, 63))
    for forged, message in ((structured, "refused dtype 'V8'"), (bad_order, "byte order '\\?'"),
                            (with_fields, "structured or subarray dtype"),
                            (Forge(np.dtype, ("M8[s]", False, True)), "refused dtype")):
        with pytest.raises(SafePickleError, match=message):
            safe_load(io.BytesIO(forged_pickle(forged_array((1,), forged, b"\0" * 8))))


def test_huge_shapes_with_tiny_data_are_refused_without_allocating():
    cases = [(forged_array((2**28,), np.dtype(object), []), r"needs a list of 268435456 items, got a list of length 0"),
             (forged_array((2**20, 2**20), np.dtype("f8"), b""), r"needs 8796093022208 bytes of data, got a bytes"),
             (forged_array((-1,), np.dtype("f8"), b""), "non-negative ints")]
    for forged, message in cases:
        pickled = forged_pickle(forged)
        assert len(pickled) < 700
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(SafePickleError, match=message):
            safe_load(io.BytesIO(pickled))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert time.perf_counter() - start < 1 and peak < 1_000_000


def test_shared_data_cannot_multiply_into_large_arrays():
    shared = bytes(1 << 16)  # pickled once, then referenced by every array through the memo
    pickled = forged_pickle([forged_array((1 << 16,), np.dtype("u1"), shared) for _ in range(300)])
    assert len(pickled) < 100_000  # 300 arrays of 64 KiB each would be 19 MiB
    with pytest.raises(SafePickleError, match="refusing to amplify shared data"):
        safe_load(io.BytesIO(pickled))


def test_cycles_depth_and_stray_globals_are_clear_errors(tmp_path):
    loop = np.empty(1, dtype=object)
    loop[0] = loop
    path = write_npz(tmp_path / "0001_loop.npz", {"image_paths": ((1,), pickle.dumps(loop, protocol=3)),
                                                  "pair_infos": ((0,), pickle.dumps(np.empty(0, object)))})
    with pytest.raises(IndexFileError, match=r"0001_loop\.npz: 'image_paths' .*a numpy array that contains itself"):
        read_scene_index(path)
    nested = []
    for _ in range(300):
        nested = [nested]
    with pytest.raises(SafePickleError, match="nested deeper than 100 levels"):
        safe_load(io.BytesIO(pickle.dumps(nested)))
    deep = b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."  # 100000 nested lists: loads without recursion
    with pytest.raises(SafePickleError, match="nested deeper than 100 levels"):
        safe_load(io.BytesIO(deep))
    with pytest.raises(SafePickleError, match=r"holds the numpy\.ndarray class"):
        safe_load(io.BytesIO(pickle.dumps([np.ndarray])))
    with pytest.raises(SafePickleError, match=r"_reconstruct may only rebuild numpy\.ndarray"):
        safe_load(io.BytesIO(forged_pickle(Forge(RECONSTRUCT, (np.dtype, (0,), b"b")))))
    with pytest.raises(SafePickleError, match="refused to set state on a numpy function"):
        safe_load(io.BytesIO(b"\x80\x02cnumpy._core.multiarray\nscalar\n}X\x01\x00\x00\x00aK\x01sb."))
    with pytest.raises(SafePickleError, match=r"bytes\(\) may only be called without arguments"):
        safe_load(io.BytesIO(b"\x80\x02c__builtin__\nbytes\nK\x05\x85R."))
    with pytest.raises(SafePickleError, match=r"_codecs\.encode\(str, 'utf-8'\) is not allowed"):
        safe_load(io.BytesIO(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf-8\x86R."))
    with pytest.raises(SafePickleError, match="refused a numpy scalar that is not a number"):
        safe_load(io.BytesIO(forged_pickle(Forge(SCALAR, (np.dtype(object), b"\0" * 8)))))
    with pytest.raises(SafePickleError, match="a int64 scalar needs exactly 8 bytes"):
        safe_load(io.BytesIO(forged_pickle(Forge(SCALAR, (np.dtype("i8"), b"\0" * 4)))))


def test_header_and_pickle_must_agree(tmp_path):
    paths = np.array(["a", "b"], dtype=object)
    for shape, pickled in (((3,), pickle.dumps(paths, protocol=3)), ((2,), pickle.dumps(["a", "b"], protocol=3))):
        path = write_npz(tmp_path / "0001_mismatch.npz", {"image_paths": (shape, pickled),
                                                          "pair_infos": ((0,), pickle.dumps(np.empty(0, object)))})
        with pytest.raises(IndexFileError, match=r"0001_mismatch\.npz: 'image_paths': the \.npy header announces "
                                                 r"an object array of shape \((3|2),\)"):
            read_scene_index(path)
