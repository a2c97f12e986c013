"""Objaverse NVS data: the Zero123 relative pose (METHOD 2.2) and the object list step."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leftrefill.nvs_pose import camera_center, relative_pose, spherical
from leftrefill.prep.objaverse import (NoCompleteObjects, ObjaverseError, check_object, make_lists,
                                       split_key, split_uids)

ROOT = Path(__file__).resolve().parents[1]
DEG = math.pi / 180


def load_script():
    spec = importlib.util.spec_from_file_location("objaverse_lists", ROOT / "scripts" / "objaverse_lists.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def look_at(theta_deg: float, phi_deg: float, radius: float) -> np.ndarray:
    """World-to-camera [R | t] (3, 4) float64 of a camera at spherical (theta from +z, phi, radius) that
    looks at the origin (OpenCV axes: x right, y down, z forward)."""
    theta, phi = theta_deg * DEG, phi_deg * DEG
    center = radius * np.array([math.sin(theta) * math.cos(phi), math.sin(theta) * math.sin(phi), math.cos(theta)])
    forward = -center / np.linalg.norm(center)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward])
    return np.hstack([rotation, (-rotation @ center)[:, None]])


# ------------------------------------------------------------------------------------------------ pose


def test_camera_center_of_translation_only_camera():
    w2c = np.hstack([np.eye(3), [[1.0], [2.0], [3.0]]])
    torch.testing.assert_close(camera_center(w2c), torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64))


def test_camera_center_and_spherical_of_look_at_camera():
    center = camera_center(look_at(60, -45, 2.0))
    theta, phi, radius = spherical(center)
    assert theta.item() == pytest.approx(60 * DEG, abs=1e-12)
    assert phi.item() == pytest.approx(-45 * DEG, abs=1e-12)
    assert radius.item() == pytest.approx(2.0, abs=1e-12)


@pytest.mark.parametrize("target, cond, expected", [
    # d_theta = 30 deg, d_phi = 30 - (-60) = 90 deg, d_r = -0.5
    ((90, 30, 1.5), (60, -60, 2.0), [math.pi / 6, 1.0, 0.0, -0.5]),
    # phi_tgt < phi_cond: d_phi = (10 - 100) mod 360 = 270 deg
    ((45, 10, 2.0), (45, 100, 2.0), [0.0, -1.0, 0.0, 0.0]),
    # across the atan2 cut: d_phi = (-170 - 170) mod 360 = 20 deg; d_theta = -60 deg
    ((30, -170, 3.0), (90, 170, 1.0), [-math.pi / 3, math.sin(20 * DEG), math.cos(20 * DEG), 2.0]),
])
def test_relative_pose_hand_computed(target, cond, expected):
    pose = relative_pose(look_at(*target), look_at(*cond))
    assert pose.dtype == torch.float32 and pose.shape == (4,)
    np.testing.assert_allclose(pose.numpy(), expected, atol=1e-6)


def test_relative_pose_identical_cameras():
    w2c = look_at(70, 123, 1.7)
    np.testing.assert_allclose(relative_pose(w2c, w2c).numpy(), [0.0, 0.0, 1.0, 0.0], atol=1e-6)


def test_relative_pose_batched_and_torch_input():
    targets = np.stack([look_at(90, 30, 1.5), look_at(45, 10, 2.0)])
    conds = np.stack([look_at(60, -60, 2.0), look_at(45, 100, 2.0)])
    batched = relative_pose(torch.from_numpy(targets).float(), conds)
    assert batched.shape == (2, 4)
    for i in range(2):
        torch.testing.assert_close(batched[i], relative_pose(targets[i], conds[i]), atol=1e-6, rtol=0)
    assert relative_pose(targets, conds[0]).shape == (2, 4)  # one condition camera broadcasts


@pytest.mark.parametrize("bad", [np.eye(4), np.zeros(3), np.zeros((3, 3)), np.zeros((2, 4, 3))])
def test_relative_pose_shape_errors(bad):
    with pytest.raises(ValueError, match=r"target_w2c must have shape \(\.\.\., 3, 4\)"):
        relative_pose(bad, look_at(60, 0, 2))


def test_relative_pose_takes_big_endian_arrays():
    target, cond = look_at(60, 30, 1.5), look_at(80, 250, 2.0)
    expected = relative_pose(target, cond)
    assert torch.equal(relative_pose(target.astype(">f8"), cond.astype(">f8")), expected)
    assert torch.allclose(camera_center(target.astype(">f4")), camera_center(target), atol=1e-6)
    radius = spherical(np.array([1, 2, 3], dtype=">i2"))[2]
    assert torch.allclose(radius, torch.tensor(math.sqrt(14), dtype=torch.float64))


def test_pose_input_errors():
    with pytest.raises(ValueError, match="numpy array or torch tensor"):
        camera_center([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    with pytest.raises(ValueError, match="real numbers"):
        camera_center(np.zeros((3, 4), dtype=complex))
    with pytest.raises(ValueError, match=r"center must have shape \(\.\.\., 3\)"):
        spherical(torch.zeros(2))
    with pytest.raises(ValueError, match="do not broadcast"):
        relative_pose(np.zeros((2, 3, 4)), np.zeros((3, 3, 4)))


# ------------------------------------------------------------------------------------------- object lists


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (8, 8), (200, 100, 50, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


def make_object(root: Path, uid: str, num_views: int = 12) -> Path:
    """A complete synthetic object: tiny RGBA renders and look-at cameras around the origin."""
    folder = root / uid
    folder.mkdir(parents=True)
    for index in range(num_views):
        (folder / f"{index:03d}.png").write_bytes(PNG)
        np.save(folder / f"{index:03d}.npy", look_at(60, 30 * index, 1.5).astype(np.float32))
    return folder


def make_tree(root: Path, complete: int = 4) -> list[str]:
    """``complete`` good objects plus one of each kind of broken object; returns the good uids."""
    good = [f"{i:032x}" for i in range(1, complete + 1)]
    for uid in good:
        make_object(root, uid)
    (make_object(root, "missing_png") / "005.png").unlink()
    (make_object(root, "corrupt_npy") / "003.npy").write_bytes(b"junk" + np.random.default_rng(0).bytes(60))
    np.save(make_object(root, "camera_4x4") / "004.npy", np.eye(4))
    camera = look_at(60, 0, 1.5)
    camera[1, 3] = np.nan
    np.save(make_object(root, "nan_camera") / "007.npy", camera)
    (make_object(root, "truncated_png") / "002.png").write_bytes(PNG[:30])
    (root / "notes.txt").write_text("not an object")
    (root / ".partial").mkdir()
    return good


def test_make_lists_skips_incomplete_objects(tmp_path):
    views = tmp_path / "views_release"
    good = make_tree(views)
    report = make_lists(views, tmp_path / "lists", seed=0, test_fraction=0.5)
    train = (tmp_path / "lists" / "obj_train.txt").read_text().splitlines()
    test = (tmp_path / "lists" / "obj_test.txt").read_text().splitlines()
    assert sorted(train + test) == good and train == sorted(train) and test == sorted(test)
    assert report == json.loads((tmp_path / "lists" / "objaverse_report.json").read_text())
    assert report["counts"] == {"found": 9, "complete": 4, "skipped": 5, "train": len(train), "test": len(test)}
    reasons = {reason: n for reason, n in report["skipped_by_reason"].items() if n}
    assert reasons == {"missing_png": 1, "unreadable_npy": 1, "bad_camera_shape": 1, "nonfinite_camera": 1,
                       "unreadable_png": 1}
    examples = report["skipped_examples"]
    assert examples["missing_png"] == [{"uid": "missing_png", "detail": "005.png: missing"}]
    assert examples["unreadable_npy"][0]["uid"] == "corrupt_npy"
    assert examples["unreadable_npy"][0]["detail"].startswith("003.npy: ")
    assert examples["bad_camera_shape"][0] == {"uid": "camera_4x4",
                                               "detail": "004.npy: shape (4, 4), expected (3, 4)"}
    assert examples["nonfinite_camera"][0]["uid"] == "nan_camera"
    assert examples["unreadable_png"][0]["detail"].startswith("002.png: ")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (8-bit gray) and whose IDAT holds no pixel at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b""))
            + png_chunk(b"IEND", b""))


def npy_header_only(shape: tuple, descr: str = "<f8") -> bytes:
    """A .npy header announcing ``shape`` followed by 96 bytes of data (what a (3, 4) float64 needs)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + bytes(96)


