"""The declared trainable set, the checkpoint metadata, the strict loader, and flat vs nested configs."""

from __future__ import annotations

import hashlib

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT
from ldm.checkpoint import CheckpointError
from ldm.latent_diffusion import model_builder
from ldm.util import ConfigError
from leftrefill.model_dir import TOKEN_KEY, build_random, load_with_base, read_prompt_tokens, read_trained
from leftrefill.train_config import TrainableGroup, load_training_config
from leftrefill.trainable import freeze_all_but, resolve_groups
from leftrefill.trainer import build_training_model, train
from leftrefill.training_module import LeftRefillModule

CONFIGS = ROOT / "configs"
TINY_MODEL = ROOT / "checkpoints" / "tiny_random" / "model_config.yaml"
UNET_OUT = "model.diffusion_model.out.*"  # the UNet's last norm and conv: 4 tensors
TWO_GROUPS = f"""  - name: unet_out
    parameters: ['{UNET_OUT}']
    lr: 1.0e-2
    weight_decay: 0.0
"""
FAST = ["num_workers=0", "val_image_path=null", "image_size=64"]


@pytest.fixture(scope="module")
def tiny():
    return build_random(model_builder(TINY_MODEL))


def group(name: str, *parameters: str, lr: float = 1e-3) -> TrainableGroup:
    return TrainableGroup(name=name, parameters=list(parameters), lr=lr)


def two_group_config(tmp_path):
    text = (CONFIGS / "tiny_ref_inpainting.yaml").read_text()
    text = text.replace("    lr: 1.0e-3\n", "    lr: 1.0e-3\n" + TWO_GROUPS)  # after the prompt-token group
    path = tmp_path / "two_groups.yaml"
    path.write_text(text)
    return path


def save_base(model, path):
    torch.save({"state_dict": {k: v for k, v in model.state_dict().items() if k != TOKEN_KEY}}, path)
    return path


# -- groups ------------------------------------------------------------------------------------------------
def test_groups_take_exact_names_and_patterns_in_model_order(tiny):
    tokens, unet = resolve_groups(tiny, [group("tokens", TOKEN_KEY), group("unet_out", UNET_OUT, lr=0.5)])
    assert tokens.names == (TOKEN_KEY,)
    expected = [n for n, _ in tiny.named_parameters() if n.startswith("model.diffusion_model.out.")]
    assert list(unet.names) == expected and len(expected) == 4 and unet.lr == 0.5


def test_a_pattern_that_matches_nothing_is_named(tiny):
    with pytest.raises(ConfigError, match=r"trainable group 'x': 'model\.diffusion_model\.outt\.\*' matches no "
                                          r"parameter of the model"):
        resolve_groups(tiny, [group("x", "model.diffusion_model.outt.*")])


def test_a_parameter_in_two_groups_is_refused(tiny):
    with pytest.raises(ConfigError, match=r"parameter 'model\.diffusion_model\.out\.2\.weight' is in two trainable "
                                          r"groups: 'a' and 'b'"):
        resolve_groups(tiny, [group("a", UNET_OUT), group("b", "model.diffusion_model.out.2.weight")])


def test_frozen_parameters_get_no_gradient_and_stay_in_eval_mode(tmp_path):
    config = load_training_config(two_group_config(tmp_path), FAST)
    module = LeftRefillModule(build_training_model(config.model.config, None, random_init=True), config).train()
    names = [n for n, _ in module.model.named_parameters()]
    trained = {TOKEN_KEY} | {n for n in names if n.startswith("model.diffusion_model.out.")}
    assert {n for n, p in module.model.named_parameters() if p.requires_grad} == trained
    canvas, mask = torch.rand(1, 3, 64, 128) * 2 - 1, torch.ones(1, 1, 64, 128)
    module.loss(canvas, mask).backward()
    for name, parameter in module.model.named_parameters():
        assert (parameter.grad is not None) == (name in trained), name
    assert module.model.model.diffusion_model.out.training and not module.model.first_stage_model.training
    assert not module.model.model.diffusion_model.input_blocks.training
    optimizer = module.configure_optimizers()
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        ("prompt_tokens", 1e-3, 0.01), ("unet_out", 1e-2, 0.0)]


