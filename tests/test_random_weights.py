"""--random_init builds a model in which every input matters (ldm.random_weights, leftrefill.model_dir)."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import FULL_CONFIG, ROOT
from ldm.latent_diffusion import model_builder
from ldm.random_weights import liven_
from leftrefill import LeftRefillPipeline
from leftrefill.pipeline import _warn_if_large

TINY_DIR = ROOT / "checkpoints" / "tiny_random"
SIZE = 64


@pytest.fixture(scope="module")
def pipe() -> LeftRefillPipeline:
    return LeftRefillPipeline.from_model_dir(TINY_DIR, random_init=True, device="cpu", test_size=SIZE)


def views(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    reference = torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1
    target = torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 16:48, 8:56] = 1
    return reference, target, mask


def fill(pipe, reference, target, mask, **options):
    return pipe.inpaint(reference, target, mask, steps=4, generator=[torch.Generator().manual_seed(0)], **options)


def test_no_parameter_tensor_of_the_random_model_is_constant(pipe):
    constant = [name for name, p in pipe.model.named_parameters()
                if p.numel() > 1 and bool((p == p.flatten()[0]).all())]
    all_zero = [name for name, p in pipe.model.named_parameters() if not p.any()]
    assert constant == [] and all_zero == []
    unet_out = pipe.model.model.diffusion_model.out[-1].weight  # zero-initialised in SD2
    assert unet_out.abs().mean() > 0.01


def test_random_weights_are_the_same_on_every_build(pipe):
    again = LeftRefillPipeline.from_model_dir(TINY_DIR, random_init=True, device="cpu", test_size=SIZE)
    mine, theirs = pipe.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(mine[key], theirs[key]) for key in mine)


def test_with_random_weights_the_reference_changes_the_result(pipe):
    reference, target, mask = views()
    a = fill(pipe, reference, target, mask)
    b = fill(pipe, views(seed=1)[0], target, mask)
    assert (a - b).abs().mean() > 1e-3  # measured 2.5e-3 on a 64 px canvas, 4 steps


def test_with_random_weights_the_guidance_scale_changes_the_result(pipe):
    reference, target, mask = views()
    a, b = fill(pipe, reference, target, mask, cfg=1.0), fill(pipe, reference, target, mask, cfg=7.0)
    assert (a - b).abs().mean() > 1e-2  # measured 0.06


def test_with_random_weights_the_mask_and_the_tokens_change_the_result(pipe):
    reference, target, mask = views()
    a = fill(pipe, reference, target, mask)
    smaller = mask.clone()
    smaller[..., 16:48, 8:32] = 0
    assert (a - fill(pipe, reference, target, smaller))[..., 16:48, 32:56].abs().mean() > 1e-3
    table = pipe.model.cond_stage_model.special_embeddings.weight
    saved = table.detach().clone()
    try:
        with torch.no_grad():
            table.add_(torch.randn(table.shape, generator=torch.Generator().manual_seed(1)))
        assert (a - fill(pipe, reference, target, mask)).abs().mean() > 1e-3
    finally:
        with torch.no_grad():
            table.copy_(saved)


def test_liven_changes_only_constant_tensors_and_keeps_norm_scales_near_one():
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    with torch.no_grad():
        layer[2].weight.zero_()
        layer[2].bias.zero_()
    varied = layer[0].weight.detach().clone()
    changed = liven_(layer, seed=3)
    assert changed == ["1.weight", "1.bias", "2.weight", "2.bias"]
    assert torch.equal(layer[0].weight, varied)
    assert (layer[1].weight - 1).abs().max() < 0.5 and layer[1].weight.std() > 0
    assert layer[2].weight.std().item() == pytest.approx(1 / 8**0.5, rel=0.35)


def test_random_init_of_the_full_size_config_says_what_it_costs(caplog):
    with caplog.at_level(logging.WARNING):
        _warn_if_large(model_builder(FULL_CONFIG), FULL_CONFIG)
    assert "builds the full-size model: 1.30 B parameters" in caplog.text
    assert "--model_path checkpoints/tiny_random" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _warn_if_large(model_builder(TINY_DIR / "model_config.yaml"), TINY_DIR)
    assert caplog.text == ""
