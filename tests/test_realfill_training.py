"""RealFill per-scene fine-tuning on the bundled scene with the tiny random model (configs/tiny_realfill.yaml):
only the adapters train, both networks' adapters learn, the target's unknown pixels get no gradient, the
adapter file round-trips, the merged model equals the adapted one, and bad input is named."""

from __future__ import annotations

import json
import math
import sys
import shutil

import lightning as L
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train_realfill as train_script
from conftest import ROOT, run_two_ranks
from ldm.checkpoint import CheckpointError
from ldm.util import ConfigError
from ldm.latent_diffusion import model_builder
from leftrefill.data.realfill import realfill_training_set
from leftrefill.lora import adapter_spec, add_lora, lora_layers
from leftrefill.model_dir import METADATA_KEY, build_random
from leftrefill.realfill_module import latent_weight
from leftrefill.realfill_pipeline import ADAPTER_NAME, RealFillPipeline
from leftrefill.export_merged import merged_state_dict
from leftrefill.realfill_training import realfill_config, train_realfill

SCENE = ROOT / "data" / "samples_realfill" / "sacre_coeur"
TINY = ROOT / "configs" / "tiny_realfill.yaml"
MODEL_CONFIG = ROOT / "checkpoints" / "tiny_random_realfill" / "model_config.yaml"


class _Grab(L.Callback):
    def on_train_end(self, trainer, module):
        self.module = module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("realfill_run") / "model"
    grab = _Grab()
    adapter = train_realfill(SCENE, out, config=TINY, random_init=True, accelerator="cpu", callbacks=[grab],
                             save_merged=out.parent / "merged.safetensors")
    return out, adapter, grab.module


def test_the_config_is_the_recipe_and_every_image_is_in_each_step():
    config = realfill_config(ROOT / "configs" / "realfill.yaml", SCENE, random_init=True)
    groups = {g.name: (g.lr, g.weight_decay) for g in config.trainable}
    assert groups == {"unet_lora": (2e-4, 0.01), "text_lora": (4e-5, 0.01)}
    assert config.trainer.max_steps == 2000 and config.trainer.gradient_clip_val == 1.0
    assert config.data.image_size == 512 and config.data.batch_size == 4  # 3 references + the target
    assert config.model.lora["unet"] == {"rank": 8, "alpha": 16.0, "dropout": 0.1, "init": "kaiming",
                                         "target_modules": r".*\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"}
    text = config.model.lora["text"]
    assert (text["rank"], text["alpha"], text["dropout"], text["init"]) == (8, 16.0, 0.1, "kaiming")
    two = realfill_config(ROOT / "configs" / "realfill.yaml", SCENE, devices=2, random_init=True)
    assert two.data.batch_size == 2  # 4 images over 2 ranks


def test_only_the_adapters_change_and_both_networks_adapters_learn(run):
    _, _, module = run
    spec = adapter_spec(module.config.model.lora)
    fresh = dict(build_random(model_builder(MODEL_CONFIG), adapter=spec).named_parameters())
    trained = dict(module.model.named_parameters())
    assert set(fresh) == set(trained)
    moved = {name for name in trained if not torch.equal(trained[name].detach(), fresh[name])}
    assert moved and all(".lora_A." in name or ".lora_B." in name for name in moved)
    assert any(name.startswith("model.diffusion_model.") for name in moved)
    assert any(name.startswith("cond_stage_model.") for name in moved)
    optimizer = module.trainer.optimizers[0]
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("unet_lora", 1e-3), ("text_lora", 2e-4)]


def test_adapter_file_holds_exactly_the_adapters_with_the_config_and_round_trips(run):
    out, adapter, module = run
    assert adapter == out / ADAPTER_NAME
    tensors = load_file(adapter)
    adapters = {n: p for n, p in module.model.named_parameters() if ".lora_" in n}
    assert set(tensors) == set(adapters)
    assert all(torch.equal(tensors[n], p.detach()) for n, p in adapters.items())
    with safe_open(adapter, "pt") as f:
        metadata = json.loads(f.metadata()[METADATA_KEY])
    assert metadata["config"]["data"]["params"]["scene"] == str(SCENE)
    assert metadata["base_checkpoint"] is None  # random_init: no base file
    pipe = RealFillPipeline.from_model_dir(out, random_init=True, device="cpu")
    assert pipe.loaded["adapters"] == str(adapter) and pipe.resolution == 64 and pipe.prompt == "a photo of sks"


