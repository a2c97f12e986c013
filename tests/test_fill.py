"""ldm.fill, the sampling core of every method, and its LeftRefill adapter: guidance, per-sample contexts,
samplers, the SDEdit start, compositing rules and the float64 schedule."""

from __future__ import annotations

import copy
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import test_inpainting
from conftest import ROOT
from ldm.attention import ViewGrouping
from ldm.fill import Conditioning, fill, soft_alpha
from ldm.sampling import ddim_timesteps, sample_ddim
from ldm.schedule import linear_betas

SIZE = 32  # latent 4 x 4


class CountingUNet:
    """Wraps model.apply_model to count calls and the batch each call saw."""

    def __init__(self, model, monkeypatch):
        self.batches = []
        original = model.apply_model

        def counted(x, t, cond):
            self.batches.append(x.shape[0])
            return original(x, t, cond)

        monkeypatch.setattr(model, "apply_model", counted)


def inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, SIZE, SIZE)
    mask[..., 8:24, 8:24] = 1
    return image, mask


def contexts(model, batch: int = 2, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    width = model.cond_stage_model.width
    return Conditioning(torch.randn(batch, 77, width, generator=g), torch.randn(batch, 77, width, generator=g))


def generators(seed: int = 0, batch: int = 2):
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


def test_guidance_one_evaluates_only_the_conditional_branch(tiny_model, monkeypatch):
    image, mask = inputs()
    counter = CountingUNet(tiny_model, monkeypatch)
    fill(tiny_model, image, mask, contexts(tiny_model), steps=3, guidance=1.0, generator=generators())
    assert counter.batches == [2, 2, 2]
    counter.batches.clear()
    fill(tiny_model, image, mask, contexts(tiny_model), steps=3, guidance=2.5, generator=generators())
    assert counter.batches == [4, 4, 4]  # both branches of both items in one call per step
    with pytest.raises(ValueError, match="guidance 2.5 needs an unconditional context"):
        fill(tiny_model, image, mask, Conditioning(contexts(tiny_model).cond), guidance=2.5)


def test_contexts_are_per_sample(tiny_model):
    image, mask = inputs()
    image[1], mask[1] = image[0], mask[0]
    same = contexts(tiny_model)
    same = Conditioning(same.cond[:1].expand(2, -1, -1), same.uncond[:1].expand(2, -1, -1))
    differ = Conditioning(torch.cat([same.cond[:1], -same.cond[:1]]), same.uncond)
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)]  # the same noise for both items
    a = fill(tiny_model, image, mask, same, steps=3, guidance=2.5, generator=gens)
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)]
    b = fill(tiny_model, image, mask, differ, steps=3, guidance=2.5, generator=gens)
    torch.testing.assert_close(a[0], a[1])  # same inputs, same context, same noise
    torch.testing.assert_close(b[0], a[0])  # item 0 kept its context
    assert (b[1] - a[1]).abs().mean() > 1e-3  # item 1's own context changed item 1 only


def test_strength_runs_the_last_steps_from_the_noised_image_as_written_by_hand(tiny_model, monkeypatch):
    image, mask = inputs(batch=1)
    conditioning = contexts(tiny_model, batch=1)
    counter = CountingUNet(tiny_model, monkeypatch)
    out = fill(tiny_model, image, mask, conditioning, steps=50, guidance=1.0, strength=0.85, eta=0.0,
               generator=torch.Generator().manual_seed(3))
    assert len(counter.batches) == 42  # AuraFusion360's setting: 42 of 50 DDIM steps
    # By hand, the same draws in the same order: masked-image latent, image latent, noise.
    g = torch.Generator().manual_seed(3)
    c_concat = tiny_model.concat_conditioning(image, mask, g)
    x0 = tiny_model.encode_first_stage(image, g)
    schedule = torch.cumprod(1 - linear_betas(), 0)
    timesteps = ddim_timesteps(50)[:42]
    abar = schedule[timesteps[-1]].item()
    x = abar**0.5 * x0 + (1 - abar) ** 0.5 * torch.randn(x0.shape, generator=g)
    cond = {"c_concat": c_concat, "c_crossattn": conditioning.cond}
    latent = sample_ddim(lambda x, t: tiny_model.apply_model(x, t, cond), x, schedule, timesteps, eta=0.0)
    decoded = tiny_model.decode_first_stage(latent)
    expected = torch.where(mask > 0.5, decoded, image)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="strength 0.01 of 50 steps runs no step"):
        fill(tiny_model, image, mask, conditioning, steps=50, strength=0.01)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde"])
def test_every_sampler_fills_and_keeps_the_unmasked_pixels(tiny_model, sampler):
    image, mask = inputs()
    a = fill(tiny_model, image, mask, contexts(tiny_model), sampler=sampler, steps=4, guidance=2.5,
             generator=generators())
    assert torch.isfinite(a).all()
    assert torch.equal(a * (1 - mask), image * (1 - mask))
    assert (a - image)[mask.expand_as(a) > 0].abs().mean() > 1e-2


