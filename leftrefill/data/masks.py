"""Training masks of the cross-view inpainting task (METHOD 1.12, METHOD 1.2).

All masks are bool arrays, True = hole (to fill). All randomness comes from an explicitly passed
``np.random.Generator``, so every mask is a deterministic function of the generator's state.

* :class:`IrregularMaskGenerator`: procedural LaMa-style strokes and boxes, so training needs no mask
  dataset on disk.
* :class:`MaskFileList`: masks from image files listed in a text file (the original used LaMa irregular
  mask lists and COCO segmentation mask lists).
* :class:`RandomInpaintingMask`: the original ``get_inpainting_mask`` mixture (irregular / segmentation /
  union of both).
* :func:`place_on_half`, :func:`choose_side`: put a square mask on one half of the 512 x 1024 canvas.
* :func:`matching_mask`: the original ``get_match_based_mask``, a thick closed polyline through
  confident keypoint matches of the target, so the hole covers content that the reference also shows.

Every mask source has the same protocol: ``sample(rng) -> bool (size, size)``; calling the object is the
same as ``sample``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from PIL import Image, ImageDraw

from leftrefill.data.views import ViewTransform

SIDES = ("left", "right")


class MaskError(ValueError):
    """A mask source that cannot be used; the message names the list file or mask file."""


class MaskSource(Protocol):
    """Anything that draws a square bool mask (size, size), True = hole, from a generator."""

    size: int

    def sample(self, rng: np.random.Generator) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------------
# Procedural irregular masks (LaMa)
# --------------------------------------------------------------------------------------------------

# LaMa's configs/data_gen/random_thick_512.yaml (advimman/lama): its pixel lengths, for a 512 canvas.
LAMA_THICK_SIZE = 512
LAMA_THICK_PIXELS = {"max_width": 250, "max_len": 450, "box_margin": 10, "box_min_size": 30, "box_max_size": 300}


def _lama_pixels(name: str, value: int | None, size: int) -> int:
    """An explicit length in canvas pixels, or (None) LaMa's thick-512 length scaled to ``size``."""
    if value is not None:
        return int(value)
    return max(1, int(round(LAMA_THICK_PIXELS[name] * size / LAMA_THICK_SIZE)))


