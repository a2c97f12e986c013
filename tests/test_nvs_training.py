"""NVS training on the tiny config and the bundled procedural renders: the three trainable sets (the release's
tokens + pose MLP, the paper's full UNet, LoRA), what their checkpoints hold, loading them back, and DDP."""

from __future__ import annotations

import re
import sys

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

import train_inpainting
from conftest import ROOT, run_two_ranks
from ldm.latent_diffusion import model_builder
from leftrefill.lora import add_lora, merge_lora
from leftrefill.model_dir import TOKEN_KEY, build_random
from leftrefill.nvs_pipeline import NVSPipeline
from leftrefill.train_config import load_training_config
from leftrefill.trainable import resolve_groups
from leftrefill.trainer import build_training_model, train

CONFIGS = ROOT / "configs"
TINY_NVS = CONFIGS / "tiny_nvs.yaml"
TINY_MODEL = ROOT / "checkpoints" / "tiny_random_nvs" / "model_config.yaml"
UNET_GROUP = {"name": "unet", "parameters": ["model.diffusion_model.*"], "lr": 1e-4,
              "weight_decay": 0.0}  # no decay: a tensor changes only through its gradient
LORA_GROUP = {"name": "lora", "parameters": ["model.diffusion_model.*.lora_A.*", "model.diffusion_model.*.lora_B.*"],
              "lr": 1e-2, "weight_decay": 0.01}


def is_conditioner(name: str) -> bool:
    return name == TOKEN_KEY or name.startswith("cond_stage_model.pose_mlp.")


def tiny_variant(tmp_path, name: str, *, groups=(), lora=None):
    """tiny_nvs.yaml with extra trainable groups, a LoRA adapter, and a saved base checkpoint (random_init off,
    so the run goes through the strict base loader as a real one does)."""
    config = OmegaConf.load(TINY_NVS)
    config.trainable = list(config.trainable) + list(groups)
    base = tmp_path / "base.ckpt"
    if not base.exists():
        state = build_random(model_builder(TINY_MODEL)).state_dict()
        torch.save({"state_dict": {k: v for k, v in state.items() if not is_conditioner(k)}}, base)
    config.model.random_init, config.model.base_checkpoint = False, str(base)
    if lora:
        config.model.lora = lora
    path = tmp_path / f"{name}.yaml"
    OmegaConf.save(config, path)
    return path


def run_two_steps(tmp_path, config_path, name):
    config = load_training_config(config_path, ["trainer.max_steps=2", "trainer.max_epochs=-1", "data.batch_size=1"])
    L.seed_everything(config.trainer.seed, workers=True)  # the start train() builds, drawn again
    spec = config.model
    lora = OmegaConf.to_container(spec.lora) if spec.lora is not None else None
    start = build_training_model(spec.config, spec.base_checkpoint, False, lora).state_dict()
    trainer = train(config, tmp_path / name, accelerator="cpu")
    after = trainer.lightning_module.model.state_dict()
    changed = {key for key in start if not torch.equal(start[key], after[key])}
    checkpoint = torch.load(tmp_path / name / "ckpts" / "last.ckpt", weights_only=True)
    return changed, checkpoint, after


def test_the_released_set_trains_tokens_and_pose_mlp_only(tmp_path):
    changed, checkpoint, after = run_two_steps(tmp_path, tiny_variant(tmp_path, "a"), "a")
    conditioner = {k for k in after if is_conditioner(k)}
    assert changed == conditioner and len(conditioner) == 5  # the table and the MLP's two Linear layers
    assert set(checkpoint["state_dict"]) == conditioner
    assert checkpoint["leftrefill"]["config"]["model"]["cfg_dropout"] == 0.15


def test_the_paper_set_trains_the_unet_too_in_its_own_group(tmp_path):
    changed, checkpoint, after = run_two_steps(tmp_path, tiny_variant(tmp_path, "b", groups=[UNET_GROUP]), "b")
    unet = {k for k, _ in build_random(model_builder(TINY_MODEL)).named_parameters()
            if k.startswith("model.diffusion_model.")}
    expected = {k for k in after if is_conditioner(k)} | unet
    assert set(checkpoint["state_dict"]) == expected and changed == expected  # the VAE and CLIP stay frozen
    assert [g["lr"] for g in checkpoint["optimizer_states"][0]["param_groups"]] == [1e-3, 1e-4]


def test_a_declared_adapter_that_no_group_trains_is_refused(tmp_path):
    from ldm.util import ConfigError
    with pytest.raises(ConfigError, match="model.lora adds an adapter but no trainable group trains it"):
        load_training_config(tiny_variant(tmp_path, "lora_untrained", lora={"rank": 4}))


