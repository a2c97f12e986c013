"""Random weights that exercise every path of a model: for trying the code without a checkpoint.

PyTorch's default initialisation leaves some parameter tensors constant, and SD2 zero-initialises the last
layer of every residual block, every attention block and the UNet itself (``zero_module`` in the original
code). Built as it is, the random UNet outputs exactly 0: no input (the reference, the mask, the prompt,
the guidance scale) changes any result, and nothing upstream of the UNet gets a gradient. ``liven_`` gives
every constant tensor random values, so that each input matters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NORM_SCALE_STD = 0.1  # norm scales (all ones) become 1 + N(0, 0.1^2): they stay near 1
VECTOR_STD = 0.1  # constant vectors (zero biases, zero embeddings) get N(0, 0.1^2) added


@torch.no_grad()
def liven_(module: nn.Module, seed: int = 0) -> list[str]:
    """Give every parameter tensor whose elements are all equal (zeros, ones) seeded random values, in place.

    Matrices and kernels (ndim >= 2) get N(0, 1/fan_in), the scale of PyTorch's default init, so a
    zero-initialised output layer passes its input on at the usual magnitude; 1-d tensors get their value
    plus N(0, 0.1^2), so norm scales stay near 1 and zero biases become small. Tensors that already vary are
    left as they are. Uses its own generator (``seed``), not the global RNG. Returns the names changed.
    """
    generator = torch.Generator().manual_seed(seed)
    changed = []
    for name, param in module.named_parameters():
        if param.numel() == 0 or param.is_meta or not _is_constant(param):
            continue
        if param.ndim >= 2:
            noise = torch.randn(param.shape, generator=generator) / math.sqrt(param[0].numel())
            param.copy_(noise.to(param.dtype))
        else:
            std = NORM_SCALE_STD if bool((param == 1).all()) else VECTOR_STD
            param.add_((std * torch.randn(param.shape, generator=generator)).to(param.device, param.dtype))
        changed.append(name)
    return changed


def _is_constant(param: torch.Tensor) -> bool:
    """All elements equal; a single element counts only when it is zero (e.g. CLIP's logit scale is not)."""
    flat = param.detach().flatten()
    return bool((flat == flat[0]).all()) and (flat.numel() > 1 or flat[0].item() == 0)