def test_huge_headers_are_skipped_without_allocating(tmp_path):
    huge_npy = make_object(tmp_path, "huge_npy")
    (huge_npy / "002.npy").write_bytes(npy_header_only((10**12,)))
    check = check_object(huge_npy)
    assert (check.reason, check.detail) == ("bad_camera_shape", "002.npy: shape (1000000000000,), expected (3, 4)")
    pickled = make_object(tmp_path, "object_npy")
    (pickled / "001.npy").write_bytes(npy_header_only((3, 4), "|O"))
    check = check_object(pickled)
    assert (check.reason, check.detail) == ("bad_camera_dtype", "001.npy: dtype object, expected real numbers")
    short = make_object(tmp_path, "short_npy")
    (short / "000.npy").write_bytes(npy_header_only((3, 4))[:-10])
    assert check_object(short).reason == "unreadable_npy"
    bomb = make_object(tmp_path, "bomb_png")
    (bomb / "004.png").write_bytes(png_header_only(20000, 20000))
    check = check_object(bomb)
    assert check.reason == "unreadable_png" and check.detail.startswith("004.png: DecompressionBombError")


def test_check_object_complete(tmp_path):
    assert check_object(make_object(tmp_path, "abc")).complete
    assert check_object(make_object(tmp_path, "few", num_views=11)).reason == "missing_png"


