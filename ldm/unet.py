"""The SD2 denoising UNet (Ho et al. 2020; Rombach et al. 2022), epsilon-prediction.

Parameter names match the original ``openaimodel.UNetModel`` (``input_blocks``, ``middle_block``,
``output_blocks``, ``time_embed``, ``out``) so the SD2 512-inpainting weights load under
``model.diffusion_model.*`` without conversion. Only the configuration SD2 uses is implemented:
spatial transformers with a fixed head width (``num_head_channels``), no class conditioning,
no scale-shift norm.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.attention import BasicTransformerBlock, SelfAttentionGrouping, SpatialTransformer
from ldm.layers import Upsample


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) float32, laid out [cos | sin] as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups computed in fp32 whatever the input dtype (as the original)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """Two 3x3 convs with a timestep-embedding bias in between; 1x1 skip when the width changes."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0,
                 use_checkpoint: bool = False):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        out_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(out_conv.weight)  # residual branch starts at zero, as in the original
        nn.init.zeros_(out_conv.bias)
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout), out_conv)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # In-place adds into fresh conv outputs avoid full-size temporaries; convolutions do not keep
        # their outputs for backward, so this is autograd-safe.
        h = self.in_layers(x)
        h += self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.out_layers(h).add_(self.skip_connection(x))


class Downsample(nn.Module):
    """Strided 3x3 conv, halving H and W."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers that hands each one what it takes: (x, emb) to ResBlocks, (x, context)
    to transformers, x to the rest."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Conditional UNet: (x (B, in_channels, h, w), t (B,), context (B, M, context_dim)) -> eps (B, out_channels, h, w).

    ``attention_resolutions`` lists downsampling factors (1 = full latent resolution) that get a
    spatial transformer after each ResBlock. ``h`` and ``w`` must be divisible by 2**(len(channel_mult)-1).
    """

    def __init__(self, in_channels: int, out_channels: int, model_channels: int, attention_resolutions: list[int],
                 num_res_blocks: int, channel_mult: list[int], num_head_channels: int, context_dim: int,
                 transformer_depth: int = 1, dropout: float = 0.0, use_checkpoint: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        emb_dim = model_channels * 4
        self.model_channels = model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res_block(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, dropout, use_checkpoint)

        def transformer(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, ch // num_head_channels, num_head_channels, context_dim,
                                      transformer_depth, dropout, use_checkpoint)

        # 1. Encoder: per level num_res_blocks ResBlocks (+ transformers), then a downsample.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        # 2. Bottleneck.
        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), transformer(ch), res_block(ch, ch))

        # 3. Decoder: per level num_res_blocks+1 ResBlocks fed with the encoder skips, then an upsample.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        out_conv = nn.Conv2d(model_channels, out_channels, 3, padding=1)
        nn.init.zeros_(out_conv.weight)
        nn.init.zeros_(out_conv.bias)
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), out_conv)

    @contextmanager
    def self_attention_grouping(self, grouping: SelfAttentionGrouping | None) -> Iterator[UNetModel]:
        """Regroup every self-attention layer's tokens with ``grouping`` (None: per image) for the ``with``
        block only; each layer's previous setting comes back afterwards, also when the block raises."""
        blocks = [module for module in self.modules() if isinstance(module, BasicTransformerBlock)]
        previous = [block.self_attention_grouping for block in blocks]
        for block in blocks:
            block.self_attention_grouping = grouping
        try:
            yield self
        finally:
            for block, setting in zip(blocks, previous):
                block.self_attention_grouping = setting

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.downsample_factor or x.shape[-1] % self.downsample_factor:
            raise ValueError(f"UNet input of spatial size {tuple(x.shape[-2:])} is not divisible by "
                             f"{self.downsample_factor}; use a canvas whose sides are multiples of "
                             f"{8 * self.downsample_factor} pixels")
        t_emb = timestep_embedding(timesteps, self.model_channels).to(x.dtype)
        emb = self.time_embed(t_emb)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