def test_soft_composite_alpha_equals_pil_max_filter_then_box_blur():
    mask = np.zeros((16, 16), np.uint8)
    mask[3:9, 5:12] = 255
    mask[14, 0] = 255  # a corner pixel: the border rule
    pil = Image.fromarray(mask).filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.BoxBlur(1))
    ours = soft_alpha(torch.from_numpy(mask / 255.0)[None, None].float())[0, 0].numpy()
    inside = (slice(1, 15), slice(1, 15))  # PIL extends the edge pixels; ours averages the pixels inside
    assert np.abs(ours[inside] * 255 - np.asarray(pil, np.float64)[inside]).max() <= 1.0
    assert ours.max() == 1.0 and ours[0, 0] == 0.0 and 0 < ours[2, 5] < 1


def test_soft_composite_blends_across_the_border(tiny_model):
    image, mask = inputs(batch=1)
    hard = fill(tiny_model, image, mask, contexts(tiny_model, 1), steps=2, generator=generators(batch=1))
    soft = fill(tiny_model, image, mask, contexts(tiny_model, 1), steps=2, composite="soft",
                generator=generators(batch=1))
    assert torch.equal(soft[..., :4, :], image[..., :4, :])  # far from the hole: the image exactly
    assert not torch.equal(soft[..., 7, 10], image[..., 7, 10])  # one pixel outside the hole: blended
    torch.testing.assert_close(soft[..., 12, 12], hard[..., 12, 12])  # deep inside: generated


def test_the_sampling_schedule_is_float64_whatever_the_model_dtype(tiny_model):
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    half = copy.deepcopy(tiny_model).to(torch.bfloat16)  # a copy: the session's fixture must stay float32
    schedule = half.sampling_schedule()
    assert schedule.dtype == torch.float64 and schedule.shape == (1000,)
    torch.testing.assert_close(schedule, reference.double(), rtol=1e-6, atol=0)  # diffusers computes in float32
    assert half.alphas_cumprod.dtype == torch.bfloat16  # the buffer itself was cast


def test_the_cli_takes_a_sampler_and_a_strength(tmp_path, capsys):
    args = ["--model_path", str(ROOT / "checkpoints" / "tiny_random"), "--random_init", "--test_size", "64",
            "--test_path", str(ROOT / "data" / "samples"), "--no_lpips", "--limit", "1", "--steps", "4"]
    assert test_inpainting.main([*args, "--output_path", str(tmp_path / "a"), "--sampler", "dpmpp_2m",
                                 "--strength", "0.5", "--precision", "32"]) == 0
    assert (tmp_path / "a" / "results" / "building.png").is_file()
    for flags, message in ((["--sampler", "dpmpp_2m", "--eta", "0.5"], "--eta applies to the samplers ddim, not "
                                                                        "dpmpp_2m"),
                           (["--strength", "0"], "--strength must be a number in (0, 1], got 0.0"),
                           (["--precision", "fp64"], "argument --precision: must be one of fp32, 32")):
        with pytest.raises(SystemExit):
            test_inpainting.main([*args, "--output_path", str(tmp_path / "b"), *flags])
        assert message in capsys.readouterr().err


def test_views_regroup_self_attention_for_the_call_only(tiny_model):
    """Multi-view (METHOD 3.1): with two views per sample the first view's fill depends on the second; one view
    per sample is exactly the plain path; and the UNet is left ungrouped after the call."""
    unet = tiny_model.model.diffusion_model
    image, mask = inputs()
    conditioning = contexts(tiny_model)

    def run(image, views):
        return fill(tiny_model, image, mask, conditioning, steps=3, guidance=2.0, generator=generators(),
                    views=views)

    plain = run(image, None)
    assert torch.equal(run(image, ViewGrouping(num_views=1)), plain)
    other = image.clone()
    other[1] = -other[1]  # the second view changes
    joint, joint_other = run(image, ViewGrouping(num_views=2)), run(other, ViewGrouping(num_views=2))
    assert not torch.allclose(joint[0], joint_other[0], atol=1e-4)  # view 0 sees view 1
    assert torch.equal(run(other, None)[0], plain[0])  # ... which it does not without the grouping
    causal = run(image, ViewGrouping(num_views=2, causal=True)), run(other, ViewGrouping(num_views=2, causal=True))
    assert torch.allclose(causal[0][0], causal[1][0], atol=1e-5)  # block-causal: view 0 ignores later views
    assert all(block.self_attention_grouping is None for block in unet.modules() if hasattr(block, "attn1"))


def test_the_grouping_is_removed_when_the_call_raises(tiny_model, monkeypatch):
    unet = tiny_model.model.diffusion_model
    image, mask = inputs()

    def broken(x, t, cond):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(tiny_model, "apply_model", broken)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        fill(tiny_model, image, mask, contexts(tiny_model), steps=2, guidance=2.0, views=ViewGrouping(num_views=2))
    assert all(block.self_attention_grouping is None for block in unet.modules() if hasattr(block, "attn1"))
    outer = ViewGrouping(num_views=2)
    with unet.self_attention_grouping(outer):  # nested: the inner block gives the outer setting back
        with unet.self_attention_grouping(ViewGrouping(num_views=1)):
            pass
        assert all(block.self_attention_grouping is outer for block in unet.modules() if hasattr(block, "attn1"))
    assert all(block.self_attention_grouping is None for block in unet.modules() if hasattr(block, "attn1"))


