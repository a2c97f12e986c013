"""DDIM sampling (Song et al. 2021) as a pure function over a denoiser ``denoise(x, t) -> eps``.

The denoiser already includes conditioning and guidance (see ``ldm.guidance``); the sampler only does
the schedule arithmetic. Timesteps use LDM's "uniform" discretisation, which equals diffusers'
``DDIMScheduler`` with ``timestep_spacing="leading"`` and ``steps_offset=1``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ldm.noise import Generators, randn

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Ascending int64 timesteps ``range(0, T, T // num_steps) + 1``: 50 steps -> 1, 21, ..., 981."""
    if not 1 <= num_steps < num_train_timesteps:  # num_steps = T would end at t = T, past the schedule
        raise ValueError(f"number of DDIM steps must be in [1, {num_train_timesteps - 1}], got {num_steps}")
    return torch.arange(0, num_train_timesteps, num_train_timesteps // num_steps)[:num_steps] + 1


@torch.no_grad()
def sample_ddim(denoise: Denoiser, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, *,
                eta: float = 0.0, generator: Generators = None, callback: StepCallback | None = None,
                progress: bool = False) -> torch.Tensor:
    """Run DDIM from x = x_T (B, C, h, w) down to x_0 over ascending ``timesteps``; return x_0.

    One step, with abar = alphas_cumprod[t] and abar_prev = alphas_cumprod[t_prev] (alphas_cumprod[0]
    after the last step, as LDM and ``set_alpha_to_one=False``):
        x0_hat = (x - sqrt(1 - abar) eps) / sqrt(abar)
        sigma  = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev)
        x      = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z,   z ~ N(0, I)
    ``callback(i, t, x, x0_hat)`` is called after each step i with the updated x.
    """
    alphas_cumprod = alphas_cumprod.to(torch.float64)
    steps = timesteps.flip(0).tolist()
    prev_steps = steps[1:] + [0]
    for i, (t, t_prev) in enumerate(tqdm(list(zip(steps, prev_steps)), desc="DDIM", disable=not progress,
                                                           leave=None)):
        abar, abar_prev = alphas_cumprod[t].item(), alphas_cumprod[t_prev].item()
        eps = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0_hat = (x - (1 - abar) ** 0.5 * eps) / abar**0.5
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
        x = abar_prev**0.5 * x0_hat + (1 - abar_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, x)
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x
