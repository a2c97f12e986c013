"""Samplers as pure functions over a denoiser ``denoise(x, t) -> eps`` (k-diffusion style).

The denoiser already includes conditioning and guidance (see ``ldm.guidance``); a sampler only does the
schedule arithmetic. Every sampler has one signature,

    sample(denoise, x_T, alphas_cumprod, timesteps, *, generator=None, callback=None, progress=False, **options)

with ``timesteps`` any ascending int64 subset of [0, T) (the sampler walks it downwards), the schedule
in float64, ``generator`` one ``torch.Generator`` or one per batch item (``ldm.noise``), and
``callback(i, t, x, x0_hat)`` after each step. Options exist only where they apply (``eta`` for DDIM).

``SAMPLERS`` / ``get_sampler(name)`` name them; ``default_timesteps(name, num_steps)`` gives each one's
diffusers spacing for the SD2 scheduler config (``steps_offset=1``, no ``timestep_spacing`` key):
* ddim, ddpm: "leading" + steps_offset 1 (``ddim_timesteps``: 50 steps -> 1, 21, ..., 981), LDM's "uniform";
* dpmpp_2m, dpmpp_2m_sde: "linspace", the ``DPMSolverMultistepScheduler`` default (``linspace_timesteps``:
  20 steps -> 50, 100, ..., 999).
"""

from __future__ import annotations

import math
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
    for i, (t, t_prev) in enumerate(_progress(list(zip(steps, prev_steps)), "DDIM", progress)):
        abar, abar_prev = alphas_cumprod[t].item(), alphas_cumprod[t_prev].item()
        eps = denoise(x, _timestep_batch(x, t))
        x0_hat = (x - (1 - abar) ** 0.5 * eps) / abar**0.5
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
        x = abar_prev**0.5 * x0_hat + (1 - abar_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, x)
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x


def linspace_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Ascending int64 timesteps of diffusers' "linspace" spacing for DPM-Solver: 20 steps -> 50, 100, ..., 999.

    ``linspace(0, T - 1, num_steps + 1).round()`` without its 0; computed as numpy's linspace does
    (k * step, the last point exactly T - 1) so that ties round alike for every num_steps (checked 1..999).
    """
    if not 1 <= num_steps < num_train_timesteps:
        raise ValueError(f"number of steps must be in [1, {num_train_timesteps - 1}], got {num_steps}")
    points = torch.arange(num_steps + 1, dtype=torch.float64) * ((num_train_timesteps - 1) / num_steps)
    points[-1] = num_train_timesteps - 1
    return points.round()[1:].long()


def _progress(steps: list, name: str, progress: bool):
    """The steps, under a tqdm bar that disappears when done (none without ``progress``)."""
    return tqdm(steps, desc=name, disable=not progress, leave=None)


def _timestep_batch(x: torch.Tensor, t: int) -> torch.Tensor:
    """t for every item of x: (B,) int64 on x's device, as a denoiser takes it."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


