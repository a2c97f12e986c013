"""RealFill's per-scene fine-tuning step (METHOD 5.1, 7.1) on the shared training seam.

Everything but the step is LeftRefillModule's: the trainable groups (the UNet and text-encoder LoRA, each
with its own learning rate), the frozen base in eval mode with the adapters' dropout following train mode,
checkpoints that hold the adapters only, the non-finite-loss guard. What differs from the stitched
LeftRefill step:

* a batch holds single images (leftrefill.data.realfill): ``image`` (B, 3, S, S) in [-1, 1], ``mask``
  (B, 1, S, S) in {0, 1} (1 = hole), ``loss_weight`` (B, 1, S, S) in {0, 1}, ``prompt`` (B strings);
* the loss weight goes to the latent grid (a cell weighs 1 only when its whole 8 x 8 block is known: the
  reference takes the nearest pixel, :func:`latent_weight`) and multiplies each element's squared error; the
  mean stays over all latent elements (the reference's ``(weights * mse).mean()``), so a target's unknown
  pixels get no gradient at all;
* the prompt dropout ("" with p = 0.1) is the dataset's, so ``model.cfg_dropout`` stays 0;
* no validation: previews fill the scene's target (its real mask) with the validation sampler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.fill import Conditioning, fill
from leftrefill.arguments import item_generators, sampler_options
from leftrefill.grid import labelled_row
from leftrefill.images import tensor_to_rgb
from leftrefill.training_module import LeftRefillModule

PREVIEW_LABELS = ("target (model's view)", "filled")


class RealFillModule(LeftRefillModule):
    """Fine-tunes LoRA adapters of SD2 inpainting on one scene's images, each with its own prompt and mask."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        model, image = self.model, batch["image"]
        x0 = model.encode_first_stage(image)  # (B, 4, S/8, S/8), posterior sample
        c_concat = model.concat_conditioning(image, batch["mask"])  # (B, 5, S/8, S/8)
        context = model.cond_stage_model.context(self.conditions(batch), image.shape[0])
        weight = latent_weight(batch["loss_weight"], x0.shape[-1])  # (B, 1, S/8, S/8)
        loss = model.training_loss(x0, {"c_concat": c_concat, "c_crossattn": context}, weight=weight)
        if torch.isfinite(loss):
            self.log("train/loss", loss, prog_bar=True, batch_size=image.shape[0])
        return loss

    def sample(self, batch: dict) -> torch.Tensor:
        """The batch's ``image`` filled where ``mask`` is 1, (B, 3, S, S), with the validation sampler."""
        val, model = self.config.validation, self.model
        n = batch["image"].shape[0]
        cond = model.cond_stage_model.context({"prompt": batch["prompt"]}, n)
        conditioning = Conditioning(cond, model.cond_stage_model.empty_context(n) if val.cfg != 1 else None)
        generators = item_generators(self.config.trainer.seed, range(n))
        was_training = self.training
        self.eval()  # no adapter dropout while previewing
        try:
            return fill(model, batch["image"], batch["mask"], conditioning, sampler=val.sampler, steps=val.steps,
                        guidance=val.cfg, composite="hard", generator=generators,
                        **sampler_options(val.sampler, val.eta, default_eta=0.0))
        finally:
            self.train(was_training)

    def log_grid(self, tag: str, batch: dict, filled: torch.Tensor) -> None:
        """Labelled target-as-the-model-sees-it | filled columns, to TensorBoard (rank zero)."""
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image") or not self.trainer.is_global_zero:
            return
        seen = batch["image"][:4].float().cpu() * (1 - batch["mask"][:4].float().cpu())  # holes mid-gray
        panels = [tensor_to_rgb(torch.cat(list(column), dim=-2)) for column in (seen, filled[:4].float().cpu())]
        experiment.add_image(tag, labelled_row(panels, PREVIEW_LABELS), self.global_step, dataformats="HWC")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        raise NotImplementedError("RealFill trains without validation (a scene has no held-out ground truth)")


def latent_weight(loss_weight: torch.Tensor, latent_size: int) -> torch.Tensor:
    """The pixel loss weight (B, 1, S, S) in {0, 1} on the latent grid (B, 1, s, s): a cell weighs 1 only when
    every pixel of its (S/s) x (S/s) block does (a min-pool). The reference takes the block's top-left pixel
    (nearest), so latent cells straddling the target's hole were supervised on what the VAE made of the
    hole's pixels: the ground truth there in RealBench, mid-gray here (leftrefill.data.realfill)."""
    factor = loss_weight.shape[-1] // latent_size
    return -F.max_pool2d(-loss_weight.float(), kernel_size=factor)