# -- a two-group run: what trains and what the checkpoint holds --------------------------------------------
def test_a_two_group_run_trains_exactly_those_tensors_and_saves_them_with_metadata(tmp_path):
    start = build_training_model(TINY_MODEL, None, random_init=True)
    base = save_base(start, tmp_path / "base.ckpt")
    config = load_training_config(two_group_config(tmp_path), [*FAST, "max_steps=2", "max_epochs=-1",
                                                                 "random_init=false", f"resume_path={base}"])
    trainer = train(config, tmp_path / "run", accelerator="cpu")
    before, after = start.state_dict(), trainer.lightning_module.model.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    unet_out = {n for n, _ in start.named_parameters() if n.startswith("model.diffusion_model.out.")}
    assert changed == {TOKEN_KEY} | unet_out

    checkpoint = torch.load(tmp_path / "run" / "ckpts" / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {TOKEN_KEY} | unet_out
    assert all(torch.equal(checkpoint["state_dict"][k], after[k]) for k in checkpoint["state_dict"])
    metadata = checkpoint["leftrefill"]
    assert metadata["trainable"] == {"prompt_tokens": [TOKEN_KEY],
                                     "unet_out": [n for n, _ in start.named_parameters() if n in unet_out]}
    assert metadata["base_checkpoint"] == {"name": "base.ckpt", "sha256": hashlib.sha256(base.read_bytes()).hexdigest()}
    assert metadata["config"] == OmegaConf.to_container(config, resolve=True)
    assert [g["lr"] for g in checkpoint["optimizer_states"][0]["param_groups"]] == [1e-3, 1e-2]

    # The loader takes the whole set back, over the base checkpoint.
    loaded = load_with_base(model_builder(TINY_MODEL), base, tmp_path / "run" / "ckpts" / "last.ckpt").state_dict()
    assert all(torch.equal(loaded[key], after[key]) for key in after)


# -- the strict loader -------------------------------------------------------------------------------------
def test_the_loader_refuses_a_key_outside_the_trainable_set_naming_it(tiny, tmp_path):
    tokens = tiny.state_dict()[TOKEN_KEY]
    extra = "model.diffusion_model.out.2.weight"
    with_metadata = tmp_path / "declared.ckpt"
    torch.save({"state_dict": {TOKEN_KEY: tokens, extra: tiny.state_dict()[extra]},
                "leftrefill": {"trainable": {"prompt_tokens": [TOKEN_KEY]}}}, with_metadata)
    without_metadata = tmp_path / "old.ckpt"
    torch.save({"state_dict": {TOKEN_KEY: tokens, extra: tiny.state_dict()[extra]}}, without_metadata)
    for path in (with_metadata, without_metadata):
        with pytest.raises(CheckpointError, match=rf"holds {extra}, outside") as info:
            read_trained(path, tiny)
        assert str(path) in str(info.value)
        with pytest.raises(CheckpointError, match=rf"holds {extra}, outside"):
            read_prompt_tokens(path, tuple(tokens.shape))


def test_the_loader_refuses_a_declared_tensor_of_the_wrong_shape(tiny, tmp_path):
    key = "model.diffusion_model.out.2.bias"
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {key: torch.zeros(3)}, "leftrefill": {"trainable": {"unet_out": [key]}}}, path)
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape \[3\], but the model's parameter has \[4\]"):
        read_trained(path, tiny)


def test_the_released_token_checkpoint_still_loads():
    released = ROOT / "checkpoints" / "ref_guided_inpainting" / "ckpts" / "epoch=7-step=6039.ckpt"
    with torch.device("meta"):
        model = model_builder(ROOT / "checkpoints" / "ref_guided_inpainting" / "model_config.yaml")()
    trained = read_trained(released, model)
    assert list(trained) == [TOKEN_KEY] and trained[TOKEN_KEY].shape == (50, 1024)
    assert torch.equal(read_prompt_tokens(released, (50, 1024))[TOKEN_KEY], trained[TOKEN_KEY])


