"""Canvas geometry: the reference half is never masked, and blending keeps unmasked pixels exactly."""

from __future__ import annotations

import pytest
import torch

from ldm.fill import composite_hard as composite
from leftrefill.canvas import canvas_mask, right_half, stitch


def test_stitch_puts_reference_left_and_target_right():
    reference, target = torch.full((1, 3, 4, 5), -1.0), torch.full((1, 3, 4, 5), 1.0)
    canvas = stitch(reference, target)
    assert canvas.shape == (1, 3, 4, 10)
    assert torch.equal(canvas[..., :5], reference) and torch.equal(right_half(canvas), target)
    with pytest.raises(ValueError, match="must have one shape"):
        stitch(reference, target[..., :4])


def test_mask_never_touches_reference_half():
    target_mask = torch.rand(2, 1, 8, 8)  # soft values are binarised at 0.5
    mask = canvas_mask(target_mask)
    assert mask.shape == (2, 1, 8, 16)
    assert mask[..., :8].abs().sum() == 0
    assert torch.equal(right_half(mask), (target_mask > 0.5).float())
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_composite_keeps_unmasked_pixels_exactly():
    generator = torch.Generator().manual_seed(0)
    canvas = torch.rand(1, 3, 8, 16, generator=generator) * 2 - 1
    generated = torch.rand(1, 3, 8, 16, generator=generator) * 2 - 1
    mask = canvas_mask((torch.rand(1, 1, 8, 8, generator=generator) > 0.5).float())
    out = composite(generated, canvas, mask)
    keep = (mask < 0.5).expand_as(canvas)
    assert torch.equal(out[keep], canvas[keep])
    assert torch.equal(out[~keep], generated[~keep])
    assert torch.equal(out[..., :8], canvas[..., :8])
