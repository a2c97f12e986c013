"""Checks of the sampling options shared by the Python API and every command line, and the seed rule.

Each check raises ``ValueError`` whose message starts with the option's name as the user typed it:
``name`` is ``"steps"`` for the Python API and ``"--steps"`` on a command line (``flag_names``).
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch

from ldm.sampling import SAMPLERS

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed and numpy take any seed in [0, 2^63 - 1]
MAX_STEPS = 999  # LDM's timesteps are range(0, 1000, 1000 // n) + 1: with n = 1000 they would reach t = 1000


def check_sampling_options(*, steps: int | None = None, cfg: float | None = None, eta: float | None = None,
                           seed: int | None = None, num_seeds: int = 1, strength: float | None = None,
                           sampler: str | None = None, flags: bool = False) -> None:
    """Raise ValueError naming the first bad option; options left at None are not checked.

    steps: an int in [1, 999]; cfg: finite and >= 0; eta: finite and >= 0; seed: an int such that
    ``seed + num_seeds - 1`` stays in [0, 2^63 - 1] (item k is sampled with seed + k); strength: in (0, 1];
    sampler: a name of ``ldm.sampling.SAMPLERS``, and ``eta`` only with a sampler that takes it.
    """
    prefix = "--" if flags else ""
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"{prefix}sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler is not None and eta is not None and not takes_eta(sampler):
        raise ValueError(f"{prefix}eta applies to the samplers {', '.join(n for n in SAMPLERS if takes_eta(n))}, "
                         f"not {sampler}")
    if strength is not None and not (_is_number(strength) and 0 < strength <= 1):
        raise ValueError(f"{prefix}strength must be a number in (0, 1], got {strength!r}")
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


def takes_eta(sampler: str) -> bool:
    """Whether sampler ``sampler`` has an ``eta`` option (DDIM's stochasticity)."""
    return "eta" in inspect.signature(SAMPLERS[sampler]).parameters


def sampler_options(sampler: str, eta: float | None, default_eta: float) -> dict:
    """The keyword options of ``sampler``: ``eta`` (``default_eta`` when None) for a sampler that takes it."""
    return {"eta": default_eta if eta is None else eta} if takes_eta(sampler) else {}


def item_generators(seed: int, indices) -> list[torch.Generator]:
    """The seed rule of every sampling entry point: item ``i`` (sample k of a call, pair i of a test folder,
    validation pair i) draws from its own CPU generator seeded ``seed + i``, so its result depends neither on
    the batch it is in nor on the device."""
    return [torch.Generator().manual_seed(seed + int(i)) for i in indices]
