"""Checkpoint I/O: exact key names, zero-copy loading, and one clear error per kind of bad file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError, read_state_dict
from ldm.latent_diffusion import load_model
from ldm.schedule import SCHEDULE_BUFFERS
from ldm.util import ConfigError
from tests.conftest import FULL_CONFIG, ROOT, TINY_CONFIG


def save_lightning(path: Path, state_dict: dict, **extra) -> Path:
    torch.save({"epoch": 0, "global_step": 1, "state_dict": state_dict, **extra}, path)
    return path


def test_state_dict_keys_are_those_of_the_original_checkpoint(tiny_state_dict):
    prefixes = {k.split(".")[0] if not k.startswith("model.") else ".".join(k.split(".")[:2]) for k in tiny_state_dict}
    assert prefixes == {"model.diffusion_model", "first_stage_model", "cond_stage_model"} | set(SCHEDULE_BUFFERS)
    for key in ["model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.output_blocks.2.1.transformer_blocks.0.attn2.to_out.0.bias",
                "model.diffusion_model.time_embed.2.weight", "model.diffusion_model.out.2.weight",
                "first_stage_model.encoder.down.0.downsample.conv.weight", "first_stage_model.decoder.mid.attn_1.q.weight",
                "first_stage_model.decoder.up.1.upsample.conv.weight", "first_stage_model.quant_conv.weight",
                "cond_stage_model.model.token_embedding.weight", "cond_stage_model.model.positional_embedding",
                "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
                "cond_stage_model.model.ln_final.weight", "cond_stage_model.model.text_projection",
                "cond_stage_model.model.logit_scale"]:
        assert key in tiny_state_dict, key
    assert tiny_state_dict["model.diffusion_model.input_blocks.0.0.weight"].shape == (32, 9, 3, 3)


@pytest.mark.parametrize("fmt", ["ckpt", "bare.pt", "safetensors"])
def test_roundtrip_loads_every_tensor_exactly(tmp_path, tiny_state_dict, fmt):
    path = tmp_path / f"model.{fmt}"
    if fmt == "ckpt":
        ema = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}
        save_lightning(path, {**tiny_state_dict, **ema})  # model_ema.* is not a weight: ignored
    elif fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in tiny_state_dict.items()}, str(path))
    else:
        torch.save(tiny_state_dict, path)
    loaded = load_model(TINY_CONFIG, path).state_dict()
    assert loaded.keys() == tiny_state_dict.keys()
    for key, value in tiny_state_dict.items():
        assert torch.equal(loaded[key], value), key


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_weights_are_memory_mapped_not_copied(tmp_path, tiny_state_dict):
    path = save_lightning(tmp_path / "model.ckpt", tiny_state_dict)
    model = load_model(TINY_CONFIG, path)
    ranges = _mapped_ranges(path)
    assert ranges, "the checkpoint should be memory-mapped"
    params = list(model.parameters())
    inside = [p for p in params if any(s <= p.data_ptr() < e for s, e in ranges)]
    assert len(inside) == len(params), "every parameter should point into the mapped file (no copy in RAM)"
    assert not any(p.is_meta for p in params)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nowhere\.ckpt"):
        read_state_dict(tmp_path / "nowhere.ckpt")


def test_truncated_checkpoint_says_so(tmp_path, tiny_state_dict):
    path = save_lightning(tmp_path / "model.ckpt", tiny_state_dict)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.ckpt: incomplete checkpoint .*truncated download"):
        load_model(TINY_CONFIG, path)


@pytest.mark.parametrize("content", [b"", b"hello, this is not a checkpoint\n"])
def test_non_checkpoint_file_is_rejected(tmp_path, content):
    path = tmp_path / "notes.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"notes\.ckpt: not a PyTorch checkpoint"):
        read_state_dict(path)


def test_truncated_safetensors_is_rejected(tmp_path, tiny_state_dict):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(10)}, str(path))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        read_state_dict(path)


class Payload:
    """Anything that is not a tensor or a plain container: unpickling it needs code."""


def test_pickle_that_needs_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refusing to load: .*pickled Python objects .*"
                                              r"\(the global test_checkpoint\.Payload\)"):
        read_state_dict(path)


def test_state_dict_keys_must_be_strings(tmp_path):
    path = tmp_path / "int_keys.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2), 3: torch.ones(1), (4, 5): torch.ones(1)}}, path)
    with pytest.raises(CheckpointError, match=r"int_keys\.ckpt: state dict keys that are not strings: int, tuple$"):
        read_state_dict(path)


def test_text_to_image_checkpoint_names_the_key_and_shapes(tmp_path, tiny_state_dict):
    state_dict = dict(tiny_state_dict)
    state_dict["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 4, 3, 3)
    path = save_lightning(tmp_path / "sd2_txt2img.ckpt", state_dict)
    with pytest.raises(CheckpointError) as info:
        load_model(TINY_CONFIG, path)
    message = str(info.value)
    assert "sd2_txt2img.ckpt" in message
    assert ("'model.diffusion_model.input_blocks.0.0.weight' has shape [32, 4, 3, 3] in the checkpoint "
            "but [32, 9, 3, 3] in the model") in message
    assert "takes 4 input channels" in message


def test_report_groups_missing_and_unexpected_keys_by_submodule(tmp_path, tiny_state_dict):
    state_dict = {k: v for k, v in tiny_state_dict.items() if not k.startswith("first_stage_model.decoder.")}
    state_dict["cond_stage_model.model.visual.proj"] = torch.zeros(3)
    path = save_lightning(tmp_path / "partial.ckpt", state_dict)
    with pytest.raises(CheckpointError) as info:
        load_model(TINY_CONFIG, path)
    message = str(info.value)
    assert re.search(r"first_stage_model: \d+ key\(s\) missing from the checkpoint: first_stage_model\.decoder\.", message)
    assert "cond_stage_model: 1 key(s) not in the model: cond_stage_model.model.visual.proj" in message
    assert "model.diffusion_model" not in message  # the UNet is fine and not mentioned


def test_other_noise_schedule_is_rejected(tmp_path, tiny_state_dict):
    state_dict = dict(tiny_state_dict)
    state_dict["alphas_cumprod"] = state_dict["alphas_cumprod"] * 0.99
    path = save_lightning(tmp_path / "other_schedule.ckpt", state_dict)
    with pytest.raises(CheckpointError, match=r"other_schedule\.ckpt: 'alphas_cumprod' differs .*noise schedule"):
        load_model(TINY_CONFIG, path)


def test_schedule_buffers_may_be_absent(tmp_path, tiny_state_dict):
    state_dict = {k: v for k, v in tiny_state_dict.items() if k not in SCHEDULE_BUFFERS}
    model = load_model(TINY_CONFIG, save_lightning(tmp_path / "weights_only.ckpt", state_dict))
    assert torch.equal(model.alphas_cumprod, tiny_state_dict["alphas_cumprod"])


def test_config_with_unknown_target_names_file_and_node(tmp_path):
    text = TINY_CONFIG.read_text().replace("target: ldm.unet.UNetModel", "target: ldm.unet.UNetModell")
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"typo\.yaml: model\.params\.unet_config\.target: unknown target "
                                          r"'ldm\.unet\.UNetModell': module 'ldm\.unet' has no attribute 'UNetModell'"):
        load_model(path)
    path.write_text(text.replace("ldm.unet.UNetModell", "ldm.nonexistent.UNetModel"))
    with pytest.raises(ConfigError, match=r"cannot import module 'ldm\.nonexistent'"):
        load_model(path)


def test_config_with_unknown_parameter_names_it(tmp_path):
    path = tmp_path / "extra.yaml"
    path.write_text(TINY_CONFIG.read_text().replace("num_res_blocks: 1\n        channel_mult",
                                                    "num_res_blocks: 1\n        num_res_blokcs: 2\n        channel_mult"))
    with pytest.raises(ConfigError, match=r"extra\.yaml: model\.params\.unet_config: UNetModel has no parameter\(s\) \['num_res_blokcs'\]"):
        load_model(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*absent\.yaml"):
        load_model(tmp_path / "absent.yaml")


def test_full_config_targets_resolve():
    from ldm.util import load_config

    config = load_config(FULL_CONFIG)
    assert config.model.params.unet_config.params.in_channels == 9


def test_parameter_typo_in_a_subclass_that_forwards_kwargs_is_named(tmp_path):
    path = tmp_path / "token_typo.yaml"
    config = (ROOT / "checkpoints" / "tiny_random" / "model_config.yaml").read_text()
    assert "num_tokens: 50" in config
    path.write_text(config.replace("num_tokens: 50", "num_tokens: 50\n        max_lenght: 77"))
    with pytest.raises(ConfigError, match=r"token_typo\.yaml: model\.params\.cond_stage_config: PromptCLIPEmbedder "
                                          r"has no parameter\(s\) \['max_lenght'\]; it takes: num_tokens, .*arch"):
        load_model(path)
