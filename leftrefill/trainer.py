"""Assembling a training run: the model with its frozen base, the Lightning Trainer, the run directory.

Run directory ``<output_dir>/<exp_name>/``, laid out as a model directory: LeftRefillPipeline and
test_inpainting.py take any of its checkpoints (``ckpts/last.ckpt`` or a best one) as ``--model_path``::

    model_config.yaml        copy of the config the trained tensors belong to
    training_config.yaml     the resolved training config (nested form, leftrefill.train_config)
    ckpts/epoch=E-step=S.ckpt                      the best checkpoints by ``validation.monitor``
    ckpts/last.ckpt          the newest state (every ``save_last_every_n_steps`` steps, after each
                             validation, at the end): what ``--resume last`` continues from
    ckpts/index.json         which checkpoint is the best (test_inpainting.py evaluates that one)
    logs/                    TensorBoard event files

A run directory that already holds a run is not written over unless the run is resumed or ``overwrite``.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import check_resumable_checkpoint
from ldm.latent_diffusion import LatentInpaintDiffusion, model_builder
from ldm.util import ConfigError, get_obj_from_str
from leftrefill.atomic import atomic_path, write_text_atomic
from leftrefill.callbacks import LastCheckpoint
from leftrefill.checkpoint_io import AtomicCheckpointIO, file_record
from leftrefill.data.datamodule import LeftRefillDataModule
from leftrefill.metrics import load_lpips_alex
from leftrefill.model_dir import CONFIG_NAME, LAST_NAME, build_model
from leftrefill.paths import locate
from leftrefill.train_config import experiment_config, has_validation
from leftrefill.training_module import LeftRefillModule

log = logging.getLogger(__name__)


def build_training_model(model_config: str | Path, base_ckpt: str | Path | None, random_init: bool,
                         adapter: Mapping | None = None) -> LatentInpaintDiffusion:
    """The model with SD2 weights from ``base_ckpt``, fresh prompt tokens (mean embedding of the init text)
    and fresh task modules (an NVS pose MLP; a LoRA ``adapter`` at B = 0).

    The frozen weights are assigned from the memory-mapped checkpoint (no second copy); only the new
    modules are allocated and initialised. ``random_init`` instead draws seeded random weights everywhere.
    """
    return build_model(model_builder(model_config), base_ckpt=base_ckpt, random_init=random_init, adapter=adapter)


def prepare_run_directory(config: DictConfig, run_dir: Path) -> None:
    """Copy the model config and write the resolved training config (both atomically)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / CONFIG_NAME) as tmp:
        shutil.copyfile(config.model.config, tmp)
    write_text_atomic(run_dir / "training_config.yaml", OmegaConf.to_yaml(config, resolve=True))


def build_trainer(config: DictConfig, run_dir: Path, *, accelerator: str, devices: int, num_nodes: int,
                  precision: str, callbacks: list[L.Callback] = ()) -> L.Trainer:
    val, run = config.validation, config.trainer
    has_val = has_validation(config)
    # Without validation and with save_each_epoch false (RealFill: an epoch is one step) only last.ckpt is kept.
    checkpoints = [ModelCheckpoint(
        dirpath=run_dir / "ckpts", filename="epoch={epoch}-step={step}", auto_insert_metric_name=False,
        monitor=val.monitor if has_val else None, mode=val.monitor_mode,
        save_top_k=run.save_top_k if has_val else 1, save_last=False)] if has_val or run.save_each_epoch else []
    last = LastCheckpoint(run_dir / "ckpts", every_n_steps=run.save_last_every_n_steps,
                          each_epoch=run.save_each_epoch)
    distributed = devices * num_nodes > 1
    return L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, precision=precision,
        strategy="ddp" if distributed else "auto",
        max_epochs=run.max_epochs, max_steps=run.max_steps, accumulate_grad_batches=run.accumulate_grad_batches,
        check_val_every_n_epoch=val.every_n_epochs, val_check_interval=val.val_check_interval, num_sanity_val_steps=0,
        logger=TensorBoardLogger(save_dir=run_dir, name="logs", version=""),
        gradient_clip_val=run.gradient_clip_val or None,
        callbacks=[*checkpoints, last, LearningRateMonitor(logging_interval="step"), *callbacks],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # BalancedSceneSampler splits the epoch across ranks itself
        log_every_n_steps=min(50, run.logger_freq), default_root_dir=run_dir)


