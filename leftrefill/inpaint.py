"""LeftRefill reference-guided inpainting on tensors (METHOD 1.2 to 1.8): a thin adapter on ``ldm.fill``.

The canvas is ``[reference | target]`` with the mask on the target half only; the conditioning is the learned
prompt tokens against the empty string; the core samples, decodes and composites hard; the target half is
returned. Shared by the pipeline and training validation. It never changes the model (no dtype casts, no
requires_grad or train/eval switches), so it can run on a model that is being trained.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ldm.fill import Conditioning, fill
from ldm.latent_diffusion import LatentInpaintDiffusion
from ldm.noise import Generators
from leftrefill.canvas import canvas_mask, right_half, stitch


def prompt_conditioning(model: LatentInpaintDiffusion, batch: int, conditions: Mapping | None = None) -> Conditioning:
    """The LeftRefill contexts for ``batch`` items, each (batch, 77, width), in the model's current state: the
    conditioner's context (prompt tokens; plus each item's pose for NVS, read from ``conditions``) and the
    empty string's (one text-encoder pass each)."""
    embedder = model.cond_stage_model
    return Conditioning(embedder.context(conditions or {}, batch), embedder.empty_context(batch))


@torch.no_grad()
def inpaint(model: LatentInpaintDiffusion, reference: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
            sampler: str = "ddim", steps: int = 50, cfg: float = 2.5, strength: float = 1.0,
            conditions: Mapping | None = None, composite: str = "hard", generator: Generators = None,
            progress: bool = False, **sampler_options) -> torch.Tensor:
    """Fill ``mask`` in ``target`` from ``reference`` at the model resolution.

    reference, target: (B, 3, H, W) in [-1, 1]; mask: (B, 1, H, W), 1 = fill (binarised at 0.5).
    sampler, steps, sampler_options (``eta=`` for DDIM), strength: see ``ldm.fill.fill``; cfg: guidance scale.
    conditions: the per-item inputs the model's conditioner reads (``{"pose": (B, 4)}`` for NVS; see its
    ``condition_keys``). composite: "hard" (the target's pixels outside the mask) or "none" (the whole
    decoded half). generator: one, or one per batch item (item i's result then does not depend on the batch).
    Returns the target half (B, 3, H, W), float32 on the model's device, not clamped.
    """
    if reference.shape != target.shape or mask.shape != (target.shape[0], 1, *target.shape[2:]):
        raise ValueError(f"reference {tuple(reference.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(mask.shape)} must be (B, 3, H, W), (B, 3, H, W) and (B, 1, H, W)")
    canvas = stitch(reference.float(), target.float())  # (B, 3, H, 2W)
    fill_mask = canvas_mask(mask.float())  # (B, 1, H, 2W), zero on the reference half
    conditioning = prompt_conditioning(model, canvas.shape[0], conditions)
    filled = fill(model, canvas, fill_mask, conditioning, sampler=sampler, steps=steps, guidance=cfg,
                  strength=strength, composite=composite, generator=generator, progress=progress, **sampler_options)
    return right_half(filled)
