"""Prompt-token training as a LightningModule (METHOD 1.5, 1.9, 1.10): only the wiring lives here.

Everything but ``cond_stage_model.special_embeddings`` is frozen (requires_grad False, eval mode), so
backward computes gradients for the 50 x 1024 token table only. Loss: eps-MSE over the whole latent canvas,
t ~ U[0, 999], VAE latents sampled from the posterior (``LatentInpaintDiffusion.training_loss``).
Validation samples with DDIM (eta 0, cfg 2.5) through ``leftrefill.inpaint`` and scores with
``leftrefill.metrics.InpaintingMetrics``, the functions of the evaluation CLI. Checkpoints keep only the
trainable tensors (plus Lightning's trainer state), so a checkpoint loads into LeftRefillPipeline directly.
"""

from __future__ import annotations

import hashlib
import logging

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn
from torchmetrics import MeanMetric

from ldm.latent_diffusion import LatentInpaintDiffusion
from leftrefill.arguments import item_generators
from leftrefill.grid import INPAINTING_LABELS, inpainting_panels, labelled_row
from leftrefill.inpaint import inpaint
from leftrefill.metrics import InpaintingMetrics
from leftrefill.model_dir import TOKEN_KEY

log = logging.getLogger(__name__)


class LeftRefillModule(L.LightningModule):
    """Trains ``model.cond_stage_model.special_embeddings``; ``lpips`` (optional) is a frozen metric network."""

    def __init__(self, model: LatentInpaintDiffusion, config: DictConfig, lpips: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.lpips = lpips
        self.config = config
        self.metrics = InpaintingMetrics(None, lpips)
        self.val_means = nn.ModuleDict({name: MeanMetric() for name in self.metrics.names})
        self.model.requires_grad_(False)
        self.tokens.requires_grad_(True)
        self.model.set_gradient_checkpointing(config.gradient_checkpointing)
        self.strict_loading = False  # checkpoints hold only the tokens; on_load_checkpoint checks them
        self._nan_streak = 0
        self._skip_optimizer_step = False
        self._last_preview_step = -1
        self._pairs_seen: list[int] = []

    @property
    def tokens(self) -> nn.Parameter:
        return self.model.cond_stage_model.special_embeddings.weight

    def train(self, mode: bool = True) -> LeftRefillModule:
        """Frozen networks stay in eval mode whatever Lightning asks (no dropout or norm statistics change)."""
        super().train(mode)
        self.model.eval()
        if self.lpips is not None:
            self.lpips.eval()
        return self

    # -- training ------------------------------------------------------------------------------------
    def loss(self, canvas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """canvas (B, 3, S, 2S) in [-1, 1], mask (B, 1, S, 2S) in {0, 1} -> scalar eps-MSE."""
        model = self.model
        x0 = model.encode_first_stage(canvas)  # (B, 4, S/8, 2S/8), posterior sample, no grad
        c_concat = model.concat_conditioning(canvas, mask)  # (B, 5, S/8, 2S/8), no grad
        embedder = model.cond_stage_model
        context = embedder.encode([embedder.prompt]).expand(canvas.shape[0], -1, -1)  # one text pass per step
        return model.training_loss(x0, {"c_concat": c_concat, "c_crossattn": context})

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch["canvas"], batch["mask"])
        # Decided on every rank together: a rank may not leave out backward under DDP (the gradient
        # all-reduce would wait for it), so a bad step still runs backward, on a zero loss, and the
        # optimiser step is then skipped in on_before_optimizer_step.
        if self.trainer.strategy.reduce_boolean_decision(not torch.isfinite(loss).item(), all=False):
            self._skip_non_finite(loss)
            return self.tokens.sum() * 0.0
        self._nan_streak = 0
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["canvas"].shape[0])
        return loss

    def _skip_non_finite(self, loss: torch.Tensor) -> None:
        self._nan_streak += 1
        self._skip_optimizer_step = True
        log.warning("step %d: a non-finite loss on at least one rank (here %s); the optimiser step is skipped "
                    "(%d in a row)", self.global_step, loss.item(), self._nan_streak)
        if self._nan_streak >= self.config.max_nan_steps:
            raise RuntimeError(f"the loss was not finite for {self._nan_streak} steps in a row (max_nan_steps); "
                               f"check the data for corrupt images, lower optim_cfg.learning_rate, or train with "
                               f"--precision bf16-mixed instead of 16-mixed")

    def on_after_backward(self) -> None:
        """While a skip is pending, void the token gradient after every backward of the accumulation
        window, so the whole optimiser step is skipped: AdamW leaves a parameter without gradient untouched
        (no update, no weight decay, no moment change); under 16-mixed the GradScaler gets an infinite
        gradient instead (set before it unscales) and skips the step itself."""
        if not self._skip_optimizer_step:
            return
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            self.tokens.grad.fill_(float("inf"))
        else:
            self.tokens.grad = None

    def on_before_optimizer_step(self, optimizer) -> None:
        self._skip_optimizer_step = False  # this step is the skipped one; the next window starts clean

    def configure_optimizers(self):
        optim = self.config.optim_cfg
        optimizer = torch.optim.AdamW([self.tokens], lr=optim.learning_rate, weight_decay=optim.weight_decay)
        if optim.lr_scheduler == "none":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=optim.eta_min)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation ----------------------------------------------------------------------------------
    def sample(self, batch: dict) -> torch.Tensor:
        """DDIM samples (B, 3, S, S) for a test-layout batch; pair i uses seed + its dataset index."""
        generators = item_generators(self.config.seed, batch["index"])
        return inpaint(self.model, batch["reference"], batch["target"], batch["mask"], steps=self.config.val_steps,
                       cfg=self.config.val_cfg, eta=self.config.val_eta, generator=generators)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        scored = batch["mask"].flatten(1).amax(dim=1) > 0.5  # an empty mask would give an infinite PSNR
        if scored.any():
            filled = self.sample(batch)[scored]
            scores = self.metrics((filled.float() + 1) / 2, (batch["target"][scored].float() + 1) / 2)
            for name, values in scores.items():
                self.val_means[name].update(values.to(self.device))
            if batch_idx == 0:
                self.log_grid("val/grid", {k: v[scored] for k, v in batch.items() if torch.is_tensor(v)}, filled)
        # Logged on every rank and every batch, scored or not: the metric objects hold sums and counts and
        # are reduced across ranks once, at the end of the epoch (exact means, no collective per batch).
        for name, mean in self.val_means.items():
            self.log(f"val/{name}", mean, on_step=False, on_epoch=True)

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        """A preview grid every ``logger_freq`` optimiser steps, from the first validation pair."""
        step = self.global_step
        if step == 0 or step % self.config.logger_freq or not self.trainer.is_global_zero:
            return
        if self._last_preview_step == step:  # several micro-batches share one optimiser step
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        preview = datamodule.preview_batch() if datamodule is not None else None
        if preview is None:
            return
        self._last_preview_step = step
        preview = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in preview.items()}
        self.log_grid("train/preview", preview, self.sample(preview))

    def log_grid(self, tag: str, batch: dict, filled: torch.Tensor) -> None:
        """Labelled reference | masked target | result | ground truth columns, one row per item (at most 4),
        to TensorBoard."""
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image") or not self.trainer.is_global_zero:
            return
        items = [batch[key][:4].float().cpu() for key in ("reference", "target", "mask")]
        panels = inpainting_panels(*items, filled[:4].float().cpu())
        image = labelled_row(panels, INPAINTING_LABELS)  # (strip + rows * S, 4S, 3) uint8
        experiment.add_image(tag, image, self.global_step, dataformats="HWC")

    def setup(self, stage: str) -> None:
        """Lightning seeds every rank alike; re-seed per rank so that ranks draw different timesteps, noise
        and augmentations (the token tables stay identical: DDP averages their gradients)."""
        if stage == "fit":
            torch.manual_seed(self.config.seed + self.global_rank)

    def on_train_epoch_start(self) -> None:
        self._pairs_seen: list[int] = []

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._pairs_seen.extend(int(i) for i in batch["pair_id"])

    def on_train_end(self) -> None:
        """One line per rank: what it trained on in the last epoch, and a digest of the token table (equal on
        every rank when DDP kept them in sync)."""
        tokens = self.tokens.detach().float().cpu()
        pairs = hashlib.sha256(str(self._pairs_seen).encode()).hexdigest()[:16]
        log.info("rank %d: last epoch trained on %d samples (pair-id digest %s); token table checksum %s",
                 self.global_rank, len(self._pairs_seen), pairs,
                 hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16])

    # -- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the trained tensors: the token table (~200 KB for 50 x 1024) instead of 5 GB of SD2."""
        trainable = {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["state_dict"] = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        if TOKEN_KEY not in state:
            raise RuntimeError(f"the checkpoint to resume from holds no '{TOKEN_KEY}'")
        checkpoint["state_dict"] = {f"model.{k}": v for k, v in state.items()}
