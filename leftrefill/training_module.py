"""Training the declared trainable set as a LightningModule (METHOD 1.5, 1.9, 1.10): only the wiring lives here.

The config's ``trainable`` groups (leftrefill.trainable) train, each with its own learning rate and weight
decay; everything else is frozen (requires_grad False, eval mode), so backward computes gradients for the
trainable tensors only (the paper: the 50 x 1024 prompt-token table). Loss: eps-MSE over the whole latent
canvas, t ~ U[0, 999], VAE latents sampled from the posterior (``LatentInpaintDiffusion.training_loss``).
Training and validation batches share one schema (docs/data.md): ``reference``, ``target``, ``mask``.
Validation samples with ``validation.sampler`` (DDIM, eta 0, cfg 2.5 by default) through
``leftrefill.inpaint`` and scores with ``leftrefill.metrics.InpaintingMetrics``, the functions of the evaluation
CLI. Checkpoints keep only the
trainable tensors plus metadata (leftrefill.checkpoint_io), so a checkpoint loads into LeftRefillPipeline
directly. The non-finite-loss guard, preview grids and per-rank digests are callbacks (leftrefill.callbacks).
"""

from __future__ import annotations

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MeanMetric

from ldm.latent_diffusion import LatentInpaintDiffusion
from leftrefill.arguments import item_generators, sampler_options
from leftrefill.callbacks import PreviewGrids, RankDigest, SkipNonFiniteSteps
from leftrefill.canvas import stitch
from leftrefill.grid import INPAINTING_LABELS, inpainting_panels, labelled_row
from leftrefill.inpaint import inpaint
from leftrefill.lora import set_lora_dropout_mode
from leftrefill.metrics import InpaintingMetrics
from leftrefill.model_dir import METADATA_KEY
from leftrefill.train_config import experiment_config
from leftrefill.trainable import (freeze_all_but, optimizer_groups, resolve_groups, set_train_mode,
                                  trainable_state_dict)


