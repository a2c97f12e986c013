"""The LeftRefill canvas: reference on the left, target on the right (METHOD 1.2, 1.8).

Pure tensor functions. Images are (B, 3, H, W) in [-1, 1]; masks are (B, 1, H, W) with 1 = fill.
"""

from __future__ import annotations

import torch


def binarize(mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mask in [0, 1] -> {0, 1} float (1 where mask > threshold)."""
    return (mask > threshold).to(mask.dtype if mask.is_floating_point() else torch.float32)


def stitch(reference: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) reference and target -> canvas (B, C, H, 2W), reference in columns [0, W)."""
    if reference.shape != target.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and target {tuple(target.shape)} must have one shape")
    return torch.cat([reference, target], dim=-1)


def canvas_mask(target_mask: torch.Tensor) -> torch.Tensor:
    """Target mask (B, 1, H, W) -> binary canvas mask (B, 1, H, 2W) that is zero on the reference half."""
    mask = binarize(target_mask)
    return torch.cat([torch.zeros_like(mask), mask], dim=-1)


def right_half(canvas: torch.Tensor) -> torch.Tensor:
    """(B, C, H, 2W) -> the target half (B, C, H, W)."""
    return canvas[..., canvas.shape[-1] // 2:]
