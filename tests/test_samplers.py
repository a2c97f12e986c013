"""The sampler registry: DDPM and DPM-Solver++(2M) (ODE and SDE) step for step against diffusers, per-item
noise, and the solvers' order of convergence on a Gaussian toy whose probability-flow solution is exact."""

from __future__ import annotations

import inspect

import pytest
import torch

from ldm.sampling import (SAMPLERS, ddim_timesteps, default_timesteps, get_sampler, linspace_timesteps,
                          sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_dpmpp_2m_sde)
from ldm.schedule import linear_betas, schedule_buffers

diffusers = pytest.importorskip("diffusers")

SD2_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 16)
# At every step max |ours - diffusers| <= 1e-5 max |diffusers|: diffusers does the schedule arithmetic in
# float32, we do it in float64 (measured: 6.5e-6 on the custom DDPM subset with steps 3 -> 0, 3.6e-6 on the
# custom DPM-Solver subset, <= 1e-6 on the default spacings). Relative, because the toy denoiser is no real
# denoiser and x0_hat reaches |x| ~ 30.
TOLERANCE = 1e-5


def ddpm_scheduler():
    """DDPMScheduler as a pipeline gets it from the SD2 scheduler config (steps_offset 1, default "leading"
    spacing), with the LDM posterior variance ("fixed_small") and no x0 clipping."""
    return diffusers.DDPMScheduler(**SD2_BETAS, variance_type="fixed_small", clip_sample=False, steps_offset=1,
                                   timestep_spacing="leading")


def dpm_scheduler(algorithm_type="dpmsolver++"):
    """DPMSolverMultistepScheduler with its documented defaults spelled out (METHOD 7.6)."""
    return diffusers.DPMSolverMultistepScheduler(**SD2_BETAS, algorithm_type=algorithm_type, solver_order=2,
                                                 solver_type="midpoint", lower_order_final=True,
                                                 final_sigmas_type="zero", timestep_spacing="linspace")


def toy_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the UNet whose output depends on both x and t (as in test_sampling.py)."""
    return torch.tanh(0.7 * x + 0.3 * torch.sin(x.flip(-1))) * (1 + t.float().view(-1, 1, 1, 1) / 1000)


def sd2_alphas_cumprod() -> torch.Tensor:
    return schedule_buffers(linear_betas())["alphas_cumprod"]


def run_ours(sampler, timesteps, seed=7, **options):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    steps = []
    sampler(toy_denoiser, x_T, sd2_alphas_cumprod(), timesteps, generator=torch.Generator().manual_seed(seed),
            callback=lambda i, t, x, x0: steps.append(x.clone()), **options)
    return steps


def run_diffusers(scheduler, seed=7):
    """scheduler.timesteps must be set; diffusers draws its own noise from a generator seeded alike."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    generator, steps = torch.Generator().manual_seed(seed), []
    for t in scheduler.timesteps:
        x = scheduler.step(toy_denoiser(x, t.expand(SHAPE[0])), t, x, generator=generator).prev_sample
        steps.append(x.clone())
    return steps


def assert_same_steps(ours, theirs):
    assert len(ours) == len(theirs) > 0
    for step, (a, b) in enumerate(zip(ours, theirs)):
        difference = ((a - b).abs().max() / b.abs().max()).item()
        assert difference <= TOLERANCE, f"step {step} differs by {difference:.3g} of the largest value"
    assert ours[-1].abs().mean() > 0.1  # a real sample, not a vanishing one


# --- timesteps ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_steps", [1, 2, 7, 10, 15, 20, 25, 50, 200, 333, 999])
def test_default_timesteps_are_diffusers_spacings_for_sd2(num_steps):
    dpm = dpm_scheduler()
    dpm.set_timesteps(num_steps)
    assert linspace_timesteps(num_steps).tolist() == dpm.timesteps.flip(0).tolist()
    assert default_timesteps("dpmpp_2m", num_steps).tolist() == dpm.timesteps.flip(0).tolist()
    ddpm = ddpm_scheduler()
    ddpm.set_timesteps(num_steps)
    assert default_timesteps("ddpm", num_steps).tolist() == ddpm.timesteps.flip(0).tolist()
    assert torch.equal(default_timesteps("ddim", num_steps), ddim_timesteps(num_steps))


