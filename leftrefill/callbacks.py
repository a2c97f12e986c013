"""Training callbacks: ``last.ckpt`` and the best-checkpoint index, the non-finite-loss guard, preview grids
and the per-rank digests. The LightningModule returns the last three from ``configure_callbacks``, so they
run with any Trainer.

``LastCheckpoint`` keeps ``ckpts/last.ckpt`` the newest training state, and ``ckpts/index.json`` naming the
best checkpoint.

Lightning's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when it saves a top-k checkpoint,
so after a validation that did not improve, or when ``max_steps`` ends a run mid-epoch, ``last.ckpt`` (and a
``--resume last``) lags behind. ``LastCheckpoint`` saves it itself:

* every ``every_n_steps`` optimiser steps (so a killed run loses at most that many steps),
* after every validation and at the end of every epoch (after the top-k checkpoint callback, which saves
  at one or the other, so the saved callback state and the index are current),
* when training ends.

After each save rank zero rewrites ``index.json`` (atomically)::

    {"monitor": "val/lpips", "mode": "min", "best": "epoch=3-step=2000.ckpt", "best_score": 0.21,
     "top_k": {"epoch=3-step=2000.ckpt": 0.21, ...}, "last": "last.ckpt", "last_step": 2310}

``best`` is null for a run without validation. ``leftrefill.model_dir.resolve_model_dir`` reads it to pick
the checkpoint that ``test_inpainting.py --model_path <run directory>`` evaluates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint

from leftrefill.atomic import write_text_atomic
from leftrefill.model_dir import INDEX_NAME, LAST_NAME

log = logging.getLogger(__name__)


class LastCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt`` at every ``every_n_steps`` steps (0: never mid-epoch), after each
    validation, at the end of each epoch (unless ``each_epoch`` is false) and of training, then ``<dirpath>/index.json``. A ``Checkpoint`` subclass, so
    Lightning runs it after the other callbacks, the top-k ``ModelCheckpoint`` included."""

    def __init__(self, dirpath: str | Path, every_n_steps: int = 0, each_epoch: bool = True):
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.each_epoch = each_epoch
        self._saved_step = -1

    @property
    def path(self) -> Path:
        return self.dirpath / LAST_NAME

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._saved_step = trainer.global_step  # a resumed run starts from a saved step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._saved_step:
            self.save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.save(trainer)  # also at an already saved step: the top-k state may have changed

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.each_epoch:
            self.save(trainer)  # ModelCheckpoint saves its top-k here when validation closes the epoch

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step != self._saved_step:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        """Write last.ckpt (every rank takes part; rank zero writes) and the index."""
        trainer.save_checkpoint(self.path, weights_only=False)  # full state: this is what --resume reads
        self._saved_step = trainer.global_step
        if trainer.is_global_zero:
            write_text_atomic(self.dirpath / INDEX_NAME, json.dumps(self.index(trainer), indent=2) + "\n")

    def index(self, trainer: L.Trainer) -> dict:
        top_k = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        monitored = top_k is not None and top_k.monitor is not None
        scores = {Path(p).name: _number(s) for p, s in top_k.best_k_models.items()} if monitored else {}
        return {"monitor": top_k.monitor if monitored else None, "mode": top_k.mode if monitored else None,
                "best": Path(top_k.best_model_path).name if monitored and top_k.best_model_path else None,
                "best_score": _number(top_k.best_model_score) if monitored else None,
                "top_k": scores, "last": LAST_NAME, "last_step": trainer.global_step}


def _number(value) -> float | None:
    """A metric tensor as a JSON number; None for a missing or non-finite one (strict JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class SkipNonFiniteSteps(Callback):
    """A non-finite loss on any rank skips the whole (accumulated) optimiser step on every rank; after
    ``max_nan_steps`` such losses in a row training stops.

    Decided on every rank together, before backward: a rank may not leave out backward under DDP (the
    gradient all-reduce would wait for it), so backward runs and the gradients of the trainable
    parameters are then voided after every backward of the window. AdamW leaves a parameter without
    gradient untouched (no update, no weight decay, no moment change); under 16-mixed the GradScaler gets
    an infinite gradient instead (set before it unscales) and skips the step itself.
    """

    def __init__(self, max_nan_steps: int):
        self.max_nan_steps = max_nan_steps
        self.streak = 0
        self.skip_pending = False

    def on_before_backward(self, trainer: L.Trainer, pl_module, loss: torch.Tensor) -> None:
        if not trainer.strategy.reduce_boolean_decision(not torch.isfinite(loss).item(), all=False):
            self.streak = 0
            return
        self.streak += 1
        self.skip_pending = True
        log.warning("step %d: a non-finite loss on at least one rank (here %s); the optimiser step is skipped "
                    "(%d in a row)", trainer.global_step, loss.item(), self.streak)
        if self.streak >= self.max_nan_steps:
            raise RuntimeError(f"the loss was not finite for {self.streak} steps in a row (max_nan_steps); "
                               f"check the data for corrupt images, lower the learning rate, or train with "
                               f"--precision bf16-mixed instead of 16-mixed")

    def on_after_backward(self, trainer: L.Trainer, pl_module) -> None:
        if not self.skip_pending:
            return
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        for parameter in pl_module.parameters():
            if parameter.requires_grad and parameter.grad is not None:
                if scaled:
                    parameter.grad.fill_(float("inf"))
                else:
                    parameter.grad = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        self.skip_pending = False  # this step is the skipped one; the next window starts clean


class PreviewGrids(Callback):
    """A grid every ``every_n_steps`` optimiser steps from the first validation pair (``train/preview``),
    through the module's ``sample`` and ``log_grid``; rank zero only."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch: dict, batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        if self._last_step == step:  # several micro-batches share one optimiser step
            return
        datamodule = getattr(trainer, "datamodule", None)
        preview = datamodule.preview_batch() if datamodule is not None else None
        if preview is None:
            return
        self._last_step = step
        preview = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in preview.items()}
        pl_module.log_grid("train/preview", preview, pl_module.sample(preview))


class RankDigest(Callback):
    """One line per rank when training ends: how many items it trained on in the last epoch, a digest of
    their ids, and a checksum of the trained tensors (equal on every rank when DDP kept them in sync), so
    the check can be made on a real cluster."""

    def __init__(self):
        self.ids: list = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        self.ids = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch: dict, batch_idx: int) -> None:
        ids = batch["id"]
        self.ids.extend(ids.tolist() if torch.is_tensor(ids) else ids)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        checksum = hashlib.sha256()
        for tensor in pl_module.trainable_state_dict().values():
            checksum.update(tensor.float().cpu().numpy().tobytes())
        log.info("rank %d: last epoch trained on %d samples (id digest %s); trained-tensor checksum %s",
                 trainer.global_rank, len(self.ids), hashlib.sha256(str(self.ids).encode()).hexdigest()[:16],
                 checksum.hexdigest()[:16])
