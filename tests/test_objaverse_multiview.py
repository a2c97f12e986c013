"""Multi-view NVS data (leftrefill.data.objaverse_multiview) on the tiny Objaverse-style folders of
tests/test_nvs_data.py: 64 px RGBA renders of a disc at a view-dependent place, Blender look-at cameras."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from leftrefill.data.nvs_masks import adaptive_mask
from leftrefill.data.objaverse_multiview import (NVSMultiviewTrainingItems, default_target_views,
                                                 nvs_multiview_test_items, nvs_multiview_training_items)
from leftrefill.data.objaverse_nvs import NVSDataError, load_view
from leftrefill.nvs_pose import relative_pose
from tests.test_nvs_data import RENDER, SIZE, make_object

UIDS = ("obj_a", "obj_b", "obj_c")


@pytest.fixture
def views_root(tmp_path: Path) -> Path:
    root = tmp_path / "views_release"
    for uid in UIDS:
        make_object(root, uid)
    return root


def pose_from_files(folder: Path, target_view: int, reference_view: int) -> torch.Tensor:
    """The expected pose, from the camera files as written (float32 .npy)."""
    return relative_pose(np.load(folder / f"{target_view:03d}.npy"), np.load(folder / f"{reference_view:03d}.npy"))


def silhouette_of(folder: Path, view: int) -> torch.Tensor:
    return load_view(folder / f"{view:03d}.png", SIZE)[1]  # (1, S, S) in {0, 1}


# ------------------------------------------------------------------------------------- training


def test_training_item_has_the_schema_with_a_view_dimension(views_root):
    torch.manual_seed(0)
    item = nvs_multiview_training_items(str(views_root), size=SIZE, num_views=3)[1]
    assert item["id"] == "obj_b" and isinstance(item["reference_view"], int)
    assert item["reference"].shape == (3, SIZE, SIZE) and item["target"].shape == (3, 3, SIZE, SIZE)
    assert item["mask"].shape == (3, 1, SIZE, SIZE) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["pose"].shape == (3, 4) and item["pose"].dtype == torch.float32
    assert item["target_views"].shape == (3,) and item["target_views"].dtype == torch.long
    for image in (item["reference"], item["target"]):
        assert image.dtype == torch.float32 and image.min() >= -1 and image.max() <= 1


def test_training_views_are_distinct_and_never_the_reference(views_root):
    dataset = nvs_multiview_training_items(str(views_root), size=SIZE, num_views=4)
    torch.manual_seed(0)
    references, targets = set(), set()
    for seed in range(40):
        torch.manual_seed(seed)
        item = dataset[seed % 3]
        views = item["target_views"].tolist()
        assert len(set(views)) == 4 and item["reference_view"] not in views
        assert all(0 <= view < 12 for view in [*views, item["reference_view"]])
        references.add(item["reference_view"])
        targets.add(tuple(views))
    assert len(references) > 6 and len(targets) > 30  # drawn per item, ordered draws vary too


def test_training_images_are_the_renders_of_their_views(views_root):
    torch.manual_seed(3)
    item = nvs_multiview_training_items(str(views_root), size=SIZE, num_views=3)[2]
    folder = views_root / "obj_c"
    assert torch.equal(item["reference"], load_view(folder / f"{item['reference_view']:03d}.png", SIZE)[0])
    for target, view in zip(item["target"], item["target_views"].tolist()):
        assert torch.equal(target, load_view(folder / f"{view:03d}.png", SIZE)[0])


def test_each_pose_is_its_target_seen_from_the_reference(views_root):
    dataset = nvs_multiview_training_items(str(views_root), size=SIZE, num_views=5)
    torch.manual_seed(1)
    for index, uid in enumerate(UIDS):
        item = dataset[index]
        for pose, view in zip(item["pose"], item["target_views"].tolist()):
            expected = pose_from_files(views_root / uid, view, item["reference_view"])
            torch.testing.assert_close(pose, expected, atol=1e-6, rtol=0)
        assert len({tuple(pose.tolist()) for pose in item["pose"]}) == 5  # one pose per target


def test_adaptive_masks_cover_each_target_inside_the_image_and_differ(views_root):
    dataset = nvs_multiview_training_items(str(views_root), size=SIZE, num_views=3)
    torch.manual_seed(2)
    for index, uid in enumerate(UIDS):
        item = dataset[index]
        for mask, view in zip(item["mask"], item["target_views"].tolist()):
            silhouette = silhouette_of(views_root / uid, view)
            assert (mask[silhouette > 0] == 1).all()  # the object, dilated, is always filled
            assert mask.sum() > silhouette.sum() and not mask.all()  # blobs around it, not the whole view
        assert not torch.equal(item["mask"][0], item["mask"][1])
        assert not torch.equal(item["mask"][1], item["mask"][2])


def test_masks_are_drawn_as_the_one_reference_pairs_do_once_per_target(views_root):
    """Independent replay of the draws: the views (reference first), then adaptive_mask of each target's
    silhouette in target order, from the same generator."""
    dataset = NVSMultiviewTrainingItems(views_root, list(UIDS), size=SIZE, num_views=3)
    item = dataset.item("obj_a", np.random.default_rng(11))
    rng = np.random.default_rng(11)
    views = rng.choice(12, 4, replace=False).tolist()
    assert [item["reference_view"], *item["target_views"].tolist()] == views
    for mask, view in zip(item["mask"], views[1:]):
        expected = adaptive_mask(silhouette_of(views_root / "obj_a", view)[0].numpy() > 0, rng)
        assert torch.equal(mask[0], torch.from_numpy(expected).float())


def test_training_items_follow_torch_seed(views_root):
    dataset = nvs_multiview_training_items(str(views_root), size=SIZE, num_views=3)
    torch.manual_seed(7)
    first = [dataset[i] for i in range(3)]
    torch.manual_seed(7)
    again = [dataset[i] for i in range(3)]
    for a, b in zip(first, again):
        assert a["reference_view"] == b["reference_view"]
        assert torch.equal(a["target_views"], b["target_views"]) and torch.equal(a["mask"], b["mask"])


def test_training_needs_every_render_of_every_object(views_root):
    (views_root / "obj_b" / "011.npy").unlink()
    with pytest.raises(NVSDataError, match="obj_b: missing 011.npy"):
        nvs_multiview_training_items(str(views_root), size=SIZE)


def test_unreadable_object_is_skipped_with_a_warning(views_root, caplog):
    dataset = nvs_multiview_training_items(str(views_root), size=SIZE)
    for view in range(12):
        np.save(views_root / "obj_a" / f"{view:03d}.npy", np.full((3, 4), np.nan))
    with caplog.at_level(logging.WARNING, logger="leftrefill.data.objaverse_nvs"):
        item = dataset[0]
    assert item["id"] == "obj_b"
    assert any("skipping object obj_a" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------- test set


def test_test_items_use_the_given_views_and_are_deterministic(views_root):
    dataset = nvs_multiview_test_items(str(views_root), size=SIZE, num_views=3, reference_view=5,
                                       target_views=[9, 1, 6], mask_mode="complete")
    torch.manual_seed(0)
    item = dataset[1]
    torch.manual_seed(1)
    again = dataset[1]
    folder = views_root / "obj_b"
    assert item["id"] == "obj_b" and item["index"] == 1 and item["reference_view"] == 5
    assert item["target_views"].tolist() == [9, 1, 6]
    assert torch.equal(item["reference"], load_view(folder / "005.png", SIZE)[0])
    for target, view in zip(item["target"], (9, 1, 6)):
        assert torch.equal(target, load_view(folder / f"{view:03d}.png", SIZE)[0])
    for view, pose in zip((9, 1, 6), item["pose"]):
        torch.testing.assert_close(pose, pose_from_files(folder, view, 5), atol=1e-6, rtol=0)
    assert item["mask"].shape == (3, 1, SIZE, SIZE) and item["mask"].all()
    assert torch.equal(item["target_visible"], item["target"]) and not item["mask_resized"].any()
    for key in ("reference", "target", "target_visible", "mask", "pose", "target_views"):
        assert torch.equal(item[key], again[key])


def test_reference_mode_masks_every_target_with_the_reference_silhouette(views_root):
    item = nvs_multiview_test_items(str(views_root), size=SIZE)[0]
    assert item["reference_view"] == 2 and item["target_views"].tolist() == [0, 1, 3]
    reference_silhouette = silhouette_of(views_root / "obj_a", 2)
    assert torch.equal(item["reference_silhouette"], reference_silhouette)
    assert torch.equal(item["mask"], reference_silhouette.expand(3, 1, SIZE, SIZE))
    assert torch.equal(item["target_visible"], torch.ones(3, 3, SIZE, SIZE))


@pytest.mark.parametrize("reference_view, num_views, expected", [
    (2, 3, [0, 1, 3]), (0, 3, [1, 2, 3]), (11, 4, [0, 1, 2, 3]), (5, 11, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]),
])
def test_default_target_views_are_the_first_indices_other_than_the_reference(reference_view, num_views, expected):
    assert default_target_views(reference_view, num_views) == expected


def test_fixed_mode_reads_one_mask_file_per_target_view(views_root, tmp_path):
    mask_root = tmp_path / "masks"
    for uid in UIDS:
        (mask_root / uid).mkdir(parents=True)
        for k, view in enumerate((4, 7)):
            values = np.zeros((SIZE, SIZE), np.uint8)
            values[2 + k: 10 + 5 * k, 3:20] = 255
            Image.fromarray(values).save(mask_root / uid / f"{view:03d}.png")
    Image.fromarray(np.full((RENDER, RENDER), 255, np.uint8)).save(mask_root / "obj_c" / "007.png")
    dataset = nvs_multiview_test_items(str(views_root), size=SIZE, num_views=2, reference_view=0,
                                       target_views=[4, 7], mask_mode="fixed", mask_path=str(mask_root))
    item = dataset[0]
    assert item["mask"][0, 0, 2:10, 3:20].all() and item["mask"][0].sum() == 8 * 17
    assert item["mask"][1, 0, 3:15, 3:20].all() and item["mask"][1].sum() == 12 * 17
    assert torch.equal(item["target_visible"], item["target"]) and not item["mask_resized"].any()
    resized = dataset[2]
    assert resized["mask_resized"].tolist() == [False, True] and resized["mask"][1].all()


def test_fixed_mode_lists_every_missing_mask_file(views_root, tmp_path):
    mask_root = tmp_path / "masks"
    (mask_root / "obj_a").mkdir(parents=True)
    for view in (0, 1, 3):
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(mask_root / "obj_a" / f"{view:03d}.png")
    with pytest.raises(NVSDataError, match="6 of 9 test mask files") as info:
        nvs_multiview_test_items(str(views_root), size=SIZE, mask_mode="fixed", mask_path=str(mask_root))
    assert str(mask_root / "obj_c" / "003.png") in str(info.value)


def test_test_set_needs_only_its_views(views_root):
    (views_root / "obj_a" / "009.png").unlink()
    assert len(nvs_multiview_test_items(str(views_root), size=SIZE)) == 3
    with pytest.raises(NVSDataError, match="obj_a: missing 009.png"):
        nvs_multiview_test_items(str(views_root), size=SIZE, target_views=[0, 9, 1])


# ------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs, message", [
    ({"num_views": 12}, "num_views 12 target views and one reference need 13 distinct renders, but num_renders "
                        "is 12"),
    ({"num_views": 4, "num_renders": 4}, "need 5 distinct renders, but num_renders is 4"),
    ({"num_views": 0}, "num_views .* must be >= 1, got 0"),
    ({"size": 0}, "size must be >= 1"),
])
def test_too_many_views_for_the_renders_are_refused(views_root, kwargs, message):
    with pytest.raises(ValueError, match=message):
        nvs_multiview_training_items(str(views_root), **{"size": SIZE, **kwargs})
    with pytest.raises(ValueError, match=message):
        nvs_multiview_test_items(str(views_root), **{"size": SIZE, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    ({"target_views": [0, 2, 3]}, r"target_views \[0, 2, 3\] contains the reference_view 2"),
    ({"target_views": [0, 3, 0]}, r"target_views \[0, 3, 0\] repeats \[0\]"),
    ({"target_views": [0, 1]}, r"target_views \[0, 1\] has 2 views, but num_views is 3"),
    ({"target_views": [0, 1, 12]}, r"\[12\] outside \[0, 12\)"),
    ({"target_views": [0, 1.5, 3]}, "expected render indices"),
    ({"reference_view": 12}, r"reference_view 12 is outside \[0, 12\)"),
    ({"mask_mode": "random"}, "mask_mode 'random' is unknown"),
    ({"mask_mode": "fixed"}, "mask_mode fixed needs mask_path"),
])
def test_bad_test_views_are_refused_with_the_reason(views_root, kwargs, message):
    with pytest.raises(ValueError, match=message):
        nvs_multiview_test_items(str(views_root), size=SIZE, **kwargs)


def test_arguments_are_checked_before_the_files(tmp_path):
    with pytest.raises(ValueError, match="num_renders"):
        nvs_multiview_training_items(str(tmp_path / "absent"), num_views=20)
    with pytest.raises(ValueError, match="contains the reference_view"):
        nvs_multiview_test_items(str(tmp_path / "absent"), target_views=[1, 2, 3])


# ------------------------------------------------------------------------------------- batches


def test_items_collate_with_a_view_dimension(views_root):
    torch.manual_seed(0)
    training = nvs_multiview_training_items(str(views_root), size=SIZE, num_views=2)
    batch = default_collate([training[i] for i in range(3)])
    assert batch["reference"].shape == (3, 3, SIZE, SIZE) and batch["target"].shape == (3, 2, 3, SIZE, SIZE)
    assert batch["mask"].shape == (3, 2, 1, SIZE, SIZE) and batch["pose"].shape == (3, 2, 4)
    assert batch["target_views"].shape == (3, 2) and batch["reference_view"].shape == (3,)
    assert batch["id"] == list(UIDS)
    test = default_collate([nvs_multiview_test_items(str(views_root), size=SIZE, num_views=2)[i] for i in range(3)])
    assert test["target_visible"].shape == (3, 2, 3, SIZE, SIZE) and test["mask_resized"].shape == (3, 2)
    assert test["reference_silhouette"].shape == (3, 1, SIZE, SIZE) and test["index"].tolist() == [0, 1, 2]
