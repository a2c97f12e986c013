"""NVS data (leftrefill.data.objaverse_nvs, leftrefill.data.nvs_masks) on tiny Objaverse-style folders
built here: 64 px RGBA renders of a disc at a view-dependent place, Blender look-at cameras."""

from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from leftrefill.data import nvs_masks, objaverse_nvs
from leftrefill.data.nvs_masks import adaptive_mask, complete_mask, dilation_kernel_size, stroke_width
from leftrefill.data.objaverse_nvs import (NVSDataError, load_view, nvs_test_pairs, nvs_training_pairs,
                                           read_camera, read_object_list)
from leftrefill.images import ImageInputError
from leftrefill.nvs_pose import relative_pose

RENDER = 64  # px of the synthetic renders
SIZE = 32  # dataset size (renders are resized)
BACKGROUND_RGB = (10, 200, 30)  # colour stored under alpha == 0: must come out white


# ------------------------------------------------------------------------------------- fixtures


def look_at(eye: np.ndarray) -> np.ndarray:
    """Blender world-to-camera [R | t] (3, 4) of a camera at ``eye`` looking at the origin down its -Z,
    world +Z up."""
    back = eye / np.linalg.norm(eye)  # camera +Z points away from the object
    right = np.cross([0.0, 0.0, 1.0], back)
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    rotation = np.stack([right, up, back])  # rows: camera axes in world coordinates
    return np.concatenate([rotation, -rotation @ eye[:, None]], axis=1)


def camera_of(view: int) -> np.ndarray:
    theta, phi, radius = 0.6 + 0.08 * view, 2 * math.pi * view / 12, 1.5 + 0.05 * view
    eye = radius * np.array([math.sin(theta) * math.cos(phi), math.sin(theta) * math.sin(phi), math.cos(theta)])
    return look_at(eye)


