"""Exported LoRA adapters (UNet, RealFill's text encoder) work in diffusers / transformers exactly as here,
import back, and bad input is refused.

The proof builds diffusers' ``UNet2DConditionModel`` (and transformers' ``CLIPTextModel``) from the tiny
model's base weights with diffusers' own single-file converters (tests/test_parity.py), loads the exported
file with diffusers' LoRA loader (the ``lora_state_dict`` + ``load_lora_into_unet`` /
``load_lora_into_text_encoder`` that ``pipe.load_lora_weights`` runs, kohya conversion included) and compares
one forward with this project's adapted network.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.latent_diffusion import model_builder
from leftrefill.export_lora import export_lora, import_lora, is_lora_file, unet_module_map
from leftrefill.export_tokens import ExportError
from leftrefill.model_dir import CONFIG_NAME, build_model, build_random
from tests.conftest import ROOT

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tests.test_parity import diffusers_unet, original_config  # noqa: E402

TINY_DIR = ROOT / "checkpoints" / "tiny_random"
TINY_CONFIG = TINY_DIR / CONFIG_NAME
LORA = {"rank": 4, "alpha": 8.0}  # scale 2: the test sees whether alpha / rank is carried
ATOL = 1e-4  # fp32 outputs of order 0.1..1 (measured: UNet 0; text 1.1e-6 with alpha / rank folded into B)


def adapter_dir(folder, model, spec=LORA, config=TINY_CONFIG):
    """A model directory whose trained file holds the adapter of ``model`` with training-like metadata."""
    shutil.copy(config, folder / CONFIG_NAME)
    (folder / "ckpts").mkdir()
    state = {k: v.detach().clone().contiguous() for k, v in model.named_parameters() if ".lora_" in k}
    metadata = {"config": {"model": {"lora": spec}}, "trainable": {"lora": sorted(state)}, "base_checkpoint": None}
    save_file(state, str(folder / "ckpts" / "lora.safetensors"), metadata={"leftrefill": json.dumps(metadata)})
    return folder


@pytest.fixture(scope="module")
def adapted():
    return build_random(model_builder(TINY_CONFIG), adapter=LORA).eval()


@pytest.fixture(scope="module")
def model_dir(adapted, tmp_path_factory):
    return adapter_dir(tmp_path_factory.mktemp("tiny_lora"), adapted)


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 16, 24, generator=generator)
    return x, torch.tensor([3, 977]), torch.randn(2, 77, 64, generator=generator)


def unet_out(model, inputs):
    with torch.no_grad():
        return model.model.diffusion_model(*inputs)


def diffusers_with_lora(path):
    """diffusers' UNet from the base weights (no adapter) with the LoRA file loaded by diffusers' loader."""
    base = build_random(model_builder(TINY_CONFIG))  # the same seeded backbone as ``adapted``
    state_dict = {k: v.detach().clone() for k, v in base.state_dict().items()}
    unet = diffusers_unet(original_config(TINY_CONFIG), state_dict)
    lora, alphas = diffusers.StableDiffusionInpaintPipeline.lora_state_dict(str(path))
    diffusers.StableDiffusionInpaintPipeline.load_lora_into_unet(lora, alphas, unet=unet)
    return unet.eval()


def test_module_map_comes_from_diffusers_converter_and_follows_the_block_rules():
    tiny = unet_module_map(str(TINY_CONFIG.resolve()))
    # tiny UNet: one ResBlock per level, so input_blocks.{1 + 2b + a}, output_blocks.{2b + a}
    for ours, theirs in [("input_blocks.1.1", "down_blocks.0.attentions.0"),
                         ("input_blocks.3.1", "down_blocks.1.attentions.0"),
                         ("middle_block.1", "mid_block.attentions.0"),
                         ("output_blocks.3.1", "up_blocks.1.attentions.1")]:
        for leaf in ("attn1.to_q", "attn2.to_out.0", "ff.net.0.proj"):
            assert tiny[f"{ours}.transformer_blocks.0.{leaf}"] == f"{theirs}.transformer_blocks.0.{leaf}"
    # SD2 (two ResBlocks per level): METHOD 7.8's rules for all 16 transformer blocks
    full = unet_module_map(str((ROOT / "checkpoints" / "realfill" / CONFIG_NAME).resolve()))
    blocks = {k.split(".transformer_blocks")[0]: v.split(".transformer_blocks")[0] for k, v in full.items()
              if ".transformer_blocks." in k}
    expected = {f"input_blocks.{1 + 3 * b + a}.1": f"down_blocks.{b}.attentions.{a}"
                for b in range(3) for a in range(2)}
    expected |= {f"output_blocks.{3 * b + a}.1": f"up_blocks.{b}.attentions.{a}" for b in (1, 2, 3) for a in range(3)}
    assert blocks == {**expected, "middle_block.1": "mid_block.attentions.0"}


@pytest.mark.parametrize("fmt", ["diffusers-lora", "kohya"])
def test_exported_lora_gives_the_adapted_unet_in_diffusers(fmt, adapted, model_dir, inputs, tmp_path):
    path = export_lora(model_dir, fmt, tmp_path / "lora.safetensors")
    keys = set(load_file(path))
    if fmt == "diffusers-lora":
        assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
        assert len(keys) == 2 * 63
    else:
        assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.alpha" in keys
        assert len(keys) == 3 * 63
    ours = unet_out(adapted, inputs)
    plain = unet_out(build_random(model_builder(TINY_CONFIG)).eval(), inputs)
    x, t, context = inputs
    with torch.no_grad():
        theirs = diffusers_with_lora(path)(x, t, encoder_hidden_states=context).sample
    assert 0.05 < ours.abs().mean().item() < 10
    assert (ours - plain).abs().max() > 100 * ATOL  # the adapter matters
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"max abs difference {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("fmt", ["diffusers-lora", "kohya"])
def test_imported_lora_loads_as_a_model_directory_with_the_same_outputs(fmt, adapted, model_dir, inputs, tmp_path):
    path = export_lora(model_dir, fmt, tmp_path / "lora.safetensors")
    assert is_lora_file(path)
    imported = import_lora(path, tmp_path / "imported", TINY_DIR)
    model = build_model(model_builder(imported / CONFIG_NAME), trained=imported / "ckpts" / "lora.safetensors",
                        random_init=True).eval()
    torch.testing.assert_close(unet_out(model, inputs), unet_out(adapted, inputs), atol=1e-5, rtol=1e-5)
    # into the model directory it came from: its spec (alpha 8) is kept
    again = import_lora(path, tmp_path / "again", model_dir)
    trained = load_file(again / "ckpts" / "lora.safetensors")
    original = load_file(model_dir / "ckpts" / "lora.safetensors")
    assert set(trained) == set(original)
    for key in original:
        torch.testing.assert_close(trained[key], original[key], atol=1e-6, rtol=1e-6)


# -- bad input (issue 15, item 5) ----------------------------------------------------------------------
def test_exporting_without_an_adapter_is_one_clear_error(tmp_path):
    with pytest.raises(ExportError, match="nothing to export"):
        export_lora(TINY_DIR, "diffusers-lora", tmp_path / "x.safetensors")


def test_importing_a_lora_of_another_rank_than_the_model_directorys_is_refused(model_dir, tmp_path):
    (tmp_path / "rank2").mkdir()
    spec = {"rank": 2, "alpha": 2.0}
    other = adapter_dir(tmp_path / "rank2", build_random(model_builder(TINY_CONFIG), adapter=spec), spec)
    path = export_lora(other, "diffusers-lora", tmp_path / "rank2.safetensors")
    with pytest.raises(ExportError, match=r"LoRA rank 2, but the adapter of .* has rank 4"):
        import_lora(path, tmp_path / "out", model_dir)
    assert not (tmp_path / "out").exists()


def test_importing_a_lora_for_another_base_model_is_refused(model_dir, tmp_path):
    lora = load_file(export_lora(model_dir, "diffusers-lora", tmp_path / "lora.safetensors"))
    extra = "unet.down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q"  # no such block in the tiny UNet
    save_file({**lora, f"{extra}.lora_A.weight": torch.zeros(4, 64), f"{extra}.lora_B.weight": torch.zeros(64, 4)},
              str(tmp_path / "bigger.safetensors"))
    with pytest.raises(ExportError, match="another base model"):
        import_lora(tmp_path / "bigger.safetensors", tmp_path / "out", TINY_DIR)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    save_file({**lora, key: torch.zeros(4, 768)}, str(tmp_path / "sd1.safetensors"))  # SD1's 768-wide context
    with pytest.raises(ExportError, match=r"\[4, 768\].*another base model"):
        import_lora(tmp_path / "sd1.safetensors", tmp_path / "out", TINY_DIR)
    assert not (tmp_path / "out").exists()


# -- RealFill: UNet + text-encoder LoRA ----------------------------------------------------------------
REALFILL_DIR = ROOT / "checkpoints" / "tiny_random_realfill"
REALFILL_LORA = {"unet": {"rank": 4, "alpha": 8.0}, "text": {"rank": 2, "alpha": 6.0, "dropout": 0.0}}
PROMPT = ["a photo of sks"]


@pytest.fixture(scope="module")
def realfill():
    return build_random(model_builder(REALFILL_DIR / CONFIG_NAME), adapter=REALFILL_LORA).eval()


@pytest.fixture(scope="module")
def realfill_dir(realfill, tmp_path_factory):
    return adapter_dir(tmp_path_factory.mktemp("tiny_realfill_lora"), realfill, REALFILL_LORA,
                       REALFILL_DIR / CONFIG_NAME)


def transformers_text_with_lora(path):
    """transformers' CLIPTextModel from the base weights with the file's text LoRA loaded by diffusers."""
    from tests.test_export_tokens import clip_text_model

    base = build_random(model_builder(REALFILL_DIR / CONFIG_NAME))
    state_dict = {k: v.detach().clone() for k, v in base.state_dict().items()}
    text = clip_text_model(state_dict, 64, 3)
    lora, alphas = diffusers.StableDiffusionInpaintPipeline.lora_state_dict(str(path))
    diffusers.StableDiffusionInpaintPipeline.load_lora_into_text_encoder(lora, alphas, text_encoder=text,
                                                                         prefix="text_encoder")
    return text.eval()


@pytest.mark.parametrize("fmt", ["diffusers-lora", "kohya"])
def test_exported_text_encoder_lora_gives_the_adapted_context_in_transformers(fmt, realfill, realfill_dir, tmp_path):
    path = export_lora(realfill_dir, fmt, tmp_path / "realfill.safetensors")
    keys = set(load_file(path))
    if fmt == "diffusers-lora":
        assert "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight" in keys
    else:
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    encoder = realfill.cond_stage_model
    plain = build_random(model_builder(REALFILL_DIR / CONFIG_NAME)).eval().cond_stage_model
    with torch.no_grad():
        ours, before = encoder.encode(PROMPT), plain.encode(PROMPT)
        theirs = transformers_text_with_lora(path)(input_ids=encoder.tokenize(PROMPT)).last_hidden_state
    assert (ours - before).abs().max() > 100 * ATOL  # the text adapter matters
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"max abs difference {diff:.3g} > {ATOL}"


def test_imported_realfill_lora_gives_the_same_unet_and_context(realfill, realfill_dir, inputs, tmp_path):
    path = export_lora(realfill_dir, "kohya", tmp_path / "realfill.safetensors")
    imported = import_lora(path, tmp_path / "imported", REALFILL_DIR)
    model = build_model(model_builder(imported / CONFIG_NAME), trained=imported / "ckpts" / "lora.safetensors",
                        random_init=True).eval()
    torch.testing.assert_close(unet_out(model, inputs), unet_out(realfill, inputs), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.cond_stage_model.encode(PROMPT), realfill.cond_stage_model.encode(PROMPT),
                                   atol=1e-5, rtol=1e-5)
    # into a model directory whose text adapter has another rank
    other = {"unet": REALFILL_LORA["unet"], "text": {**REALFILL_LORA["text"], "rank": 3}}
    (tmp_path / "rank3").mkdir()
    adapter_dir(tmp_path / "rank3", build_random(model_builder(REALFILL_DIR / CONFIG_NAME), adapter=other), other,
                REALFILL_DIR / CONFIG_NAME)
    with pytest.raises(ExportError, match=r"text LoRA rank 2, but the adapter of .* has rank 3"):
        import_lora(path, tmp_path / "out", tmp_path / "rank3")
    assert not (tmp_path / "out").exists()


def test_export_cli_writes_and_imports_lora_files(model_dir, tmp_path):
    from scripts.export import main

    out = tmp_path / "lora.safetensors"
    assert main(["--model_path", str(model_dir), "--format", "kohya", "--out", str(out)]) == 0
    assert main(["--import", str(out), "--out", str(tmp_path / "no_base")]) == 2  # a LoRA needs --base_model
    assert main(["--import", str(out), "--base_model", str(TINY_DIR), "--out", str(tmp_path / "imported")]) == 0
    assert (tmp_path / "imported" / "ckpts" / "lora.safetensors").is_file()
    assert main(["--model_path", str(TINY_DIR), "--format", "diffusers-lora", "--out", str(out)]) == 2


def test_nvs_adapter_exports_alone_and_imports_back_beside_the_tokens_and_pose_mlp(tmp_path, caplog):
    nvs_config = ROOT / "checkpoints" / "tiny_random_nvs" / CONFIG_NAME
    nvs = build_random(model_builder(nvs_config), adapter=LORA)
    state = {k: v.detach().clone().contiguous() for k, v in nvs.named_parameters()
             if ".lora_" in k or ".pose_mlp." in k or "special_embeddings" in k}
    shutil.copy(nvs_config, tmp_path / CONFIG_NAME)
    metadata = {"config": {"model": {"lora": LORA}}, "trainable": {"all": sorted(state)}, "base_checkpoint": None}
    save_file(state, str(tmp_path / "nvs.safetensors"), metadata={"leftrefill": json.dumps(metadata)})
    exported = export_lora(tmp_path, "diffusers-lora", tmp_path / "out" / "nvs_lora.safetensors")
    assert "not exported: cond_stage_model" in caplog.text  # the tokens and the pose MLP stay behind
    assert all(key.startswith("unet.") for key in load_file(exported))
    imported = import_lora(exported, tmp_path / "imported", tmp_path / "nvs.safetensors")
    again = load_file(imported / "ckpts" / "lora.safetensors")
    assert set(again) == set(state)
    for key in state:
        torch.testing.assert_close(again[key], state[key], atol=1e-6, rtol=1e-6)


def test_import_reads_the_alpha_diffusers_save_lora_weights_writes_in_the_header(adapted, model_dir, inputs,
                                                                                   tmp_path):
    lora = load_file(export_lora(model_dir, "diffusers-lora", tmp_path / "folded.safetensors"))
    unfolded = {k: v / 2 if k.endswith("lora_B.weight") else v for k, v in lora.items()}  # alpha / rank = 2
    header = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8.0})}
    save_file(unfolded, str(tmp_path / "saved.safetensors"), metadata=header)
    imported = import_lora(tmp_path / "saved.safetensors", tmp_path / "imported", TINY_DIR)
    model = build_model(model_builder(imported / CONFIG_NAME), trained=imported / "ckpts" / "lora.safetensors",
                        random_init=True).eval()
    torch.testing.assert_close(unet_out(model, inputs), unet_out(adapted, inputs), atol=1e-5, rtol=1e-5)