def test_linspace_timesteps_examples_and_bounds():
    assert linspace_timesteps(20)[:3].tolist() == [50, 100, 150] and linspace_timesteps(20)[-1].item() == 999
    with pytest.raises(ValueError, match="number of steps"):
        linspace_timesteps(0)


# --- step for step against diffusers ---------------------------------------------------------------------

@pytest.mark.parametrize("custom", [False, True])
def test_ddpm_matches_diffusers_step_for_step(custom):
    timesteps = torch.tensor([0, 3, 40, 41, 200, 555, 998]) if custom else ddim_timesteps(20)
    scheduler = ddpm_scheduler()
    if custom:  # arbitrary subsets: prev_t is the next lower timestep in the list
        scheduler.set_timesteps(timesteps=timesteps.flip(0).tolist())
    else:  # diffusers' own spacing: prev_t = t - T // n
        scheduler.set_timesteps(20)
    assert_same_steps(run_ours(sample_ddpm, timesteps), run_diffusers(scheduler))


@pytest.mark.parametrize("num_steps", [3, 10, 20])  # 20 >= 15: lower_order_final's step rule is off there
def test_dpmpp_2m_matches_diffusers_step_for_step(num_steps):
    scheduler = dpm_scheduler()
    scheduler.set_timesteps(num_steps)
    assert_same_steps(run_ours(sample_dpmpp_2m, linspace_timesteps(num_steps)), run_diffusers(scheduler))


def test_dpmpp_2m_matches_diffusers_on_custom_timesteps():
    timesteps = torch.tensor([1, 2, 30, 31, 200, 555, 999])
    scheduler = dpm_scheduler()
    scheduler.set_timesteps(timesteps=timesteps.flip(0).tolist())
    assert_same_steps(run_ours(sample_dpmpp_2m, timesteps), run_diffusers(scheduler))


@pytest.mark.parametrize("num_steps", [10, 20])
def test_dpmpp_2m_sde_matches_diffusers_step_for_step_with_the_same_noise(num_steps):
    scheduler = dpm_scheduler("sde-dpmsolver++")
    scheduler.set_timesteps(num_steps)
    ours = run_ours(sample_dpmpp_2m_sde, linspace_timesteps(num_steps))
    assert_same_steps(ours, run_diffusers(scheduler))
    assert not torch.allclose(ours[-1], run_ours(sample_dpmpp_2m_sde, linspace_timesteps(num_steps), seed=8)[-1])


