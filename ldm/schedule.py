"""Discrete DDPM noise schedule of latent diffusion (Ho et al. 2020; Rombach et al. 2022).

Stable Diffusion 2 uses T = 1000 steps and the LDM "linear" schedule, which is linear in sqrt(beta):
beta_t = linspace(sqrt(0.00085), sqrt(0.012), T) ** 2 (diffusers calls it "scaled_linear").
"""

from __future__ import annotations

import torch

# Buffer names registered by the original LDM ``DDPM.register_schedule``; SD2 checkpoints carry them.
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def linear_betas(num_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> torch.Tensor:
    """LDM "linear" betas, (T,) float64 on the CPU: squares of a linspace between sqrt(start) and sqrt(end).

    The device is explicit so the schedule has real values even when a model is built on the meta device.
    """
    return torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64, device="cpu") ** 2


def schedule_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """All derived quantities of the original ``register_schedule``, as float32 tensors of shape (T,).

    Computed in float64 and rounded once, like the original (numpy float64 then torch.float32).
    The posterior uses v_posterior = 0: var = beta_t * (1 - abar_{t-1}) / (1 - abar_t).
    """
    betas = betas.to(torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        # posterior_variance is 0 at t = 0; LDM clips it at 1e-20 before the log.
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }
    return {name: buffers[name].to(torch.float32) for name in SCHEDULE_BUFFERS}


def extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``values[t]`` for a batch of integer timesteps and shape it (B, 1, ..., 1) for broadcasting."""
    out = values.gather(0, t.to(values.device).long())
    return out.reshape(t.shape[0], *([1] * (ndim - 1)))


def q_sample(sqrt_alphas_cumprod: torch.Tensor, sqrt_one_minus_alphas_cumprod: torch.Tensor,
             x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward diffusion x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4)."""
    a = extract(sqrt_alphas_cumprod, t, x0.ndim).to(x0.dtype)
    s = extract(sqrt_one_minus_alphas_cumprod, t, x0.ndim).to(x0.dtype)
    return a * x0 + s * noise
