"""Side-by-side image grids with a label above each panel (evaluation grids, training previews)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from leftrefill.images import tensor_to_rgb

STRIP_BACKGROUND = (0, 0, 0)
STRIP_TEXT = (255, 255, 255)


def labelled_row(panels: Sequence[np.ndarray], labels: Sequence[str]) -> np.ndarray:
    """Panels RGB uint8 (H, W_i, 3), all of one height, side by side under a header strip that names each one.

    Returns RGB uint8 (strip + H, sum W_i, 3); the panels' pixels are unchanged, and a label longer than
    its panel is cut at the panel's edge rather than running into the next one.
    """
    if len(panels) != len(labels) or not panels:
        raise ValueError(f"need one label per panel, got {len(panels)} panels and {len(labels)} labels")
    if len({panel.shape[0] for panel in panels}) != 1:
        raise ValueError(f"panels must share one height, got {[panel.shape[0] for panel in panels]}")
    height = strip_height(panels[0].shape[0])
    font = _font(round(height * 0.7))
    columns = [np.concatenate([_header(panel.shape[1], height, label, font), panel], axis=0)
               for panel, label in zip(panels, labels)]
    return np.concatenate(columns, axis=1)


INPAINTING_LABELS = ("reference", "masked target", "result", "ground truth")
NVS_LABELS = ("reference", "target as seen", "result", "ground truth")


def inpainting_panels(reference: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      filled: torch.Tensor) -> list[np.ndarray]:
    """The four panels of INPAINTING_LABELS for items (..., 3, S, S) in [-1, 1] and masks (..., 1, S, S);
    with a leading batch dimension the items are stacked top to bottom. The masked target shows the
    holes mid-gray, as the model sees them. Returns RGB uint8 arrays."""
    return model_view_panels(reference, target, mask, filled, target)


def multiview_labels(num_references: int) -> tuple[str, ...]:
    """The labels of :func:`multiview_panels`: "reference 1" ... "reference k" (just "reference" for one),
    then INPAINTING_LABELS' other three."""
    names = ["reference"] if num_references == 1 else [f"reference {k}" for k in range(1, num_references + 1)]
    return (*names, *INPAINTING_LABELS[1:])


def multiview_panels(references: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     filled: torch.Tensor) -> list[np.ndarray]:
    """One multi-view item's panels: each reference (k, 3, S, S) in order, then the masked target (1, S, S
    mask, holes mid-gray), the result and the ground truth as :func:`inpainting_panels`; RGB uint8 arrays,
    one per :func:`multiview_labels` (k)."""
    return [tensor_to_rgb(reference) for reference in references] + inpainting_panels(
        references[0], target, mask, filled)[1:]


def model_view_panels(reference: torch.Tensor, seen: torch.Tensor, mask: torch.Tensor, result: torch.Tensor,
                      truth: torch.Tensor) -> list[np.ndarray]:
    """reference | what the model was shown of the target (``seen`` with the mask mid-gray) | result |
    ground truth, as :func:`inpainting_panels`. For novel view synthesis ``seen`` is the visible target
    (white when the target is unknown) and differs from ``truth``; the labels are NVS_LABELS."""
    columns = [reference, seen * (1 - mask), result.to(truth.dtype), truth]
    if reference.ndim == 4:
        columns = [torch.cat(list(column), dim=-2) for column in columns]
    return [tensor_to_rgb(column) for column in columns]


def strip_height(panel_height: int) -> int:
    """Header height in pixels: 1/16 of the panel, and at least 16 so the default font stays legible."""
    return max(16, panel_height // 16)


def _header(width: int, height: int, label: str, font: ImageFont.ImageFont) -> np.ndarray:
    """One panel's header: ``label`` in white on black, (height, width, 3) uint8."""
    strip = Image.new("RGB", (width, height), STRIP_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    _, top, _, bottom = draw.textbbox((0, 0), label, font=font)
    draw.text((4, (height - top - bottom) // 2), label, fill=STRIP_TEXT, font=font)  # centred vertically
    return np.asarray(strip)


def _font(size: int) -> ImageFont.ImageFont:
    """Pillow's default font at ``size`` px (FreeType), or its fixed bitmap font where FreeType is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, TypeError):  # Pillow built without FreeType, or older than 10.1
        return ImageFont.load_default()