def check_run_directory(run_dir: Path, *, resume: str | Path | None, overwrite: bool) -> None:
    """Refuse to start a new run in a directory that holds one; with ``overwrite`` remove its checkpoints
    and logs first, but only from a directory that training wrote (it has ``training_config.yaml``: a
    released model directory is never removed). Resuming (``resume`` set) continues in the directory as it
    is. Only global rank zero looks: under torchrun every rank runs this, and they must not race."""
    if rank_zero_only.rank != 0:
        return
    previous = [p for p in (run_dir / "ckpts", run_dir / "logs") if p.is_dir() and any(p.iterdir())]
    if not previous or resume is not None:
        return
    last = run_dir / "ckpts" / LAST_NAME
    if not overwrite:
        raise FileExistsError(f"{run_dir} already holds a training run{' (' + str(last) + ')' if last.is_file() else ''}. "
                              f"Continue it with --resume last, replace it with --overwrite, or choose another "
                              f"run directory (--exp_name; train_realfill.py: --output_dir)")
    if not (run_dir / "training_config.yaml").is_file():
        raise FileExistsError(f"{run_dir} holds checkpoints that training did not write (no training_config.yaml); "
                              f"--overwrite removes only training runs. Choose another run directory (--exp_name; "
                              f"train_realfill.py: --output_dir)")
    log.warning("--overwrite: removing the previous run's %s", " and ".join(str(p) for p in previous))
    for folder in previous:
        shutil.rmtree(folder)


def training_module_class(config: DictConfig) -> type[LeftRefillModule]:
    """The config's ``model.training_module`` class (a LeftRefillModule), or a ConfigError naming it."""
    cls = get_obj_from_str(config.model.training_module)
    if not (isinstance(cls, type) and issubclass(cls, LeftRefillModule)):
        raise ConfigError(f"model.training_module {config.model.training_module} is not a LeftRefillModule subclass")
    return cls


def train(config: DictConfig, run_dir: Path, *, accelerator: str = "auto", devices: int = 1, num_nodes: int = 1,
          precision: str = "32", resume: str | Path | None = None, overwrite: bool = False,
          callbacks: list[L.Callback] = ()) -> L.Trainer:
    """Fit the config's trainable set; returns the trainer (its checkpoint callback knows the best
    checkpoint). ``config`` is an ExperimentConfig (leftrefill.train_config.load_training_config).
    ``callbacks`` are added to the run's own (checkpoints, learning-rate logging, the module's)."""
    config = experiment_config(config)
    check_run_directory(run_dir, resume=resume, overwrite=overwrite)
    if resume is not None:
        check_resumable_checkpoint(resume)  # before building the model; never hand Lightning a hostile pickle
    L.seed_everything(config.trainer.seed, workers=True)
    # The frozen SD2 modules are in eval mode on purpose (LeftRefillModule.train keeps them there).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    val, spec = config.validation, config.model
    spec.config = str(locate(spec.config, "checkpoints"))  # unchanged when the working directory has them
    if spec.base_checkpoint is not None:
        spec.base_checkpoint = str(locate(spec.base_checkpoint, "pretrained_models"))
    lpips = load_lpips_alex(val.lpips_weights) if val.use_lpips and has_validation(config) else None
    prepare_run_directory(config, run_dir)
    lora = OmegaConf.to_container(spec.lora) if spec.lora is not None else None
    model = build_training_model(spec.config, spec.base_checkpoint, spec.random_init, lora)
    # Hashed once per run, by global rank zero only (it writes the checkpoints): 5 GB need not be read per rank.
    base = None if spec.random_init or rank_zero_only.rank != 0 else file_record(spec.base_checkpoint)
    module = training_module_class(config)(model, config, lpips, base_checkpoint=base)
    datamodule = LeftRefillDataModule(config, model.cond_stage_model.condition_keys)
    trainer = build_trainer(config, run_dir, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                            precision=precision, callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    return trainer