# --- the shared signature and per-item noise -----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_has_the_shared_signature_and_calls_back_once_per_step(name):
    sampler = get_sampler(name)
    parameters = inspect.signature(sampler).parameters
    assert list(parameters)[:4] == ["denoise", "x", "alphas_cumprod", "timesteps"]
    assert {"generator", "callback", "progress"} <= {n for n, p in parameters.items() if p.kind == p.KEYWORD_ONLY}
    calls = []
    out = sampler(toy_denoiser, torch.randn(1, 4, 4, 4), sd2_alphas_cumprod(), default_timesteps(name, 5),
                  generator=torch.Generator().manual_seed(0), callback=lambda *args: calls.append(args[:2]),
                  progress=False)
    assert [i for i, _ in calls] == list(range(5))
    assert [t for _, t in calls] == default_timesteps(name, 5).flip(0).tolist()
    assert out.shape == (1, 4, 4, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("name, options", [("ddim", {"eta": 1.0}), ("ddpm", {}), ("dpmpp_2m_sde", {})])
def test_item_of_a_batch_equals_the_item_sampled_alone(name, options):
    sampler, timesteps = get_sampler(name), default_timesteps(name, 8)
    x_T = torch.randn(3, 4, 4, 8, generator=torch.Generator().manual_seed(0))

    def sample(x, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return sampler(toy_denoiser, x, sd2_alphas_cumprod(), timesteps, generator=generators, **options)

    batch = sample(x_T, [5, 6, 7])
    alone = sample(x_T[1:2], [6])
    assert torch.allclose(batch[1:2], alone, rtol=0, atol=1e-6)
    assert not torch.allclose(batch[1:2], sample(x_T[1:2], [5]))  # the noise does matter


def test_registry_refuses_an_unknown_name_listing_the_names():
    assert set(SAMPLERS) == {"ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde"}
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*ddim, ddpm, dpmpp_2m, dpmpp_2m_sde"):
        get_sampler("euler")
    with pytest.raises(ValueError, match="unknown sampler"):
        default_timesteps("euler", 10)


# --- order of convergence on a Gaussian toy ---------------------------------------------------------------
# Data x0 ~ N(MU, S^2) per element. Then x_t = a x0 + sigma eps ~ N(a MU, a^2 S^2 + sigma^2), the exact
# denoiser is E[eps | x_t] = sigma (x_t - a MU) / (a^2 S^2 + sigma^2), and the probability-flow ODE keeps the
# standardised value z = (x_t - a MU) / sqrt(a^2 S^2 + sigma^2) constant, so its solution is known exactly.
# The schedule has log-SNR lambda linear in t (from +10 at t = 0 to -4 at t = T), so a grid uniform in t has
# a constant step h in lambda, and grids of n and 2n steps nest.
MU, S, T_TOY = 0.4, 0.3, 1024


def toy_schedule() -> torch.Tensor:
    lambdas = torch.linspace(10.0, -4.0, T_TOY + 1, dtype=torch.float64)
    return torch.sigmoid(2 * lambdas)  # abar = alpha^2 = 1 / (1 + e^{-2 lambda})


def gaussian_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    abar = toy_schedule()[t].view(-1, 1, 1, 1)
    a, sigma = abar.sqrt(), (1 - abar).sqrt()
    return sigma * (x - a * MU) / (abar * S**2 + sigma**2)


def exact_at(abar: float, z: torch.Tensor) -> torch.Tensor:
    return abar**0.5 * MU + (abar * S**2 + 1 - abar) ** 0.5 * z


def solver_error(name: str, n: int) -> float:
    """Max abs error after n steps from t = T to t = 0 (DDIM ends at abar[0]; DPM++ then jumps to sigma 0)."""
    abar = toy_schedule()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = torch.arange(0, T_TOY + 1, T_TOY // n)  # 0, T/n, ..., T
    x_T = exact_at(abar[-1].item(), z)
    if name == "ddim":  # its last step goes from T/n to abar[0]
        out, exact = sample_ddim(gaussian_eps, x_T, abar, grid[1:]), exact_at(abar[0].item(), z)
    else:  # n second-order steps down to t = 0, then x0_hat at sigma(0) = e^-10 (error ~ 1e-10)
        out, exact = sample_dpmpp_2m(gaussian_eps, x_T, abar, grid), exact_at(1.0, z)
    return (out - exact).abs().max().item()


@pytest.mark.parametrize("name, order", [("ddim", 1), ("dpmpp_2m", 2)])
def test_error_falls_at_the_solvers_order_on_a_gaussian_with_exact_flow(name, order):
    # Measured at 8, 16, 32, 64, 128, 256 steps:
    #   ddim     errors 0.326, 0.185, 0.0978, 0.0502, 0.0255, 0.0128; ratios 1.76, 1.90, 1.95, 1.97, 1.99
    #   dpmpp_2m errors 0.039, 0.0319, 0.0105, 2.78e-3, 7.03e-4, 1.76e-4; ratios 1.22, 3.04, 3.78, 3.95, 3.99
    # (the asymptotic regime starts around h = 14 / 32 in lambda); asserted on 64, 128, 256 steps.
    errors = [solver_error(name, n) for n in (64, 128, 256)]
    ratios = [coarse / fine for coarse, fine in zip(errors, errors[1:])]
    assert all(abs(r / 2**order - 1) < 0.05 for r in ratios), f"{name}: errors {errors}, ratios {ratios}"
