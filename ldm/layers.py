"""Building blocks shared by the UNet and the VAE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Upsample(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 conv (``conv``, as named in both original modules)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