class LeftRefillModule(L.LightningModule):
    """Trains the groups of ``config.trainable`` of ``model``; ``lpips`` (optional) is a frozen metric
    network; ``base_checkpoint`` ({"name", "sha256"} or None) goes into every checkpoint's metadata.
    ``config`` is an ExperimentConfig (a flat TrainingConfig is converted)."""

    def __init__(self, model: LatentInpaintDiffusion, config: DictConfig, lpips: nn.Module | None = None,
                 base_checkpoint: dict | None = None):
        super().__init__()
        self.model = model
        self.lpips = lpips
        self.config = config = experiment_config(config)
        self.base_checkpoint = base_checkpoint
        self.metrics = InpaintingMetrics(None, lpips)
        self.val_means = nn.ModuleDict({name: MeanMetric() for name in self.metrics.names})
        self.groups = resolve_groups(model, config.trainable)
        self._training_modules = freeze_all_but(model, self.groups)
        self.model.set_gradient_checkpointing(config.model.gradient_checkpointing)
        self.strict_loading = False  # checkpoints hold only the trainable tensors; on_load_checkpoint checks them

    @property
    def tokens(self) -> nn.Parameter:
        return self.model.cond_stage_model.special_embeddings.weight

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state_dict(self.model, self.groups)

    def train(self, mode: bool = True) -> LeftRefillModule:
        """Frozen networks stay in eval mode whatever Lightning asks (no dropout or norm statistics change);
        the dropout of LoRA adapters (RealFill's 0.1), which sit inside frozen layers, follows ``mode``."""
        super().train(mode)
        set_train_mode(self.model, self._training_modules, mode)
        set_lora_dropout_mode(self.model, mode)
        if self.lpips is not None:
            self.lpips.eval()
        return self

    def configure_callbacks(self) -> list[L.Callback]:
        return [SkipNonFiniteSteps(self.config.optim.max_nan_steps), PreviewGrids(self.config.trainer.logger_freq),
                RankDigest()]

    # -- training ------------------------------------------------------------------------------------
    def loss(self, canvas: torch.Tensor, mask: torch.Tensor, conditions: dict | None = None) -> torch.Tensor:
        """canvas (B, 3, S, 2S) in [-1, 1], mask (B, 1, S, 2S) in {0, 1} -> scalar eps-MSE. ``conditions``: the
        batch keys the conditioner reads (the NVS pose). With ``model.cfg_dropout`` > 0 each item's whole
        conditioning becomes the empty string's with that probability (METHOD 2.4)."""
        model, n = self.model, canvas.shape[0]
        x0 = model.encode_first_stage(canvas)  # (B, 4, S/8, 2S/8), posterior sample, no grad
        c_concat = model.concat_conditioning(canvas, mask)  # (B, 5, S/8, 2S/8), no grad
        drop = conditioning_dropout(n, self.config.model.cfg_dropout, canvas.device)
        context = model.cond_stage_model.context(conditions or {}, n, drop)  # one text pass per step
        return model.training_loss(x0, {"c_concat": c_concat, "c_crossattn": context})

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """A batch in the shared schema; ``reference_mask`` (optional) masks the reference half instead,
        the symmetric task the original trains (METHOD 1.2)."""
        mask = batch["mask"]  # (B, 1, S, S), 1 = fill
        reference_mask = batch.get("reference_mask", torch.zeros_like(mask))
        canvas = stitch(batch["reference"], batch["target"])  # (B, 3, S, 2S)
        loss = self.loss(canvas, torch.cat([reference_mask, mask], dim=-1), self.conditions(batch))
        if torch.isfinite(loss):  # a non-finite one is skipped by SkipNonFiniteSteps, and not logged
            self.log("train/loss", loss, prog_bar=True, batch_size=canvas.shape[0])
        return loss

    def conditions(self, batch: dict) -> dict:
        """The batch entries the conditioner reads (``condition_keys``: the NVS pose), or a ValueError naming
        the missing key and the dataset."""
        keys = self.model.cond_stage_model.condition_keys
        missing = [key for key in keys if key not in batch]
        if missing:
            raise ValueError(f"the model's conditioner needs batch key(s) {missing}, which this batch lacks "
                             f"(training: {self.config.data.target}; validation: "
                             f"{self.config.validation.target or self.config.validation.image_path})")
        return {key: batch[key] for key in keys}

    def configure_optimizers(self):
        optim = self.config.optim
        optimizer = torch.optim.AdamW(optimizer_groups(self.model, self.groups))
        if optim.lr_scheduler == "none":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=optim.eta_min)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation ----------------------------------------------------------------------------------
    def sample(self, batch: dict) -> torch.Tensor:
        """Samples (B, 3, S, S) for a test-layout batch with the validation sampler; pair i uses seed + its
        dataset index."""
        val = self.config.validation
        generators = item_generators(self.config.trainer.seed, batch["index"])
        visible = batch.get("target_visible", batch["target"])  # NVS hides the unknown target (white)
        return inpaint(self.model, batch["reference"], visible, batch["mask"], sampler=val.sampler,
                       steps=val.steps, cfg=val.cfg, conditions=self.conditions(batch), composite=val.composite,
                       generator=generators, **sampler_options(val.sampler, val.eta, default_eta=0.0))

    def scored_view(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The ground truth (B, 3, S, S) and mask (B, 1, S, S) that ``sample``'s output is scored against
        (a multi-view task scores one of its views)."""
        return batch["target"], batch["mask"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        target, mask = self.scored_view(batch)
        scored = mask.flatten(1).amax(dim=1) > 0.5  # an empty mask would give an infinite PSNR
        if scored.any():
            filled = self.sample(batch)[scored]
            scores = self.metrics((filled.float() + 1) / 2, (target[scored].float() + 1) / 2)
            for name, values in scores.items():
                self.val_means[name].update(values.to(self.device))
            if batch_idx == 0:
                self.log_grid("val/grid", {k: v[scored] for k, v in batch.items() if torch.is_tensor(v)}, filled)
        # Logged on every rank and every batch, scored or not: the metric objects hold sums and counts and
        # are reduced across ranks once, at the end of the epoch (exact means, no collective per batch).
        for name, mean in self.val_means.items():
            self.log(f"val/{name}", mean, on_step=False, on_epoch=True)

    def log_grid(self, tag: str, batch: dict, filled: torch.Tensor) -> None:
        """Labelled reference | masked target | result | ground truth columns, one row per item (at most 4),
        to TensorBoard."""
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image") or not self.trainer.is_global_zero:
            return
        items = [item[:4].float().cpu() for item in self.grid_inputs(batch)]
        panels = inpainting_panels(*items, filled[:4].float().cpu())
        image = labelled_row(panels, INPAINTING_LABELS)  # (strip + rows * S, 4S, 3) uint8
        experiment.add_image(tag, image, self.global_step, dataformats="HWC")

    def grid_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reference, target and mask columns of the grids, each (B, C, S, S)."""
        return batch["reference"], batch["target"], batch["mask"]

    def setup(self, stage: str) -> None:
        """Lightning seeds every rank alike; re-seed per rank so that ranks draw different timesteps, noise
        and augmentations (the trained tensors stay identical: DDP averages their gradients)."""
        if stage == "fit":
            torch.manual_seed(self.config.trainer.seed + self.global_rank)

    # -- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the trainable tensors (the token table: ~200 KB for 50 x 1024, instead of 5 GB of SD2),
        plus what they belong to: the resolved config, the groups, the base checkpoint's name and hash."""
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {name: state[f"model.{name}"] for name in self.trainable_state_dict()}
        checkpoint[METADATA_KEY] = {
            "config": OmegaConf.to_container(self.config, resolve=True),
            "trainable": {group.name: list(group.names) for group in self.groups},
            "base_checkpoint": dict(self.base_checkpoint) if self.base_checkpoint else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume only from a checkpoint holding exactly this run's trainable tensors (one written before
        the metadata existed holds the prompt tokens only)."""
        state = checkpoint.get("state_dict", {})
        expected = set(self.trainable_state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise RuntimeError(f"the checkpoint to resume from does not hold this config's trainable set"
                               f"{f'; missing {missing}' if missing else ''}"
                               f"{f'; not trainable here {unexpected}' if unexpected else ''}")
        checkpoint["state_dict"] = {f"model.{k}": v for k, v in state.items()}


def conditioning_dropout(n: int, rate: float, device: torch.device) -> torch.Tensor | None:
    """Which of n items train unconditionally: (n,) bool, each True with probability ``rate`` (METHOD 2.4);
    None when ``rate`` is 0 (no random number is drawn then, so runs without dropout are unchanged)."""
    return torch.rand(n, device=device) < rate if rate > 0 else None
