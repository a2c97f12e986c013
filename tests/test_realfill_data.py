"""RealFill scenes and training set (leftrefill.data.realfill, METHOD 5.1 / 7.1).

Statistical tests use a fixed seed and tolerances of at least 5 standard errors of the estimate, so a
correct implementation fails them with probability below 1e-6 for any seed."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from leftrefill.data.realfill import (MAX_REFERENCES, PROMPT, RealFillTrainingSet, Scene, SceneError, load_target,
                                     random_box_mask, random_resized_crop, read_scene, realfill_training_set)

from conftest import ROOT

BUNDLED = ROOT / "data" / "samples_realfill" / "sacre_coeur"
RED = (220, 30, 30)
SQUARE = (slice(20, 56), slice(40, 76))  # rows, columns of the target's hole in the synthetic scene


def make_scene(root, n_refs=2, target_hw=(72, 96), mask=None, gt_hw=None):
    """A synthetic scene: grey references, a grey target with a red square exactly where the mask is white."""
    (root / "ref").mkdir(parents=True)
    (root / "target").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_refs):
        Image.fromarray(rng.integers(0, 255, (80, 70, 3), dtype=np.uint8)).save(root / "ref" / f"{i}.jpg")
    target = np.full((*target_hw, 3), 128, np.uint8)
    target[SQUARE] = RED
    Image.fromarray(target).save(root / "target" / "target.png")
    if mask is None:
        mask = np.zeros(target_hw, np.uint8)
        mask[SQUARE] = 255
    Image.fromarray(mask).save(root / "target" / "mask.png")
    if gt_hw is not None:
        Image.fromarray(np.zeros((*gt_hw, 3), np.uint8)).save(root / "target" / "gt.png")
    return root


# -- reading scenes ------------------------------------------------------------------------------------
def test_bundled_scene_reads_and_yields_items():
    scene = read_scene(BUNDLED)
    assert [p.name for p in scene.references] == ["view_3.jpg", "view_5.jpg", "view_6.jpg"]
    assert scene.gt is not None and scene.name == "sacre_coeur"
    target, hole = load_target(scene)
    assert hole.shape == target.shape[:2] == (256, 341) and 0.05 < hole.mean() < 0.3
    dataset = realfill_training_set(BUNDLED, size=256)
    assert len(dataset) == 4
    for index in range(4):
        item = dataset[index]
        assert item["image"].shape == (3, 256, 256) and item["mask"].shape == item["loss_weight"].shape == (1, 256, 256)
        assert item["is_target"] == (index == 3)


def test_scene_is_frozen_and_lists_references_then_target(tmp_path):
    scene = read_scene(make_scene(tmp_path / "s", n_refs=3))
    assert [p.name for p in scene.images] == ["0.jpg", "1.jpg", "2.jpg", "target.png"]
    with pytest.raises(AttributeError):
        scene.target = scene.mask


def _break(kind, root):
    """Make the scene at ``root`` bad in one way; return the text the error must name."""
    if kind == "no ref folder":
        for p in (root / "ref").iterdir():
            p.unlink()
        (root / "ref").rmdir()
        return str(root / "ref")
    if kind == "no references":
        for p in (root / "ref").iterdir():
            p.unlink()
        (root / "ref" / "notes.txt").write_text("not an image")
        return str(root / "ref")
    if kind == "too many references":
        for i in range(MAX_REFERENCES + 1):
            Image.new("RGB", (8, 8)).save(root / "ref" / f"extra{i}.png")
        return str(root / "ref")
    if kind in ("no target", "no mask"):
        file = root / "target" / ("target.png" if kind == "no target" else "mask.png")
        file.unlink()
        return str(file)
    if kind == "unreadable reference":
        (root / "ref" / "0.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
        return str(root / "ref" / "0.jpg")
    if kind == "truncated target":
        file = root / "target" / "target.png"
        file.write_bytes(file.read_bytes()[:60])
        return str(file)
    if kind in ("empty mask", "all-white mask"):
        value = 0 if kind == "empty mask" else 255
        Image.new("L", (96, 72), value).save(root / "target" / "mask.png")
        return str(root / "target" / "mask.png")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no ref folder", "no references", "too many references", "no target", "no mask",
                                  "unreadable reference", "truncated target", "empty mask", "all-white mask"])
def test_bad_scene_raises_scene_error_naming_the_file(tmp_path, kind):
    root = make_scene(tmp_path / "scene")
    named = _break(kind, root)
    with pytest.raises(SceneError) as err:
        read_scene(root)
    assert named in str(err.value)


def test_missing_scene_folder_is_named(tmp_path):
    with pytest.raises(SceneError, match="nowhere"):
        read_scene(tmp_path / "nowhere")


def test_gt_of_another_size_is_an_error_naming_it(tmp_path):
    root = make_scene(tmp_path / "s", gt_hw=(72, 95))
    with pytest.raises(SceneError, match=r"gt\.png: 95x72 but the target .* is 96x72"):
        read_scene(root)
    assert read_scene(make_scene(tmp_path / "ok", gt_hw=(72, 96))).gt is not None


def test_mask_of_another_size_is_resized_nearest_with_a_warning(tmp_path, caplog):
    mask = np.zeros((36, 48), np.uint8)  # half the target's size, hole at half the square
    mask[10:28, 20:38] = 255
    root = make_scene(tmp_path / "s", mask=mask)
    with caplog.at_level(logging.WARNING, logger="leftrefill.data.realfill"):
        scene = read_scene(root)
        _, hole = load_target(scene)
    assert any(str(scene.mask) in r.getMessage() and "48x36" in r.getMessage() for r in caplog.records)
    expected = np.zeros((72, 96), bool)
    expected[SQUARE] = True
    assert hole.shape == (72, 96) and np.array_equal(hole, expected)


# -- random_box_mask (make_mask) -----------------------------------------------------------------------
class CountingRng:
    """A generator that records its ``integers`` draws (box count, then w, h, x, y per box)."""

    def __init__(self, seed):
        self.rng, self.draws = np.random.default_rng(seed), []

    def integers(self, low, high):
        value = self.rng.integers(low, high)
        self.draws.append((low, high, int(value)))
        return value

    def random(self):
        return self.rng.random()


def _expected_box_coverage(size):
    """E[fraction of pixels covered by the boxes], derived independently of the implementation: one box
    covers pixel (x, y) with p = a(x) a(y), a(x) = E_w[P(start <= x < start + w)] for start uniform in
    [margin, size - margin - w]; k boxes are independent, k uniform in 1..29."""
    lo, hi, margin = int(0.03 * size), int(min(0.25 * size, size - 0.02 * size)), int(0.01 * size)
    a = np.zeros(size)
    for w in range(lo, hi):
        starts = np.arange(margin, size - margin - w + 1)
        covered = np.zeros(size)
        for s in starts:
            covered[s:s + w] += 1
        a += covered / len(starts) / (hi - lo)
    p = np.outer(a, a)
    uncovered = np.mean([(1 - p) ** k for k in range(1, 30)], axis=0)
    return float(np.mean(1 - uncovered))


def test_box_mask_matches_make_mask_statistics():
    size, n = 128, 3000
    rng = np.random.default_rng(1)
    masks = np.stack([random_box_mask(size, rng) for _ in range(n)])
    assert masks.dtype == bool and masks.shape == (n, size, size)
    # The corner lies in the 1 px margin no box reaches: True = boxes are known, False = inverted.
    not_inverted = masks[:, 0, 0]
    assert abs(not_inverted.mean() - 0.5) < 5 * math.sqrt(0.25 / n)
    ring = np.concatenate([masks[:, 0, :], masks[:, -1, :], masks[:, :, 0], masks[:, :, -1]], axis=1)
    assert (ring == not_inverted[:, None]).all()
    coverage = np.where(not_inverted, 1 - masks.mean(axis=(1, 2)), masks.mean(axis=(1, 2)))
    expected = _expected_box_coverage(size)
    assert abs(coverage.mean() - expected) < 5 * coverage.std() / math.sqrt(n), (coverage.mean(), expected)


def test_box_mask_draws_1_to_29_boxes_of_the_recipes_sizes():
    size, counts = 512, []
    for seed in range(2000):
        rng = CountingRng(seed)
        mask = random_box_mask(size, rng)
        (low, high, k), boxes = rng.draws[0], rng.draws[1:]
        assert (low, high) == (1, 30) and len(boxes) == 4 * k
        for w, h in zip(boxes[0::4], boxes[1::4]):
            assert (w[0], w[1], h[0], h[1]) == (15, 128, 15, 128)  # [0.03, 0.25) x 512
        if k == 1:  # one box: the hole or the known region is exactly that rectangle, 5 px from the border
            (_, _, w), (_, _, h), (_, _, x), (_, _, y) = boxes
            box = np.zeros((size, size), bool)
            box[y:y + h, x:x + w] = True
            assert np.array_equal(mask, box) or np.array_equal(mask, ~box)
            assert 5 <= x and x + w <= size - 5 and 5 <= y and y + h <= size - 5
        counts.append(k)
    counts = np.array(counts)
    assert counts.min() == 1 and counts.max() == 29
    sd = math.sqrt((29 ** 2 - 1) / 12)  # discrete uniform on 1..29
    assert abs(counts.mean() - 15) < 5 * sd / math.sqrt(len(counts))


def test_box_mask_rejects_tiny_sizes():
    with pytest.raises(ValueError, match="size >= 4"):
        random_box_mask(3, np.random.default_rng(0))


# -- the joint resize + crop ---------------------------------------------------------------------------
def test_short_side_is_resized_into_size_to_9_8_size():
    image = np.zeros((40, 50, 3), np.uint8)  # short side 40 (rows)
    rng = np.random.default_rng(0)
    shorts = {round(random_resized_crop(image, None, rng, 512)[2].scale_y * 40) for _ in range(2000)}
    assert shorts == set(range(512, 576))  # [512, int(1.125 * 512)): each of 64 values seen in 2,000 draws
    small = {round(random_resized_crop(image, None, rng, 64)[2].scale_y * 40) for _ in range(500)}
    assert small == set(range(64, 72))


def test_crop_is_joint_for_image_and_mask(tmp_path):
    target, hole = load_target(read_scene(make_scene(tmp_path / "s")))  # the red square is the hole
    rng = np.random.default_rng(0)
    for _ in range(50):
        image, crop_hole, _ = random_resized_crop(target, hole, rng, 64)
        red = torch.from_numpy((image[..., 0] > 178) & (image[..., 1] < 76))  # (220, 30, 30)
        mask = torch.from_numpy(crop_hole)
        assert mask.any()
        iou = (red & mask).sum() / (red | mask).sum()
        assert iou > 0.9, iou


# -- training items ------------------------------------------------------------------------------------
def test_items_have_the_schema_shapes_and_ranges(tmp_path):
    dataset = realfill_training_set(make_scene(tmp_path / "s"), size=64)
    torch.manual_seed(0)
    assert [dataset[i]["id"] for i in range(3)] == ["ref/0.jpg", "ref/1.jpg", "target/target.png"]
    for index in range(len(dataset)):
        item = dataset[index]
        assert set(item) == {"id", "image", "mask", "loss_weight", "prompt", "is_target"}
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        for key in ("mask", "loss_weight"):
            assert item[key].shape == (1, 64, 64) and set(item[key].unique().tolist()) <= {0.0, 1.0}
        assert item["prompt"] in (PROMPT, "") and item["is_target"] == (index == 2)


def test_target_loss_weight_is_zero_exactly_on_its_mask_and_references_weigh_everywhere(tmp_path):
    dataset = realfill_training_set(make_scene(tmp_path / "s"), size=64, target_random_mask=False)
    rng = np.random.default_rng(3)
    for _ in range(30):
        target = dataset.item(2, rng)
        assert torch.equal(target["loss_weight"], 1 - target["mask"])  # the input mask is the hole here
        for index in (0, 1):
            assert torch.equal(dataset.item(index, rng)["loss_weight"], torch.ones(1, 64, 64))


def test_target_random_mask_variant_keeps_the_known_region_loss_and_always_masks_the_hole(tmp_path):
    dataset = realfill_training_set(make_scene(tmp_path / "s"), size=64)  # the default: random boxes + the hole
    real = realfill_training_set(dataset.scene, size=64, target_random_mask=False)
    for seed in range(10):
        item = dataset.item(2, np.random.default_rng(seed))
        reference = real.item(2, np.random.default_rng(seed))  # same resize + crop draws come first
        assert torch.equal(item["loss_weight"], reference["loss_weight"])
        assert torch.equal(reference["mask"], 1 - reference["loss_weight"])  # thuanz123's: the hole alone
        assert not torch.equal(item["mask"], 1 - item["loss_weight"])
        assert torch.all(item["mask"] >= 1 - item["loss_weight"])  # the unknown pixels are never shown


def test_prompt_dropout_and_full_mask_rates_are_one_in_ten(tmp_path):
    dataset = realfill_training_set(make_scene(tmp_path / "s"), size=64)
    rng, n = np.random.default_rng(0), 3000
    items = [dataset.item(i % 2, rng) for i in range(n)]  # references only
    dropped = np.mean([item["prompt"] == "" for item in items])
    full = np.mean([bool(item["mask"].all()) for item in items])  # a box mask is never all ones at 64 px
    tolerance = 5 * math.sqrt(0.1 * 0.9 / n)  # 0.027
    assert abs(dropped - 0.1) < tolerance and abs(full - 0.1) < tolerance, (dropped, full)
    targets = [dataset.item(2, rng) for _ in range(n)]  # the default: boxes (all ones at the same rate) + hole
    assert abs(np.mean([bool(item["mask"].all()) for item in targets]) - 0.1) < tolerance
    hole_only = realfill_training_set(dataset.scene, size=64, target_random_mask=False)
    assert not any(bool(hole_only.item(2, rng)["mask"].all()) for _ in range(300))  # never replaced


def test_items_are_reproducible_per_torch_seed(tmp_path):
    dataset = realfill_training_set(make_scene(tmp_path / "s"), size=64)

    def epoch(seed):
        torch.manual_seed(seed)
        return [dataset[i] for i in range(len(dataset))]

    first, again, other = epoch(0), epoch(0), epoch(1)
    for a, b in zip(first, again):
        assert all(torch.equal(a[k], b[k]) for k in ("image", "mask", "loss_weight")) and a["prompt"] == b["prompt"]
    assert any(not torch.equal(a["image"], c["image"]) for a, c in zip(first, other))


def test_one_batch_holds_every_image_of_the_scene_once(tmp_path):
    dataset = realfill_training_set(make_scene(tmp_path / "s", n_refs=3), size=64)
    torch.manual_seed(0)
    (batch,) = list(DataLoader(dataset, batch_size=16, shuffle=True))
    assert sorted(batch["id"]) == ["ref/0.jpg", "ref/1.jpg", "ref/2.jpg", "target/target.png"]
    assert batch["image"].shape == (4, 3, 64, 64) and batch["is_target"].sum() == 1


def test_training_set_accepts_a_scene_and_checks_rates(tmp_path):
    scene = read_scene(make_scene(tmp_path / "s"))
    assert isinstance(realfill_training_set(scene, size=64), RealFillTrainingSet)
    assert isinstance(scene, Scene)
    with pytest.raises(ValueError, match="prompt_dropout"):
        realfill_training_set(scene, size=64, prompt_dropout=1.5)


def test_the_targets_unknown_pixels_never_reach_training(tmp_path):
    """Whatever the target holds in its hole (the bundled target is the whole photo), training items never show
    it: the same scene with the hole painted another colour gives identical target items."""
    scene = make_scene(tmp_path / "s")
    target = np.asarray(Image.open(scene / "target" / "target.png").convert("RGB")).copy()
    hole = np.asarray(Image.open(scene / "target" / "mask.png").convert("L")) > 127
    items = []
    for colour in (0, 255):
        target[hole] = colour
        Image.fromarray(target).save(scene / "target" / "target.png")
        dataset = realfill_training_set(scene, size=64, target_random_mask=True)
        items.append(dataset.item(len(dataset) - 1, np.random.default_rng(0))["image"])
    assert torch.equal(items[0], items[1])


def test_files_in_ref_that_are_not_images_are_named_in_a_warning(tmp_path, caplog):
    scene = make_scene(tmp_path / "s")
    (scene / "ref" / "notes.txt").write_text("taken at noon")
    (scene / "ref" / "view.webp").write_bytes(b"RIFF")
    with caplog.at_level(logging.WARNING):
        assert len(read_scene(scene).references) == 2
    assert "2 file(s) that are not .jpg/.jpeg/.png are not used as references: notes.txt, view.webp" in caplog.text
