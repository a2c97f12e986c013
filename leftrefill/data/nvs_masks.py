"""Masks of the novel-view-synthesis task (METHOD 2.5, the release's ``NVS_OBJDataset``).

All masks are bool (S, S) arrays over the target view, True = fill. Randomness comes only from the
``np.random.Generator`` passed in, so a mask is a deterministic function of the generator's state.

* :func:`adaptive_mask`: the training mask, the target's silhouette dilated, plus a thick closed
  polyline through random points of its enlarged bounding box (the paper's "adaptive masking").
* :func:`complete_mask`: the whole target (the release's ``mask_type 'complete'``).
* :func:`read_fixed_mask`: the official fixed test masks, ``<mask_path>/<uid>/<view:03d>.png``.

Random integer ranges: the release draws the dilation kernel size and the number of points with
Python's ``random.randint(low, high)``, whose ``high`` is *included*, and the point coordinates and the
stroke width with ``np.random.randint(low, high)``, whose ``high`` is *excluded*. The constants below
keep each bound as the release wrote it and say which convention applies; the code calls
``rng.integers(low, high + 1)`` for the inclusive ones.

Sizes: the release trains at 256 px; its dilation sizes are 256-px constants, its stroke widths
512-px constants that it scales by ``img_size / 512``. At another size S we scale the dilation by
S / 256 (and the widths by S / 512, as the release); the number of points is not a length.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from leftrefill.data.masks import draw_closed_polyline
from leftrefill.images import load_mask, resize_mask

RELEASE_SIZE = 256  # the image size of the release's NVS config, the unit of DILATE_SIZE
DILATE_SIZE = (10, 25)  # elliptical kernel side, random.randint: both bounds included (config dilate_size)
ENLARGE = (0.05, 0.2)  # bbox growth per side, as a fraction of its longer side, uniform (mask_enlarge)
NUM_POINTS = (20, 45)  # polyline vertices, random.randint: both bounds included (pts_size)
STROKE_WIDTH_512 = (80, 140)  # px at 512, np.random.randint: high excluded, so [40, 70) at 256 (width_range)


def adaptive_mask(silhouette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The NVS training mask of a target with object ``silhouette`` (bool (S, S)) -> bool (S, S).

    METHOD 2.5, in the release's order of random draws:
    1. dilate the silhouette with an elliptical kernel (:func:`dilation_kernel_size`);
    2. take the dilated mask's bounding box, enlarged on every side by r * its longer side,
       r ~ U(0.05, 0.2), clipped to the image;
    3. draw n ~ randint(20, 45) integer points uniformly in that box;
    4. draw a closed polyline through them, plus a disc at every vertex, :func:`stroke_width` wide;
    5. return its union with the dilated silhouette.
    An empty silhouette gives the complete mask (the release's fallback).
    """
    silhouette = np.asarray(silhouette, dtype=bool)
    if silhouette.ndim != 2 or silhouette.shape[0] != silhouette.shape[1] or silhouette.size == 0:
        raise ValueError(f"adaptive_mask expects a square (S, S) silhouette, got shape {silhouette.shape}")
    size = silhouette.shape[0]
    # 1. Dilation
    kernel_size = dilation_kernel_size(rng, size)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_size, kernel_size))
    dilated = cv2.dilate(silhouette.astype(np.uint8), kernel, iterations=1) > 0
    if not dilated.any():
        return complete_mask(size)
    # 2. Enlarged bounding box
    y0, y1, x0, x1 = _enlarged_box(dilated, rng.uniform(*ENLARGE))
    # 3. Random points, (x, y) as PIL draws them
    count = int(rng.integers(NUM_POINTS[0], NUM_POINTS[1] + 1))
    points = np.stack([_randint_between(rng, x0, x1, count), _randint_between(rng, y0, y1, count)], axis=1)
    # 4.-5. Stroke, union
    stroke = draw_closed_polyline(points, stroke_width(rng, size), size) > 0
    return dilated | stroke


def complete_mask(size: int) -> np.ndarray:
    """The whole target: bool (size, size), all True."""
    return np.ones((size, size), dtype=bool)


def dilation_kernel_size(rng: np.random.Generator, size: int) -> int:
    """The side of the elliptical dilation kernel: randint(10, 25) with both bounds included (the
    release's ``random.randint``) at 256 px, scaled by size / 256 and rounded, at least 1."""
    drawn = int(rng.integers(DILATE_SIZE[0], DILATE_SIZE[1] + 1))
    return max(1, round(drawn * size / RELEASE_SIZE))


def stroke_width(rng: np.random.Generator, size: int) -> int:
    """The polyline width: np.random.randint(80 s, 140 s), high excluded, s = size / 512, bounds truncated
    to integers as numpy's legacy randint does with float bounds; [40, 70) at 256. At least 1 px."""
    low = max(1, int(STROKE_WIDTH_512[0] * size / 512))
    high = max(low + 1, int(STROKE_WIDTH_512[1] * size / 512))
    return int(rng.integers(low, high))


def read_fixed_mask(path: str | Path, size: int) -> tuple[np.ndarray, bool]:
    """A fixed test mask file -> (bool (size, size), whether it had another size and was resized).

    White marks the hole. The release divides the file by 255 and uses it unthresholded; here it is
    binarised at 0.5 (> 127 of 255, leftrefill.images.load_mask), so that a grey anti-aliased edge is a
    clean hole boundary. A mask of another size is resized with nearest neighbour (the release would
    fail on it).
    """
    mask = load_mask(path, "NVS test mask")
    return resize_mask(mask, (size, size), rule="nearest"), mask.shape != (size, size)


def _enlarged_box(mask: np.ndarray, rate: float) -> tuple[float, float, float, float]:
    """(y0, y1, x0, x1): the bounding box of ``mask``'s True pixels (inclusive pixel indices), grown on
    every side by rate * max(height, width) and clipped to [0, size - 1]; floats, as in the release."""
    rows, cols = np.nonzero(mask)
    y0, y1, x0, x1 = rows.min(), rows.max(), cols.min(), cols.max()
    grow = max(y1 - y0, x1 - x0) * rate
    last = mask.shape[0] - 1
    return (float(np.clip(y0 - grow, 0, last)), float(np.clip(y1 + grow, 0, last)),
            float(np.clip(x0 - grow, 0, last)), float(np.clip(x1 + grow, 0, last)))


def _randint_between(rng: np.random.Generator, low: float, high: float, count: int) -> np.ndarray:
    """``count`` integers in [int(low), int(high)), the release's np.random.randint with float bounds; a
    box one pixel wide (where the release's randint would fail) gives that pixel."""
    low_int = int(low)
    return rng.integers(low_int, max(int(high), low_int + 1), size=count)
