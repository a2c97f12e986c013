"""Building test folders in the test_inpainting.py layout, with matching-based masks (METHOD 1.12, 1.14).

A mask is drawn in the test loader's view of the target (a direct resize to ``size`` x ``size``) with the
training code's matching-based mask: a thick closed polyline through confident matches inside a sub-box
of 20-50 % of their bounding box. With too few matches it falls back to a procedural irregular mask. The
mask is then resized (nearest) to the target's own size, so that mask.png and target.jpg agree.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from leftrefill.atomic import atomic_path
from leftrefill.data.masks import IrregularMaskGenerator, matching_mask
from leftrefill.data.views import ViewTransform
from leftrefill.images import resize_mask

COPIED_SUFFIXES = {".jpg": ".jpg", ".jpeg": ".jpg", ".png": ".png"}


def direct_view(width: int, height: int, size: int) -> ViewTransform:
    """The test loader's view: a direct resize to size x size, no crop."""
    return ViewTransform(scale_x=size / width, scale_y=size / height, crop_x=0, crop_y=0, size=size)


def evaluation_mask(target_size: tuple[int, int], points: np.ndarray | None, confidence: np.ndarray | None,
              rng: np.random.Generator, size: int = 512) -> tuple[np.ndarray, str]:
    """(bool mask (H, W) at the target's size (width, height), "matching" or "irregular")."""
    width, height = target_size
    mask = None
    if points is not None and len(points):
        mask = matching_mask(points, confidence, direct_view(width, height, size), rng)
    kind = "matching"
    if mask is None:
        mask, kind = IrregularMaskGenerator(size).sample(rng), "irregular"
    return resize_mask(mask, (height, width), rule="nearest"), kind


def copy_image(image: Path, folder: Path, stem: str) -> Path:
    """Copy the image file ``image`` into ``folder`` as ``<stem>.jpg`` / ``<stem>.png`` (bytes kept, EXIF
    included); other formats are re-encoded as PNG. Atomic."""
    suffix = COPIED_SUFFIXES.get(image.suffix.lower())
    destination = folder / f"{stem}{suffix or '.png'}"
    with atomic_path(destination) as tmp:
        if suffix:
            shutil.copyfile(image, tmp)
        else:
            Image.open(image).save(tmp)
    return destination


def save_mask(mask: np.ndarray, path: Path) -> None:
    """Bool (H, W) -> 8-bit PNG, 255 = hole. Atomic."""
    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp)
