"""Exported prompt tokens work in diffusers exactly as here, and the export / import paths refuse bad input.

The proof builds diffusers' ``StableDiffusionInpaintPipeline`` from this project's tiny random (non-zero)
weights through diffusers' own single-file converters (as tests/test_parity.py), loads the exported
textual-inversion file with ``load_textual_inversion`` and fills one stitched canvas [reference | target]
in both: the same canvas, mask, initial noise x_T and masked-image latent, DDIM with eta 0, guidance 2.5
against the empty prompt. Both sides sample the masked-image latent from the VAE posterior with the
generator they are given, before any other draw from it (this project: ``ldm.fill`` encodes the masked
image and then draws x_T; diffusers: ``prepare_mask_latents`` is the first draw when ``latents=`` is
passed), so one seed gives both the same posterior noise; x_T is that seed's second draw, passed to
diffusers as ``latents`` (scaled by DDIM's ``init_noise_sigma`` = 1). Diffusers' result is decoded with its
own VAE and composited hard like ours.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.checkpoint import read_state_dict
from ldm.latent_diffusion import model_builder
from ldm.sampling import ddim_timesteps
from leftrefill.canvas import canvas_mask, right_half, stitch
from leftrefill.export_tokens import (A1111_SAFETENSORS_KEY, ExportError, export_tokens, import_textual_inversion,
                                      read_embedding, read_tokens)
from leftrefill.inpaint import inpaint
from leftrefill.model_dir import CONFIG_NAME, TOKEN_KEY, build_random, load_trained
from tests.conftest import ROOT

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

from tests.test_parity import diffusers_unet, original_config  # noqa: E402

TINY_DIR = ROOT / "checkpoints" / "tiny_random"
TINY_MODEL_CONFIG = TINY_DIR / CONFIG_NAME
RELEASED = ROOT / "checkpoints" / "ref_guided_inpainting" / "ckpts" / "epoch=7-step=6039.ckpt"
TOKEN = "<leftrefill>"
STEPS, CFG, SEED = 25, 2.5, 7  # 25 DDIM steps keep the CPU test short; 50 measured 1.6e-6 as well
IMAGE_ATOL = 1e-4  # fp32 images of order 0.1..1 after the DDIM loop (measured: 1.3e-6; 1.6e-6 at 50 steps)
CONTEXT_ATOL = 1e-5  # measured: 0 (the same operations in the same order)


@pytest.fixture(scope="module")
def tiny_leftrefill():
    """The tiny LeftRefill model with seeded random non-zero weights (prompt tokens included)."""
    return build_random(model_builder(TINY_MODEL_CONFIG)).eval()


@pytest.fixture(scope="module")
def model_dir(tiny_leftrefill, tmp_path_factory):
    """A model directory holding the tiny config and the tiny model's token table as its trained file."""
    folder = tmp_path_factory.mktemp("tiny_tokens")
    shutil.copy(TINY_MODEL_CONFIG, folder / CONFIG_NAME)
    (folder / "ckpts").mkdir()
    tokens = tiny_leftrefill.cond_stage_model.special_embeddings.weight.detach().clone()
    save_file({TOKEN_KEY: tokens}, str(folder / "ckpts" / "tokens.safetensors"))
    return folder


def openclip_tokenizer(folder):
    """A transformers CLIPTokenizer with OpenCLIP's BPE vocabulary and merges (the files written to
    ``folder`` from open_clip's own tables) and SD2's padding token "!" (id 0): it tokenises like the
    project's OpenCLIP tokenizer (checked in the test)."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): index for token, index in bpe.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!",
                                        model_max_length=77)


def clip_text_model(state_dict: dict, width: int, layers: int):
    """SD2's text encoder as diffusers holds it: a CLIPTextModel of ``layers`` - 1 layers (penultimate
    layer + final layer norm), converted by diffusers' open_clip converter."""
    last = f"cond_stage_model.model.transformer.resblocks.{layers - 1}."
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(last) and "special_embeddings" not in k}
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_attention_heads=4,
        num_hidden_layers=layers - 1, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
        projection_dim=width, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    model = transformers.CLIPTextModel(config).eval()
    converted = sfu.convert_open_clip_checkpoint(model, state_dict)
    prefix = "" if any(k.startswith("text_model.") for k in model.state_dict()) else "text_model."
    converted = {k.removeprefix(prefix): v for k, v in converted.items()}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k]
    return model


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_leftrefill, tmp_path_factory):
    """diffusers' StableDiffusionInpaintPipeline from the tiny model's weights, with SD2's DDIM scheduler."""
    state_dict = {k: v.detach().clone() for k, v in tiny_leftrefill.state_dict().items()}
    config = original_config(TINY_MODEL_CONFIG)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(config, state_dict)
    vae = diffusers.AutoencoderKL(**vae_config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state_dict, vae_config), strict=True)
    text_cfg = config["model"]["params"]["cond_stage_config"]["params"]["text_cfg"]
    scheduler = diffusers.DDIMScheduler(  # SD2's scheduler_config.json
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=clip_text_model(state_dict, text_cfg["width"], text_cfg["layers"]),
        tokenizer=openclip_tokenizer(tmp_path_factory.mktemp("tokenizer")), unet=diffusers_unet(config, state_dict),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe_with_tokens(diffusers_pipe, model_dir, tmp_path_factory):
    path = export_tokens(model_dir, "diffusers-ti", tmp_path_factory.mktemp("ti") / "leftrefill.safetensors", TOKEN)
    diffusers_pipe.load_textual_inversion(str(path), token=TOKEN)
    return diffusers_pipe


def test_openclip_tokenizer_in_transformers_tokenises_like_the_project(diffusers_pipe, tiny_leftrefill):
    # Not "!": as in SD2's own tokenizer on the Hub, the padding token "!" is a special token there, so a
    # literal "!" becomes id 0 instead of OpenCLIP's "!</w>" (256). No LeftRefill prompt holds one.
    texts = ["a photograph of an astronaut riding a horse", "", "Scene/landmark, splited?"]
    theirs = diffusers_pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                                      return_tensors="pt").input_ids
    assert torch.equal(theirs, tiny_leftrefill.cond_stage_model.tokenize(texts))


