"""Training the multi-view LeftRefill models (METHOD 3): the LeftRefill training module with views.

A sample is v views flattened into the batch as (b v); the conditioner (leftrefill.multiview_prompt) gives
each view its own context and the UNet's self-attention grouping, installed for the loss's forward pass
only (a checkpointed block recomputes in backward with the grouping it was run with). All views of a sample
share one timestep, drawn per sample: at inference they are denoised together (multi-reference) or the
earlier views enter noised to the current view's timestep (autoregressive NVS), so that is what training
shows the model. Noise is drawn per view. Everything else (trainable groups, checkpoints, validation
metrics, callbacks) is LeftRefillModule's.

* ``MultiViewRefModule``: multi-reference inpainting (METHOD 3.2): view 0 the masked target, the references
  unmasked; the loss on view 0 only (``reduced_loss``).
* ``AutoregressiveNVSModule``: block-causal NVS (METHOD 3.3): views [reference | target_i] with their poses;
  teacher forcing, the loss on every view.
"""

from __future__ import annotations

import torch
from einops import rearrange

from leftrefill.arguments import item_generators, sampler_options
from leftrefill.canvas import canvas_mask, stitch
from leftrefill.multiview_inpaint import ViewCountError, inpaint_views, references_per_sample, view_canvases
from leftrefill.nvs_autoregressive import predict_last_view
from leftrefill.training_module import LeftRefillModule, conditioning_dropout


class MultiViewModule(LeftRefillModule):
    """The shared multi-view loss; subclasses lay out their batches as views."""

    def views_loss(self, images: torch.Tensor, masks: torch.Tensor, conditions: dict,
                   target_views_only: bool) -> torch.Tensor:
        """images (b*v, 3, H, W) in [-1, 1] and masks (b*v, 1, H, W), views flattened as (b v) -> scalar
        eps-MSE over all views, or over view 0 of each sample (``target_views_only``). ``conditions``: the
        conditioner's per-view batch entries, flattened alike. CFG dropout, when configured, drops a whole
        sample's conditioning."""
        model = self.model
        embedder = model.cond_stage_model
        v, n = embedder.num_views, images.shape[0]
        if n % v:
            raise ViewCountError(f"a batch of {n} views is not a whole number of samples of {v} views")
        x0 = model.encode_first_stage(images)  # (n, 4, H/8, W/8), posterior sample, no grad
        c_concat = model.concat_conditioning(images, masks)  # (n, 5, H/8, W/8), no grad
        drop = conditioning_dropout(n // v, self.config.model.cfg_dropout, images.device)
        context = embedder.context(conditions, n, None if drop is None else drop.repeat_interleave(v))
        t = torch.randint(0, model.num_timesteps, (n // v,), device="cpu").repeat_interleave(v).to(images.device)
        items = (torch.arange(n, device=images.device) % v == 0) if target_views_only else None
        with model.model.diffusion_model.self_attention_grouping(embedder.grouping()):
            return model.training_loss(x0, {"c_concat": c_concat, "c_crossattn": context}, t=t, items=items)

    def log_loss(self, loss: torch.Tensor, samples: int) -> None:
        if torch.isfinite(loss):  # a non-finite one is skipped by SkipNonFiniteSteps, and not logged
            self.log("train/loss", loss, prog_bar=True, batch_size=samples)


class MultiViewRefModule(MultiViewModule):
    """Multi-reference inpainting. Batches: ``target`` (B, 3, S, S), ``mask`` (B, 1, S, S), ``references``
    (B, k, 3, S, S) with k the model's references per sample (leftrefill.data.multiview)."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        embedder = self.model.cond_stage_model
        self.check_references(batch["references"], self.config.data.target)
        images, masks = view_canvases(batch["references"], batch["target"], batch["mask"], embedder.concat_target)
        loss = self.views_loss(images, masks, {}, target_views_only=True)
        self.log_loss(loss, batch["target"].shape[0])
        return loss

    def check_references(self, references: torch.Tensor, source: str) -> None:
        """A ViewCountError naming the dataset when its samples hold another number of references than the
        model's views need (data.params.num_views against the model config's num_views)."""
        embedder = self.model.cond_stage_model
        expected = references_per_sample(embedder)
        if references.shape[1] != expected:
            raise ViewCountError(f"{source} gives {references.shape[1]} reference(s) per sample, but the model "
                                 f"config has num_views={embedder.num_views} ({expected} reference(s)); make the "
                                 f"dataset's num_views equal to the model's")

    def sample(self, batch: dict) -> torch.Tensor:
        val = self.config.validation
        self.check_references(batch["references"], val.target or "the validation set")
        generators = item_generators(self.config.trainer.seed, batch["index"])
        return inpaint_views(self.model, batch["references"], batch["target"], batch["mask"], sampler=val.sampler,
                             steps=val.steps, cfg=val.cfg, composite=val.composite, generator=generators,
                             **sampler_options(val.sampler, val.eta, default_eta=0.0))

    def grid_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first reference (the highest overlap) in the grid's reference column."""
        return batch["references"][:, 0], batch["target"], batch["mask"]


class AutoregressiveNVSModule(MultiViewModule):
    """Block-causal autoregressive NVS. Batches (leftrefill.data.objaverse_multiview): ``reference``
    (B, 3, S, S), ``target`` (B, v, 3, S, S), ``mask`` (B, v, 1, S, S), ``pose`` (B, v, 4)."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, masks, conditions = self.canvases(batch)
        loss = self.views_loss(images, masks, conditions, target_views_only=False)  # teacher forcing: all views
        self.log_loss(loss, batch["reference"].shape[0])
        return loss

    def canvases(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """[reference | target_i] canvases (B*v, 3, S, 2S), their masks on the right halves and the poses
        (B*v, 4), flattened as (B v)."""
        targets = batch["target"]
        v = targets.shape[1]
        if v != self.model.cond_stage_model.num_views:
            raise ViewCountError(f"the data gives {v} target views per object, but the model config has num_views="
                                 f"{self.model.cond_stage_model.num_views}; make them equal")
        images = stitch(batch["reference"].repeat_interleave(v, dim=0), rearrange(targets, "b v c h w -> (b v) c h w"))
        masks = canvas_mask(rearrange(batch["mask"], "b v c h w -> (b v) c h w"))
        return images, masks, {"pose": rearrange(batch["pose"], "b v d -> (b v) d")}

    def scored_view(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The last target view, generated given the earlier ground-truth views."""
        return batch["target"][:, -1], batch["mask"][:, -1]

    def sample(self, batch: dict) -> torch.Tensor:
        """The last view (B, 3, S, S) given the reference and the earlier ground-truth target views."""
        val = self.config.validation
        generators = item_generators(self.config.trainer.seed, batch["index"])
        visible = batch["target_visible"][:, -1] if "target_visible" in batch else None  # the unknown view hidden
        return predict_last_view(self.model, batch["reference"], batch["target"][:, :-1], batch["pose"],
                                 batch["mask"], target_visible=visible, sampler=val.sampler, steps=val.steps,
                                 cfg=val.cfg, generator=generators,
                                 **sampler_options(val.sampler, val.eta, default_eta=0.0))

    def grid_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        target, mask = self.scored_view(batch)
        return batch["reference"], target, mask