def test_merged_model_equals_the_adapted_one_and_has_exactly_the_sd2_keys(run):
    out, _, module = run
    model = module.model.eval()
    plain = build_random(model_builder(MODEL_CONFIG))
    merged = load_file(out.parent / "merged.safetensors")
    with safe_open(out.parent / "merged.safetensors", "pt") as f:
        header = json.loads(f.metadata()[METADATA_KEY])
    assert header == {"merged_from": str(out / ADAPTER_NAME), "base_checkpoint": None, "prompt": "a photo of sks",
                      "image_size": 64}
    assert set(merged) == set(plain.state_dict())  # SD2 format: no base_layer level, no lora_ tensors
    plain.load_state_dict(merged, strict=True)
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    c_concat = torch.randn(2, 5, 8, 8)
    with torch.no_grad():
        contexts = [m.cond_stage_model.encode(["a photo of sks", ""]) for m in (model, plain)]
        eps = [m.apply_model(x, t, {"c_concat": c_concat, "c_crossattn": c}) for m, c in zip((model, plain), contexts)]
    assert torch.allclose(contexts[0], contexts[1], atol=1e-5)
    assert torch.allclose(eps[0], eps[1], atol=1e-5)
    assert merged_state_dict(model).keys() == merged.keys()  # the model was left unmerged
    assert all(not layer.merged for layer in lora_layers(model))


def test_unknown_target_pixels_get_zero_loss_gradient(run, monkeypatch):
    _, _, module = run
    module.train()
    items = [realfill_training_set(SCENE, size=64, prompt_dropout=0, full_mask_rate=0)[3]]  # the target
    batch = {"image": items[0]["image"][None], "mask": items[0]["mask"][None],
             "loss_weight": items[0]["loss_weight"][None], "prompt": [items[0]["prompt"]]}
    assert batch["loss_weight"].min() == 0 and batch["loss_weight"].max() == 1
    captured = {}
    apply_model = module.model.apply_model

    def keep_prediction(*args, **kwargs):
        captured["eps"] = out = apply_model(*args, **kwargs)
        out.retain_grad()
        return out

    monkeypatch.setattr(module.model, "apply_model", keep_prediction)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    module.training_step(batch, 0).backward()
    grad = captured["eps"].grad[0].abs().sum(0)  # (h, w)
    weight = latent_weight(batch["loss_weight"], grad.shape[-1])[0, 0]
    assert torch.all(grad[weight == 0] == 0) and torch.all(grad[weight == 1] > 0)
    nearest = torch.nn.functional.interpolate(batch["loss_weight"], size=grad.shape, mode="nearest")[0, 0]
    assert (nearest > weight).any()  # the reference's nearest weight would supervise cells on the hole's edge
    module.zero_grad()


def test_a_latent_cell_weighs_one_only_when_its_whole_block_is_known():
    pixels = torch.ones(1, 1, 16, 16)
    pixels[0, 0, 9, 3] = 0  # one unknown pixel in the block of latent cell (1, 0)
    assert latent_weight(pixels, 2).tolist() == [[[[1.0, 1.0], [0.0, 1.0]]]]


def test_weighted_loss_is_the_mean_over_all_latent_elements(tiny_model):
    x0, t, noise = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 4, 8, 8)
    cond = {"c_concat": torch.randn(2, 5, 8, 8), "c_crossattn": torch.randn(2, 77, 64)}
    weight = (torch.rand(2, 1, 8, 8) > 0.5).float()
    with torch.no_grad():
        eps = tiny_model.apply_model(tiny_model.q_sample(x0, t, noise), t, cond)
        weighted = tiny_model.training_loss(x0, cond, t=t, noise=noise, weight=weight)
        plain = tiny_model.training_loss(x0, cond, t=t, noise=noise)
        ones = tiny_model.training_loss(x0, cond, t=t, noise=noise, weight=torch.ones(2, 1, 8, 8))
    assert torch.allclose(weighted, (weight * (eps - noise) ** 2).mean(), rtol=1e-6)
    assert torch.equal(plain, ones)
    with pytest.raises(ValueError, match="on the latent grid"):
        tiny_model.training_loss(x0, cond, weight=torch.ones(2, 1, 4, 4))


