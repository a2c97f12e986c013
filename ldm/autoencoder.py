"""KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), f = 8, z = 4 for SD2.

Parameter names match the original ``ldm.models.autoencoder.AutoencoderKL`` / ``ldm.modules.diffusionmodules.model``
so the VAE of SD2 checkpoints loads under ``first_stage_model.*``. Images are (B, 3, H, W) in [-1, 1];
latents are (B, z_channels, H/f, W/f), unscaled (the diffusion model multiplies by ``scale_factor``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.layers import Upsample
from ldm.noise import Generators, randn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block of two 3x3 convs; 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections (``q``, ``k``, ``v``, ``proj_out``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # (B, 1, HW, C), contiguous: on the CPU transposed views send scaled_dot_product_attention to a slower
        # kernel; the block is 1.4x (C = 512) to 5x (C = 64) faster so (scripts/benchmark_vae_attention.py)
        q, k, v = (proj(hn).flatten(2).transpose(1, 2).contiguous()[:, None] for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out[:, 0].transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with the original's asymmetric padding (right and bottom only)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _mid_block(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f), f = 2**(len(ch_mult)-1)."""

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, in_channels: int, z_channels: int,
                 double_z: bool = True, dropout: float = 0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult, dropout))
                block_in = ch * mult
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _mid_block(block_in, dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f). ``up[i]`` is level i, run from deepest to 0."""

    def __init__(self, ch: int, out_ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int,
                 dropout: float = 0.0):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid_block(block_in, dropout)
        stages = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * ch_mult[level], dropout))
                block_in = ch * ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(block_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from moments (B, 2z, h, w); logvar clamped to [-30, 20] as the original."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Generators = None) -> torch.Tensor:
        """mean + std * z, z ~ N(0, I) from ``generator`` (one, or one per batch item; see ldm.noise)."""
        return self.mean + self.std * randn(self.mean.shape, generator, self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """``encode`` -> DiagonalGaussian over latents, ``decode`` latents -> images in about [-1, 1].

    ``ddconfig`` holds the original's keys (ch, ch_mult, num_res_blocks, in_channels, out_ch, z_channels,
    double_z, dropout; resolution and attn_resolutions are accepted for config compatibility and
    must describe an attention-free encoder/decoder body, as in every SD VAE).
    """

    def __init__(self, ddconfig: dict, embed_dim: int):
        super().__init__()
        ddconfig = dict(ddconfig)
        ddconfig.pop("resolution", None)
        if ddconfig.pop("attn_resolutions", []):
            raise ValueError("AutoencoderKL: attn_resolutions must be empty (SD VAEs use attention only in the middle block)")
        out_ch = ddconfig.pop("out_ch")
        dropout = ddconfig.pop("dropout", 0.0)
        double_z = ddconfig.pop("double_z", True)
        if not double_z:
            raise ValueError("AutoencoderKL: double_z must be true (the encoder predicts mean and log-variance)")
        self.encoder = Encoder(double_z=True, dropout=dropout, **ddconfig)
        self.decoder = Decoder(ch=ddconfig["ch"], out_ch=out_ch, ch_mult=ddconfig["ch_mult"],
                               num_res_blocks=ddconfig["num_res_blocks"], z_channels=ddconfig["z_channels"],
                               dropout=dropout)
        z = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1] -> posterior over (B, embed_dim, H/f, W/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, embed_dim, h, w), unscaled -> (B, 3, h*f, w*f), nominally [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))