def test_a_checkpoint_written_before_the_metadata_still_loads_and_resumes(tmp_path):
    """Made as the pre-issue-11 code wrote it: the tokens and Lightning's trainer state, no metadata."""
    run = tmp_path / "run"
    first = train(load_training_config(CONFIGS / "tiny_training_config.yaml", [*FAST, "max_steps=1", "max_epochs=-1"]),
                  run, accelerator="cpu")
    old = tmp_path / "old" / "ckpts" / "last.ckpt"
    old.parent.mkdir(parents=True)
    checkpoint = torch.load(run / "ckpts" / "last.ckpt", weights_only=True)
    del checkpoint["leftrefill"]
    assert {"state_dict", "epoch", "global_step", "optimizer_states", "loops"} <= set(checkpoint)
    torch.save(checkpoint, old)
    tokens = first.lightning_module.tokens.detach()
    assert torch.equal(read_prompt_tokens(old, tuple(tokens.shape))[TOKEN_KEY], tokens)
    base = save_base(first.lightning_module.model, tmp_path / "base.ckpt")
    loaded = load_with_base(model_builder(TINY_MODEL), base, old)
    assert torch.equal(loaded.cond_stage_model.special_embeddings.weight, tokens)
    resumed = train(load_training_config(CONFIGS / "tiny_ref_inpainting.yaml", [*FAST, "max_steps=2"]),
                    tmp_path / "resumed", accelerator="cpu", resume=old)
    assert resumed.global_step == 2


# -- configs -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flat, nested", [("tiny_training_config.yaml", "tiny_ref_inpainting.yaml"),
                                          ("ref_inpainting_training_config.yaml", "ref_inpainting.yaml")])
def test_flat_and_nested_configs_resolve_to_the_same_training(flat, nested):
    overrides = ["max_steps=3", "val_image_path=null", "optim_cfg.lr_scheduler=cosine"]
    resolved = [OmegaConf.to_container(load_training_config(CONFIGS / name, overrides)) for name in (flat, nested)]
    assert resolved[0] == resolved[1]
    assert resolved[0]["trainer"]["max_steps"] == 3 and resolved[0]["validation"]["image_path"] is None


def test_flat_learning_rate_goes_to_the_prompt_token_group():
    config = load_training_config(CONFIGS / "ref_inpainting_training_config.yaml", ["optim_cfg.learning_rate=1e-4"])
    assert [(g.name, g.parameters, g.lr, g.weight_decay) for g in config.trainable] == [
        ("prompt_tokens", [TOKEN_KEY], 1e-4, 0.01)]
    assert config.trainer.accumulate_grad_batches == 2
    assert config.model.base_checkpoint.endswith("512-inpainting-ema.ckpt")


@pytest.mark.parametrize("source, old, new, message", [
    ("tiny_training_config.yaml", "num_workers: 0\n", "batch_sise: 2\n",
     "unknown key 'batch_sise' (did you mean 'batch_size'?)"),
    ("tiny_ref_inpainting.yaml", "  max_epochs: 2\n", "  max_step: 2\n",
     "unknown key 'trainer.max_step' (did you mean 'trainer.max_steps'?)"),
    ("tiny_ref_inpainting.yaml", "trainer:\n", "max_steps: 3\ntrainer:\n",
     "unknown key 'max_steps' (a key of the flat form; in the nested form: trainer.max_steps)"),
    ("tiny_ref_inpainting.yaml", "  image_size: 128\n", "    match_mask_rat: 0.5\n  image_size: 128\n",
     "data.params.match_mask_rat: leftrefill.data.cross_view.cross_view_pairs takes no parameter 'match_mask_rat' "
     "(did you mean 'match_mask_rate'?)"),
])
def test_an_unknown_key_names_the_file_and_the_closest_key(tmp_path, source, old, new, message):
    text = (CONFIGS / source).read_text()
    assert old in text
    path = tmp_path / source
    path.write_text(text.replace(old, new))
    with pytest.raises(ConfigError) as info:
        load_training_config(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_an_unknown_override_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'data\.batch_sise' \(did you mean 'data\.batch_size'\?\)"):
        load_training_config(CONFIGS / "tiny_ref_inpainting.yaml", ["data.batch_sise=2"])
    with pytest.raises(ConfigError, match="a nested config sets learning rates per trainable group"):
        load_training_config(CONFIGS / "tiny_ref_inpainting.yaml", ["optim_cfg.learning_rate=1e-4"])


def test_freezing_keeps_modules_with_trainable_parameters_only_in_train_mode(tiny):
    groups = resolve_groups(tiny, [group("tokens", TOKEN_KEY)])
    assert freeze_all_but(tiny, groups) == ["cond_stage_model.special_embeddings"]