def test_lora_dropout_follows_train_mode_while_the_base_stays_in_eval(run):
    _, _, module = run
    dropouts = [d for layer in lora_layers(module.model) for d in layer.lora_dropout.values()]
    module.train()
    assert dropouts and all(d.training for d in dropouts)
    assert not module.model.model.diffusion_model.training and not module.model.first_stage_model.training
    module.eval()
    assert not any(d.training for d in dropouts)


def test_resume_last_continues_to_the_new_step_count(run, tmp_path):
    out, _, _ = run
    copy = tmp_path / "model"
    shutil.copytree(out, copy)
    grab = _Grab()
    train_realfill(SCENE, copy, config=TINY, random_init=True, accelerator="cpu", resume="last", max_steps=5,
                   callbacks=[grab])
    assert grab.module.trainer.global_step == 5


def test_tensorboard_gets_the_loss_and_a_labelled_preview(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = run
    events = EventAccumulator(str(out / "logs")).Reload()
    assert "train/loss" in events.Tags()["scalars"] and "train/preview" in events.Tags()["images"]


def test_adapters_for_another_base_model_or_rank_are_refused(run, tmp_path):
    out, adapter, _ = run
    tensors = load_file(adapter)
    with safe_open(adapter, "pt") as f:
        metadata = json.loads(f.metadata()[METADATA_KEY])
    base = tmp_path / "other_base.safetensors"
    save_file({"x": torch.zeros(1)}, base)
    other = dict(metadata, base_checkpoint={"name": "512-inpainting-ema.ckpt", "sha256": "0" * 64})
    moved = tmp_path / "other"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("ckpts", "logs"))
    save_file(tensors, moved / ADAPTER_NAME, metadata={METADATA_KEY: json.dumps(other)})
    with pytest.raises(CheckpointError, match=r"trained on the base checkpoint 512-inpainting-ema.ckpt.*"
                                              r"other_base.safetensors has sha256"):
        RealFillPipeline.from_model_dir(moved, base, device="cpu")
    ranked = json.loads(json.dumps(metadata))
    ranked["config"]["model"]["lora"]["unet"]["rank"] = 8  # the tensors are rank 4
    save_file(tensors, moved / ADAPTER_NAME, metadata={METADATA_KEY: json.dumps(ranked)})
    with pytest.raises(CheckpointError, match=r"adapters.safetensors: '.*lora_A.*' has shape \[4, .*\[8, "):
        RealFillPipeline.from_model_dir(moved, random_init=True, device="cpu")


@pytest.mark.parametrize("problem, message", [
    ("no_ref", "no .*ref folder"), ("no_mask", "mask.png is missing"), ("too_many", "6 reference images"),
    ("empty_mask", "marks nothing to fill"), ("full_mask", "no known pixel")])
def test_bad_scenes_get_one_error_naming_the_file(problem, message, tmp_path, caplog):
    scene = tmp_path / "scene"
    shutil.copytree(SCENE, scene)
    if problem == "no_ref":
        shutil.rmtree(scene / "ref")
    elif problem == "no_mask":
        (scene / "target" / "mask.png").unlink()
    elif problem == "too_many":
        for k in range(3):
            shutil.copy(scene / "ref" / "view_3.jpg", scene / "ref" / f"extra_{k}.jpg")
    else:
        from PIL import Image
        size = Image.open(scene / "target" / "target.png").size
        Image.new("L", size, 0 if problem == "empty_mask" else 255).save(scene / "target" / "mask.png")
    code = train_script.main(["--scene", str(scene), "--output_dir", str(tmp_path / "out"), "--config", str(TINY),
                                "--random_init", "--accelerator", "cpu"])
    assert code == 2
    assert any(record.levelname == "ERROR" and __import__("re").search(message, record.getMessage())
               for record in caplog.records), caplog.text
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_bad_flags_are_parser_errors(capsys):
    for flags, message in ((["--max_steps", "0"], "--max_steps must be at least 1"),
                           (["--resolution", "100"], "--resolution must be a positive multiple of 64"),
                           (["--resume", "last", "--overwrite"], "contradict")):
        with pytest.raises(SystemExit):
            train_script.parse_args(["--scene", "s", "--output_dir", "o", *flags])
        assert message in capsys.readouterr().err


