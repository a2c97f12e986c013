"""Gaussian noise drawn reproducibly, on the CPU or per batch item.

A ``Generators`` value is ``None`` (torch's global RNG), one ``torch.Generator`` for the whole batch,
or a sequence of generators, one per batch item, so that item i's noise does not depend on the batch it
is in (the evaluation CLI gives pair i the seed ``seed + i`` whatever ``--batch_size`` is).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generators, like: torch.Tensor) -> torch.Tensor:
    """N(0, 1) noise of ``shape`` on ``like``'s device and dtype.

    Numbers are drawn in float32 on each generator's own device, so a CPU generator gives the same noise
    whether the model runs on the CPU or a GPU, in any precision.
    """
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else like.device
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    else:
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32)
                           .to(like.device) for g in generator])
    return noise.to(like.device, like.dtype)