class IrregularMaskGenerator:
    """LaMa's "random thick 512" masks: either random thick strokes or random boxes.

    The defaults are LaMa's ``configs/data_gen/random_thick_512.yaml`` (advimman/lama, used with
    ``MixedMaskGenerator`` and ``bin/gen_mask_dataset.py``):
      irregular_proba 1, irregular_kwargs {min_times 1, max_times 5, max_width 250, max_angle 4,
      max_len 450}; box_proba 0.3, box_kwargs {margin 10, bbox_min_size 30, bbox_max_size 300,
      min_times 1, max_times 4}; max_tamper_area 0.5 (masks covering more are rejected).
    (``random_thick_256.yaml`` has max_width 100, max_len 200, bbox_max_size 150, box max_times 3.)
    As in LaMa's ``MixedMaskGenerator`` each mask is *either* strokes *or* boxes, chosen with the
    renormalised weights irregular_proba : box_proba (1 : 0.3, i.e. boxes in 23% of the raw draws).
    Lengths (max_width, max_len, box_*size, box_margin) are in pixels of the ``size`` x ``size`` canvas;
    left as None they are LaMa's 512 values scaled by size / 512, so smaller canvases get the same
    shapes. A mask that is empty or has a hole fraction above ``max_hole_fraction`` is redrawn.

    Stroke ends and joints: each segment here is ``cv2.line`` plus a filled disc of the brush width at
    both ends. LaMa's default line mode (``DrawMethod.LINE``) draws the bare ``cv2.line`` segments; but
    OpenCV already gives a line thicker than 1 px round caps of that diameter, so the discs add no pixel
    (tests/test_masks.py checks this) and the strokes are LaMa's, round ends included.
    """

    def __init__(self, size: int = 512, *, min_times: int = 1, max_times: int = 5, max_width: int | None = None,
                 max_angle: int = 4, max_len: int | None = None, irregular_proba: float = 1.0,
                 box_proba: float = 0.3, box_margin: int | None = None, box_min_size: int | None = None,
                 box_max_size: int | None = None, box_min_times: int = 1, box_max_times: int = 4,
                 max_hole_fraction: float = 0.5, max_attempts: int = 100) -> None:
        self.size = size
        self.min_times, self.max_times, self.max_angle = min_times, max_times, max_angle
        self.max_width = _lama_pixels("max_width", max_width, size)
        self.max_len = _lama_pixels("max_len", max_len, size)
        self.box_margin = _lama_pixels("box_margin", box_margin, size)
        self.box_min_size = _lama_pixels("box_min_size", box_min_size, size)
        # LaMa clamps the box size so that a box plus its margins fits the canvas.
        self.box_max_size = min(_lama_pixels("box_max_size", box_max_size, size), size - 2 * self.box_margin)
        self.box_min_times, self.box_max_times = box_min_times, box_max_times
        self.box_share = box_proba / (irregular_proba + box_proba)
        self.max_hole_fraction, self.max_attempts = max_hole_fraction, max_attempts
        self._check()

    def _check(self) -> None:
        if not 0 < self.max_hole_fraction <= 1:
            raise ValueError(f"max_hole_fraction must be in (0, 1], got {self.max_hole_fraction}")
        if self.box_share > 0 and not 0 < self.box_min_size < self.box_max_size:
            raise ValueError(f"box sizes: need 0 < box_min_size ({self.box_min_size}) < box_max_size "
                             f"({self.box_max_size}, after fitting the margins into size {self.size})")
        if self.box_share < 1 and not 1 <= self.min_times <= self.max_times:
            raise ValueError(f"strokes: need 1 <= min_times ({self.min_times}) <= max_times ({self.max_times})")

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """A bool (size, size) mask, True = hole, non-empty, hole fraction <= max_hole_fraction."""
        for _ in range(self.max_attempts):
            mask = self._draw(rng)
            if mask.any() and mask.mean() <= self.max_hole_fraction:
                return mask
        raise MaskError(f"IrregularMaskGenerator: no mask with 0 < hole fraction <= {self.max_hole_fraction} "
                        f"in {self.max_attempts} attempts; the stroke/box parameters are too large for size "
                        f"{self.size}")

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        return self.sample(rng)

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        canvas = np.zeros((self.size, self.size), np.uint8)
        if rng.random() < self.box_share:
            self._draw_boxes(canvas, rng)
        else:
            self._draw_strokes(canvas, rng)
        return canvas > 0

    def _draw_strokes(self, canvas: np.ndarray, rng: np.random.Generator) -> None:
        """Draws ``min_times..max_times`` strokes, each a chain of 1..5 thick segments (as LaMa)."""
        for stroke in range(int(rng.integers(self.min_times, self.max_times + 1))):
            start = rng.integers(0, self.size, size=2)
            for _ in range(1 + int(rng.integers(5))):
                # LaMa's angles are 0.01 + an integer below max_angle (radians), mirrored for every
                # other stroke; lengths 10 + [0, max_len), brush widths 5 + [0, max_width).
                angle = 0.01 + int(rng.integers(self.max_angle))
                angle = 2 * math.pi - angle if stroke % 2 == 0 else angle
                length = 10 + int(rng.integers(self.max_len))
                width = 5 + int(rng.integers(self.max_width))
                step = length * np.array([math.sin(angle), math.cos(angle)])
                end = np.clip((start + step).astype(np.int64), 0, self.size - 1)
                _thick_segment(canvas, start, end, width)
                start = end

    def _draw_boxes(self, canvas: np.ndarray, rng: np.random.Generator) -> None:
        """Draws ``box_min_times..box_max_times`` axis-aligned boxes inside the margins (as LaMa)."""
        low, high, margin = self.box_min_size, self.box_max_size, self.box_margin
        for _ in range(int(rng.integers(self.box_min_times, self.box_max_times + 1))):
            box_w, box_h = (int(v) for v in rng.integers(low, high, size=2))
            x0 = int(rng.integers(margin, self.size - margin - box_w + 1))
            y0 = int(rng.integers(margin, self.size - margin - box_h + 1))
            canvas[y0:y0 + box_h, x0:x0 + box_w] = 1