def test_too_few_training_items_for_one_batch_is_refused_before_training(tmp_path):
    from ldm.util import ConfigError
    args = ["--config_file", str(TINY_NVS), "--exp_name", "x", "--accelerator", "cpu", "--output_dir", str(tmp_path),
            "data.batch_size=3"]
    with pytest.raises(ConfigError, match="gets 2 training item\\(s\\) per epoch, fewer than data.batch_size 3"):
        config = load_training_config(TINY_NVS, args[-1:])
        train(config, tmp_path / "x", accelerator="cpu")


def test_the_lora_set_saves_only_the_adapter_and_loads_back_merged_or_unmerged(tmp_path):
    lora = {"rank": 4, "alpha": 4.0}
    changed, checkpoint, after = run_two_steps(tmp_path, tiny_variant(tmp_path, "c", groups=[LORA_GROUP], lora=lora), "c")
    adapter = {k for k in after if ".lora_A." in k or ".lora_B." in k}
    assert len(adapter) == 2 * 63 and set(checkpoint["state_dict"]) == {k for k in after if is_conditioner(k)} | adapter
    assert changed == set(checkpoint["state_dict"])  # B moved off zero, A moved; nothing else
    assert not any(".base_layer." in k for k in changed)

    pipe = NVSPipeline.from_model_dir(tmp_path / "c", tmp_path / "base.ckpt", test_size=64, device="cpu")
    assert all(torch.equal(pipe.model.state_dict()[k], after[k]) for k in checkpoint["state_dict"])
    reference, pose = torch.rand(1, 3, 64, 64) * 2 - 1, torch.tensor([[0.2, 0.5, 0.8, 0.1]])
    mask = torch.ones(1, 1, 64, 64)
    unmerged = pipe.synthesize(reference, pose, mask, steps=2, generator=torch.Generator().manual_seed(0))
    merge_lora(pipe.model)
    merged = pipe.synthesize(reference, pose, mask, steps=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)


def test_tiny_nvs_config_trains_and_validates_from_the_command_line(tmp_path):
    args = ["--config_file", str(TINY_NVS), "--exp_name", "tiny_nvs", "--accelerator", "cpu",
            "--output_dir", str(tmp_path)]
    assert train_inpainting.main(args) == 0
    run = tmp_path / "tiny_nvs"
    index = (run / "ckpts" / "index.json").read_text()
    assert '"monitor": "val/psnr"' in index and re.search(r'"best_score": \d+\.\d+', index)
    saved = OmegaConf.load(run / "training_config.yaml")
    assert saved.data.target == "leftrefill.data.objaverse_nvs.nvs_training_pairs"
    assert saved.validation.params.mask_mode == "fixed" and saved.validation.composite == "none"


@pytest.mark.parametrize("name", ["nvs_training_config", "nvs_full_finetune", "nvs_lora"])
def test_full_size_configs_declare_the_papers_trainable_sets(name):
    config = load_training_config(CONFIGS / f"{name}.yaml")
    with torch.device("meta"):
        model = model_builder(ROOT / config.model.config)()
        if config.model.lora is not None:
            add_lora(model, OmegaConf.to_container(config.model.lora))
    groups = resolve_groups(model, config.trainable)
    sizes = {g.name: sum(dict(model.named_parameters())[n].numel() for n in g.names) for g in groups}
    assert sizes["prompt_and_pose"] == 602_624 and config.model.cfg_dropout == 0.15
    assert config.data.batch_size == 16 and config.trainer.max_epochs == 10
    assert config.validation.val_check_interval == 0.1
    if name == "nvs_full_finetune":
        assert sizes["unet"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.diffusion_model."))
        assert [g.lr for g in groups] == [1e-4, 1e-5]
    if name == "nvs_lora":
        # rank 16 on the 16 transformer blocks: q, k, v, out of attn1 and attn2, and the GEGLU input projection
        layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "reset_lora_parameters")]
        assert len(layers) == 16 * 9 and sizes["lora"] == 5_116_928
        assert config.model.lora.rank == 16 and [g.lr for g in groups] == [1e-4, 1e-4]


def test_two_process_ddp_nvs_run_keeps_ranks_in_sync_on_different_objects(tmp_path):
    command = [sys.executable, str(ROOT / "tests" / "ddp_nvs_run.py"), str(tmp_path / "run")]
    output, lines = run_two_ranks(command)
    (_, count_a, ids_a, sum_a), (_, count_b, ids_b, sum_b) = lines
    assert sum_a == sum_b and count_a == count_b == "1" and ids_a != ids_b
    index = (tmp_path / "run" / "ckpts" / "index.json").read_text()  # validated: rank 1 ran an unscored item
    assert re.search(r'"best_score": \d+\.\d+', index)
