"""Training views and masks (METHOD 1.12, 1.2): determinism, shapes, branch frequencies, geometry, errors."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from leftrefill.data.masks import (
    IrregularMaskGenerator,
    MaskError,
    MaskFileList,
    RandomInpaintingMask,
    choose_side,
    matching_mask,
    place_on_half,
)
from leftrefill.data.views import ViewTransform, random_view, short_side_resized


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

class RowsStub:
    """Irregular stand-in: the top 3 rows are a hole."""

    size = 16

    def sample(self, generator: np.random.Generator) -> np.ndarray:
        mask = np.zeros((16, 16), bool)
        mask[:3] = True
        return mask


class ColumnsStub:
    """Segmentation stand-in: the left 3 columns are a hole."""

    size = 16

    def sample(self, generator: np.random.Generator) -> np.ndarray:
        mask = np.zeros((16, 16), bool)
        mask[:, :3] = True
        return mask


def write_mask(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), "L").save(path)
    return path


def mask_list(tmp_path: Path, count: int = 3, size: int = 4) -> tuple[Path, list[np.ndarray]]:
    """A list file in tmp/lists with relative entries (masks/...) and one absolute entry."""
    arrays = [rng(100 + i).integers(0, 256, (size, size)).astype(np.uint8) for i in range(count)]
    lines = []
    for i, array in enumerate(arrays):
        if i == 0:  # an absolute path somewhere else
            lines.append(str(write_mask(tmp_path / "elsewhere" / "m0.png", array)))
        else:
            write_mask(tmp_path / "lists" / "masks" / f"m{i}.png", array)
            lines.append(f"masks/m{i}.png")
    list_file = tmp_path / "lists" / "irregular.txt"
    list_file.write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n\n")  # blank lines are skipped
    return list_file, arrays


def gradient_image(width: int, height: int) -> np.ndarray:
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------

def test_every_generator_is_deterministic_per_seed(tmp_path):
    list_file, _ = mask_list(tmp_path, count=6)
    files = MaskFileList(list_file, size=32)
    mixture = RandomInpaintingMask(size=32, irregular=IrregularMaskGenerator(32, max_width=10, max_len=20,
                                                                             box_min_size=3, box_max_size=8),
                                   segmentation=files)
    points = rng(7).uniform(0, 800, (300, 2))
    confidence = rng(8).uniform(0.5, 1.0, 300)
    view = ViewTransform(0.64, 0.64, 0, 0, 512)
    draws = {
        "irregular": lambda g: IrregularMaskGenerator()(g),
        "files": files.sample,
        "mixture": mixture,
        "matching": lambda g: matching_mask(points, confidence, view, g),
        "view": lambda g: random_view(gradient_image(90, 60), g, size=32)[0],
    }
    for name, draw in draws.items():
        same = [np.array_equal(draw(rng(3)), draw(rng(3))) for _ in range(3)]
        first = [draw(rng(seed)) for seed in range(12)]
        assert all(same), name
        assert any(not np.array_equal(first[0], other) for other in first[1:]), name


# --------------------------------------------------------------------------------------------------
# IrregularMaskGenerator
# --------------------------------------------------------------------------------------------------

def test_irregular_masks_shape_nonempty_and_hole_fraction_bounds():
    generator, generator_rng = IrregularMaskGenerator(), rng(0)
    fractions = []
    for _ in range(200):
        mask = generator(generator_rng)
        assert mask.shape == (512, 512) and mask.dtype == bool
        fractions.append(mask.mean())
    fractions = np.array(fractions)
    assert fractions.min() > 0 and fractions.max() <= 0.5  # non-empty, LaMa's max_tamper_area
    # Measured: the mean of 200 draws lies in [0.241, 0.292] over seeds 0..199 (about 0.27 overall).
    assert 0.21 < fractions.mean() < 0.33
    assert (fractions > 0.3).mean() > 0.2 and (fractions < 0.1).mean() > 0.05  # a spread of sizes


def test_irregular_defaults_scale_with_the_canvas():
    generator, generator_rng = IrregularMaskGenerator(128), rng(5)
    assert (generator.max_width, generator.max_len, generator.box_max_size) == (62, 112, 75)  # 250, 450, 300 / 4
    fractions = np.array([generator(generator_rng).mean() for _ in range(200)])
    assert fractions.min() > 0 and fractions.max() <= 0.5 and 0.21 < fractions.mean() < 0.33


def test_irregular_size_and_cap_follow_the_arguments():
    generator = IrregularMaskGenerator(128, max_width=30, max_len=60, box_min_size=8, box_max_size=40,
                                       max_hole_fraction=0.2)
    masks = [generator(rng(seed)) for seed in range(50)]
    assert all(m.shape == (128, 128) and 0 < m.mean() <= 0.2 for m in masks)


def test_stroke_end_discs_add_nothing_to_opencv_thick_lines():
    """The IrregularMaskGenerator docstring's claim: cv2.line already rounds thick line ends, as LaMa's
    line mode draws them, so the discs of _thick_segment change no pixel."""
    from leftrefill.data.masks import _thick_segment

    generator = rng(0)
    for width in range(5, 260, 7):
        start, end = generator.integers(0, 512, size=2), generator.integers(0, 512, size=2)
        ours = np.zeros((512, 512), np.uint8)
        _thick_segment(ours, start, end, width)
        lama = np.zeros((512, 512), np.uint8)
        cv2.line(lama, (int(start[0]), int(start[1])), (int(end[0]), int(end[1])), 1, width)
        assert np.array_equal(ours, lama), width


def test_box_only_masks_are_unions_of_boxes_inside_the_margin():
    generator = IrregularMaskGenerator(irregular_proba=0.0, box_proba=1.0, box_max_times=1)
    for seed in range(20):
        mask = generator(rng(seed))
        rows, cols = np.nonzero(mask)
        assert rows.min() >= 10 and cols.min() >= 10 and rows.max() < 502 and cols.max() < 502
        box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all()  # one axis-aligned box
        assert 30 <= box.shape[0] < 300 and 30 <= box.shape[1] < 300


def test_empty_draws_are_redrawn():
    generator = IrregularMaskGenerator(64, irregular_proba=0.0, box_min_times=0, box_max_times=1,
                                       box_min_size=4, box_max_size=8)  # half the raw draws are empty
    assert all(generator(rng(seed)).any() for seed in range(40))


def test_impossible_hole_cap_raises_a_clear_error():
    generator = IrregularMaskGenerator(64, max_hole_fraction=1e-4, max_attempts=5, box_max_size=40)
    with pytest.raises(MaskError, match="hole fraction"):
        generator(rng(0))
    with pytest.raises(ValueError, match="max_hole_fraction"):
        IrregularMaskGenerator(max_hole_fraction=0.0)


# --------------------------------------------------------------------------------------------------
# RandomInpaintingMask
# --------------------------------------------------------------------------------------------------

def test_mixture_branch_frequencies_and_union():
    mixture, mixture_rng = RandomInpaintingMask(16, irregular=RowsStub(), segmentation=ColumnsStub()), rng(1)
    rows, cols = RowsStub().sample(rng(0)), ColumnsStub().sample(rng(0))
    counts = {"irregular": 0, "segmentation": 0, "union": 0}
    for _ in range(2000):
        mask = mixture(mixture_rng)
        if np.array_equal(mask, rows):
            counts["irregular"] += 1
        elif np.array_equal(mask, cols):
            counts["segmentation"] += 1
        else:
            assert np.array_equal(mask, rows | cols)
            counts["union"] += 1
    assert abs(counts["irregular"] / 2000 - 0.4) < 0.04
    assert abs(counts["segmentation"] / 2000 - 0.4) < 0.04
    assert abs(counts["union"] / 2000 - 0.2) < 0.04


def test_mixture_without_segmentation_is_always_irregular():
    mixture = RandomInpaintingMask(16, irregular=RowsStub())
    assert all(np.array_equal(mixture(rng(s)), RowsStub().sample(rng(s))) for s in range(50))
    default = RandomInpaintingMask(64)
    assert isinstance(default.irregular, IrregularMaskGenerator) and default.irregular.size == 64


def test_mixture_checks_probabilities_and_source_shapes():
    with pytest.raises(ValueError, match="sum"):
        RandomInpaintingMask(16, irregular=RowsStub(), irregular_prob=0.7, segmentation_prob=0.4)
    with pytest.raises(MaskError, match=r"RowsStub.*\(16, 16\).*\(32, 32\)"):
        RandomInpaintingMask(32, irregular=RowsStub())(rng(0))


# --------------------------------------------------------------------------------------------------
# MaskFileList
# --------------------------------------------------------------------------------------------------

def test_mask_file_list_reads_relative_and_absolute_paths_with_nearest_resize(tmp_path):
    list_file, arrays = mask_list(tmp_path)
    files = MaskFileList(list_file, size=8)
    assert len(files) == 3
    for index, array in enumerate(arrays):
        expected = np.kron(array > 127, np.ones((2, 2), bool))  # 4 -> 8 nearest is pixel doubling
        assert np.array_equal(files.load(index), expected)
    seen = {next(i for i, a in enumerate(arrays) if np.array_equal(files.sample(rng(s))[::2, ::2], a > 127))
            for s in range(40)}
    assert seen == {0, 1, 2}


def test_mask_file_list_threshold_is_strictly_above_127(tmp_path):
    write_mask(tmp_path / "t.png", np.array([[127, 128], [0, 255]]))
    (tmp_path / "list.txt").write_text("t.png\n")
    assert np.array_equal(MaskFileList(tmp_path / "list.txt", size=2).load(0), [[False, True], [False, True]])


def test_mask_file_list_errors_name_the_files(tmp_path):
    with pytest.raises(MaskError, match="missing.txt"):
        MaskFileList(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(MaskError, match=r"empty.txt.*no mask files"):
        MaskFileList(tmp_path / "empty.txt")
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "list.txt").write_text("gone.png\nbroken.png\n")
    files = MaskFileList(tmp_path / "list.txt")
    for index, name in enumerate(("gone.png", "broken.png")):
        with pytest.raises(MaskError, match=rf"{name}.*list.txt"):
            files.load(index)
    assert issubclass(MaskError, ValueError)


def test_mask_file_claiming_a_huge_size_is_a_mask_error(tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # claims 400 megapixels; 65 bytes in all
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                                        + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    (tmp_path / "list.txt").write_text("bomb.png\n")
    with pytest.raises(MaskError, match=r"bomb\.png \(listed in .*list\.txt\) cannot be read: .*decompression bomb"):
        MaskFileList(tmp_path / "list.txt").load(0)


# --------------------------------------------------------------------------------------------------
# place_on_half, choose_side
# --------------------------------------------------------------------------------------------------

def test_place_on_half_keeps_the_mask_on_its_half():
    for seed in range(10):
        mask = rng(seed).random((32, 32)) < 0.5
        left, right = place_on_half(mask, "left"), place_on_half(mask, "right")
        assert left.shape == right.shape == (32, 64) and left.dtype == bool
        assert np.array_equal(left[:, :32], mask) and not left[:, 32:].any()
        assert np.array_equal(right[:, 32:], mask) and not right[:, :32].any()
    with pytest.raises(ValueError, match="side"):
        place_on_half(mask, "middle")
    with pytest.raises(ValueError, match="square"):
        place_on_half(np.zeros((4, 8), bool), "left")


def test_choose_side_frequencies():
    side_rng = rng(2)
    sides = [choose_side(side_rng, constant_place=False) for _ in range(2000)]
    assert set(sides) == {"left", "right"} and abs(sides.count("left") / 2000 - 0.5) < 0.04
    assert all(choose_side(side_rng, constant_place=True) == "right" for _ in range(100))


# --------------------------------------------------------------------------------------------------
# random_view, ViewTransform
# --------------------------------------------------------------------------------------------------

def test_random_view_branches_shapes_and_crop_ranges():
    image, view_rng, direct = gradient_image(120, 80), rng(4), 0
    for _ in range(1000):
        view, transform = random_view(image, view_rng, size=64)
        assert view.shape == (64, 64, 3) and view.dtype == np.uint8 and transform.size == 64
        if transform.scale_x != transform.scale_y:  # direct resize: 64/120 vs 64/80
            direct += 1
            assert (transform.crop_x, transform.crop_y) == (0, 0)
            assert transform.scale_x == 64 / 120 and transform.scale_y == 64 / 80
        else:  # short side 80 -> 64, long side 120 -> 96, crop inside
            assert transform.scale_x == 96 / 120 and 0 <= transform.crop_x <= 32 and transform.crop_y == 0
    assert abs(direct / 1000 - 0.5) < 0.05


def test_cropped_view_is_the_crop_of_the_short_side_resize():
    for width, height in ((90, 150), (150, 90), (40, 30)):
        image = gradient_image(width, height)
        for seed in range(10):
            view, t = random_view(image, rng(seed), size=48, direct_prob=0.0)
            new_w, new_h = short_side_resized(width, height, 48)
            assert min(new_w, new_h) == 48 and t.scale_x == new_w / width and t.scale_y == new_h / height
            assert 0 <= t.crop_x <= new_w - 48 and 0 <= t.crop_y <= new_h - 48
            resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
            assert np.array_equal(view, resized[t.crop_y:t.crop_y + 48, t.crop_x:t.crop_x + 48])


@pytest.mark.parametrize("direct_prob", [1.0, 0.0])
@pytest.mark.parametrize("width, height", [(300, 200), (200, 300), (40, 30)])
def test_view_transform_follows_a_bright_spot(direct_prob, width, height):
    """The mapped centre of a bright square lands on the brightness centroid of the view."""
    checked = 0
    for seed in range(6):
        spot_rng = rng(seed)
        x0, y0 = int(spot_rng.integers(5, width - 10)), int(spot_rng.integers(5, height - 10))
        image = np.zeros((height, width, 3), np.uint8)
        image[y0:y0 + 4, x0:x0 + 4] = 255
        view, transform = random_view(image, spot_rng, size=64, direct_prob=direct_prob)
        corners = transform.apply(np.array([[x0, y0], [x0 + 4, y0 + 4]], float))
        if not transform.inside(corners - 1).all() or not transform.inside(corners + 1).all():
            continue  # the spot was cropped away (partly)
        weights = view[..., 0].astype(np.float64)
        ys, xs = np.mgrid[0:64, 0:64] + 0.5  # pixel (i, j) covers [i, i+1): its centre is at +0.5
        centroid = np.array([(weights * xs).sum(), (weights * ys).sum()]) / weights.sum()
        assert np.abs(centroid - transform.apply(np.array([[x0 + 2, y0 + 2]], float))[0]).max() < 0.6
        checked += 1
    assert checked >= 3


def test_view_transform_apply_formula():
    transform = ViewTransform(0.5, 2.0, 3, 4, 10)
    out = transform.apply(np.array([[10.0, 1.0], [0.0, 0.0]]))
    assert out.dtype == np.float32 and np.allclose(out, [[2.0, -2.0], [-3.0, -4.0]])
    assert transform.inside(np.array([[0, 0], [9.9, 9.9], [10, 5], [-0.1, 5]])).tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="H, W, 3"):
        random_view(np.zeros((8, 8), np.uint8), rng(0))


# --------------------------------------------------------------------------------------------------
# matching_mask
# --------------------------------------------------------------------------------------------------

# An 800 x 600 target whose short side goes 600 -> 512 and whose view starts 100 px to the right.
VIEW = ViewTransform(512 / 600, 512 / 600, 100, 0, 512)
DILATION = 70 / 2 * 512 / 256 + 2  # max_width / 2 on the 256 grid, in view pixels, plus nearest slack


def view_box(points: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    mapped = VIEW.apply(points)
    mapped = mapped[VIEW.inside(mapped)]
    return mapped.min(axis=0) - margin, mapped.max(axis=0) + margin


def holes_inside(mask: np.ndarray, low: np.ndarray, high: np.ndarray) -> bool:
    ys, xs = np.nonzero(mask)
    return bool(xs.min() + 1 >= low[0] and xs.max() <= high[0] and ys.min() + 1 >= low[1] and ys.max() <= high[1])


def test_matching_mask_stays_near_the_confident_points_and_ignores_the_others():
    points_rng = rng(11)
    good = points_rng.uniform([350, 200], [600, 400], (200, 2))
    weak = points_rng.uniform([120, 480], [220, 590], (100, 2))  # view x 2..88, y 410..503
    points = np.concatenate([good, weak])
    confidence = np.concatenate([points_rng.uniform(0.9, 1.0, 200), np.full(100, 0.1)])
    good_low, good_high = view_box(good, DILATION)
    weak_low, weak_high = view_box(weak, 2)
    for seed in range(20):
        mask = matching_mask(points, confidence, VIEW, rng(seed))
        assert mask is not None and mask.shape == (512, 512) and mask.dtype == bool and mask.any()
        assert holes_inside(mask, good_low, good_high)
        weak_region = mask[int(weak_low[1]):int(weak_high[1]) + 1, max(int(weak_low[0]), 0):int(weak_high[0]) + 1]
        assert not weak_region.any()


def test_matching_mask_subrectangle_branch_keeps_holes_in_the_view():
    """Points over the whole view: the box exceeds the area budget, so a sub-rectangle is picked."""
    points = rng(12).uniform([0, 0], [800, 600], (3000, 2))
    confidence = np.ones(3000)
    low, high = view_box(points, DILATION)
    fractions = []
    for seed in range(20):
        mask = matching_mask(points, confidence, VIEW, rng(seed))
        assert mask is not None and holes_inside(mask, low, high)
        fractions.append(mask.mean())
    assert 0.01 < np.mean(fractions) < 0.6


def test_matching_mask_needs_ten_confident_points_in_the_view():
    points_rng = rng(13)
    few = points_rng.uniform([350, 200], [400, 250], (10, 2))
    noise = points_rng.uniform([350, 200], [600, 400], (200, 2))
    confidence = np.concatenate([np.ones(10), np.full(200, 0.5)])
    assert matching_mask(np.concatenate([few, noise]), confidence, VIEW, rng(0)) is not None
    assert matching_mask(np.concatenate([few[:9], noise]), confidence[1:], VIEW, rng(0)) is None
    outside = points_rng.uniform([0, 0], [100, 600], (50, 2))  # view x < 0: cropped away
    assert matching_mask(np.concatenate([few[:5], outside]), np.ones(55), VIEW, rng(0)) is None
    assert matching_mask(np.zeros((0, 2)), np.zeros(0), VIEW, rng(0)) is None
    assert matching_mask(np.tile([[400.0, 300.0]], (20, 1)), np.ones(20), VIEW, rng(0)) is None  # area 0
    with pytest.raises(ValueError, match="confidences"):
        matching_mask(few, np.ones(3), VIEW, rng(0))


def test_matching_sub_box_covers_20_to_50_percent_of_the_grid():
    """METHOD 1.12: with a large point spread, the kept points fill a sub-box of U(0.2, 0.5) x 256^2."""
    from leftrefill.data.masks import _pick_region

    points = rng(21).uniform(0, 256, (20000, 2))
    fractions = []
    for seed in range(50):
        kept = _pick_region(points, rng(seed), 256, 0.2, 0.5)
        width, height = kept.max(axis=0) - kept.min(axis=0)
        fractions.append(width * height / 256**2)
    assert 0.19 < min(fractions) and max(fractions) <= 0.5
    assert max(fractions) - min(fractions) > 0.2  # the area really is drawn from the range


def test_matching_masks_are_placed_on_the_target_half_only():
    points = rng(22).uniform([350, 200], [600, 400], (200, 2))
    for seed in range(10):
        canvas = place_on_half(matching_mask(points, np.ones(200), VIEW, rng(seed)), "right")
        assert canvas.shape == (512, 1024) and not canvas[:, :512].any() and canvas[:, 512:].any()
