"""Reading user images and masks, resizing them, and moving them between numpy and torch.

Everything a user hands in goes through ``load_rgb`` / ``load_mask``, which accept a path, a PIL image
or a numpy array and return one canonical form: RGB ``uint8`` (H, W, 3), or a boolean mask (H, W) with
True = hole (to fill). On the way they honour EXIF orientation, convert grayscale / palette / RGBA /
16-bit images, and turn every reading problem into one ``ImageInputError`` naming the input.
A mask holding only the values 0 and 1 (a common export of boolean arrays) is read as a 0/1 mask, with
a warning, instead of as an empty 0..255 mask. ``image_file_problem`` checks a file cheaply, without a
full decode, so that a whole test folder can be checked before a model is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

ImageSource = str | Path | Image.Image | np.ndarray

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WARNED_ZERO_ONE: set[str] = set()  # inputs already reported as 0/1 masks (forgotten past MAX_WARNED)
MAX_WARNED = 1024
MIN_ONES_FRACTION = 1e-3  # fewer ones than this are stray values of a near-black mask, not a 0/1 mask


class ImageInputError(ValueError):
    """An image or mask that cannot be used; the message names the file or argument and the problem."""


# -- reading -------------------------------------------------------------------------------------------
def load_rgb(source: ImageSource, name: str = "image") -> np.ndarray:
    """Any supported image -> RGB uint8 (H, W, 3).

    Grayscale and palette images are expanded to RGB, an alpha channel is dropped (the colour is kept),
    16-bit images are scaled to 8 bits (v / 257), float arrays must lie in [0, 1].
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, name)
    image = as_pil(source, name)
    if image.mode in _SIXTEEN_BIT_MODES:
        return _array_to_rgb(_sixteen_bit_to_uint8(np.asarray(image)), name)
    if image.mode == "F":
        return _array_to_rgb(np.asarray(image), name)
    return np.asarray(image.convert("RGB"))


def load_mask(source: ImageSource, name: str = "mask") -> np.ndarray:
    """Any supported mask image -> bool (H, W), True = hole (to fill).

    White (> 127 of 255, > 0.5 for floats) marks the hole. Colour masks use their luminance; with an
    alpha channel the luminance is multiplied by the alpha, so strokes painted on a transparent layer
    count and transparent pixels do not. An integer mask whose largest value is 1 is a 0/1 mask: 1 is
    the hole, and a warning naming the input says so (once per input name or file).
    """
    if isinstance(source, np.ndarray):
        return _array_to_gray01(source, name) > 0.5
    image = as_pil(source, name)
    label = f"{name} {source}" if isinstance(source, (str, Path)) else name  # names the file in warnings
    if image.mode in _SIXTEEN_BIT_MODES:
        return _array_to_gray01(np.asarray(image).astype(np.uint16), label) > 0.5
    if image.mode == "F":
        return _array_to_gray01(np.asarray(image), label) > 0.5
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA")).astype(np.float32) / 255.0
        return _luminance(rgba[..., :3]) * rgba[..., 3] > 0.5
    return _array_to_gray01(np.asarray(image.convert("L")), label) > 0.5  # > 0.5 of 255 is > 127


def image_file_problem(path: str | Path) -> str | None:
    """What makes the file at ``path`` unusable as an image, or None when it reads.

    Cheap: a PNG is checked chunk by chunk (lengths and CRCs up to IEND) without inflating it, a JPEG is
    decoded at 1/8 scale (DC coefficients only, but the whole entropy-coded stream is read, so a
    truncated file still shows); other formats are decoded fully.
    """
    path = Path(path)
    if not path.is_file():
        return "file not found" if not path.exists() else "not a file"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as image:
            if image.width == 0 or image.height == 0:
                return f"empty image ({image.width}x{image.height})"
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
    except UnidentifiedImageError:
        return "not an image file Pillow can read"
    except Image.DecompressionBombError as err:
        return f"too large to open safely ({err})"
    except (OSError, SyntaxError, ValueError) as err:
        return f"cannot be decoded (truncated or corrupt?): {err}"
    return None


