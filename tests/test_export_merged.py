"""A RealFill model merged into an SD2-format checkpoint samples as the adapted model, here and in diffusers'
``from_single_file`` (offline), holds exactly SD2's keys, and bad input is refused.

The model is the tiny RealFill config with seeded random non-zero weights and a non-zero UNet + text-encoder
LoRA (alpha / rank 2 and 3, so a lost scale would show). Its adapters go into a model directory with
training-like metadata, and the plain seeded backbone into a base checkpoint file; ``export_merged`` folds
one into the other. Both sides fill the same 64 x 64 image, DDIM 25 steps, eta 0, guidance 2.5 against the
empty prompt, with the same masked-image posterior noise and x_T (the draw order of tests/test_export_tokens.py:
the posterior noise is each side's first draw from the seed, x_T the second, passed to diffusers as
``latents``), and are compared on the decoded image before any compositing.

diffusers cannot guess a tiny model's sizes (its single-file loader would fetch the SD2 configs from the Hub),
so the test writes a local diffusers config folder from the tiny LDM config: ``model_index.json`` and the
component configs (UNet and VAE by diffusers' own ``create_*_diffusers_config_from_ldm``, the CLIP text
config, OpenCLIP's tokenizer files, SD2's DDIM scheduler), no weights. Every weight then comes from the
merged file, and sockets are closed while it loads.
"""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.checkpoint import CheckpointError
from ldm.latent_diffusion import model_builder
from leftrefill.export_merged import export_merged
from leftrefill.export_tokens import ExportError
from leftrefill.model_dir import CONFIG_NAME, METADATA_KEY, TOKEN_KEY, build_random
from leftrefill.realfill_pipeline import RealFillPipeline
from tests.conftest import ROOT

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

from tests.test_export_tokens import openclip_tokenizer  # noqa: E402
from tests.test_parity import original_config  # noqa: E402

REALFILL_DIR = ROOT / "checkpoints" / "tiny_random_realfill"  # config only: the route for a merged base
REALFILL_CONFIG = REALFILL_DIR / CONFIG_NAME
LORA = {"unet": {"rank": 4, "alpha": 8.0}, "text": {"rank": 2, "alpha": 6.0, "dropout": 0.0}}
PROMPT = "a photo of sks"
STEPS, CFG, SEED = 25, 2.5, 7
MERGE_ATOL = 1e-5  # merged W + sBA vs the adapter's Wx + sB(Ax), after 25 DDIM steps (measured 1.9e-6)
IMAGE_ATOL = 1e-4  # diffusers vs this project, fp32 images of order 0.1..1 (measured 1.7e-6)
SUFFIXES = (".safetensors", ".ckpt")


def lora_dir(folder, model, config=REALFILL_CONFIG, base_record=None, extra=()):
    """A model directory whose trained file holds ``model``'s adapter tensors (and ``extra`` parameters) with
    the metadata a RealFill run writes: the resolved config's LoRA spec and data section, the base record."""
    folder.mkdir(exist_ok=True)
    shutil.copy(config, folder / CONFIG_NAME)
    state = {k: v.detach().clone().contiguous() for k, v in model.named_parameters()
             if ".lora_" in k or any(name in k for name in extra)}
    metadata = {"config": {"model": {"lora": LORA}, "data": {"image_size": 64, "params": {"prompt": PROMPT}}},
                "trainable": {"lora": sorted(state)}, "base_checkpoint": base_record}
    (folder / "ckpts").mkdir()
    save_file(state, str(folder / "ckpts" / "lora.safetensors"), metadata={METADATA_KEY: json.dumps(metadata)})
    return folder


@pytest.fixture(scope="module")
def adapted():
    return build_random(model_builder(REALFILL_CONFIG), adapter=LORA).eval()


@pytest.fixture(scope="module")
def plain():
    """The same seeded backbone without the adapter: the base model the adapters were "trained" on."""
    return build_random(model_builder(REALFILL_CONFIG)).eval()