class RecordingUNet:
    """Wraps model.apply_model to record every call's x and t."""

    def __init__(self, model, monkeypatch):
        self.calls = []
        original = model.apply_model

        def recorded(x, t, cond):
            self.calls.append((x.detach().clone(), t.clone()))
            return original(x, t, cond)

        monkeypatch.setattr(model, "apply_model", recorded)


def test_known_views_enter_noised_to_each_step_with_one_fixed_noise(tiny_model, monkeypatch):
    """Autoregressive multi-view sampling (METHOD 3.3): the known view 0 is returned as given, is never sampled,
    and enters every step as sqrt(abar_t) z0 + sqrt(1 - abar_t) n with the same z0 and n; view 1, which the
    causal grouping lets attend to view 0, depends on it."""
    image, mask = inputs()
    conditioning = contexts(tiny_model)
    recorder = RecordingUNet(tiny_model, monkeypatch)
    out = fill(tiny_model, image, mask, conditioning, steps=3, guidance=1.0, generator=generators(),
               views=ViewGrouping(num_views=2, causal=True), known_views=1)
    assert torch.equal(out[0], image[0])
    assert [x.shape[0] for x, _ in recorder.calls] == [2, 2, 2]  # both views go through the UNet every step
    assert all(t[0] == t[1] for _, t in recorder.calls)  # one timestep per sample, as in training
    abar = tiny_model.sampling_schedule().float()
    coefficients = torch.stack([torch.stack([abar[t[0]].sqrt(), (1 - abar[t[0]]).sqrt()]) for _, t in recorder.calls])
    known_inputs = torch.stack([x[0].flatten() for x, _ in recorder.calls])  # (steps, 4*h*w)
    solved = torch.linalg.lstsq(coefficients[:2], known_inputs[:2]).solution  # z0 and n from two steps
    assert torch.allclose(coefficients[2] @ solved, known_inputs[2], atol=1e-4)  # ... predict the third
    other = image.clone()
    other[0] = -other[0]
    changed = fill(tiny_model, other, mask, conditioning, steps=3, guidance=1.0, generator=generators(),
                   views=ViewGrouping(num_views=2, causal=True), known_views=1)
    assert not torch.allclose(changed[1], out[1], atol=1e-4)
    with pytest.raises(ValueError, match="known_views=2 needs a multi-view grouping"):
        fill(tiny_model, image, mask, conditioning, steps=2, views=ViewGrouping(num_views=2), known_views=2)


def test_shared_region_keeps_the_groups_latents_equal_inside_it(tiny_model, monkeypatch):
    """Training-free multi-reference (METHOD 7.3): two canvases of one target share their right half's latent at
    every step (equal inputs to the UNet there), whatever their own generators; the left halves differ."""
    from ldm.view_sampling import SharedRegion

    image, mask = inputs()
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:, 2:] = True
    recorder = RecordingUNet(tiny_model, monkeypatch)
    shared = SharedRegion(group_size=2, region=region)
    out = fill(tiny_model, image, mask, contexts(tiny_model), steps=3, guidance=2.0, generator=generators(),
               shared_region=shared, eta=1.0)
    for step, (x, _) in enumerate(recorder.calls):  # CFG: [uncond of items 0, 1; cond of items 0, 1]
        for branch in (x[:2], x[2:]):
            assert torch.equal(branch[0][..., 2:], branch[1][..., 2:])
            # one start noise for the group; its images then make the unshared halves differ
            assert torch.equal(branch[0], branch[1]) if step == 0 else not torch.allclose(branch[0], branch[1])
    again = fill(tiny_model, image, mask, contexts(tiny_model), steps=3, guidance=2.0,
                 generator=[generators()[0], torch.Generator().manual_seed(99)], shared_region=shared, eta=1.0)
    assert torch.equal(out, again)  # the group follows its first generator only


def test_guidance_batches_keep_each_branch_of_a_multi_view_sample_together(tiny_model):
    """Classifier-free guidance stacks [uncond; cond] into one UNet call; under a view grouping each half must
    still hold whole samples, so the batched result equals the two branches run separately."""
    from ldm.guidance import ClassifierFreeGuidance

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 4, 4, generator=g), torch.full((4,), 500)
    c_concat = torch.randn(4, 5, 4, 4, generator=g)
    conditioning = contexts(tiny_model, batch=4)
    cond = {"c_concat": c_concat, "c_crossattn": conditioning.cond}
    uncond = {"c_concat": c_concat, "c_crossattn": conditioning.uncond}
    with torch.no_grad(), tiny_model.model.diffusion_model.self_attention_grouping(ViewGrouping(num_views=2)):
        guided = ClassifierFreeGuidance(tiny_model.apply_model, cond, uncond, scale=3.0)(x, t)
        eps_cond, eps_uncond = tiny_model.apply_model(x, t, cond), tiny_model.apply_model(x, t, uncond)
    assert torch.allclose(guided, eps_uncond + 3.0 * (eps_cond - eps_uncond), atol=1e-5)