def test_the_merged_checkpoint_samples_as_the_adapters_through_a_config_only_model_directory(run, caplog):
    out, _, _ = run
    tiny_dir = ROOT / "checkpoints" / "tiny_random_realfill"  # model_config.yaml only: no adapters
    merged = RealFillPipeline.from_model_dir(tiny_dir, out.parent / "merged.safetensors", device="cpu")
    assert "holds no adapters" in caplog.text and merged.loaded["adapters"] is None
    adapted = RealFillPipeline.from_model_dir(out, random_init=True, device="cpu")
    image, mask = torch.rand(1, 3, 64, 64) * 2 - 1, (torch.rand(1, 1, 64, 64) > 0.5).float()
    samples = [p.sample(image, mask, steps=3, generator=torch.Generator().manual_seed(0)) for p in (merged, adapted)]
    assert torch.allclose(samples[0], samples[1], atol=1e-4)


def test_two_process_ddp_run_splits_the_scene_and_keeps_the_adapters_in_sync(tmp_path):
    command = [sys.executable, str(ROOT / "train_realfill.py"), "--config", str(TINY), "--scene", str(SCENE),
               "--output_dir", str(tmp_path / "run"), "--random_init", "--accelerator", "cpu", "--ngpu", "2",
               "--max_steps", "2"]
    output, lines = run_two_ranks(command)
    (_, count_a, ids_a, sum_a), (_, count_b, ids_b, sum_b) = lines
    assert count_a == count_b == "2" and ids_a != ids_b  # 4 images: 2 per rank, different ones
    assert sum_a == sum_b  # DDP averaged the adapters' gradients
    assert (tmp_path / "run" / ADAPTER_NAME).is_file()


def test_a_bad_adapter_spec_is_named_at_load_time():
    with pytest.raises(ConfigError, match=r"realfill.yaml: model.lora: text LoRA spec: unknown key\(s\) rnk"):
        realfill_config(ROOT / "configs" / "realfill.yaml", SCENE, random_init=True, overrides=["model.lora.text.rnk=4"])
    with pytest.raises(ConfigError, match="rank must be an integer >= 1"):
        realfill_config(ROOT / "configs" / "realfill.yaml", SCENE, random_init=True,
                        overrides=["model.lora.unet.rank=0"])


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_fresh_adapters_start_as_the_spec_says_with_b_zero(init):
    """kaiming: peft's default (nn.Linear's kaiming-uniform, std 1 / sqrt(3 fan_in)), the re-implementations';
    gaussian: N(0, 1 / rank), the LeftRefill release's. B = 0 either way."""
    model = model_builder(MODEL_CONFIG)()
    rank = 4
    add_lora(model, {"unet": {"rank": rank, "alpha": 8.0, "init": init}, "text": {"rank": rank, "init": init}})
    for name, parameter in model.named_parameters():
        if ".lora_B." in name:
            assert torch.count_nonzero(parameter) == 0, name
        elif ".lora_A." in name:
            fan_in = parameter.shape[1]
            expected = 1 / math.sqrt(3 * fan_in) if init == "kaiming" else 1 / rank
            assert parameter.std().item() == pytest.approx(expected, rel=0.35), name
    with pytest.raises(ConfigError, match="init must be one of gaussian, kaiming"):
        add_lora(model_builder(MODEL_CONFIG)(), {"rank": 4, "init": "xavier"})


def test_adapters_of_an_earlier_run_are_not_trained_over_silently(run, tmp_path):
    out, _, _ = run
    copy = tmp_path / "model"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("ckpts", "logs"))  # the adapters stay
    with pytest.raises(FileExistsError, match=r"already holds adapters .*--overwrite"):
        train_realfill(SCENE, copy, config=TINY, random_init=True, accelerator="cpu")
