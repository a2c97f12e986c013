"""Frozen OpenCLIP text encoder of SD2: tokens -> (B, 77, width) cross-attention context.

The transformer is open_clip's own (``open_clip.transformer.TextTransformer``), built with random
weights and never downloaded (weights come from the SD2 checkpoint). No visual tower is built.
SD2 takes the output of the penultimate residual block, then ``ln_final`` (``layer="penultimate"``).
"""

from __future__ import annotations

import math

import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint


class OpenCLIPTextModel(nn.Module):
    """The text half of an open_clip CLIP, with CLIP's attribute names.

    Parameter names equal those of ``open_clip.CLIP`` without ``visual.*`` (``token_embedding``,
    ``positional_embedding``, ``transformer.resblocks.*``, ``ln_final``, ``text_projection``,
    ``logit_scale``), which is what SD2 checkpoints store under ``cond_stage_model.model.``.
    """

    def __init__(self, embed_dim: int, context_length: int, vocab_size: int, width: int, heads: int, layers: int):
        super().__init__()
        text = TextTransformer(context_length=context_length, vocab_size=vocab_size, width=width, heads=heads,
                               layers=layers, output_dim=embed_dim)
        if not text.transformer.batch_first:
            raise RuntimeError("open_clip text transformer is not batch-first; unsupported open_clip version")
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.logit_scale = nn.Parameter(torch.full([], math.log(1 / 0.07)))  # unused; stored in CLIP checkpoints


class FrozenOpenCLIPEmbedder(nn.Module):
    """Text -> context (B, max_length, width) through a frozen OpenCLIP text transformer.

    ``arch`` names an open_clip model config (its ``text_cfg`` and ``embed_dim`` are read from the
    package, nothing is downloaded); ``text_cfg``/``embed_dim`` given explicitly override it (used by the
    tiny test configs). ``layer`` is "last" or "penultimate" (SD2). ``special_tokens`` are extra tokenizer
    entries matched whole, with ids after SOT/EOT (prompt tuning registers its tokens this way).
    """

    def __init__(self, arch: str | None = "ViT-H-14", layer: str = "penultimate", max_length: int = 77,
                 text_cfg: dict | None = None, embed_dim: int | None = None, freeze: bool = True,
                 special_tokens: list[str] | None = None):
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
        cfg = open_clip.get_model_config(arch) if arch else {}
        if arch and cfg is None:
            raise ValueError(f"open_clip has no model config named {arch!r}")
        text_cfg = {**(cfg.get("text_cfg") or {}), **(text_cfg or {})}
        embed_dim = embed_dim or cfg.get("embed_dim")
        self.model = OpenCLIPTextModel(embed_dim=embed_dim, context_length=text_cfg["context_length"],
                                       vocab_size=text_cfg["vocab_size"], width=text_cfg["width"],
                                       heads=text_cfg["heads"], layers=text_cfg["layers"])
        self.max_length = max_length
        self.num_layers_used = text_cfg["layers"] - (1 if layer == "penultimate" else 0)
        self.tokenizer = SimpleTokenizer(context_length=max_length, additional_special_tokens=special_tokens)
        # Recompute block activations in backward (prompt tuning back-propagates through the frozen blocks).
        self.grad_checkpointing = False
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        self.model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)

    @property
    def width(self) -> int:
        return self.model.token_embedding.embedding_dim

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """BPE ids (B, max_length) int64: [SOT, tokens..., EOT, 0 padding], truncated to keep EOT."""
        return self.tokenizer(texts)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, width) for ids (B, L). Prompt tuning overrides this lookup."""
        return self.model.token_embedding(tokens)

    def encode_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, width) -> context (B, L, width): add positions, run the causal
        transformer up to the chosen layer, apply ``ln_final``."""
        length = embeddings.shape[1]
        x = embeddings + self.model.positional_embedding[:length].to(embeddings.dtype)
        # Additive causal mask: position i attends to positions <= i (OpenCLIP's build_causal_mask).
        causal = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        for block in self.model.transformer.resblocks[: self.num_layers_used]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask=causal, use_reentrant=False)
            else:
                x = block(x, attn_mask=causal)
        return self.model.ln_final(x)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Texts -> context (B, max_length, width) on the encoder's device."""
        tokens = self.tokenize(texts).to(self.model.positional_embedding.device)
        return self.encode_embeddings(self.embed_tokens(tokens))

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.encode(texts)
