"""Keeping ``ckpts/last.ckpt`` the newest training state, and ``ckpts/index.json`` naming the best checkpoint.

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

import json
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from leftrefill.atomic import write_text_atomic
from leftrefill.model_dir import INDEX_NAME, LAST_NAME


class LastCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt`` at every ``every_n_steps`` steps (0: never mid-epoch), after each
    validation and at the end of training, then ``<dirpath>/index.json``. A ``Checkpoint`` subclass, so
    Lightning runs it after the other callbacks, the top-k ``ModelCheckpoint`` included."""

    def __init__(self, dirpath: str | Path, every_n_steps: int = 0):
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
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