def as_pil(source: str | Path | Image.Image, name: str) -> Image.Image:
    """Open (fully decode) a path, or take a PIL image; apply its EXIF orientation."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, Path)):
        image = _open(Path(source), name)
    else:
        raise ImageInputError(f"{name}: expected a file path, a PIL image or a numpy array, "
                              f"got {type(source).__name__}")
    if image.width == 0 or image.height == 0:
        raise ImageInputError(f"{name}: the image is empty ({image.width}x{image.height})")
    return ImageOps.exif_transpose(image)


def _open(path: Path, name: str) -> Image.Image:
    if not path.is_file():
        raise ImageInputError(f"{name}: file not found: {path}" if not path.exists() else f"{name}: not a file: {path}")
    try:
        image = Image.open(path)
        image.load()  # decode now, so a truncated file fails here and not deep inside a transform
    except UnidentifiedImageError:
        raise ImageInputError(f"{name}: {path} is not an image file Pillow can read") from None
    except Image.DecompressionBombError as err:
        raise ImageInputError(f"{name}: {path} is too large to open safely ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageInputError(f"{name}: {path} cannot be decoded (truncated or corrupt?): {err}") from None
    return image


def _sixteen_bit_to_uint8(array: np.ndarray) -> np.ndarray:
    return np.clip(np.round(array.astype(np.float32) / 257.0), 0, 255).astype(np.uint8)


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    array = _to_uint8(array, name)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[..., :3])
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    raise ImageInputError(f"{name}: expected an array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                          f"got {array.shape}")


def _array_to_gray01(array: np.ndarray, name: str) -> np.ndarray:
    """(H, W[, C]) array -> float32 (H, W) in [0, 1] (luminance, times alpha if C = 4)."""
    if array.dtype == np.bool_:
        array = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.floating):
        _check_unit_range(array, name)
        array = array.astype(np.float32)
    else:
        array = _integers_to_unit(array, name)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[2] == 3:
        array = _luminance(array)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = _luminance(array[..., :3]) * array[..., 3]
    if array.ndim != 2 or array.size == 0:
        raise ImageInputError(f"{name}: expected a non-empty mask array of shape (H, W), (H, W, 1), (H, W, 3) "
                              f"or (H, W, 4), got {array.shape}")
    return array


def _integers_to_unit(array: np.ndarray, name: str) -> np.ndarray:
    """Integer mask values -> float32 in [0, 1], scaled by what the values can reach. Values only 0 and 1
    (with at least 0.1 % ones, so the stray 1s of a near-black JPEG do not count) are a 0/1 mask."""
    if (array.size and np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() == 1
            and np.count_nonzero(array) >= MIN_ONES_FRACTION * array.size):
        if name not in _WARNED_ZERO_ONE:  # once per file: an evaluation reads each mask twice
            if len(_WARNED_ZERO_ONE) >= MAX_WARNED:
                _WARNED_ZERO_ONE.clear()
            _WARNED_ZERO_ONE.add(name)
            log.warning("%s holds only the values 0 and 1: read as a 0/1 mask with 1 = hole (save masks as "
                        "0 / 255 to silence this warning)", name)
        return array.astype(np.float32)
    if array.dtype == np.uint16 and array.size:
        # A 16-bit file holding 0 / 255 is an 8-bit mask saved wide.
        return array.astype(np.float32) / (255.0 if array.max() <= 255 else 65535.0)
    return _to_uint8(array, name).astype(np.float32) / 255.0


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.size == 0:
        raise ImageInputError(f"{name}: the array is empty {array.shape}")
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return _sixteen_bit_to_uint8(array)
    if np.issubdtype(array.dtype, np.floating):
        _check_unit_range(array, name)
        return np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)
    raise ImageInputError(f"{name}: unsupported array dtype {array.dtype} with values in "
                          f"[{array.min()}, {array.max()}]; use uint8, uint16, bool or float in [0, 1]")


def _check_unit_range(array: np.ndarray, name: str) -> None:
    if not np.isfinite(array).all() or array.min() < -1e-3 or array.max() > 1 + 1e-3:
        raise ImageInputError(f"{name}: float arrays must hold values in [0, 1], got "
                              f"[{np.nanmin(array):.4g}, {np.nanmax(array):.4g}]")


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (the weights of PIL's "L" conversion) of float RGB (..., 3)."""
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


# -- resizing ------------------------------------------------------------------------------------------
def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> (h, w, 3) with OpenCV INTER_AREA, the original test loader's resize, also
    when enlarging (the evaluation protocol, METHOD 1.14)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, size: tuple[int, int], rule: str = "nearest") -> np.ndarray:
    """Bool mask (H, W) -> (h, w).

    ``"nearest"`` is the original loaders' rule. ``"cover"`` marks an output pixel as hole when any input
    pixel it covers is a hole, so every hole pixel of the input stays inside the resized hole.
    """
    h, w = size
    if mask.shape == (h, w):
        return mask
    if rule == "nearest":
        return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    if rule == "cover":
        return cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0
    raise ValueError(f"unknown mask resize rule {rule!r}; use 'nearest' or 'cover'")


# -- numpy <-> torch -----------------------------------------------------------------------------------
def rgb_to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """Bool (H, W) -> float32 (1, H, W) in {0, 1}."""
    return torch.from_numpy(np.ascontiguousarray(mask)).float()[None]


def tensor_to_rgb(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] (clamped) -> RGB uint8 (H, W, 3)."""
    image = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return image.permute(1, 2, 0).cpu().numpy()
