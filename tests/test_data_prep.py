"""Data preparation on a synthetic MegaDepth tree: pair mining, safe index reading, multi-view extension,
test folders and fixed mask sets."""

from __future__ import annotations

import json
import logging
import os
import sys
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
from leftrefill.data.megadepth import IndexFileError, read_scene_index  # noqa: E402


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    root = synthetic_megadepth.build(tmp_path_factory.mktemp("megadepth"))
    out = root.parent / "pairs"
    assert megadepth_pairs.main(["--data_root", str(root), "--out_dir", str(out), "--n_sample_per_scene", "3"]) == 0
    return root, out


def test_training_pairs_are_filtered_by_overlap_and_ids_follow_first_appearance(mined):
    root, out = mined
    train = read_pairs(out / "train_pairs.json")
    assert [(p.source.name, p.target.name, p.scene, p.overlap) for p in train] == [
        ("0000.jpg", "0002.jpg", "0001", 0.45), ("0000.jpg", "0003.jpg", "0001", 0.42),
        ("0001.jpg", "0004.jpg", "0001", 0.5), ("0003.jpg", "0004.jpg", "0001", 0.6),
        ("0000.jpg", "0001.jpg", "0002", 0.41), ("0001.jpg", "0002.jpg", "0002", 0.44)]
    assert [p.id for p in train] == list(range(6))
    assert all(p.source.is_file() and p.target.is_file() for p in train)
    table = json.loads((out / "images.json").read_text())["images"]
    assert table["0"] == "Undistorted_SfM/0001/images/0000.jpg" and table["1"] == "Undistorted_SfM/0001/images/0002.jpg"
    assert len(table) == 9


def test_test_pairs_keep_every_overlap_and_the_report_counts_everything(mined):
    _, out = mined
    test = read_pairs(out / "test_pairs.json")
    assert [(p.source.name, p.target.name, p.overlap) for p in test] == [("0000.jpg", "0001.jpg", 0.3),
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
    with pytest.raises(IndexFileError, match="refused global .*system"):
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
    assert pairs and all(1 <= len(p.sources) - 1 <= 2 for p in pairs)
    for pair in pairs:
        assert pair.sources[0] == original[pair.id].source and pair.target == original[pair.id].target
        target_k = int(pair.target.stem)
        for extra in pair.sources[1:]:
            assert int(extra.stem) in index[(pair.scene, target_k)] and extra not in (pair.sources[0], pair.target)
            assert extra.is_file()  # views listed in the index but missing on disk are never used
    assert extend_multiview.main(args) == 0
    assert read_multiview_pairs(extended) == pairs  # deterministic for the seed

    test_set = out / "multiview_test"
    assert make_test_set.main(["--multiview", "--pairs", str(extended), "--out_dir", str(test_set)]) == 0
    two_extra = next(p for p in pairs if len(p.sources) == 3)
    assert sorted(f.name for f in (test_set / f"{two_extra.id:06d}").iterdir()) == [
        "mask.png", "source.jpg", "source_1.jpg", "source_2.jpg", "target.jpg"]


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
    assert names == ["mask_000.png", "mask_001.png", "mask_002.png", "mask_003.png"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert np.asarray(Image.open(tmp_path / "a" / name)).max() == 255


def test_matched_pairs_get_matching_based_masks_over_their_matches(tmp_path):
    import match_pairs
    from leftrefill.data.manifest import write_image_table, write_pairs_manifest
    from leftrefill.data.matching import Matches

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
