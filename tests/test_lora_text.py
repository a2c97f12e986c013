"""Text-encoder LoRA (RealFill, METHOD 5.1): SplitAttention and peft adapters on the OpenCLIP attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.checkpoint import CheckpointError, load_weights
from ldm.latent_diffusion import model_builder
from ldm.util import ConfigError
from leftrefill.lora import (SplitAttention, adapter_spec, add_lora, lora_layers, merge_lora, set_lora_dropout_mode,
                             unmerge_lora)
from leftrefill.model_dir import TOKEN_KEY, build_random, load_with_base

TINY = "checkpoints/tiny_random/model_config.yaml"  # text encoder: width 64, 4 heads, 3 blocks (2 run)
TEXT = {"text": {"rank": 4, "alpha": 8.0, "dropout": 0.0}}
PROMPT = ["a photo of sks"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def context(model: nn.Module) -> torch.Tensor:
    return model.cond_stage_model.encode(PROMPT)  # (1, 77, 64)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if ".lora_" in name}


def train_adapters_only(model: nn.Module) -> dict[str, nn.Parameter]:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    return adapter_parameters(model)


def test_fresh_text_adapter_leaves_the_context_unchanged_and_a_trained_one_changes_it():
    model = build_random(model_builder(TINY)).eval()
    with torch.no_grad():
        before = context(model)
        add_lora(model, TEXT)  # B = 0
        assert torch.equal(context(model), before)
        livened = build_random(model_builder(TINY), adapter=TEXT).eval()  # same backbone, B != 0
        changed = context(livened)
    assert torch.isfinite(changed).all() and not torch.allclose(changed, before, atol=1e-4)


def test_text_adapters_sit_on_q_k_v_out_of_every_block_that_runs_and_nowhere_else():
    model = build_random(model_builder(TINY), adapter=TEXT)
    transformer = model.cond_stage_model.model.transformer
    wrapped = sorted(name for name, m in transformer.named_modules() if m in lora_layers(model))
    assert wrapped == sorted(f"resblocks.{b}.attn.{p}" for b in (0, 1) for p in PROJECTIONS)
    assert len(lora_layers(model)) == 8  # no UNet adapter with a text-only spec
    # SD2's penultimate layer: the last block never runs, so it keeps its plain attention and no adapter
    assert model.cond_stage_model.num_layers_used == 2
    assert type(transformer.resblocks[2].attn) is nn.MultiheadAttention
    assert all(isinstance(transformer.resblocks[b].attn, SplitAttention) for b in (0, 1))
    assert sum(p.numel() for p in adapter_parameters(model).values()) == 2 * 4 * (4 * 64 + 64 * 4)


def test_target_blocks_and_projections_select_the_adapters():
    model = build_random(model_builder(TINY), adapter={"text": {"target_blocks": [1], "target_modules": ["q_proj",
                                                                                                        "v_proj"]}})
    names = {name.split(".lora_")[0] for name in adapter_parameters(model)}
    assert names == {"cond_stage_model.model.transformer.resblocks.1.attn.q_proj",
                     "cond_stage_model.model.transformer.resblocks.1.attn.v_proj"}
    with pytest.raises(ConfigError, match=r"runs blocks 0..1 only"):
        add_lora(build_random(model_builder(TINY)), {"text": {"target_blocks": [2]}})


def test_an_optimizer_step_on_the_text_adapters_changes_nothing_else():
    model = build_random(model_builder(TINY), adapter=TEXT).eval()
    adapters = train_adapters_only(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    start = {k: v.detach().clone() for k, v in adapters.items()}
    optimizer = torch.optim.AdamW(adapters.values(), lr=4e-5)  # METHOD 5.1: the text LoRA's rate
    context(model).square().mean().backward()
    optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(not torch.equal(adapters[k], v) for k, v in start.items())


def test_text_lora_merged_equals_unmerged_and_saves_as_a_plain_sd2_state_dict():
    model = build_random(model_builder(TINY), adapter=TEXT).eval()
    with torch.no_grad():
        unmerged = context(model)
        assert merge_lora(model) == 8
        assert torch.allclose(context(model), unmerged, atol=1e-5)
        # the merged weights under MultiheadAttention's keys run in a model without any adapter
        merged = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
        plain = build_random(model_builder(TINY)).eval()
        plain.load_state_dict(merged, strict=True)
        assert torch.allclose(context(plain), unmerged, atol=1e-5)
        unmerge_lora(model)
        assert torch.allclose(context(model), unmerged, atol=1e-6)


@pytest.mark.parametrize("mask_kind", ["float", "bool"])
def test_split_attention_equals_multihead_attention_with_the_causal_mask(mask_kind):
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(64, 4, batch_first=True)
    nn.init.normal_(attn.in_proj_bias)
    nn.init.normal_(attn.out_proj.bias)
    split = SplitAttention.from_multihead(attn)
    x = torch.randn(2, 7, 64)
    causal = torch.ones(7, 7, dtype=torch.bool).triu_(1)  # True: may not attend (MultiheadAttention's meaning)
    mask = causal if mask_kind == "bool" else torch.zeros(7, 7).masked_fill_(causal, float("-inf"))
    expected = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert torch.allclose(split(x, x, x, need_weights=False, attn_mask=mask)[0], expected, atol=1e-6)
    with torch.no_grad():  # MultiheadAttention's inference fast path
        assert torch.allclose(split(x, x, x, attn_mask=mask)[0], attn.eval()(x, x, x, attn_mask=mask)[0], atol=1e-6)


def test_sd2_state_dict_keys_load_strictly_into_a_text_adapted_model():
    sd2 = build_random(model_builder(TINY)).state_dict()  # MultiheadAttention keys, as SD2 checkpoints
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    sd2[key] = torch.randn_like(sd2[key])
    model = build_random(model_builder(TINY), adapter=TEXT)
    assert set(model.state_dict()) == set(sd2) | set(adapter_parameters(model))
    load_weights(model, {**sd2, **{k: v.detach() for k, v in adapter_parameters(model).items()}}, source="sd2")
    attn = model.cond_stage_model.model.transformer.resblocks[0].attn
    for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(getattr(attn, name).base_layer.weight, sd2[key][part * 64:(part + 1) * 64])
    with pytest.raises(CheckpointError, match="lora_A"):  # strict: the adapter tensors must come too
        load_weights(model, sd2, source="sd2")


def test_lora_dropout_is_active_in_train_mode_only():
    model = build_random(model_builder(TINY), adapter={"text": {}})  # RealFill's defaults: 8 / 16 / 0.1
    layer = lora_layers(model)[0]
    assert (layer.r["default"], layer.scaling["default"], layer.lora_dropout["default"].p) == (8, 2.0, 0.1)
    with torch.no_grad():
        model.cond_stage_model.train()
        assert not torch.equal(context(model), context(model))
        model.eval()
        assert torch.equal(context(model), context(model))
        set_lora_dropout_mode(model, True)  # frozen modules stay in eval; their adapters' dropout need not
        assert not torch.equal(context(model), context(model))


def test_gradient_checkpointing_gives_the_same_nonzero_adapter_gradients():
    model = build_random(model_builder(TINY), adapter=TEXT).eval()
    adapters = train_adapters_only(model)
    grads = []
    for checkpointing in (False, True):
        model.cond_stage_model.grad_checkpointing = checkpointing
        model.zero_grad()
        context(model).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in adapters.items()})
    assert all(g.abs().sum() > 0 for g in grads[1].values())
    assert all(torch.allclose(grads[1][k], grads[0][k], atol=1e-7) for k in adapters)


def test_unet_spec_is_unchanged_and_a_combined_spec_adds_both_adapters():
    assert adapter_spec({"rank": 4, "alpha": 4.0}) == adapter_spec({"rank": 4, "alpha": 4.0, "dropout": 0.0})
    assert set(adapter_spec({"rank": 4, "alpha": 4.0})) == {"rank", "alpha", "target_modules"}
    assert adapter_spec({"dropout": 0.1})["dropout"] == 0.1
    spec = adapter_spec({"unet": {"rank": 8, "alpha": 16.0, "dropout": 0.1}, "text": {}})
    assert spec["text"] == {"rank": 8, "alpha": 16.0, "dropout": 0.1, "target_blocks": None,
                            "target_modules": list(PROJECTIONS), "init": "kaiming"}
    assert adapter_spec({"rank": 4, "init": "kaiming"})["init"] == "kaiming"  # the UNet's default is left out
    model = build_random(model_builder(TINY), adapter=spec)
    names = adapter_parameters(model)
    assert any(n.startswith("model.diffusion_model.") for n in names)
    assert any(n.startswith("cond_stage_model.") for n in names)
    unet_layer = next(m for n, m in model.model.diffusion_model.named_modules() if m in lora_layers(model))
    assert unet_layer.lora_dropout["default"].p == 0.1
    for bad in ({"unet": None, "text": None}, {"text": {"rank": 0}}, {"text": {"target_modules": ["c_fc"]}},
                {"text": {}, "rank": 4}):
        with pytest.raises(ConfigError):
            adapter_spec(bad)


def test_a_unet_and_text_adapter_checkpoint_loads_over_an_sd2_base_with_the_same_context(tmp_path):
    spec = {"unet": {"rank": 4, "alpha": 4.0}, "text": TEXT["text"]}
    trained = build_random(model_builder(TINY), adapter=spec).eval()
    state = {k: v.detach().clone() for k, v in trained.named_parameters() if k == TOKEN_KEY or ".lora_" in k}
    metadata = {"config": {"model": {"lora": spec}}, "trainable": {"all": sorted(state)}, "base_checkpoint": None}
    torch.save({"state_dict": state, "leftrefill": metadata}, tmp_path / "realfill.ckpt")
    base = {k: v for k, v in build_random(model_builder(TINY)).state_dict().items() if k != TOKEN_KEY}
    torch.save({"state_dict": base}, tmp_path / "base.ckpt")  # MultiheadAttention keys, as SD2
    loaded = load_with_base(model_builder(TINY), tmp_path / "base.ckpt", tmp_path / "realfill.ckpt")
    assert set(adapter_parameters(loaded)) == set(adapter_parameters(trained))
    with torch.no_grad():
        torch.testing.assert_close(context(loaded), context(trained), atol=0, rtol=0)
