"""The UNet, VAE and text encoder equal independent implementations (diffusers, transformers) given the
same weights, converted from this project's state dict by diffusers' own single-file converters."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import FULL_CONFIG, TINY_CONFIG, perturb_

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

ATOL = 1e-4  # fp32, for outputs of order 0.1..1 (asserted below)


def original_config(path) -> dict:
    """The config as the plain dict diffusers' config converters read. They also need the original's
    ``use_linear_in_transformer`` flag, which this project's UNet does not take (SD2 is always linear)."""
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    config["model"]["params"]["unet_config"]["params"]["use_linear_in_transformer"] = True
    return config


def assert_close_and_nontrivial(ours: torch.Tensor, reference: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.shape == reference.shape
    assert 0.05 < ours.abs().mean().item() < 10, "outputs should be of order 0.1..1, not trivially small"
    diff = (ours - reference).abs().max().item()
    print(f"max abs difference {diff:.3g}, mean abs output {ours.abs().mean().item():.3g}")
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol}"


def diffusers_unet(config: dict, state_dict: dict):
    unet_config = sfu.create_unet_diffusers_config_from_ldm(config, state_dict)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = sfu.convert_ldm_unet_checkpoint(state_dict, unet_config)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_config)
    unet.load_state_dict(converted, strict=True, assign=True)
    return unet.eval()


def test_unet_matches_diffusers(tiny_model, tiny_state_dict):
    reference = diffusers_unet(original_config(TINY_CONFIG), tiny_state_dict)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 16, 24, generator=generator)  # non-square latent, like the 1:2 canvas
    t = torch.tensor([3, 977])
    context = torch.randn(2, 77, 64, generator=generator)
    with torch.no_grad():
        ours = tiny_model.model.diffusion_model(x, t, context)
        theirs = reference(x, t, encoder_hidden_states=context).sample
    assert_close_and_nontrivial(ours, theirs)


def test_vae_matches_diffusers(tiny_model, tiny_state_dict):
    config = original_config(TINY_CONFIG)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(config, tiny_state_dict)
    reference = diffusers.AutoencoderKL(**vae_config).eval()
    reference.load_state_dict(sfu.convert_ldm_vae_checkpoint(tiny_state_dict, vae_config), strict=True)
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 64, 96, generator=generator) * 2 - 1
    latent = torch.randn(2, 4, 8, 12, generator=generator)
    vae = tiny_model.first_stage_model
    with torch.no_grad():
        posterior, reference_posterior = vae.encode(image), reference.encode(image).latent_dist
        assert_close_and_nontrivial(posterior.mean, reference_posterior.mean)
        assert_close_and_nontrivial(posterior.std, reference_posterior.std)
        assert_close_and_nontrivial(vae.decode(latent), reference.decode(latent).sample)


def test_text_encoder_matches_transformers_clip(tiny_model, tiny_state_dict):
    # SD2's penultimate layer + ln_final equals a CLIPTextModel with one layer fewer (diffusers' SD2
    # text encoder has 23 of 24 layers), so the last open_clip block is left out of the conversion.
    last = "cond_stage_model.model.transformer.resblocks.2."
    state_dict = {k: v for k, v in tiny_state_dict.items() if not k.startswith(last)}
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=64,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    reference = transformers.CLIPTextModel(config).eval()
    converted = sfu.convert_open_clip_checkpoint(reference, state_dict)
    prefix = "" if any(k.startswith("text_model.") for k in reference.state_dict()) else "text_model."
    converted = {k.removeprefix(prefix) if prefix else k: v for k, v in converted.items()}
    missing, unexpected = reference.load_state_dict(converted, strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k]

    encoder = tiny_model.cond_stage_model
    tokens = encoder.tokenize(["a photograph of an astronaut riding a horse", ""])
    assert tokens.shape == (2, 77)
    assert tokens[1, :3].tolist() == [49406, 49407, 0]  # SOT, EOT, padding id 0
    with torch.no_grad():
        ours = encoder(["a photograph of an astronaut riding a horse", ""])
        theirs = reference(input_ids=tokens).last_hidden_state
    assert ours.shape == (2, 77, 64)
    assert_close_and_nontrivial(ours, theirs)


@pytest.mark.slow
def test_full_size_sd2_unet_matches_diffusers():
    """The real SD2 inpainting UNet configuration (865M parameters) at a small 16x24 latent."""
    from ldm.util import instantiate_from_config

    config = original_config(FULL_CONFIG)
    unet = instantiate_from_config(OmegaConf.load(FULL_CONFIG).model.params.unet_config).eval()
    # 865,910,724 parameters in SD2's text-to-image UNet + 5 extra input channels x 320 x 3 x 3.
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724 + 5 * 320 * 9
    perturb_(unet, seed=3)
    with torch.no_grad():
        unet.out[2].weight.mul_(4)  # lift the output to order 0.1..1 so that the tolerance means something
    state_dict = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    reference = diffusers_unet(config, state_dict)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 9, 16, 24, generator=generator)
    t = torch.tensor([501])
    context = torch.randn(1, 77, 1024, generator=generator)
    with torch.no_grad():
        ours = unet(x, t, context)
        theirs = reference(x, t, encoder_hidden_states=context).sample
    del reference, state_dict
    gc.collect()
    assert_close_and_nontrivial(ours, theirs)