def _thick_segment(canvas: np.ndarray, start: np.ndarray, end: np.ndarray, width: int) -> None:
    """A line of thickness ``width`` from start to end (x, y), with round joints of the same diameter."""
    p0, p1 = (int(start[0]), int(start[1])), (int(end[0]), int(end[1]))
    cv2.line(canvas, p0, p1, 1, width)
    for point in (p0, p1):
        cv2.circle(canvas, point, width // 2, 1, -1)


# --------------------------------------------------------------------------------------------------
# Masks from files
# --------------------------------------------------------------------------------------------------

class MaskFileList:
    """Masks read from image files named in a text file, one path per line.

    Relative paths are relative to the list file's folder; blank lines are skipped. A drawn mask is read
    as grayscale, resized to size x size with nearest neighbour and thresholded at > 127 (METHOD 1.12).
    """

    def __init__(self, list_file: str | Path, size: int = 512) -> None:
        self.list_file = Path(list_file)
        self.size = size
        self.paths = _read_list_file(self.list_file)

    def __len__(self) -> int:
        return len(self.paths)

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """A uniformly random listed mask as bool (size, size), True = hole (white)."""
        return self.load(int(rng.integers(len(self.paths))))

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        return self.sample(rng)

    def load(self, index: int) -> np.ndarray:
        """The ``index``-th listed mask as bool (size, size)."""
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                gray = np.asarray(image.convert("L"))
        except (OSError, ValueError, Image.DecompressionBombError) as error:  # the last is not an OSError
            raise MaskError(f"mask file {path} (listed in {self.list_file}) cannot be read: {error}") from error
        resized = cv2.resize(gray, (self.size, self.size), interpolation=cv2.INTER_NEAREST)
        return resized > 127


def _read_list_file(list_file: Path) -> list[Path]:
    """The non-blank lines of ``list_file`` as paths, relative ones joined to the list file's folder."""
    try:
        lines = list_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise MaskError(f"mask list file {list_file} cannot be read: {error}") from error
    paths = [Path(line.strip()) for line in lines if line.strip()]
    if not paths:
        raise MaskError(f"mask list file {list_file} lists no mask files (one path per line expected)")
    return [path if path.is_absolute() else list_file.parent / path for path in paths]


# --------------------------------------------------------------------------------------------------
# The random inpainting mask mixture
# --------------------------------------------------------------------------------------------------

class RandomInpaintingMask:
    """METHOD 1.12 ``get_inpainting_mask``: an irregular mask with p = irregular_prob (0.4), a segmentation
    mask with p = segmentation_prob (0.4), else (0.2) the union of one of each.

    ``irregular`` defaults to ``IrregularMaskGenerator(size)``. ``segmentation`` is optional (the original
    used COCO segmentation mask lists); without it *every* draw is an irregular mask, because the union
    branch would then be just an irregular mask too. Sources must return bool (size, size).
    """

    def __init__(self, size: int = 512, irregular: MaskSource | None = None,
                 segmentation: MaskSource | None = None, irregular_prob: float = 0.4,
                 segmentation_prob: float = 0.4) -> None:
        if irregular_prob < 0 or segmentation_prob < 0 or irregular_prob + segmentation_prob > 1:
            raise ValueError(f"need irregular_prob, segmentation_prob >= 0 with a sum <= 1, got "
                             f"{irregular_prob}, {segmentation_prob}")
        self.size = size
        self.irregular = irregular if irregular is not None else IrregularMaskGenerator(size)
        self.segmentation = segmentation
        self.irregular_prob, self.segmentation_prob = irregular_prob, segmentation_prob

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """A bool (size, size) mask, True = hole."""
        if self.segmentation is None:
            return self._draw(self.irregular, rng)
        u = rng.random()
        if u < self.irregular_prob:
            return self._draw(self.irregular, rng)
        if u < self.irregular_prob + self.segmentation_prob:
            return self._draw(self.segmentation, rng)
        return self._draw(self.segmentation, rng) | self._draw(self.irregular, rng)

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        return self.sample(rng)

    def _draw(self, source: MaskSource, rng: np.random.Generator) -> np.ndarray:
        mask = np.asarray(source.sample(rng)).astype(bool, copy=False)
        if mask.shape != (self.size, self.size):
            raise MaskError(f"{type(source).__name__} returned a mask of shape {mask.shape}, expected "
                            f"({self.size}, {self.size})")
        return mask


# --------------------------------------------------------------------------------------------------
# Placing a mask on the canvas
# --------------------------------------------------------------------------------------------------

def place_on_half(mask: np.ndarray, side: str) -> np.ndarray:
    """Bool (S, S) -> bool (S, 2S): ``mask`` on the 'left' (reference, columns [0, S)) or 'right' (target,
    columns [S, 2S)) half of the stitched canvas; the other half is all False."""
    if side not in SIDES:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"place_on_half expects a square (S, S) mask, got shape {mask.shape}")
    size = mask.shape[0]
    canvas = np.zeros((size, 2 * size), dtype=bool)
    start = 0 if side == "left" else size
    canvas[:, start:start + size] = mask
    return canvas


def choose_side(rng: np.random.Generator, constant_place: bool) -> str:
    """'right' (the target half) if ``constant_place``, else 'left' or 'right' with p = 0.5 each
    (METHOD 1.2: the original puts random masks on the reference half half of the time)."""
    if constant_place:
        return "right"
    return "left" if rng.random() < 0.5 else "right"


