"""Multi-view LeftRefill reference-guided inpainting on tensors (METHOD 3.1, 3.2): a thin adapter on ``ldm.fill``.

A sample is the target and its references, laid out as the model's views and flattened into the batch as
(b v): by default view 0 is the target (masked) and views 1..v-1 the references (unmasked), each S x S; with
``concat_target`` every view is a stitched canvas [reference_i | target] with the mask on its right half.
Each view is conditioned on its own prompt (shared + view tokens); the self-attention runs jointly over the
views (the conditioner's ``grouping``), installed for the call only. Shared by the pipeline, the evaluation
CLI and training (loss and validation).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from einops import rearrange

from ldm.fill import Conditioning, fill
from ldm.noise import Generators
from leftrefill.canvas import canvas_mask, stitch

VIEW_SEED_RANGE = 2**62


class ViewCountError(ValueError):
    """The number of references does not match the number of views the model was trained for."""


def references_per_sample(embedder) -> int:
    """How many references a sample of this multi-view model holds: v - 1 (view 0 is the target), or v with
    ``concat_target`` (each view stitches its own reference to the target)."""
    return embedder.num_views if embedder.concat_target else embedder.num_views - 1


def view_canvases(references: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                  concat_target: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's views of B samples, flattened as (B v).

    references: (B, k, 3, S, S); target: (B, 3, S, S); mask: (B, 1, S, S), 1 = fill. Returns images and
    masks: (B*(k+1), 3, S, S) and (B*(k+1), 1, S, S) with the target first and zero masks on the
    references; with ``concat_target`` (B*k, 3, S, 2S) canvases [reference_i | target] and (B*k, 1, S, 2S)
    masks on their right halves.
    """
    b, k = references.shape[:2]
    if references.ndim != 5 or references.shape[2:] != target.shape[1:] or target.shape[0] != b:
        raise ValueError(f"references {tuple(references.shape)} must be (B, k, 3, S, S) with the target's "
                         f"{tuple(target.shape)} image size")
    if mask.shape != (b, 1, *target.shape[2:]):
        raise ValueError(f"mask {tuple(mask.shape)} must be (B, 1, S, S) = ({b}, 1, {target.shape[2]}, {target.shape[3]})")
    if concat_target:
        canvases = stitch(rearrange(references, "b k c h w -> (b k) c h w"), target.repeat_interleave(k, dim=0))
        return canvases, canvas_mask(mask.repeat_interleave(k, dim=0))
    images = torch.cat([target[:, None], references], dim=1)  # (B, k+1, 3, S, S)
    masks = torch.cat([mask[:, None], torch.zeros_like(mask)[:, None].expand(-1, k, -1, -1, -1)], dim=1)
    return rearrange(images, "b v c h w -> (b v) c h w"), rearrange(masks, "b v c h w -> (b v) c h w")


def target_of(views: torch.Tensor, num_views: int, concat_target: bool = False) -> torch.Tensor:
    """The target (B, 3, S, S) from the views (B*v, 3, S, S or 2S): view 0, its right half with concat_target."""
    target = views[::num_views]
    return target[..., target.shape[-1] // 2:] if concat_target else target


def view_generators(generator: Generators, num_views: int) -> Generators:
    """Per-view generators from per-sample ones: sample i's v views draw from generators seeded by v numbers
    drawn from sample i's generator (so a sample's result still depends only on its own seed). A shared
    generator (or None) is kept as it is."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return [torch.Generator(g.device).manual_seed(seed) for g in generator
            for seed in torch.randint(0, VIEW_SEED_RANGE, (num_views,), generator=g, device=g.device).tolist()]


@torch.no_grad()
def inpaint_views(model, references: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                  sampler: str = "ddim", steps: int = 50, cfg: float = 2.5, strength: float = 1.0,
                  conditions: Mapping | None = None, composite: str = "hard", generator: Generators = None,
                  progress: bool = False, **sampler_options) -> torch.Tensor:
    """Fill ``mask`` in ``target`` from all its ``references`` at once with a multi-view model.

    references: (B, k, 3, S, S) in [-1, 1], k = the model's references per sample (ViewCountError
    otherwise); target: (B, 3, S, S); mask: (B, 1, S, S), 1 = fill. generator: one, or one per sample.
    Other options: as ``leftrefill.inpaint.inpaint``. Returns the target (B, 3, S, S), float32, not clamped.
    """
    embedder = model.cond_stage_model
    expected = references_per_sample(embedder)
    if references.ndim != 5 or references.shape[1] != expected:
        got = references.shape[1] if references.ndim == 5 else f"shape {tuple(references.shape)}"
        raise ViewCountError(f"this multi-view model was trained for {embedder.num_views} views, i.e. {expected} "
                             f"reference(s) per target; got {got}")
    images, masks = view_canvases(references.float(), target.float(), mask.float(), embedder.concat_target)
    n = images.shape[0]
    conditioning = Conditioning(embedder.context(conditions or {}, n), embedder.empty_context(n))
    filled = fill(model, images, masks, conditioning, sampler=sampler, steps=steps, guidance=cfg, strength=strength,
                  composite=composite, generator=view_generators(generator, embedder.num_views), progress=progress,
                  views=embedder.grouping(), **sampler_options)
    return target_of(filled, embedder.num_views, embedder.concat_target)
