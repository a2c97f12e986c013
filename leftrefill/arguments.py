"""Checks of the sampling options shared by the Python API and every command line, and the seed rule.

Each check raises ``ValueError`` whose message starts with the option's name as the user typed it:
``name`` is ``"steps"`` for the Python API and ``"--steps"`` on a command line (``flag_names``).
"""

from __future__ import annotations

import math
import numbers

import torch

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed and numpy take any seed in [0, 2^63 - 1]
MAX_STEPS = 999  # LDM's timesteps are range(0, 1000, 1000 // n) + 1: with n = 1000 they would reach t = 1000


def check_sampling_options(*, steps: int | None = None, cfg: float | None = None, eta: float | None = None,
                           seed: int | None = None, num_seeds: int = 1, flags: bool = False) -> None:
    """Raise ValueError naming the first bad option; options left at None are not checked.

    steps: an int in [1, 999]; cfg: finite and >= 0; eta: finite and >= 0; seed: an int such that
    ``seed + num_seeds - 1`` stays in [0, 2^63 - 1] (item k is sampled with seed + k).
    """
    prefix = "--" if flags else ""
    if steps is not None and (not _is_int(steps) or not 1 <= steps <= MAX_STEPS):
        raise ValueError(f"{prefix}steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")
    for name, value in (("cfg", cfg), ("eta", eta)):
        if value is not None and not (_is_number(value) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{prefix}{name} must be a finite number >= 0, got {value!r}")
    if seed is not None:
        if not _is_int(seed) or not 0 <= seed <= MAX_SEED - max(num_seeds - 1, 0):
            top = MAX_SEED - max(num_seeds - 1, 0)
            extra = f" so that seed + {num_seeds - 1} (the last item's seed) fits" if num_seeds > 1 else ""
            raise ValueError(f"{prefix}seed must be an integer in [0, {top}]{extra}, got {seed!r}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def item_generators(seed: int, indices) -> list[torch.Generator]:
    """The seed rule of every sampling entry point: item ``i`` (sample k of a call, pair i of a test folder,
    validation pair i) draws from its own CPU generator seeded ``seed + i``, so its result depends neither on
    the batch it is in nor on the device."""
    return [torch.Generator().manual_seed(seed + int(i)) for i in indices]