def test_make_lists_is_deterministic(tmp_path):
    views = tmp_path / "views_release"
    make_tree(views, complete=6)
    outputs = []
    for run, workers in enumerate([1, 4, 1]):
        out = tmp_path / f"out{run}"
        make_lists(views, out, seed=3, test_fraction=0.5, workers=workers)
        outputs.append([(out / name).read_bytes() for name in ("obj_train.txt", "obj_test.txt",
                                                              "objaverse_report.json")])
    assert outputs[0] == outputs[1] == outputs[2]


def test_split_depends_on_seed_and_is_stable_under_additions():
    uids = [f"{i:032x}" for i in range(400)]
    train0, test0 = split_uids(uids, seed=0, test_fraction=0.25)
    assert sorted(train0 + test0) == uids and 60 < len(test0) < 140
    assert test0 == [u for u in uids if split_key(u, 0) < 0.25]
    assert split_uids(uids, seed=1, test_fraction=0.25)[1] != test0
    more = uids + [f"{i:032x}" for i in range(1000, 1100)]
    train_more, test_more = split_uids(reversed(more), seed=0, test_fraction=0.25)
    assert set(test0) <= set(test_more) and set(train0) <= set(train_more)


def test_split_by_count():
    uids = [f"uid{i}" for i in range(50)]
    train, test = split_uids(uids, seed=0, num_test=7)
    assert len(test) == 7 and len(train) == 43
    # More objects can push boundary objects out of test, never an existing train object into it.
    train_more, _ = split_uids(uids + [f"new{i}" for i in range(20)], seed=0, num_test=7)
    assert set(train) <= set(train_more)
    with pytest.raises(ObjaverseError, match="exceeds the 50 complete objects"):
        split_uids(uids, num_test=51)
    with pytest.raises(ObjaverseError, match="exactly one"):
        split_uids(uids, test_fraction=0.1, num_test=1)
    with pytest.raises(ObjaverseError, match=r"test_fraction must be in \[0, 1\]"):
        split_uids(uids, test_fraction=1.5)


def test_main_writes_next_to_views_root(tmp_path, capsys):
    views = tmp_path / "views_release"
    good = make_tree(views, complete=3)
    assert load_script().main(["--views_root", str(views), "--num_test", "1"]) == 0
    lines = [(tmp_path / name).read_text().splitlines() for name in ("obj_train.txt", "obj_test.txt")]
    assert len(lines[1]) == 1 and sorted(lines[0] + lines[1]) == good


def test_main_bad_input(tmp_path, capsys):
    main = load_script().main
    missing = tmp_path / "nowhere"
    assert main(["--views_root", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main(["--views_root", str(tmp_path / "empty")]) == 2
    assert "no object folders" in capsys.readouterr().err
    make_object(tmp_path / "views", "a")
    assert main(["--views_root", str(tmp_path / "views"), "--num_test", "2"]) == 2
    assert "exceeds" in capsys.readouterr().err
    assert not (tmp_path / "obj_train.txt").exists()


def test_no_complete_object_writes_only_the_report(tmp_path, capsys):
    views = tmp_path / "views_release"
    (make_object(views, "broken") / "000.npy").unlink()
    with pytest.raises(NoCompleteObjects):
        make_lists(views, tmp_path / "lists")
    assert sorted(p.name for p in (tmp_path / "lists").iterdir()) == ["objaverse_report.json"]
    assert load_script().main(["--views_root", str(views), "--out_dir", str(tmp_path / "lists")]) == 1
    assert "none of the 1 objects is complete" in capsys.readouterr().err
