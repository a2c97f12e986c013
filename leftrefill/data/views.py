"""Per-image view sampling of the training pipeline (METHOD 1.12, the original ``resize_and_crop``).

Every training image (the reference and the target of a pair, each with its own draw) becomes a square
``size`` x ``size`` view: with probability ``direct_prob`` it is resized directly (the aspect ratio is
not kept), otherwise its short side is resized to ``size`` and a uniformly random square is cropped.
The returned :class:`ViewTransform` maps original image pixels into the view, so that keypoint
matches (given in original image pixels) can be followed into the view for the matching-based masks.

Coordinates are continuous (x, y) with pixel (i, j) covering [i, i + 1) x [j, j + 1), i.e. the same
convention as the original code, which only scaled the keypoints (no half-pixel offset).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# METHOD 1.12: the original picks "directly resizing" vs "resize and random crop" with p = 0.5.
DIRECT_RESIZE_PROB = 0.5


@dataclass(frozen=True)
class ViewTransform:
    """Original image pixels -> view pixels: (x, y) -> (x * scale_x - crop_x, y * scale_y - crop_y).

    ``size`` is the side of the square view; points mapped outside [0, size) are not in the view.
    """

    scale_x: float
    scale_y: float
    crop_x: int
    crop_y: int
    size: int

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Points (N, 2) float (x, y) in original image pixels -> float32 (N, 2) (x, y) in view pixels."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        scale = np.array([self.scale_x, self.scale_y])
        offset = np.array([self.crop_x, self.crop_y], dtype=np.float64)
        return (points * scale - offset).astype(np.float32)

    def inside(self, points: np.ndarray) -> np.ndarray:
        """Bool (N,): which view points (N, 2) lie in [0, size) x [0, size)."""
        points = np.asarray(points).reshape(-1, 2)
        return ((points >= 0) & (points < self.size)).all(axis=1)


def random_view(image: np.ndarray, rng: np.random.Generator, size: int = 512,
                direct_prob: float = DIRECT_RESIZE_PROB) -> tuple[np.ndarray, ViewTransform]:
    """A random square view of ``image`` and the transform from image pixels into it.

    image: uint8 (H, W, 3). Returns (uint8 (size, size, 3), ViewTransform). With probability
    ``direct_prob`` the image is resized directly to size x size (INTER_AREA, aspect not kept, no crop);
    otherwise its short side is resized to ``size`` (INTER_AREA) and a uniformly random size x size
    square is cropped (METHOD 1.12).
    """
    _check_image(image)
    if rng.random() < direct_prob:
        return _direct_view(image, size)
    return _cropped_view(image, rng, size)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        shape = getattr(image, "shape", None)
        raise ValueError(f"random_view expects an RGB image array (H, W, 3), got shape {shape}")


def _direct_view(image: np.ndarray, size: int) -> tuple[np.ndarray, ViewTransform]:
    """Resize the whole image to size x size (the aspect ratio changes)."""
    height, width = image.shape[:2]
    view = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return view, ViewTransform(size / width, size / height, 0, 0, size)


def _cropped_view(image: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, ViewTransform]:
    """Resize the short side to ``size`` and crop a uniformly random size x size square."""
    height, width = image.shape[:2]
    new_width, new_height = short_side_resized(width, height, size)
    resized = cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_AREA)
    crop_x = int(rng.integers(0, new_width - size + 1))
    crop_y = int(rng.integers(0, new_height - size + 1))
    view = np.ascontiguousarray(resized[crop_y:crop_y + size, crop_x:crop_x + size])
    # The scales are the realised ones (after rounding the long side), so points land where pixels did.
    return view, ViewTransform(new_width / width, new_height / height, crop_x, crop_y, size)


def short_side_resized(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the short side to ``size``; the long side is rounded and kept
    >= ``size`` (the original truncated it with ``int``, which could differ by one pixel)."""
    if height < width:
        return max(size, int(round(width * size / height))), size
    return size, max(size, int(round(height * size / width)))