def render(view: int, size: int = RENDER) -> np.ndarray:
    """RGBA uint8: a disc of a view-dependent colour and place, a semi-transparent rim, garbage RGB under
    alpha 0."""
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., :3] = BACKGROUND_RGB
    center = (size // 2 + (view % 4) * 3 - 4, size // 2 + (view // 4) * 3 - 3)
    cv2.circle(rgba, center, size // 5 + 1, (200, 120, 40, 128), -1)
    cv2.circle(rgba, center, size // 5, (20 * view, 255 - 20 * view, 90, 255), -1)
    return rgba


def make_object(root: Path, uid: str, num_views: int = 12) -> Path:
    folder = root / uid
    folder.mkdir(parents=True)
    for view in range(num_views):
        Image.fromarray(render(view), "RGBA").save(folder / f"{view:03d}.png")
        np.save(folder / f"{view:03d}.npy", camera_of(view).astype(np.float32))
    return folder


@pytest.fixture
def views_root(tmp_path: Path) -> Path:
    root = tmp_path / "views_release"
    for uid in ("obj_a", "obj_b", "obj_c"):
        make_object(root, uid)
    return root


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(objaverse_nvs, "_warned_no_alpha", False)


def disc(size: int, center: tuple[int, int], radius: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, center, radius, 1, -1)
    return mask > 0


# ------------------------------------------------------------------------------------- load_view


def test_load_view_whitens_only_fully_transparent_pixels():
    rgba = render(3)
    rgb, silhouette = load_view(rgba, RENDER, "view")
    image = ((rgb.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    alpha = rgba[..., 3]
    assert (image[alpha == 0] == 255).all()
    # Semi-transparent pixels keep their raw RGB (no compositing onto white), as the release.
    assert (image[alpha == 128] == rgba[alpha == 128][:, :3]).all()
    assert (image[alpha == 255] == rgba[alpha == 255][:, :3]).all()
    assert torch.equal(silhouette[0], torch.from_numpy(alpha > 0).float())
    assert rgb.dtype == silhouette.dtype == torch.float32 and rgb.shape == (3, RENDER, RENDER)


def test_load_view_resizes_rgb_bilinear_and_silhouette_with_area_above_zero(tmp_path):
    path = tmp_path / "000.png"
    rgba = render(5)
    Image.fromarray(rgba, "RGBA").save(path)
    rgb, silhouette = load_view(path, SIZE, "target")
    white = rgba[..., :3].copy()
    white[rgba[..., 3] == 0] = 255
    expected_rgb = cv2.resize(white, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    expected_sil = cv2.resize((rgba[..., 3] > 0).astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_AREA) > 0
    assert torch.allclose(rgb, torch.from_numpy(expected_rgb).permute(2, 0, 1).float() / 127.5 - 1)
    assert torch.equal(silhouette[0] > 0, torch.from_numpy(expected_sil))
    assert set(silhouette.unique().tolist()) == {0.0, 1.0}


def test_rgb_render_assumes_white_background_and_warns_once(tmp_path, caplog, fresh_warning):
    rgb = np.full((RENDER, RENDER, 3), 255, np.uint8)
    rgb[10:20, 30:40] = (100, 250, 251)  # one channel below 250: object
    rgb[40:50, 5:9] = (252, 253, 250)  # all >= 250: background
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in paths:
        Image.fromarray(rgb, "RGB").save(path)
    with caplog.at_level(logging.WARNING, logger="leftrefill.data.objaverse_nvs"):
        _, silhouette = load_view(paths[0], RENDER, "target")
        load_view(paths[1], RENDER, "target")
        load_view(rgb, RENDER, "target")
    warnings = [r for r in caplog.records if "white background" in r.getMessage()]
    assert len(warnings) == 1 and str(paths[0]) in warnings[0].getMessage()
    expected = np.zeros((RENDER, RENDER), bool)
    expected[10:20, 30:40] = True
    assert torch.equal(silhouette[0] > 0, torch.from_numpy(expected))


@pytest.mark.parametrize("content", [b"", b"not a png at all", "truncated"])
def test_load_view_bad_file_names_it(tmp_path, content):
    path = tmp_path / "007.png"
    if content == "truncated":
        Image.fromarray(render(1), "RGBA").save(path)
        path.write_bytes(path.read_bytes()[:60])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageInputError, match="007.png"):
        load_view(path, SIZE, "reference")


def test_load_view_refuses_arrays_of_other_shapes_or_dtypes():
    for array in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.float32), np.zeros((8, 8, 2), np.uint8)):
        with pytest.raises(ImageInputError, match="reference"):
            load_view(array, SIZE, "reference")


# ------------------------------------------------------------------------------------- cameras


def test_read_camera_returns_float64_world_to_camera(tmp_path):
    path = tmp_path / "001.npy"
    np.save(path, camera_of(1).astype(np.float32))
    camera = read_camera(path)
    assert camera.dtype == np.float64 and camera.shape == (3, 4)
    np.testing.assert_allclose(camera, camera_of(1), atol=1e-6)


def _nan_camera():
    camera = camera_of(0)
    camera[1, 3] = np.nan
    return camera


def _reflection():
    camera = camera_of(0)
    camera[0, :3] *= -1
    return camera


@pytest.mark.parametrize("write, problem", [
    (lambda p: np.save(p, np.eye(4)), "shape"),
    (lambda p: np.save(p, camera_of(0)[:, :3]), "shape"),
    (lambda p: np.save(p, _nan_camera()), "NaN"),
    (lambda p: np.save(p, camera_of(0) * np.array([2.0, 1, 1, 1])), "orthonormal"),
    (lambda p: np.save(p, _reflection()), "reflection"),
    (lambda p: np.save(p, np.array([{"R": 1}, None], dtype=object), allow_pickle=True), "object"),
    (lambda p: p.write_bytes(pickle.dumps(camera_of(0))), "not a readable .npy"),
    (lambda p: p.write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n"), "not a readable .npy"),
    (lambda p: None, "cannot be read"),
])
def test_every_bad_camera_is_refused_naming_the_file(tmp_path, write, problem):
    path = tmp_path / "uid0" / "004.npy"
    path.parent.mkdir()
    write(path)
    with pytest.raises(NVSDataError, match=problem) as info:
        read_camera(path)
    assert str(path) in str(info.value)


def test_truncated_camera_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "004.npy"
    np.save(path, camera_of(0))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(NVSDataError, match="004.npy"):
        read_camera(path)


# ------------------------------------------------------------------------------------- object lists


def test_object_list_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "obj_train.txt"
    path.write_text("# train objects\nobj_a\n\n  obj_b  \n# obj_c\n")
    assert read_object_list(path) == ["obj_a", "obj_b"]


@pytest.mark.parametrize("bad", ["../escape", "sub/dir", "a\\b", "..", ".", "two words"])
def test_object_list_refuses_paths_naming_file_and_line(tmp_path, bad):
    path = tmp_path / "obj_test.txt"
    path.write_text(f"obj_a\n{bad}\n")
    with pytest.raises(NVSDataError, match=r"obj_test.txt, line 2"):
        read_object_list(path)


def test_empty_or_missing_object_list_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(NVSDataError, match="empty.txt: lists no uids"):
        read_object_list(tmp_path / "empty.txt")
    with pytest.raises(NVSDataError, match="absent.txt"):
        read_object_list(tmp_path / "absent.txt")


# ------------------------------------------------------------------------------------- training set


def test_incomplete_objects_are_all_listed_in_one_error(views_root, tmp_path):
    (views_root / "obj_a" / "005.png").unlink()
    (views_root / "obj_b" / "003.npy").unlink()
    (views_root / "obj_b" / "011.npy").unlink()
    listing = tmp_path / "list.txt"
    listing.write_text("obj_a\nobj_b\nobj_c\nobj_gone\n")
    with pytest.raises(NVSDataError) as info:
        nvs_training_pairs(str(views_root), str(listing), size=SIZE)
    message = str(info.value)
    assert "3 of 4 object folders are incomplete" in message
    assert "obj_a: missing 005.png" in message
    assert "obj_b: missing 003.npy, 011.npy" in message
    assert "obj_gone: no such folder" in message
    assert "obj_c" not in message


def test_more_than_ten_incomplete_objects_are_counted(tmp_path):
    root = tmp_path / "views"
    for i in range(13):
        (root / f"u{i:02d}").mkdir(parents=True)
    with pytest.raises(NVSDataError, match=r"(?s)13 of 13 .*u00: none of the 24 files.*\(\+3 more\)") as info:
        nvs_training_pairs(str(root), size=SIZE)
    assert "u09:" in str(info.value) and "u10:" not in str(info.value)


def test_training_items_pair_distinct_views_with_their_relative_pose(views_root):
    dataset = nvs_training_pairs(str(views_root), size=SIZE)
    assert len(dataset) == 3 and not hasattr(dataset, "scenes")
    torch.manual_seed(0)
    pairs = set()
    for _ in range(4):
        for index, uid in enumerate(("obj_a", "obj_b", "obj_c")):
            item = dataset[index]
            target_view, reference_view = item["target_view"], item["reference_view"]
            assert item["id"] == uid and target_view != reference_view
            assert 0 <= target_view < 12 and 0 <= reference_view < 12
            folder = views_root / uid
            target, silhouette = load_view(folder / f"{target_view:03d}.png", SIZE)
            assert torch.equal(item["target"], target)
            assert torch.equal(item["reference"], load_view(folder / f"{reference_view:03d}.png", SIZE)[0])
            expected = relative_pose(camera_of(target_view), camera_of(reference_view))
            assert item["pose"].dtype == torch.float32 and item["pose"].shape == (4,)
            torch.testing.assert_close(item["pose"], expected, atol=1e-5, rtol=0)
            assert item["mask"].shape == (1, SIZE, SIZE)
            assert (item["mask"][silhouette > 0] == 1).all()  # the adaptive mask covers the object
            pairs.add((target_view, reference_view))
    assert len(pairs) > 3  # views are drawn per item


def test_training_items_follow_torch_seed(views_root):
    dataset = nvs_training_pairs(str(views_root), size=SIZE)
    torch.manual_seed(7)
    first = [dataset[i] for i in range(3)]
    torch.manual_seed(7)
    again = [dataset[i] for i in range(3)]
    for a, b in zip(first, again):
        assert (a["target_view"], a["reference_view"]) == (b["target_view"], b["reference_view"])
        assert torch.equal(a["mask"], b["mask"])


def test_object_list_selects_objects(views_root, tmp_path):
    listing = tmp_path / "obj_train.txt"
    listing.write_text("obj_c\nobj_a\n")
    dataset = nvs_training_pairs(str(views_root), str(listing), size=SIZE)
    assert dataset.uids == ["obj_c", "obj_a"] and dataset[0]["id"] == "obj_c"


def test_unreadable_object_is_skipped_with_a_warning(views_root, caplog):
    dataset = nvs_training_pairs(str(views_root), size=SIZE)
    for view in range(12):
        np.save(views_root / "obj_a" / f"{view:03d}.npy", np.full((3, 4), np.nan))
    with caplog.at_level(logging.WARNING, logger="leftrefill.data.objaverse_nvs"):
        item = dataset[0]
    assert item["id"] == "obj_b"
    assert any("skipping object obj_a" in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------- adaptive mask


def test_adaptive_mask_covers_the_dilated_silhouette_and_more():
    silhouette = disc(256, (120, 140), 30)
    for seed in range(20):
        mask = adaptive_mask(silhouette, np.random.default_rng(seed))
        # The kernel size is the first draw; dilate independently with it.
        size = dilation_kernel_size(np.random.default_rng(seed), 256)
        dilated = cv2.dilate(silhouette.astype(np.uint8),
                             cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))) > 0
        assert mask.shape == (256, 256) and mask.dtype == bool
        assert mask[dilated].all()
        assert mask.sum() > dilated.sum() > silhouette.sum()


def test_adaptive_mask_stays_around_a_small_object():
    # Disc of radius 10 at the centre: dilated radius <= 23, so the box is within 128 +- (23 + 0.2 * 46)
    # and the stroke reaches at most 35 px (half of a width < 70) beyond it.
    silhouette = disc(256, (128, 128), 10)
    reach = 23 + math.ceil(0.2 * 47) + 35
    for seed in range(20):
        rows, cols = np.nonzero(adaptive_mask(silhouette, np.random.default_rng(seed)))
        assert rows.min() >= 128 - reach and rows.max() <= 128 + reach
        assert cols.min() >= 128 - reach and cols.max() <= 128 + reach


def test_adaptive_mask_at_the_border_stays_in_the_image():
    silhouette = np.zeros((64, 64), bool)
    silhouette[0:5, 60:64] = True
    for seed in range(10):
        mask = adaptive_mask(silhouette, np.random.default_rng(seed))
        assert mask.shape == (64, 64) and mask[silhouette].all()


def test_adaptive_mask_is_deterministic_per_seed():
    silhouette = disc(128, (60, 70), 20)
    first = adaptive_mask(silhouette, np.random.default_rng(3))
    assert np.array_equal(first, adaptive_mask(silhouette, np.random.default_rng(3)))
    assert not np.array_equal(first, adaptive_mask(silhouette, np.random.default_rng(4)))


def test_empty_silhouette_masks_the_whole_target():
    mask = adaptive_mask(np.zeros((48, 48), bool), np.random.default_rng(0))
    assert mask.all() and np.array_equal(mask, complete_mask(48))


def test_random_ranges_at_the_release_size_and_scaled():
    rng = np.random.default_rng(0)
    widths = {stroke_width(rng, 256) for _ in range(3000)}
    assert min(widths) == 40 and max(widths) == 69  # np.random.randint(40, 70): 70 excluded
    kernels = {dilation_kernel_size(rng, 256) for _ in range(3000)}
    assert kernels == set(range(10, 26))  # random.randint(10, 25): 25 included
    assert {dilation_kernel_size(rng, 512) for _ in range(3000)} == set(range(20, 51, 2))
    widths_512 = {stroke_width(rng, 512) for _ in range(3000)}
    assert min(widths_512) == 80 and max(widths_512) == 139
    assert all(stroke_width(rng, 4) >= 1 and dilation_kernel_size(rng, 4) >= 1 for _ in range(100))


def test_stroke_of_a_drawn_mask_has_the_drawn_width(monkeypatch):
    # With every point drawn at one place, the stroke is one disc of the drawn width.
    monkeypatch.setattr(nvs_masks, "_randint_between", lambda rng, low, high, count: np.full(count, 200))
    mask = adaptive_mask(disc(256, (40, 40), 5), np.random.default_rng(1))
    rng = np.random.default_rng(1)
    rng.integers(10, 26), rng.uniform(0.05, 0.2), rng.integers(20, 46)
    width = stroke_width(rng, 256)
    rows = np.nonzero(mask[:, 200])[0]
    rows = rows[rows > 100]
    assert abs((rows.max() - rows.min() + 1) - width) <= 2


def test_adaptive_mask_refuses_non_square_silhouettes():
    with pytest.raises(ValueError, match="square"):
        adaptive_mask(np.zeros((8, 9), bool), np.random.default_rng(0))


# ------------------------------------------------------------------------------------- test set


def test_reference_mode_hides_the_target_and_masks_the_reference_silhouette(views_root):
    dataset = nvs_test_pairs(str(views_root), size=SIZE)
    item = dataset[1]
    folder = views_root / "obj_b"
    reference, reference_silhouette = load_view(folder / "002.png", SIZE)
    assert item["id"] == "obj_b" and item["index"] == 1
    assert (item["reference_view"], item["target_view"]) == (2, 0)
    assert torch.equal(item["reference"], reference)
    assert torch.equal(item["target"], load_view(folder / "000.png", SIZE)[0])
    assert torch.equal(item["target_visible"], torch.ones(3, SIZE, SIZE))
    assert torch.equal(item["mask"], reference_silhouette)
    assert torch.equal(item["reference_silhouette"], reference_silhouette)
    torch.testing.assert_close(item["pose"], relative_pose(camera_of(0), camera_of(2)), atol=1e-5, rtol=0)
    assert dataset.pairs[1] == ("obj_b", folder / "002.png", folder / "000.png")


def test_fixed_mode_reads_binarised_mask_files(views_root, tmp_path):
    mask_root = tmp_path / "obj_test_masks"
    expected = {}
    for uid in ("obj_a", "obj_b", "obj_c"):
        values = np.zeros((SIZE, SIZE), np.uint8)
        values[4:12, 6:20] = 255
        values[20, 20], values[21, 21] = 100, 200  # grey: 100 / 255 < 0.5 -> keep, 200 / 255 -> fill
        (mask_root / uid).mkdir(parents=True)
        Image.fromarray(values, "L").save(mask_root / uid / "000.png")
        expected[uid] = torch.from_numpy(values > 127).float()[None]
    dataset = nvs_test_pairs(str(views_root), size=SIZE, mask_mode="fixed", mask_path=str(mask_root))
    for item in (dataset[0], dataset[2]):
        assert torch.equal(item["mask"], expected[item["id"]])
        assert torch.equal(item["target_visible"], item["target"])
        assert not item["mask_resized"]


def test_fixed_mode_resizes_a_mask_of_another_size(views_root, tmp_path):
    mask_root = tmp_path / "masks"
    for uid in ("obj_a", "obj_b", "obj_c"):
        (mask_root / uid).mkdir(parents=True)
        Image.fromarray(np.full((RENDER, RENDER), 255, np.uint8)).save(mask_root / uid / "000.png")
    item = nvs_test_pairs(str(views_root), size=SIZE, mask_mode="fixed", mask_path=str(mask_root))[0]
    assert item["mask_resized"] and item["mask"].shape == (1, SIZE, SIZE) and item["mask"].all()


def test_fixed_mode_lists_every_missing_mask_file(views_root, tmp_path):
    mask_root = tmp_path / "masks"
    (mask_root / "obj_b").mkdir(parents=True)
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(mask_root / "obj_b" / "000.png")
    with pytest.raises(NVSDataError, match="2 of 3 test mask files") as info:
        nvs_test_pairs(str(views_root), size=SIZE, mask_mode="fixed", mask_path=str(mask_root))
    message = str(info.value)
    assert str(mask_root / "obj_a" / "000.png") in message and str(mask_root / "obj_c" / "000.png") in message


def test_complete_mode_masks_the_whole_target(views_root):
    item = nvs_test_pairs(str(views_root), size=SIZE, mask_mode="complete", reference_view=5, target_view=7)[0]
    assert item["mask"].all() and torch.equal(item["target_visible"], item["target"])
    torch.testing.assert_close(item["pose"], relative_pose(camera_of(7), camera_of(5)), atol=1e-5, rtol=0)


def test_test_set_needs_only_its_two_views(views_root):
    (views_root / "obj_a" / "009.png").unlink()
    assert len(nvs_test_pairs(str(views_root), size=SIZE)) == 3
    (views_root / "obj_a" / "002.npy").unlink()
    with pytest.raises(NVSDataError, match="obj_a: missing 002.npy"):
        nvs_test_pairs(str(views_root), size=SIZE)


@pytest.mark.parametrize("kwargs, name", [
    ({"mask_mode": "random"}, "--mask_mode"),
    ({"mask_mode": "fixed"}, "--mask_path"),
    ({"reference_view": 0, "target_view": 0}, "--reference_view"),
    ({"reference_view": 12}, "--reference_view"),
    ({"target_view": -1}, "--target_view"),
    ({"target_view": 3, "num_views": 3}, "--target_view"),
])
def test_bad_test_arguments_name_the_argument(views_root, kwargs, name):
    with pytest.raises(ValueError, match=name):
        nvs_test_pairs(str(views_root), size=SIZE, **kwargs)


def test_missing_views_root_or_empty_root_is_named(tmp_path):
    with pytest.raises(NVSDataError, match="absent"):
        nvs_training_pairs(str(tmp_path / "absent"), size=SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NVSDataError, match="no object folders"):
        nvs_test_pairs(str(tmp_path / "empty"), size=SIZE)


# ------------------------------------------------------------------------------------- batches


def test_items_collate_into_the_batch_schema(views_root):
    torch.manual_seed(0)
    training = nvs_training_pairs(str(views_root), size=SIZE)
    batch = default_collate([training[i] for i in range(3)])
    assert batch["reference"].shape == batch["target"].shape == (3, 3, SIZE, SIZE)
    assert batch["mask"].shape == (3, 1, SIZE, SIZE) and batch["pose"].shape == (3, 4)
    assert batch["pose"].dtype == torch.float32 and batch["id"] == ["obj_a", "obj_b", "obj_c"]
    assert batch["target_view"].shape == (3,)
    assert batch["reference"].min() >= -1 and batch["reference"].max() <= 1
    test = default_collate([nvs_test_pairs(str(views_root), size=SIZE)[i] for i in range(3)])
    assert test["target_visible"].shape == (3, 3, SIZE, SIZE)
    assert test["reference_silhouette"].shape == test["mask"].shape == (3, 1, SIZE, SIZE)
    assert test["index"].tolist() == [0, 1, 2] and test["pose"].shape == (3, 4)
