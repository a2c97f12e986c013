"""LeftRefill reference-guided inpainting on tensors (METHOD 1.2 to 1.8): a thin adapter on ``ldm.fill``.

The canvas is ``[reference | target]`` with the mask on the target half only; the conditioning is the learned
prompt tokens against the empty string; the core samples, decodes and composites hard; the target half is
returned. With K references of one target, K such canvases share their target half while sampling
(training-free multi-reference, METHOD 7.3; see :func:`inpaint`). Shared by the pipeline and training
validation. It never changes the model (no dtype casts, no requires_grad or train/eval switches), so it can
run on a model that is being trained.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ldm.fill import COMPOSITES, Conditioning, fill
from ldm.latent_diffusion import LatentInpaintDiffusion
from ldm.noise import Generators
from ldm.view_sampling import SharedRegion
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

    reference: (B, 3, H, W), or (B, K, 3, H, W) for K references of each target (training-free
    multi-reference, see below); target: (B, 3, H, W); all in [-1, 1]. mask: (B, 1, H, W), 1 = fill
    (binarised at 0.5). sampler, steps, sampler_options (``eta=`` for DDIM), strength: see ``ldm.fill.fill``;
    cfg: guidance scale. conditions: the per-item inputs the model's conditioner reads (``{"pose": (B, 4)}``
    for NVS; see its ``condition_keys``); with K references one per canvas, (B, K, ...). composite: "hard"
    (the target's pixels outside the mask) or "none" (the whole decoded half). generator: one, or one per
    batch item (item i's result then does not depend on the batch). Returns the target half (B, 3, H, W),
    float32 on the model's device, not clamped.

    Training-free multi-reference (METHOD 7.3) with the one-reference model: item i becomes K canvases
    ``[reference_ik | target_i]``, consecutive in one batch, whose target halves share one latent
    (ldm.view_sampling.SharedRegion over the right half of the latent grid): the K canvases start from one
    noise, drawn from item i's generator, and the model's prediction on the target half is averaged over
    them at every step; the reference halves are not shared. For DDIM, whose update is affine in eps, this
    equals averaging the K target-half latents after every step: the mean that the release's
    ``ddim_multi_sampling`` has commented out. The release instead copies the half of one randomly chosen
    canvas into all of them; the mean uses every reference equally at every step and is deterministic.
    The K latents are equal, but the VAE decoder also sees each canvas's reference half near the seam, so the
    decoded target halves differ slightly: their mean is composited once (with "hard", the pixels outside the
    mask are exactly the target's). A single generator (or None) gives each target a seed drawn from it. One
    step costs K times the UNet work of one reference (and K VAE encodes and decodes per target). K = 1 is
    the one-reference path, bit for bit.
    """
    references = reference if reference.ndim == 5 else reference[:, None]  # (B, K, 3, H, W)
    _check_shapes(reference, references, target, mask)
    if composite not in COMPOSITES:
        raise ValueError(f"composite must be one of {', '.join(COMPOSITES)}, got {composite!r}")
    k = references.shape[1]
    # 1. K canvases per target, consecutive: [reference_ik | target_i]
    canvas = stitch(references.flatten(0, 1).float(), target.float().repeat_interleave(k, dim=0))  # (B*K, 3, H, 2W)
    fill_mask = canvas_mask(mask.float()).repeat_interleave(k, dim=0)  # (B*K, 1, H, 2W), zero on the reference half
    if reference.ndim == 5:
        conditions = {key: value.flatten(0, 1) for key, value in (conditions or {}).items()}  # (B*K, ...)
    conditioning = prompt_conditioning(model, canvas.shape[0], conditions)
    # 2. sample (with K > 1 the target halves shared) and decode; composite here for one reference
    shared = None if k == 1 else SharedRegion(k, _target_half_region(canvas.shape[-2:]))
    filled = fill(model, canvas, fill_mask, conditioning, sampler=sampler, steps=steps, guidance=cfg,
                  strength=strength, composite=composite if k == 1 else "none", generator=_canvas_generators(
                      generator, k, len(target)), progress=progress, shared_region=shared, **sampler_options)
    # 3. K > 1: the mean of the K decoded canvases, composited once into [reference_i1 | target_i]
    if k > 1:
        mean = filled.unflatten(0, (-1, k)).mean(dim=1)  # (B, 3, H, 2W)
        filled = COMPOSITES[composite](mean, canvas[::k].to(mean.device), fill_mask[::k].to(mean.device))
    return right_half(filled)


def _check_shapes(reference: torch.Tensor, references: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
    """references: ``reference`` as (B, K, 3, H, W)."""
    b, k, _, h, w = references.shape if references.ndim == 5 else (-1,) * 5
    if k < 1 or references.shape[2:] != target.shape[1:] or target.shape[0] != b or mask.shape != (b, 1, h, w):
        raise ValueError(f"reference {tuple(reference.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(mask.shape)} must be (B, 3, H, W) or (B, K, 3, H, W) with K >= 1, (B, 3, H, W) "
                         f"and (B, 1, H, W)")


def _target_half_region(canvas_hw: tuple[int, int]) -> torch.Tensor:
    """The target half of a canvas (H, 2W) on the latent grid: (H/8, 2W/8) bool, True in columns >= W/8."""
    h, w = canvas_hw[0] // 8, canvas_hw[1] // 8
    region = torch.zeros(h, w, dtype=torch.bool)
    region[:, w // 2:] = True
    return region


def _canvas_generators(generator: Generators, k: int, batch: int) -> Generators:
    """Item i's generator for each of its K canvases (SharedRegion then gives them copies of it); one shared
    generator, or None, is kept (SharedRegion draws one seed per target from it)."""
    if generator is None or isinstance(generator, torch.Generator) or k == 1:
        return generator
    if len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for {batch} targets")
    return [g for g in generator for _ in range(k)]