@pytest.fixture(scope="module")
def files(adapted, plain, tmp_path_factory):
    """The base checkpoint, the adapter model directory and the merged file in both formats."""
    folder = tmp_path_factory.mktemp("merged")
    base = folder / "base.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(base))
    model_dir = lora_dir(folder / "model", adapted)
    merged = {suffix: export_merged(model_dir, folder / f"merged{suffix}", base_ckpt=base) for suffix in SUFFIXES}
    return {"base": base, "model_dir": model_dir, **merged}


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1  # on the 8-pixel latent grid: both sides' downsampled masks agree
    return image, mask


def fill_here(pipe: RealFillPipeline, inputs) -> torch.Tensor:
    """The decoded fill (1, 3, 64, 64), DDIM eta 0, guidance 2.5, seed SEED."""
    return pipe.sample(*inputs, sampler="ddim", steps=STEPS, cfg=CFG, eta=0.0,
                       generator=torch.Generator().manual_seed(SEED))


@pytest.fixture(scope="module")
def adapted_fill(adapted, inputs):
    """The reference: the adapted model with its adapters unmerged (what the merged file must reproduce)."""
    return fill_here(RealFillPipeline(adapted, resolution=64), inputs)


@pytest.fixture(scope="module")
def diffusers_config(plain, tmp_path_factory):
    """A local diffusers StableDiffusionInpaintPipeline folder for the tiny model: configs only, no weights."""
    folder = tmp_path_factory.mktemp("diffusers_config")
    config, state_dict = original_config(REALFILL_CONFIG), plain.state_dict()
    text = config["model"]["params"]["cond_stage_config"]["params"]["text_cfg"]
    with torch.device("meta"):
        diffusers.UNet2DConditionModel(**sfu.create_unet_diffusers_config_from_ldm(config, state_dict)).save_config(
            folder / "unet")
        diffusers.AutoencoderKL(**sfu.create_vae_diffusers_config_from_ldm(config, state_dict)).save_config(
            folder / "vae")
    transformers.CLIPTextConfig(  # SD2's penultimate layer: one layer fewer than OpenCLIP's (test_parity.py)
        vocab_size=49408, hidden_size=text["width"], intermediate_size=4 * text["width"],
        num_attention_heads=text["heads"], num_hidden_layers=text["layers"] - 1, max_position_embeddings=77,
        hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=text["width"], bos_token_id=49406,
        eos_token_id=49407, pad_token_id=0).save_pretrained(folder / "text_encoder")
    (folder / "tokenizer").mkdir()
    openclip_tokenizer(folder / "tokenizer").save_pretrained(folder / "tokenizer")
    diffusers.DDIMScheduler(  # SD2's scheduler_config.json
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon").save_config(
        folder / "scheduler")
    components = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                  "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
                  "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionInpaintPipeline",
                                                         **components, "requires_safety_checker": False}))
    assert not [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt")]
    return folder


def changed_weight_key(adapter_key: str) -> str:
    """The SD2 key an adapter's A matrix changes: the layer's weight; the text encoder's q/k/v projections
    are slices of OpenCLIP's fused ``in_proj_weight``."""
    layer = adapter_key.split(".lora_A.")[0]
    attn, name = layer.rsplit(".", 1)
    return f"{attn}.in_proj_weight" if name in ("q_proj", "k_proj", "v_proj") else f"{layer}.weight"


# -- the file ------------------------------------------------------------------------------------------
def test_merged_file_has_exactly_the_sd2_keys_and_changes_only_the_adapted_weights(files, plain):
    merged, base = load_file(files[".safetensors"]), plain.state_dict()
    assert set(merged) == set(base)  # SD2 format: no base_layer level, no lora_ tensors
    adapter = load_file(files["model_dir"] / "ckpts" / "lora.safetensors")
    expected = {changed_weight_key(k) for k in adapter if ".lora_A." in k}
    assert any(k.startswith("cond_stage_model.") for k in expected) and len(expected) > 40
    assert {k for k in merged if not torch.equal(merged[k], base[k])} == expected
    ckpt = torch.load(files[".ckpt"], weights_only=True)
    assert list(ckpt) == ["state_dict"]
    assert set(ckpt["state_dict"]) == set(merged)
    assert all(torch.equal(ckpt["state_dict"][k], merged[k]) for k in merged)


def test_safetensors_header_says_where_the_merge_came_from(files):
    with safe_open(files[".safetensors"], "pt") as handle:
        header = json.loads(handle.metadata()[METADATA_KEY])
    assert header == {"merged_from": str(files["model_dir"] / "ckpts" / "lora.safetensors"), "base_checkpoint": None,
                      "prompt": PROMPT, "image_size": 64}


def test_random_init_merges_into_the_same_seeded_backbone(files, tmp_path):
    again = load_file(export_merged(files["model_dir"], tmp_path / "m.safetensors", random_init=True))
    merged = load_file(files[".safetensors"])
    assert set(again) == set(merged) and all(torch.equal(again[k], merged[k]) for k in merged)


# -- this project loads it -----------------------------------------------------------------------------
def test_the_adapters_change_the_fill(plain, inputs, adapted_fill):
    effect = (fill_here(RealFillPipeline(plain, resolution=64), inputs) - adapted_fill).abs().max().item()
    print(f"adapters vs none: max abs difference {effect:.3g}")
    assert effect > 100 * IMAGE_ATOL


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_merged_file_as_base_checkpoint_samples_as_the_adapted_model(suffix, files, inputs, adapted_fill):
    pipe = RealFillPipeline.from_model_dir(REALFILL_DIR, base_ckpt=files[suffix], device="cpu")
    assert pipe.loaded["adapters"] is None and pipe.loaded["base_ckpt"] == str(files[suffix])
    ours = fill_here(pipe, inputs)
    assert 0.05 < ours.abs().mean().item() < 10
    diff = (ours - adapted_fill).abs().max().item()
    print(f"this project, merged {suffix} vs adapters: max abs difference {diff:.3g}")
    assert diff <= MERGE_ATOL, f"max abs difference {diff:.3g} > {MERGE_ATOL}"


# -- diffusers loads it --------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_diffusers_from_single_file_fills_as_the_adapted_model_offline(suffix, files, diffusers_config, inputs,
                                                                        adapted, adapted_fill, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("the test is offline")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    pipe = diffusers.StableDiffusionInpaintPipeline.from_single_file(
        str(files[suffix]), config=str(diffusers_config), local_files_only=True, safety_checker=None)
    monkeypatch.undo()
    pipe.set_progress_bar_config(disable=True)
    texts = [PROMPT, ""]
    tokens = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(tokens.input_ids, adapted.cond_stage_model.tokenize(texts))
    image, mask = inputs
    draws = torch.Generator().manual_seed(SEED)  # x_T: the seed's second draw, after the posterior noise
    torch.randn(1, 4, 8, 8, generator=draws)
    x_T = torch.randn(1, 4, 8, 8, generator=draws)
    with torch.no_grad():
        latent = pipe(PROMPT, image=(image + 1) / 2, mask_image=mask, height=64, width=64,
                      num_inference_steps=STEPS, guidance_scale=CFG, negative_prompt="", eta=0.0, latents=x_T,
                      output_type="latent", generator=torch.Generator().manual_seed(SEED)).images
        theirs = pipe.vae.decode(latent / pipe.vae.config.scaling_factor).sample
    diff = (theirs - adapted_fill).abs().max().item()
    print(f"diffusers from_single_file({suffix}) vs adapters: max abs difference {diff:.3g}")
    assert diff <= IMAGE_ATOL, f"max abs difference {diff:.3g} > {IMAGE_ATOL}"


# -- bad input (issue 15, item 5) ----------------------------------------------------------------------
def test_a_config_only_directory_has_nothing_to_merge(tmp_path):
    with pytest.raises(ExportError, match="nothing to merge"):
        export_merged(REALFILL_DIR, tmp_path / "x.safetensors", random_init=True)
    assert not (tmp_path / "x.safetensors").exists()


def test_a_trained_file_without_an_adapter_has_nothing_to_merge(tmp_path):
    shutil.copy(REALFILL_CONFIG, tmp_path / CONFIG_NAME)
    key = "model.diffusion_model.out.2.bias"
    metadata = {"config": {"model": {}}, "trainable": {"unet": [key]}}
    save_file({key: torch.zeros(4)}, str(tmp_path / "run.safetensors"), metadata={METADATA_KEY: json.dumps(metadata)})
    with pytest.raises(ExportError, match=r"nothing to merge: its metadata names no LoRA adapter"):
        export_merged(tmp_path, tmp_path / "x.safetensors", random_init=True)


def test_leftrefill_prompt_tokens_are_refused_with_the_textual_inversion_route(tmp_path):
    shutil.copy(ROOT / "checkpoints" / "tiny_random" / CONFIG_NAME, tmp_path / CONFIG_NAME)
    save_file({TOKEN_KEY: torch.randn(50, 64)}, str(tmp_path / "tokens.safetensors"))
    with pytest.raises(ExportError, match=r"prompt tokens .*special_embeddings.* --format diffusers-ti"):
        export_merged(tmp_path, tmp_path / "x.safetensors", random_init=True)


@pytest.mark.parametrize("config_dir", ["tiny_random_nvs", "tiny_random_multiview"])
def test_a_model_whose_conditioning_sd2_cannot_hold_is_refused(config_dir, tmp_path):
    config = ROOT / "checkpoints" / config_dir / CONFIG_NAME
    model = build_random(model_builder(config), adapter=LORA["unet"])
    lora_dir(tmp_path / "model", model, config, extra=("special_embeddings", "pose_mlp"))
    why = "pose_mlp" if config_dir == "tiny_random_nvs" else "special_embeddings"
    with pytest.raises(ExportError, match=rf"{why}.*no place for them.*--format diffusers-lora"):
        export_merged(tmp_path / "model", tmp_path / "x.safetensors", random_init=True)


def test_wrong_suffix_and_the_base_itself_as_out_are_refused(files, tmp_path):
    with pytest.raises(ExportError, match=r"written as \.safetensors or \.ckpt, got '\.pt'"):
        export_merged(files["model_dir"], tmp_path / "x.pt", base_ckpt=files["base"])
    with pytest.raises(ExportError, match="is the base checkpoint"):
        export_merged(files["model_dir"], files["base"], base_ckpt=files["base"])


def test_adapters_trained_on_another_base_checkpoint_are_refused(adapted, files, tmp_path):
    record = {"name": "512-inpainting-ema.ckpt", "sha256": "0" * 64}
    model_dir = lora_dir(tmp_path / "model", adapted, base_record=record)
    with pytest.raises(CheckpointError, match="adapters only fit the base model they were trained on"):
        export_merged(model_dir, tmp_path / "x.safetensors", base_ckpt=files["base"])
    assert not (tmp_path / "x.safetensors").exists()


def test_export_cli_writes_a_merged_model_and_exits_2_on_bad_input(files, tmp_path):
    from scripts.export import main

    out = tmp_path / "merged.ckpt"
    model_dir, base = str(files["model_dir"]), str(files["base"])
    assert main(["--model_path", model_dir, "--format", "sd2", "--base_ckpt", base, "--out", str(out)]) == 0
    assert set(torch.load(out, weights_only=True)["state_dict"]) == set(load_file(files[".safetensors"]))
    assert main(["--model_path", model_dir, "--format", "sd2", "--base_ckpt", str(tmp_path / "none.ckpt"),
                 "--out", str(tmp_path / "x.ckpt")]) == 2  # base checkpoint not found
    assert main(["--model_path", str(REALFILL_DIR), "--format", "sd2", "--random_init",
                 "--out", str(tmp_path / "x.ckpt")]) == 2  # nothing to merge
    assert not (tmp_path / "x.ckpt").exists()
