"""SD2's frozen text encoder as a conditioner of the shared seam: each item's own prompt (RealFill, METHOD 5.1).

RealFill conditions the inpainting model on a plain prompt ("a photo of sks", "" with p = 0.1, drawn by the
dataset), encoded by SD2's OpenCLIP text encoder, which LoRA adapts (leftrefill.lora). As a conditioner it
reads ``batch["prompt"]`` (a list of n strings) and, like the prompt-token conditioners, offers
``context(batch, n, drop)`` and ``empty_context(n)``; it has no modules of its own beyond SD2's, so an SD2
checkpoint fills it completely.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ldm.text_encoder import FrozenOpenCLIPEmbedder


class TextConditioner(FrozenOpenCLIPEmbedder):
    """Prompts (n strings, ``batch["prompt"]``) -> context (n, 77, width); the empty string unconditionally."""

    condition_keys = ("prompt",)

    def new_modules(self) -> dict[str, nn.Module]:
        return {}  # nothing beyond SD2: adapters are added separately (leftrefill.lora)

    def reset_new_parameters(self) -> None:
        return None

    def context(self, batch: Mapping, n: int, drop: torch.Tensor | None = None) -> torch.Tensor:
        """(n, 77, width) for item i's prompt; items with ``drop`` (n,) True get the empty string."""
        prompts = batch.get("prompt")
        if isinstance(prompts, str):
            prompts = [prompts] * n
        if not isinstance(prompts, (list, tuple)) or len(prompts) != n or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"this model conditions on a text prompt per item: the batch needs 'prompt', a list of "
                             f"{n} strings (or one string for all); got {type(prompts).__name__}")
        if drop is not None:
            prompts = ["" if dropped else prompt for prompt, dropped in zip(prompts, drop.tolist())]
        return self.encode(list(prompts))

    def empty_context(self, n: int) -> torch.Tensor:
        return self.encode([""]).expand(n, -1, -1)
