"""Prompt-token training on the tiny config: what changes, what is saved, resume, NaN handling, DDP."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import train_inpainting
from conftest import ROOT, perturb_, run_two_ranks
from leftrefill import LeftRefillPipeline
from leftrefill.data.cross_view import CrossViewPairDataset
from leftrefill.data.manifest import read_pairs
from leftrefill.grid import strip_height
from leftrefill.model_dir import TOKEN_KEY, read_prompt_tokens, resolve_model_dir
from leftrefill.train_config import load_training_config
from leftrefill.trainer import build_training_model, train
from leftrefill.training_module import LeftRefillModule

TINY_TRAINING = ROOT / "configs" / "tiny_training_config.yaml"
FAST = ["num_workers=0", "val_steps=2"]


def tiny_config(*overrides: str):
    return load_training_config(TINY_TRAINING, [*FAST, *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short run (1 epoch = 4 steps, with validation); returns (trainer, run directory)."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    trainer = train(tiny_config("max_epochs=1"), run_dir, accelerator="cpu")
    return trainer, run_dir


def test_only_the_token_table_changes(run):
    trainer, _ = run
    before = build_training_model(tiny_config().model.config, None, random_init=True).state_dict()
    after = trainer.lightning_module.model.state_dict()
    assert trainer.global_step == 4
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed == [TOKEN_KEY]


def test_frozen_weights_get_no_gradients(run):
    trainer, _ = run
    model = trainer.lightning_module.model
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == [TOKEN_KEY]
    assert all(p.grad is None for name, p in model.named_parameters() if name != TOKEN_KEY)


def test_checkpoint_holds_only_the_tokens_and_loads_into_the_pipeline(run, tmp_path):
    trainer, run_dir = run
    last = run_dir / "ckpts" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert list(checkpoint["state_dict"]) == [TOKEN_KEY]
    assert last.stat().st_size < 1_000_000
    assert (run_dir / "training_config.yaml").is_file() and list((run_dir / "logs").glob("events.out.tfevents.*"))
    trained = trainer.lightning_module.tokens.detach()
    assert torch.equal(read_prompt_tokens(last, tuple(trained.shape))[TOKEN_KEY], trained)
    # The run directory is a model directory: the pipeline takes the checkpoint as it is.
    assert resolve_model_dir(last).config == run_dir / "model_config.yaml"
    base = tmp_path / "base.ckpt"
    frozen = {k: v for k, v in trainer.lightning_module.model.state_dict().items() if k != TOKEN_KEY}
    torch.save({"state_dict": frozen}, base)
    pipe = LeftRefillPipeline.from_model_dir(last, base, device="cpu", precision="fp32", test_size=64)
    assert torch.equal(pipe.model.cond_stage_model.special_embeddings.weight, trained)


def test_resume_continues_at_the_right_step_with_the_optimizer_state(run, tmp_path):
    _, run_dir = run
    saved = torch.load(run_dir / "ckpts" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    resumed_dir = tmp_path / "resumed"
    restored = {}

    class TokensAtStart(L.Callback):
        def on_train_start(self, trainer, module):
            restored["tokens"] = module.tokens.detach().clone()

        def on_train_epoch_start(self, trainer, module):  # Lightning sets the scene sampler's epoch
            restored["sampler_epoch"] = trainer.train_dataloader.sampler.epoch

    trainer = train(tiny_config("max_epochs=2", "val_image_path=null"), resumed_dir, accelerator="cpu",
                    resume=run_dir / "ckpts" / "last.ckpt", callbacks=[TokensAtStart()])
    assert torch.equal(restored["tokens"], saved["state_dict"][TOKEN_KEY])  # training went on from the checkpoint
    assert restored["sampler_epoch"] == 1  # the resumed epoch draws epoch 1's pairs, not epoch 0's again
    assert trainer.global_step == 8 and trainer.current_epoch == 2
    final = torch.load(resumed_dir / "ckpts" / "last.ckpt", weights_only=True)
    adam = final["optimizer_states"][0]["state"][0]
    assert adam["step"].item() == 8  # Adam's own count went on from 4, so its moments were restored


def test_tokens_learn_on_a_fixed_batch():
    config = tiny_config()
    # Perturbed: at plain random init the zero-initialised attention outputs would hide the context.
    model = perturb_(build_training_model(config.model.config, None, random_init=True))
    module = LeftRefillModule(model, config)
    generator = torch.Generator().manual_seed(0)
    canvas = torch.rand(2, 3, 64, 128, generator=generator) * 2 - 1
    mask = torch.zeros(2, 1, 64, 128)
    mask[..., 16:48, 80:120] = 1
    x0 = model.encode_first_stage(canvas, generator)
    c_concat = model.concat_conditioning(canvas, mask, generator)
    t, noise = torch.tensor([300, 700]), torch.randn(x0.shape, generator=generator)
    optimizer = torch.optim.Adam([module.tokens], lr=0.3)

    def fixed_loss():
        context = model.cond_stage_model.encode([model.cond_stage_model.prompt]).expand(2, -1, -1)
        return model.training_loss(x0, {"c_concat": c_concat, "c_crossattn": context}, t=t, noise=noise)

    first = fixed_loss().item()
    for _ in range(40):
        optimizer.zero_grad()
        fixed_loss().backward()
        optimizer.step()
    assert fixed_loss().item() < 0.95 * first  # measured: 0.986 -> 0.917 (random UNet, 40 Adam steps)


def test_non_finite_losses_are_skipped_then_stop_the_run(caplog):
    config = tiny_config("max_nan_steps=3")
    module = LeftRefillModule(build_training_model(config.model.config, None, random_init=True), config)
    nan = torch.full((3, 64, 64), float("nan"))
    batch = {"reference": nan, "target": nan, "mask": torch.ones(1, 64, 64), "id": 0}
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="not finite for 3 steps in a row"):
        trainer.fit(module, train_dataloaders=DataLoader([batch] * 8, batch_size=1))
    assert caplog.text.count("non-finite loss") == 3
    assert torch.isfinite(module.tokens).all()  # skipped steps never touched the tokens


def test_a_non_finite_micro_batch_skips_its_whole_accumulated_step():
    config = tiny_config()
    module = LeftRefillModule(build_training_model(config.model.config, None, random_init=True), config)
    good = {"reference": torch.rand(3, 64, 64) * 2 - 1, "target": torch.rand(3, 64, 64) * 2 - 1,
            "mask": torch.ones(1, 64, 64), "id": 0}
    bad = {**good, "target": torch.full((3, 64, 64), float("nan"))}
    initial = module.tokens.detach().clone()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([bad, good, good, good], batch_size=1))
    adam = trainer.optimizers[0].state[module.tokens]
    assert trainer.global_step == 2 and adam["step"].item() == 1  # the window holding the NaN did nothing
    assert not torch.equal(module.tokens, initial) and torch.isfinite(module.tokens).all()


def test_masks_stay_in_one_half_and_unreadable_images_are_skipped(tmp_path, caplog):
    pairs = read_pairs(ROOT / "data" / "samples" / "train_pairs.json")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    pairs[0] = type(pairs[0])(pairs[0].id, broken, pairs[0].target, pairs[0].scene, None)
    dataset = CrossViewPairDataset(pairs, size=64)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        items = [dataset[i] for i in range(len(pairs))]
    assert f"skipping pair 0: reference: {broken} is not an image file" in caplog.text
    sides = []
    for item in items:
        assert item["reference"].shape == item["target"].shape == (3, 64, 64)
        assert item["mask"].shape == item["reference_mask"].shape == (1, 64, 64)
        left, right = item["reference_mask"].sum(), item["mask"].sum()
        assert (left == 0) != (right == 0)  # exactly one half holds the mask
        sides.append("left" if left else "right")
    assert set(sides) == {"left", "right"}  # not constant_place: both halves occur


def test_a_monitor_that_validation_does_not_log_is_rejected_at_load_time():
    from ldm.util import ConfigError

    with pytest.raises(ConfigError, match="monitor is 'val/lpips', but validation logs only val/psnr, val/ssim"):
        tiny_config("monitor=val/lpips")  # the tiny config has use_lpips: false
    with pytest.raises(ConfigError, match="trainer.logger_freq, validation.limit, validation.batch_size and "
                                          "validation.steps must be >= 1"):
        tiny_config("logger_freq=0")


def test_a_corrupt_matching_file_falls_back_to_a_random_mask(tmp_path, caplog):
    pairs = read_pairs(ROOT / "data" / "samples" / "train_pairs.json")[:1]
    (tmp_path / f"{pairs[0].id:08d}.npz").write_bytes(b"PK\x03\x04 truncated")
    dataset = CrossViewPairDataset(pairs, size=64, match_path=tmp_path, match_mask_rate=1.0)
    with caplog.at_level(logging.WARNING):
        item = dataset[0]
    assert "unusable matching file" in caplog.text and item["mask"].sum() + item["reference_mask"].sum() > 0


def test_config_typo_is_named(caplog):
    with caplog.at_level(logging.ERROR):
        code = train_inpainting.main(["--config_file", str(TINY_TRAINING), "--exp_name", "x", "batch_sise=2"])
    assert code == 2 and "batch_sise" in caplog.text


def test_scene_with_too_few_pairs_is_named(tmp_path, caplog):
    args = ["--config_file", str(TINY_TRAINING), "--exp_name", "x", "--accelerator", "cpu", "--output_dir",
            str(tmp_path), "sample_with_replacement=false", "num_workers=0"]
    with caplog.at_level(logging.ERROR):
        assert train_inpainting.main(args) == 2
    assert "'building' (2)" in caplog.text and "sample_with_replacement: true" in caplog.text


def test_two_process_ddp_run_keeps_ranks_in_sync_through_a_nan_and_uneven_validation(tmp_path):
    """Two CPU processes (gloo), launched by Lightning as train_inpainting.py --ngpu 2 does on GPUs; rank 1
    meets a NaN loss at step 1 and has only empty-mask validation pairs (tests/ddp_training_run.py)."""
    val = tmp_path / "val"
    shutil.copytree(ROOT / "data" / "samples", val, ignore=shutil.ignore_patterns("*.md", "*.json"))
    for pair in ("sacre_coeur_a", "sacre_coeur_b"):  # the shards: rank 0 gets pairs 0 and 2, rank 1 pair 1
        Image.new("L", Image.open(val / pair / "mask.png").size, 0).save(val / pair / "mask.png")
    command = [sys.executable, str(ROOT / "tests" / "ddp_training_run.py"), str(tmp_path / "run"), str(val)]
    output, lines = run_two_ranks(command)
    (_, count_a, pairs_a, tokens_a), (_, count_b, pairs_b, tokens_b) = lines
    assert tokens_a == tokens_b  # the ranks stayed in sync
    assert count_a == count_b == "4" and pairs_a != pairs_b  # on different samples
    assert output.count("the optimiser step is skipped") == 2  # both ranks skipped step 1 together
    last = torch.load(tmp_path / "run" / "ckpts" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2  # 4 samples per rank, batch 2
    assert last["optimizer_states"][0]["state"][0]["step"].item() == 1  # AdamW applied only the unskipped step
    assert len(list((tmp_path / "run" / "ckpts").glob("epoch=*.ckpt"))) == 1  # val/psnr reached the monitor


def test_cosine_schedule_decays_to_eta_min_over_the_run():
    config = tiny_config("optim_cfg.lr_scheduler=cosine", "optim_cfg.eta_min=1e-5")
    module = LeftRefillModule(build_training_model(config.model.config, None, random_init=True), config)
    module.trainer = type("FakeTrainer", (), {"estimated_stepping_batches": 10})()
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    assert setup["lr_scheduler"]["interval"] == "step" and optimizer.param_groups[0]["params"] == [module.tokens]
    rates = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] < config.trainable[0].lr and rates == sorted(rates, reverse=True)
    assert rates[-1] == pytest.approx(1e-5)


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from leftrefill.checkpoint_io import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"state_dict": {TOKEN_KEY: torch.ones(2, 3)}, "global_step": 1}, path)

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {TOKEN_KEY: torch.zeros(2, 3)}, "global_step": 2}, path)
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_tensorboard_gets_losses_metrics_and_image_grids(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = run
    events = EventAccumulator(str(run_dir / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "val/psnr", "val/ssim"} <= set(tags["scalars"])
    assert any(tag.startswith("lr") for tag in tags["scalars"])
    assert {"val/grid", "train/preview"} <= set(tags["images"])  # logger_freq 2 in the tiny config
    grid = events.Images("val/grid")[0]
    assert grid.width == 4 * 128  # reference | masked target | result | ground truth
    assert grid.height == strip_height(3 * 128) + 3 * 128  # the label strip over the 3 validation pairs


def test_training_model_takes_the_base_weights_and_fresh_tokens(tmp_path, tiny_state_dict):
    base = tmp_path / "base.ckpt"
    torch.save({"state_dict": tiny_state_dict}, base)
    model = build_training_model(tiny_config().model.config, base, random_init=False)
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in tiny_state_dict.items())
    embedder = model.cond_stage_model
    ids = torch.tensor(embedder.tokenizer.encode(embedder.init_text))
    mean = tiny_state_dict["cond_stage_model.model.token_embedding.weight"][ids].mean(dim=0)
    torch.testing.assert_close(state[TOKEN_KEY], mean.expand(50, -1), rtol=0, atol=1e-6)


def test_a_tiny_random_run_moves_the_tokens_and_the_adam_moments(run):
    trainer, run_dir = run
    start = build_training_model(tiny_config().model.config, None, random_init=True)
    trained = trainer.lightning_module.tokens.detach()
    assert (trained - start.cond_stage_model.special_embeddings.weight).abs().max() > 1e-4
    saved = torch.load(run_dir / "ckpts" / "last.ckpt", weights_only=True)
    adam = saved["optimizer_states"][0]["state"][0]
    assert adam["exp_avg"].abs().max() > 0 and adam["exp_avg_sq"].abs().max() > 0


def step_at_start():
    """A callback recording the global step at which training (re)starts."""
    class StepAtStart(L.Callback):
        step = None

        def on_train_start(self, trainer, module):
            type(self).step = trainer.global_step

    return StepAtStart()


def test_last_checkpoint_is_the_final_state_when_max_steps_ends_mid_epoch(tmp_path):
    # 4 steps an epoch: validation (val/psnr) at step 4 writes the best checkpoint, max_steps stops at step 6.
    run_dir = tmp_path / "run"
    trainer = train(tiny_config("max_epochs=3", "max_steps=6", "save_last_every_n_steps=0"), run_dir,
                    accelerator="cpu")
    assert trainer.global_step == 6
    assert torch.load(run_dir / "ckpts" / "last.ckpt", weights_only=True)["global_step"] == 6
    index = json.loads((run_dir / "ckpts" / "index.json").read_text())
    assert index["best"] == "epoch=0-step=4.ckpt" and index["monitor"] == "val/psnr" and index["last_step"] == 6
    assert index["best_score"] == pytest.approx(trainer.checkpoint_callback.best_model_score.item())


def test_a_run_directory_is_evaluated_with_its_best_checkpoint(run, caplog):
    trainer, run_dir = run
    best = run_dir / "ckpts" / json.loads((run_dir / "ckpts" / "index.json").read_text())["best"]
    assert best.is_file() and best.name != "last.ckpt"
    with caplog.at_level(logging.INFO):
        pipe = LeftRefillPipeline.from_model_dir(run_dir, random_init=True, device="cpu", test_size=64)
    assert "using the best checkpoint by val/psnr" in caplog.text and str(best) in caplog.text
    assert pipe.loaded == {"model_config": str(run_dir / "model_config.yaml"), "base_ckpt": None,
                           "prompt_tokens": str(best), "random_init": True}
    stored = torch.load(best, weights_only=True)["state_dict"][TOKEN_KEY]
    assert torch.equal(pipe.model.cond_stage_model.special_embeddings.weight, stored)  # tokens not ignored
    (run_dir / "ckpts" / "index.json").rename(run_dir / "ckpts" / "index.json.bak")
    try:
        assert resolve_model_dir(run_dir).weights == run_dir / "ckpts" / "last.ckpt"
    finally:
        (run_dir / "ckpts" / "index.json.bak").rename(run_dir / "ckpts" / "index.json")


def test_an_existing_run_is_refused_unless_resumed_or_overwritten(tmp_path, caplog):
    args = ["--config_file", str(TINY_TRAINING), "--exp_name", "tiny", "--accelerator", "cpu", "--output_dir",
            str(tmp_path), "--max_steps", "2", *FAST, "val_image_path=null"]
    assert train_inpainting.main(args) == 0
    first = sorted(p.name for p in (tmp_path / "tiny" / "ckpts").iterdir())
    with caplog.at_level(logging.ERROR):
        assert train_inpainting.main(args) == 2
    assert f"{tmp_path / 'tiny'} already holds a training run" in caplog.text and "--resume last" in caplog.text
    assert sorted(p.name for p in (tmp_path / "tiny" / "ckpts").iterdir()) == first  # nothing written
    assert train_inpainting.main([*args, "--overwrite"]) == 0
    assert not list((tmp_path / "tiny" / "ckpts").glob("*-v1.ckpt"))
    assert torch.load(tmp_path / "tiny" / "ckpts" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.parametrize("flags, message", [
    (["--max_steps", "-3"], "--max_steps must be at least 1, got -3"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295]"),
    (["--seed", str(2**63)], "--seed must be in [0, 4294967295]"),
    (["--resume", "last", "--overwrite"], "--resume and --overwrite contradict each other"),
])
def test_bad_training_flags_get_one_clear_error(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_inpainting.main(["--config_file", str(TINY_TRAINING), "--exp_name", "x", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_kill_9_mid_run_then_resume_last_continues_from_the_newest_saved_step(tmp_path):
    command = [sys.executable, str(ROOT / "train_inpainting.py"), "--config_file", str(TINY_TRAINING), "--exp_name",
               "killed", "--accelerator", "cpu", "--output_dir", str(tmp_path), "--max_steps", "200", *FAST,
               "val_image_path=null", "save_last_every_n_steps=1"]
    last = tmp_path / "killed" / "ckpts" / "last.ckpt"
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (last.is_file() and
                                                   torch.load(last, weights_only=True)["global_step"] >= 3):
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    saved = torch.load(last, weights_only=True)["global_step"]
    assert 3 <= saved < 200
    start = step_at_start()
    run_dir = tmp_path / "killed"
    trainer = train(tiny_config("val_image_path=null", f"max_steps={saved + 2}", "max_epochs=-1"), run_dir,
                    accelerator="cpu", resume=last, callbacks=[start])
    assert type(start).step == saved and trainer.global_step == saved + 2
    assert torch.load(last, weights_only=True)["global_step"] == saved + 2


def test_resume_from_a_pickle_with_code_is_refused_before_anything_runs(tmp_path, caplog):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (__import__("os").system, (f"touch {marker}",))

    hostile = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, hostile)
    args = ["--config_file", str(TINY_TRAINING), "--exp_name", "x", "--accelerator", "cpu", "--output_dir",
            str(tmp_path), "--resume", str(hostile)]
    with caplog.at_level(logging.ERROR):
        assert train_inpainting.main(args) == 2
    assert f"{hostile}: refusing to load" in caplog.text and "posix.system" in caplog.text
    assert "weights_only set to False" not in caplog.text and not marker.exists()
    assert not (tmp_path / "x" / "ckpts").exists()


def test_overwrite_never_removes_a_model_directory_that_training_did_not_write(tmp_path, caplog):
    released = tmp_path / "released"
    shutil.copytree(ROOT / "checkpoints" / "ref_guided_inpainting", released)
    args = ["--config_file", str(TINY_TRAINING), "--exp_name", "released", "--accelerator", "cpu", "--output_dir",
            str(tmp_path), "--overwrite"]
    with caplog.at_level(logging.ERROR):
        assert train_inpainting.main(args) == 2
    assert "holds checkpoints that training did not write" in caplog.text
    assert (released / "ckpts" / "epoch=7-step=6039.ckpt").is_file()


def test_validation_samples_with_the_configured_sampler(monkeypatch):
    from ldm import fill as fill_module

    config = tiny_config("validation.sampler=dpmpp_2m", "validation.eta=null", "validation.steps=3")
    module = LeftRefillModule(build_training_model(config.model.config, None, random_init=True), config)
    used = {}
    original = fill_module.fill

    def recording_fill(*args, **kwargs):
        used.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr("leftrefill.inpaint.fill", recording_fill)
    batch = {"reference": torch.rand(1, 3, 64, 64) * 2 - 1, "target": torch.rand(1, 3, 64, 64) * 2 - 1,
             "mask": torch.ones(1, 1, 64, 64), "index": torch.tensor([0])}
    assert torch.isfinite(module.sample(batch)).all()
    assert used["sampler"] == "dpmpp_2m" and used["steps"] == 3 and "eta" not in used
    from ldm.util import ConfigError

    with pytest.raises(ConfigError, match="validation.eta applies to the samplers ddim, not dpmpp_2m"):
        tiny_config("validation.sampler=dpmpp_2m")