@pytest.mark.parametrize("steps", [STEPS, 50])
def test_diffusers_timesteps_equal_ldm_ddim_timesteps(diffusers_pipe, steps):
    scheduler = diffusers.DDIMScheduler.from_config(diffusers_pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    assert torch.equal(scheduler.timesteps.flip(0), ddim_timesteps(steps))


def test_exported_embedding_gives_the_leftrefill_context_in_diffusers(pipe_with_tokens, tiny_leftrefill):
    ours = tiny_leftrefill.cond_stage_model
    with torch.no_grad():
        cond, uncond = pipe_with_tokens.encode_prompt(TOKEN, "cpu", 1, True, negative_prompt="")
        expected_cond, expected_uncond = ours.context({}, 1), ours.empty_context(1)
    assert (cond - uncond).abs().max() > 0.1  # the learned tokens matter
    assert (cond - expected_cond).abs().max().item() <= CONTEXT_ATOL
    assert (uncond - expected_uncond).abs().max().item() <= CONTEXT_ATOL


def test_exported_embedding_fills_the_canvas_in_diffusers_as_here(pipe_with_tokens, tiny_leftrefill):
    generator = torch.Generator().manual_seed(0)
    reference, target = (torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1 for _ in range(2))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1
    ours = inpaint(tiny_leftrefill, reference, target, mask, sampler="ddim", steps=STEPS, cfg=CFG, eta=0.0,
                   generator=torch.Generator().manual_seed(SEED))
    # the same x_T: the second draw of the seed, after the masked-image posterior noise (1, 4, 8, 16)
    draws = torch.Generator().manual_seed(SEED)
    torch.randn(1, 4, 8, 16, generator=draws)
    x_T = torch.randn(1, 4, 8, 16, generator=draws)
    canvas, fill_mask = stitch(reference, target), canvas_mask(mask)  # (1, 3, 64, 128), (1, 1, 64, 128)
    pipe = pipe_with_tokens  # its image input is in [0, 1] (it maps it to [-1, 1] itself)
    with torch.no_grad():
        latent = pipe(TOKEN, image=(canvas + 1) / 2, mask_image=fill_mask, height=64, width=128,
                      num_inference_steps=STEPS, guidance_scale=CFG, negative_prompt="", eta=0.0, latents=x_T,
                      output_type="latent", generator=torch.Generator().manual_seed(SEED)).images
        decoded = pipe.vae.decode(latent / pipe.vae.config.scaling_factor).sample
    theirs = right_half(torch.where(fill_mask > 0.5, decoded, canvas))
    assert 0.05 < ours.abs().mean().item() < 10
    assert (ours - target).abs().max() > 0.1  # something was filled
    diff = (ours - theirs).abs().max().item()
    assert diff <= IMAGE_ATOL, f"max abs difference {diff:.3g} > {IMAGE_ATOL}"


# -- formats and round trips ---------------------------------------------------------------------------
def test_every_format_round_trips_the_token_table(model_dir, tmp_path):
    tokens = read_tokens(model_dir)
    assert tokens.shape == (50, 64)
    diffusers_file = export_tokens(model_dir, "diffusers-ti", tmp_path / "ti.safetensors", TOKEN)
    assert set(load_file(diffusers_file)) == {TOKEN}
    a1111_pt = export_tokens(model_dir, "a1111", tmp_path / "a1111.pt")
    saved = torch.load(a1111_pt, weights_only=True)
    assert saved["string_to_token"] == {"*": 265} and saved["name"] == "leftrefill"
    a1111_st = export_tokens(model_dir, "a1111", tmp_path / "a1111.safetensors")
    assert set(load_file(a1111_st)) == {A1111_SAFETENSORS_KEY}
    for path in (diffusers_file, a1111_pt, a1111_st):
        assert torch.equal(read_embedding(path).vectors, tokens)


def test_released_tokens_export_as_one_diffusers_embedding_and_import_back(tmp_path):
    released = read_state_dict(RELEASED)[TOKEN_KEY]
    exported = load_file(export_tokens(RELEASED.parents[1], "diffusers-ti", tmp_path / "leftrefill.safetensors"))
    assert list(exported) == [TOKEN] and exported[TOKEN].shape == (50, 1024)
    assert torch.equal(exported[TOKEN], released.float())
    imported = import_textual_inversion(tmp_path / "leftrefill.safetensors", tmp_path / "model")
    assert (imported / CONFIG_NAME).read_bytes() == (RELEASED.parents[1] / CONFIG_NAME).read_bytes()
    assert torch.equal(read_tokens(imported), released.float())


def test_imported_embedding_loads_as_a_model_directory(model_dir, tiny_leftrefill, tmp_path):
    exported = export_tokens(model_dir, "diffusers-ti", tmp_path / "ti.safetensors", TOKEN)
    imported = import_textual_inversion(exported, tmp_path / "imported", TINY_MODEL_CONFIG)
    assert torch.equal(read_tokens(imported), read_tokens(model_dir))
    model = build_random(model_builder(imported / CONFIG_NAME))
    load_trained(model, imported / "ckpts" / "prompt_tokens.safetensors")
    assert torch.equal(model.cond_stage_model.special_embeddings.weight, tiny_leftrefill.cond_stage_model
                       .special_embeddings.weight)


def test_import_of_another_token_count_writes_a_config_for_it(tmp_path):
    save_file({TOKEN: torch.randn(7, 64)}, str(tmp_path / "seven.safetensors"))
    imported = import_textual_inversion(tmp_path / "seven.safetensors", tmp_path / "seven", TINY_MODEL_CONFIG)
    assert read_tokens(imported).shape == (7, 64)


# -- bad input (issue 15, item 5) ----------------------------------------------------------------------
def test_exporting_a_config_only_directory_is_one_clear_error(tmp_path):
    with pytest.raises(ExportError, match="nothing to export"):
        export_tokens(TINY_DIR, "diffusers-ti", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_importing_an_embedding_of_another_width_names_both_widths(tmp_path):
    save_file({TOKEN: torch.randn(50, 768)}, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(ExportError, match=r"width 768.*width 64"):
        import_textual_inversion(tmp_path / "sd1.safetensors", tmp_path / "out", TINY_MODEL_CONFIG)
    assert not (tmp_path / "out").exists()


def test_export_cli_exits_2_on_bad_input(model_dir, tmp_path):
    from scripts.export import main

    assert main(["--model_path", str(TINY_DIR), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main(["--model_path", str(model_dir), "--format", "a1111", "--out", str(tmp_path / "x.bin")]) == 2
    assert main(["--model_path", str(model_dir), "--format", "a1111", "--out", str(tmp_path / "x.pt")]) == 0


@pytest.mark.parametrize("config_dir, why", [("tiny_random_nvs", "cannot carry"),
                                             ("tiny_random_multiview", "cannot carry"),
                                             ("tiny_random_realfill", "no learned prompt tokens")])
def test_exporting_a_conditioner_a_textual_inversion_cannot_carry_is_refused(config_dir, why, tmp_path):
    shutil.copy(ROOT / "checkpoints" / config_dir / CONFIG_NAME, tmp_path / CONFIG_NAME)
    save_file({TOKEN_KEY: torch.randn(50, 64)}, str(tmp_path / "tokens.safetensors"))
    with pytest.raises(ExportError, match=why):
        export_tokens(tmp_path, "diffusers-ti", tmp_path / "x.safetensors")


def test_exporting_tokens_beside_other_trained_tensors_is_refused(model_dir, tmp_path):
    tokens = load_file(model_dir / "ckpts" / "tokens.safetensors")[TOKEN_KEY]
    lora = "model.diffusion_model.out.2.lora_A.weight"
    metadata = {"leftrefill": json.dumps({"trainable": {"tokens": [TOKEN_KEY], "lora": [lora]}})}
    shutil.copy(TINY_MODEL_CONFIG, tmp_path / CONFIG_NAME)
    save_file({TOKEN_KEY: tokens, lora: torch.randn(4, 32)}, str(tmp_path / "run.safetensors"), metadata=metadata)
    with pytest.raises(ExportError, match="more than the prompt tokens"):
        export_tokens(tmp_path, "diffusers-ti", tmp_path / "x.safetensors")