# --------------------------------------------------------------------------------------------------
# Matching-based masks
# --------------------------------------------------------------------------------------------------

def matching_mask(target_points: np.ndarray, confidence: np.ndarray, view: ViewTransform,
                  rng: np.random.Generator, *, mask_size: int = 256, threshold_prob: float = 0.8,
                  min_num: int = 10, min_area_rate: float = 0.2, max_area_rate: float = 0.5,
                  min_width: int = 35, max_width: int = 70, min_vertex: int = 15,
                  max_vertex: int = 30) -> np.ndarray | None:
    """METHOD 1.12 ``get_match_based_mask``: a thick closed polyline through confident matches.

    target_points: (N, 2) float (x, y) in original target pixels; confidence: (N,) float; ``view`` maps
    the target into its (view.size, view.size) view. The defaults are the original's hyper-parameters;
    the mask is drawn on a mask_size grid ("these mask must be set in 256") and resized with nearest.
    Returns bool (view.size, view.size), True = hole, or None when there are too few usable points
    (the caller then falls back to a random mask). The caller places it on the target half.
    """
    points = _confident_points_on_grid(target_points, confidence, view, mask_size, threshold_prob)
    if len(points) < min_num:
        return None
    points = _pick_region(points, rng, mask_size, min_area_rate, max_area_rate)
    if points is None or len(points) < min_num:
        return None
    points = points[:int(rng.integers(min_vertex, max_vertex + 1))]
    # np.random.randint(35, 70) in the original: the upper bound is excluded.
    width = int(rng.integers(min_width, max_width))
    grid = draw_closed_polyline(points, width, mask_size)
    return cv2.resize(grid, (view.size, view.size), interpolation=cv2.INTER_NEAREST) > 0


def _confident_points_on_grid(target_points: np.ndarray, confidence: np.ndarray, view: ViewTransform,
                              mask_size: int, threshold_prob: float) -> np.ndarray:
    """Points (N, 2) with confidence > threshold_prob * max, mapped into the view and then onto the
    mask_size grid -> float64 (M, 2), only those inside [0, mask_size)."""
    points = np.asarray(target_points, dtype=np.float64).reshape(-1, 2)
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    if len(points) != len(confidence):
        raise ValueError(f"matching_mask: {len(points)} points but {len(confidence)} confidences")
    if len(points) == 0:
        return points
    points = points[confidence > threshold_prob * confidence.max()]
    grid = view.apply(points).astype(np.float64) * (mask_size / view.size)
    return grid[((grid >= 0) & (grid < mask_size)).all(axis=1)]


def _pick_region(points: np.ndarray, rng: np.random.Generator, mask_size: int, min_area_rate: float,
                 max_area_rate: float) -> np.ndarray | None:
    """A random sub-rectangle of the points' bounding box with an area of U(min, max) of the grid (when
    the box is larger) -> the points strictly inside it, randomly permuted; None for a degenerate box."""
    low, high = points.min(axis=0), points.max(axis=0)
    good_w, good_h = high - low
    area = good_w * good_h
    if area == 0:
        return None
    rate = mask_size * mask_size * rng.uniform(min_area_rate, max_area_rate) / area
    if rate >= 1:
        return rng.permutation(points)
    sub_w, sub_h = good_w * math.sqrt(rate), good_h * math.sqrt(rate)
    # The original's np.random.randint(0, float) truncates the float bound; int() does the same.
    x0 = low[0] + int(rng.integers(0, int(good_w - sub_w + 1)))
    y0 = low[1] + int(rng.integers(0, int(good_h - sub_h + 1)))
    inside = ((points[:, 0] > x0) & (points[:, 0] < x0 + sub_w)
              & (points[:, 1] > y0) & (points[:, 1] < y0 + sub_h))
    return rng.permutation(points[inside])


def draw_closed_polyline(points: np.ndarray, width: int, mask_size: int) -> np.ndarray:
    """uint8 (mask_size, mask_size) in {0, 1}: a closed polyline of ``width`` through ``points`` (K, 2)
    plus a filled disc of diameter ~``width`` at every vertex (PIL, as the original)."""
    canvas = Image.new("L", (mask_size, mask_size), 0)
    draw = ImageDraw.Draw(canvas)
    vertices = [(float(x), float(y)) for x, y in points]
    draw.line(vertices + vertices[:1], fill=1, width=width)
    half = width // 2
    for x, y in vertices:
        draw.ellipse((x - half, y - half, x + half, y + half), fill=1)
    return np.asarray(canvas, dtype=np.uint8)
