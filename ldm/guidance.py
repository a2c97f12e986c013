"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper: eps_u + s * (eps_c - eps_u)."""

from __future__ import annotations

from collections.abc import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


class ClassifierFreeGuidance:
    """``denoise(x, t)`` for a sampler, evaluating both branches in one batched model call.

    model_fn(x, t, cond) -> eps; ``cond`` and ``uncond`` are dicts of batch-first tensors with the same
    keys (for inpainting both hold the same ``c_concat`` and differ in ``c_crossattn``). With scale 1
    only the conditional branch is evaluated.
    """

    def __init__(self, model_fn: ModelFn, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor], scale: float):
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
        self.model_fn = model_fn
        self.cond = cond
        self.scale = scale
        # Stack once: [uncond; cond] along the batch, reused at every step.
        self.paired = {key: torch.cat([uncond[key], cond[key]]) for key in cond}

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.model_fn(x, t, self.cond)
        eps_uncond, eps_cond = self.model_fn(torch.cat([x, x]), torch.cat([t, t]), self.paired).chunk(2)
        return eps_uncond + self.scale * (eps_cond - eps_uncond)
