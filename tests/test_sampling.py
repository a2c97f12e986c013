"""Noise schedule and DDIM against diffusers' DDIMScheduler, step for step."""

from __future__ import annotations

import pytest
import torch

from ldm.guidance import ClassifierFreeGuidance
from ldm.sampling import ddim_timesteps, sample_ddim
from ldm.schedule import linear_betas, schedule_buffers

diffusers = pytest.importorskip("diffusers")


def reference_scheduler():
    """The SD2 scheduler settings that reproduce LDM's DDIM."""
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                                   clip_sample=False, timestep_spacing="leading")


def toy_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the UNet whose output depends on both x and t."""
    return torch.tanh(0.7 * x + 0.3 * torch.sin(x.flip(-1))) * (1 + t.float().view(-1, 1, 1, 1) / 1000)


def test_schedule_matches_diffusers_and_original_constants():
    buffers = schedule_buffers(linear_betas())
    scheduler = reference_scheduler()
    assert torch.allclose(buffers["alphas_cumprod"], scheduler.alphas_cumprod, rtol=1e-5, atol=0)
    assert buffers["betas"][0].item() == pytest.approx(0.00085, rel=1e-6)
    assert buffers["betas"][-1].item() == pytest.approx(0.012, rel=1e-6)
    assert buffers["posterior_log_variance_clipped"][0].item() == pytest.approx(-46.0517, abs=1e-3)  # log(1e-20)


def test_ddim_timesteps_are_ldm_uniform():
    steps = ddim_timesteps(50)
    assert steps[:3].tolist() == [1, 21, 41] and steps[-1].item() == 981 and len(steps) == 50
    scheduler = reference_scheduler()
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == steps.flip(0).tolist()
    with pytest.raises(ValueError, match="number of DDIM steps"):
        ddim_timesteps(0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_step_for_step(eta):
    num_steps, shape = 20, (2, 4, 8, 16)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    alphas_cumprod = schedule_buffers(linear_betas())["alphas_cumprod"]

    ours = []
    sample_ddim(toy_denoiser, x_T.clone(), alphas_cumprod, ddim_timesteps(num_steps), eta=eta,
                generator=torch.Generator().manual_seed(7), callback=lambda i, t, x, x0: ours.append(x.clone()))

    scheduler = reference_scheduler()
    scheduler.set_timesteps(num_steps)
    noise_generator = torch.Generator().manual_seed(7)  # the same noise, drawn in the same order
    x, theirs = x_T.clone(), []
    for t in scheduler.timesteps:
        eps = toy_denoiser(x, t.expand(shape[0]))
        noise = torch.randn(shape, generator=noise_generator) if eta > 0 else None
        x = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        theirs.append(x.clone())

    assert len(ours) == len(theirs) == num_steps
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().max().item() <= 1e-4, f"step {step} differs"
    assert ours[-1].abs().mean() > 0.1


def test_ddim_is_deterministic_per_seed():
    alphas_cumprod = schedule_buffers(linear_betas())["alphas_cumprod"]
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(seed):
        return sample_ddim(toy_denoiser, x_T.clone(), alphas_cumprod, ddim_timesteps(10), eta=1.0,
                           generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_guidance_batches_both_branches_in_one_call():
    calls = []

    def model_fn(x, t, cond):
        calls.append(x.shape[0])
        return x * cond["c"].view(-1, 1, 1, 1)

    x, t = torch.ones(3, 4, 2, 2), torch.full((3,), 5)
    guided = ClassifierFreeGuidance(model_fn, {"c": torch.full((3,), 2.0)}, {"c": torch.full((3,), 1.0)}, scale=2.5)
    out = guided(x, t)
    assert calls == [6]  # [uncond; cond] stacked along the batch
    assert torch.allclose(out, torch.full_like(x, 1 + 2.5 * (2 - 1)))
    unguided = ClassifierFreeGuidance(model_fn, {"c": torch.full((3,), 2.0)}, {"c": torch.full((3,), 1.0)}, scale=1.0)
    assert torch.equal(unguided(x, t), torch.full_like(x, 2.0)) and calls[-1] == 3


def test_one_generator_per_item_makes_noise_independent_of_the_batch():
    from ldm.noise import randn

    like = torch.empty(0)
    batch = randn((3, 4, 2, 2), [torch.Generator().manual_seed(s) for s in (5, 6, 7)], like)
    alone = randn((1, 4, 2, 2), [torch.Generator().manual_seed(6)], like)
    assert torch.equal(batch[1:2], alone)
    assert torch.equal(alone, torch.randn((1, 4, 2, 2), generator=torch.Generator().manual_seed(6)))
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        randn((3, 4), [torch.Generator(), torch.Generator()], like)