@torch.no_grad()
def sample_ddpm(denoise: Denoiser, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, *,
                generator: Generators = None, callback: StepCallback | None = None,
                progress: bool = False) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, eq. 6-7) from x = x_T (B, C, h, w) over ascending ``timesteps``.

    Each step samples the posterior q(x_prev | x_t, x0_hat) between consecutive timesteps, with abar_prev = 1
    after the last one (the chain ends at clean data), and its "fixed_small" variance:
        x0_hat = (x - sqrt(1 - abar) eps) / sqrt(abar),   beta = 1 - abar / abar_prev
        x      = sqrt(abar_prev) beta / (1 - abar) x0_hat + sqrt(1 - beta) (1 - abar_prev) / (1 - abar) x
                 + sqrt((1 - abar_prev) / (1 - abar) beta) z,   z ~ N(0, I) (none in the last step: variance 0)
    Equals diffusers' ``DDPMScheduler(variance_type="fixed_small", clip_sample=False)`` stepping through the
    same timesteps (prev_t = the next lower timestep; diffusers' own spacing steps by T // n). RealFill's
    reference sampler is this one at 200 steps.
    """
    alphas_cumprod = alphas_cumprod.to(torch.float64)
    steps = timesteps.flip(0).tolist()
    for i, t in enumerate(_progress(steps, "DDPM", progress)):
        abar = alphas_cumprod[t].item()
        abar_prev = alphas_cumprod[steps[i + 1]].item() if i + 1 < len(steps) else 1.0
        beta = 1 - abar / abar_prev
        eps = denoise(x, _timestep_batch(x, t))
        x0_hat = (x - (1 - abar) ** 0.5 * eps) / abar**0.5
        x = abar_prev**0.5 * beta / (1 - abar) * x0_hat + (1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar) * x
        variance = (1 - abar_prev) / (1 - abar) * beta
        if variance > 0:
            x = x + variance**0.5 * randn(x.shape, generator, x)
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x


def _alpha_sigma_lambda(alphas_cumprod: torch.Tensor, steps: list[int]) -> tuple[list[float], list[float], list[float]]:
    """alpha_t = sqrt(abar), sigma_t = sqrt(1 - abar), lambda_t = log(alpha_t / sigma_t) at each of ``steps``
    (descending), with the final sigma 0 appended (alpha 1, lambda +inf), diffusers' final_sigmas_type="zero"."""
    abar = [alphas_cumprod[t].item() for t in steps]
    alphas = [a**0.5 for a in abar] + [1.0]
    sigmas = [(1 - a) ** 0.5 for a in abar] + [0.0]
    lambdas = [0.5 * math.log(a / (1 - a)) for a in abar] + [math.inf]
    return alphas, sigmas, lambdas


def _midpoint(x0_hat: torch.Tensor, x0_prev: torch.Tensor | None, h: float, h_prev: float) -> torch.Tensor:
    """D0 + D1 / 2 with D1 = (D0 - D_prev) / r, r = h_prev / h: the 2M midpoint term (D0 alone at the first step)."""
    return x0_hat if x0_prev is None else x0_hat + (x0_hat - x0_prev) * (h / (2 * h_prev))


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, *,
                    generator: Generators = None, callback: StepCallback | None = None,
                    progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2; METHOD 7.6) from x = x_T (B, C, h, w) to x_0.

    Data prediction D = x0_hat = (x - sigma_s eps) / alpha_s; with h = lambda_t - lambda_s, r = h_prev / h:
        x = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) (D + (D - D_prev) / (2 r))     (midpoint solver type)
    The first step is first order (no D_prev), and so is the last, which goes to sigma = 0 and returns
    x0_hat. ``generator`` is unused (deterministic). Equals diffusers' ``DPMSolverMultistepScheduler`` with its
    defaults ``algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
    final_sigmas_type="zero"`` over the same timesteps; with a zero final sigma diffusers makes the last
    step first order for any number of steps (its ``lower_order_final`` < 15 steps rule adds nothing at order 2).
    """
    return _dpmpp_2m(denoise, x, alphas_cumprod, timesteps, sde=False, generator=generator, callback=callback,
                     progress=progress)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoise: Denoiser, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, *,
                        generator: Generators = None, callback: StepCallback | None = None,
                        progress: bool = False) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", sec. 5 / app. B; k-diffusion ``sample_dpmpp_2m_sde``).

    The stochastic counterpart of ``sample_dpmpp_2m`` (same D, h, r, first-order first and last steps):
        x = (sigma_t / sigma_s) e^{-h} x + alpha_t (1 - e^{-2h}) (D + (D - D_prev) / (2 r))
            + sigma_t sqrt(1 - e^{-2h}) z,   z ~ N(0, I) from ``generator`` (none in the last step, sigma_t = 0)
    Equals diffusers' ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`` with the other
    defaults (solver_order 2, midpoint, final sigma zero) and the same noise.
    """
    return _dpmpp_2m(denoise, x, alphas_cumprod, timesteps, sde=True, generator=generator, callback=callback,
                     progress=progress)


def _dpmpp_2m(denoise: Denoiser, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, *,
              sde: bool, generator: Generators, callback: StepCallback | None, progress: bool) -> torch.Tensor:
    """The loop both DPM-Solver++(2M) variants share; ``sde`` picks the update (see their docstrings)."""
    steps = timesteps.flip(0).tolist()
    alphas, sigmas, lambdas = _alpha_sigma_lambda(alphas_cumprod.to(torch.float64), steps)
    x0_prev, h_prev = None, 0.0
    for i, t in enumerate(_progress(steps, "SDE-DPM++(2M)" if sde else "DPM++(2M)", progress)):
        eps = denoise(x, _timestep_batch(x, t))
        x0_hat = (x - sigmas[i] * eps) / alphas[i]
        if i + 1 == len(steps):  # h = inf: the first-order step gives x = x0_hat
            x = x0_hat
        else:
            h = lambdas[i + 1] - lambdas[i]
            d = _midpoint(x0_hat, x0_prev, h, h_prev)
            if sde:
                x = (sigmas[i + 1] / sigmas[i] * math.exp(-h) * x - alphas[i + 1] * math.expm1(-2 * h) * d
                     + sigmas[i + 1] * (-math.expm1(-2 * h)) ** 0.5 * randn(x.shape, generator, x))
            else:
                x = sigmas[i + 1] / sigmas[i] * x - alphas[i + 1] * math.expm1(-h) * d
            x0_prev, h_prev = x0_hat, h
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x


Sampler = Callable[..., torch.Tensor]
TimestepFn = Callable[[int, int], torch.Tensor]

# name -> sampler; every one takes (denoise, x_T, alphas_cumprod, timesteps, *, generator, callback, progress).
SAMPLERS: dict[str, Sampler] = {
    "ddim": sample_ddim,  # eta option; eta 0 = the probability-flow ODE's first-order solver
    "ddpm": sample_ddpm,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}
# name -> (num_steps, num_train_timesteps) -> ascending timesteps, diffusers' spacing for that scheduler
# under the SD2 scheduler config (see the module docstring).
DEFAULT_TIMESTEPS: dict[str, TimestepFn] = {
    "ddim": ddim_timesteps,
    "ddpm": ddim_timesteps,
    "dpmpp_2m": linspace_timesteps,
    "dpmpp_2m_sde": linspace_timesteps,
}


def get_sampler(name: str) -> Sampler:
    """The sampler registered as ``name``; ValueError listing the names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def default_timesteps(name: str, num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Ascending timesteps for ``num_steps`` steps of sampler ``name`` in its diffusers spacing."""
    get_sampler(name)  # same error for an unknown name
    return DEFAULT_TIMESTEPS[name](num_steps, num_train_timesteps)
