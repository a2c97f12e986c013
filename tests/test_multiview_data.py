"""Multi-view reference-guided inpainting data (leftrefill.data.multiview, METHOD 3.2): training items from an
extended manifest, and the multi-view test layout."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from leftrefill.data.manifest import ManifestError, read_multiview_pairs, write_image_table, write_multiview_manifest
from leftrefill.data.multiview import (MultiViewRefDataset, MultiViewTestDataset, check_multiview_test_images,
                                       find_multiview_test_items, multiview_ref_pairs, multiview_test_items)
from leftrefill.images import ImageInputError

SIZE = 32
# Image id -> constant colour, so that every reference is recognisable after any view (a constant image
# stays constant through resizing and cropping). Image 0 is the target of every pair.
COLOURS = {0: (200, 200, 200), 1: (250, 0, 0), 2: (0, 250, 0), 3: (0, 0, 250), 4: (250, 250, 0), 5: (0, 250, 250)}


def colour_tensor(rgb: tuple[int, int, int]) -> torch.Tensor:
    """(3, 1, 1) in [-1, 1], as leftrefill.images.rgb_to_tensor maps uint8."""
    return torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 127.5 - 1


def write_manifest(folder: Path, sources: dict[int, list[int]], shapes: dict[int, tuple[int, int]] | None = None,
                   skip: tuple[int, ...] = ()) -> Path:
    """Images ``<id>.png`` of COLOURS (``shapes``: (H, W), default 48 x 40; ids in ``skip`` not written), their
    table, and a multi-view manifest with pair id -> ``sources`` (references in that order), target 0."""
    for image_id, colour in COLOURS.items():
        if image_id not in skip:
            height, width = (shapes or {}).get(image_id, (48, 40))
            Image.fromarray(np.full((height, width, 3), colour, np.uint8)).save(folder / f"{image_id}.png")
    write_image_table(folder / "images.json", folder, {i: f"{i}.png" for i in COLOURS})
    manifest = folder / "extended_train_pairs.json"
    write_multiview_manifest(manifest, folder / "images.json",
                             [{"id": i, "target": 0, "sources": s, "scene": "0001"} for i, s in sources.items()])
    return manifest


# ------------------------------------------------------------------------------------------------ training


def test_training_item_keys_shapes_ranges_and_collated_batch(tmp_path):
    dataset = multiview_ref_pairs(str(write_manifest(tmp_path, {0: [1, 2, 3]})), size=SIZE, num_views=4)
    torch.manual_seed(0)
    item = dataset[0]
    assert set(item) == {"target", "mask", "references", "id"} and item["id"] == 0
    assert item["target"].shape == (3, SIZE, SIZE) and item["references"].shape == (3, 3, SIZE, SIZE)
    assert item["mask"].shape == (1, SIZE, SIZE) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert -1 <= item["target"].min() and item["target"].max() <= 1
    assert dataset.scenes == ["0001"] and len(dataset) == 1
    batch = default_collate([item, item])
    assert batch["references"].shape == (2, 3, 3, SIZE, SIZE) and batch["mask"].shape == (2, 1, SIZE, SIZE)


def test_references_come_in_manifest_order_and_the_mask_only_on_the_target(tmp_path):
    # Sources not in id order: the manifest's order (the first has the highest overlap) must be kept.
    dataset = multiview_ref_pairs(str(write_manifest(tmp_path, {7: [4, 1, 5, 2]})), size=SIZE, num_views=4)
    for seed in range(4):
        torch.manual_seed(seed)
        item = dataset[0]
        expected = torch.stack([colour_tensor(COLOURS[i]).expand(3, SIZE, SIZE) for i in (4, 1, 5)])
        torch.testing.assert_close(item["references"], expected)  # untouched: no hole drawn on a reference
        assert item["mask"].sum() > 0
        torch.testing.assert_close(item["target"], colour_tensor(COLOURS[0]).expand(3, SIZE, SIZE))


def test_pairs_with_too_few_references_are_left_out_with_one_line(tmp_path, caplog):
    manifest = write_manifest(tmp_path, {0: [1], 1: [2, 3], 2: [3, 4, 5]})
    with caplog.at_level(logging.WARNING, logger="leftrefill.data.multiview"):
        dataset = multiview_ref_pairs(str(manifest), size=SIZE, num_views=3)
    assert [pair.id for pair in dataset.pairs] == [1, 2]
    assert [len(pair.references) for pair in dataset.pairs] == [2, 2]  # the first num_views - 1 only
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "leaving out 1 of 3 pairs with fewer than the 2 references num_views=3" in lines[0]


def test_no_pair_with_enough_references_names_the_manifest_and_num_views(tmp_path):
    manifest = write_manifest(tmp_path, {0: [1], 1: [2, 3]})
    with pytest.raises(ValueError, match=rf"{manifest}: no pair has the 3 references num_views=4 needs \(at most 2\)"):
        multiview_ref_pairs(str(manifest), size=SIZE, num_views=4)
    with pytest.raises(ValueError, match="num_views must be an integer >= 2"):
        multiview_ref_pairs(str(manifest), size=SIZE, num_views=1)


def test_pairs_missing_a_used_image_are_dropped_and_an_unused_one_does_not_matter(tmp_path, caplog):
    manifest = write_manifest(tmp_path, {0: [1, 2, 5], 1: [5, 1], 2: [2, 3]}, skip=(5,))
    with caplog.at_level(logging.WARNING, logger="leftrefill.data.multiview"):
        dataset = multiview_ref_pairs(str(manifest), size=SIZE, num_views=3, max_missing_fraction=0.5)
    assert [pair.id for pair in dataset.pairs] == [0, 2]  # pair 0 uses only references 1 and 2
    assert "skipping 1 of 3 pairs: 1 of 5 images are missing" in caplog.text and "5.png" in caplog.text
    with pytest.raises(ManifestError, match="1 of 5 images listed in .* are missing.*is the data root right"):
        multiview_ref_pairs(str(manifest), size=SIZE, num_views=3)


def test_same_torch_seed_gives_the_same_item(tmp_path):
    # Non-square images, so the random crops differ between draws.
    manifest = write_manifest(tmp_path, {0: [1, 2]}, shapes={i: (40, 90) for i in COLOURS})
    dataset = multiview_ref_pairs(str(manifest), size=SIZE, num_views=3)
    items = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        items.append(dataset[0])
    for key in ("target", "mask", "references"):
        torch.testing.assert_close(items[0][key], items[1][key])
    assert not torch.equal(items[0]["mask"], items[2]["mask"])


def test_matching_mask_follows_the_target_keypoints(tmp_path):
    # A square target (96 x 96): every view is the whole image scaled by SIZE / 96. The target's confident
    # matches lie in its left fifth, the source's in its right fifth: the hole must be on the left.
    manifest = write_manifest(tmp_path, {3: [1, 2]}, shapes={0: (96, 96)})
    rng = np.random.default_rng(0)
    target_points = np.stack([rng.uniform(2, 20, 200), rng.uniform(2, 94, 200)], axis=1).astype(np.float32)
    np.savez(tmp_path / "00000003.npz", target_points=target_points, source_points=target_points + [70, 0],
             confidence=np.ones(200, np.float32), target_size=np.array([96, 96]), source_size=np.array([40, 48]))
    dataset = multiview_ref_pairs(str(manifest), size=SIZE, num_views=3, match_path=str(tmp_path),
                                  match_mask_rate=1.0)
    for seed in range(5):
        torch.manual_seed(seed)
        mask = dataset[0]["mask"][0]
        # 20 / 96 of the width plus half the widest stroke (70 / 256 of the view) at most.
        assert mask.sum() > 0 and mask[:, SIZE // 2:].sum() == 0


def test_unreadable_reference_skips_to_the_next_pair(tmp_path, caplog):
    manifest = write_manifest(tmp_path, {0: [1, 2], 1: [3, 4]})
    (tmp_path / "2.png").write_bytes(b"not a png")
    dataset = MultiViewRefDataset(read_multiview_pairs(manifest), num_views=3, size=SIZE)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        item = dataset[0]
    assert item["id"] == 1 and "skipping pair 0: reference 1:" in caplog.text


# ---------------------------------------------------------------------------------------------------- test


def write_test_folder(folder: Path, references: list[tuple[str, tuple[int, int]]], *,
                      target: tuple[str, tuple[int, int]] = ("target.jpg", (48, 64)),
                      mask: tuple[str, tuple[int, int]] = ("mask.png", (48, 64))) -> Path:
    """A test item folder: reference files (name, (H, W)) coloured COLOURS[1], [2], ... in order, a target
    coloured COLOURS[0], and a mask whose top half is the hole."""
    folder.mkdir(parents=True)
    for k, (name, shape) in enumerate(references):
        Image.fromarray(np.full((*shape, 3), COLOURS[k + 1], np.uint8)).save(folder / name)
    Image.fromarray(np.full((*target[1], 3), COLOURS[0], np.uint8)).save(folder / target[0])
    hole = np.zeros(mask[1], np.uint8)
    hole[: mask[1][0] // 2] = 255
    Image.fromarray(hole).save(folder / mask[0])
    return folder


FOUR_SOURCES = [("source.jpg", (48, 64)), ("source_1.jpg", (48, 64)), ("source_2.jpg", (48, 64)),
                ("source_3.jpg", (48, 64))]


def test_test_items_shapes_order_and_png_fallbacks(tmp_path):
    write_test_folder(tmp_path / "000002", FOUR_SOURCES)
    write_test_folder(tmp_path / "000001", [("source.png", (48, 64)), ("source_1.png", (48, 64)),
                                            ("source_2.jpg", (48, 64))], target=("target.png", (48, 64)))
    dataset = MultiViewTestDataset(tmp_path, test_size=SIZE, view_num=4)
    assert [item.id for item in dataset.items] == ["000001", "000002"]  # sorted folders, as find_test_pairs
    first = dataset.items[0]
    assert [p.name for p in first.references] == ["source.png", "source_1.png", "source_2.jpg"]
    assert first.target.name == "target.png" and first.folder == tmp_path / "000001"
    item = dataset[0]
    assert set(item) == {"id", "index", "references", "target", "mask", "mask_resized"}
    assert item["id"] == "000001" and item["index"] == 0 and not item["mask_resized"]
    assert item["references"].shape == (3, 3, SIZE, SIZE) and item["target"].shape == (3, SIZE, SIZE)
    for k in range(3):  # source, source_1, source_2 in that order (PNG: exact colours)
        torch.testing.assert_close(item["references"][k], colour_tensor(COLOURS[k + 1]).expand(3, SIZE, SIZE))
    hole = item["mask"][0]
    assert item["mask"].shape == (1, SIZE, SIZE) and hole[: SIZE // 2].all() and not hole[SIZE // 2:].any()
    assert dataset[1]["references"].shape == (3, 3, SIZE, SIZE)  # source_3 exists but view_num 4 uses three


def test_too_few_sources_for_view_num_is_one_error_naming_the_folders(tmp_path):
    write_test_folder(tmp_path / "000001", FOUR_SOURCES)
    write_test_folder(tmp_path / "000002", FOUR_SOURCES[:2])
    write_test_folder(tmp_path / "000003", [FOUR_SOURCES[0], FOUR_SOURCES[2]])  # a gap: no source_1
    with pytest.raises(FileNotFoundError) as error:
        find_multiview_test_items(tmp_path, view_num=4)
    message = str(error.value)
    assert "2 folder(s) hold fewer than the 3 source images --view_num 4 asks for" in message
    assert f"{tmp_path / '000002'}: 2 source image(s) in order, no source_2.jpg or source_2.png" in message
    assert f"{tmp_path / '000003'}: 1 source image(s) in order, no source_1.jpg or source_1.png" in message
    assert "000001" not in message
    assert len(find_multiview_test_items(tmp_path, view_num=2)) == 3  # source.jpg alone is enough for 2 views
    with pytest.raises(ValueError, match="--view_num must be an integer >= 2"):
        find_multiview_test_items(tmp_path, view_num=1)


def test_different_image_sizes_are_said_once_per_test_set(tmp_path, caplog):
    for name in ("000001", "000002", "000003"):
        write_test_folder(tmp_path / name, [("source.jpg", (60, 80)), ("source_1.jpg", (48, 64))])
    dataset = MultiViewTestDataset(tmp_path, test_size=SIZE, view_num=3)
    with caplog.at_level(logging.WARNING, logger="leftrefill.data.multiview"):
        for index in range(len(dataset)):
            assert dataset[index]["references"].shape == (2, 3, SIZE, SIZE)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert str(tmp_path / "000001") in message and "64x48" in message and "80x60" in message and "once" in message


def test_full_size_is_the_targets_own_size(tmp_path):
    write_test_folder(tmp_path / "000001", FOUR_SOURCES[:2], target=("target.jpg", (60, 90)),
                      mask=("mask.png", (30, 45)))
    dataset = MultiViewTestDataset(tmp_path, test_size=SIZE, view_num=3)
    target, hole = dataset.full_size(0)
    assert target.shape == (60, 90, 3) and target.dtype == np.uint8
    assert hole.shape == (60, 90) and hole.dtype == bool and hole[:30].all() and not hole[30:].any()
    assert dataset[0]["mask_resized"]


def test_check_and_validation_builder_name_an_unreadable_reference(tmp_path):
    write_test_folder(tmp_path / "000001", FOUR_SOURCES)
    check_multiview_test_images(find_multiview_test_items(tmp_path, view_num=4))
    assert len(multiview_test_items(str(tmp_path), size=SIZE, num_views=4)) == 1
    (tmp_path / "000001" / "source_2.jpg").write_bytes(b"\xff\xd8 truncated")
    check_multiview_test_images(find_multiview_test_items(tmp_path, view_num=3))  # source_2 is not used
    with pytest.raises(ImageInputError, match=r"(?s)1 of the 5 test image files cannot be read.*source_2\.jpg"):
        multiview_test_items(str(tmp_path), size=SIZE, num_views=4)
