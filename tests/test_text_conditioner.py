"""The plain-prompt conditioner (RealFill): per-item prompts on the shared seam, dropout to the empty string,
adapters on top of a strict base load, and the fill core driven by it."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT
from ldm.fill import Conditioning, fill
from ldm.latent_diffusion import model_builder
from leftrefill.model_dir import build_random, load_with_base
from leftrefill.text_conditioner import TextConditioner

TINY_REALFILL = ROOT / "checkpoints" / "tiny_random_realfill" / "model_config.yaml"
PROMPT = "a photo of sks"


@pytest.fixture(scope="module")
def tiny():
    return build_random(model_builder(TINY_REALFILL)).eval()


def test_each_item_gets_its_own_prompt_and_dropped_items_the_empty_one(tiny):
    embedder = tiny.cond_stage_model
    assert isinstance(embedder, TextConditioner) and embedder.condition_keys == ("prompt",)
    with torch.no_grad():
        context = embedder.context({"prompt": [PROMPT, "a red door"]}, 2)
        dropped = embedder.context({"prompt": [PROMPT, PROMPT]}, 2, drop=torch.tensor([True, False]))
        alone = embedder.encode([PROMPT])
    torch.testing.assert_close(context[:1], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(context[0], context[1])
    torch.testing.assert_close(dropped[:1], embedder.empty_context(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(dropped[1:], alone, atol=1e-5, rtol=0)
    assert torch.equal(embedder.context({"prompt": PROMPT}, 3), embedder.encode([PROMPT] * 3))


def test_a_batch_without_prompts_is_refused_clearly(tiny):
    with pytest.raises(ValueError, match="needs 'prompt', a list of 2 strings"):
        tiny.cond_stage_model.context({}, 2)
    with pytest.raises(ValueError, match="a list of 2 strings"):
        tiny.cond_stage_model.context({"prompt": [PROMPT]}, 2)


def test_the_base_fills_the_model_and_fresh_adapters_change_nothing(tiny, tmp_path):
    base = tmp_path / "base.ckpt"
    torch.save({"state_dict": tiny.state_dict()}, base)
    spec = {"unet": {"rank": 4, "alpha": 8.0}, "text": {"rank": 4, "alpha": 8.0}}
    adapted = load_with_base(model_builder(TINY_REALFILL), base, None, adapter=spec)
    assert any(".lora_A." in n for n, _ in adapted.cond_stage_model.named_parameters())
    assert any(".lora_A." in n for n, _ in adapted.model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(adapted.cond_stage_model.context({"prompt": [PROMPT]}, 1),
                                   tiny.cond_stage_model.context({"prompt": [PROMPT]}, 1), atol=1e-6, rtol=0)


def test_the_fill_core_samples_a_single_image_and_the_prompt_matters(tiny):
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    embedder = tiny.cond_stage_model

    def sample(prompt):
        conditioning = Conditioning(embedder.context({"prompt": [prompt]}, 1), embedder.empty_context(1))
        return fill(tiny, image, mask, conditioning, sampler="ddpm", steps=3, guidance=1.0, composite="soft",
                    generator=torch.Generator().manual_seed(0))

    first, again, other = sample(PROMPT), sample(PROMPT), sample("a blue car")
    assert torch.equal(first, again) and not torch.equal(first, other)
    # alpha reaches 2 px beyond the mask (3 x 3 dilation, then a radius-1 blur); beyond that: the image exactly
    outside = torch.nn.functional.max_pool2d(mask, 5, 1, 2) == 0
    assert torch.equal(first[outside.expand_as(first)], image[outside.expand_as(image)])
