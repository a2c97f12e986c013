"""Multi-view LeftRefill: fill a target from all its references at once (METHOD 3.1, 3.2).

    pipe = MultiViewPipeline.from_model_dir("checkpoints/multiview_ref_inpainting")   # 4 views: 3 references
    [filled] = pipe(["source.jpg", "source_1.jpg", "source_2.jpg"], "target.jpg", "mask.png", seed=0)

What happens:
1. every reference and the target are resized to ``test_size`` x ``test_size`` (INTER_AREA, aspect not
   kept, as the release; images of different sizes are reported once per call);
2. they become the model's views, flattened into the batch as (b v): view 0 the masked target, views
   1..v-1 the references in the order given (the first should overlap the target most, METHOD 3.2);
3. each view is conditioned on its own prompt (shared + view tokens), the self-attention runs jointly over
   the views of a sample; classifier-free guidance against the empty string, DDIM by default
   (leftrefill.multiview_inpaint);
4. ``__call__`` only: view 0, resized back to the target's own size, is pasted through the user's mask,
   so every pixel outside it is the target's (as ``LeftRefillPipeline.__call__``).

The Python defaults are LeftRefillPipeline's (cfg 2.5, eta 1.0, seed 42); test_multiview_inpainting.py
defaults to the release's multi-view test script instead (seed 666, cfg 1.0, eta 0, batch 4; METHOD 7.4).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.noise import Generators
from ldm.util import ConfigError, instantiate_from_config, load_config
from leftrefill.arguments import check_sampling_options, item_generators, sampler_options
from leftrefill.images import (ImageSource, load_rgb, mask_to_tensor, resize_mask, resize_rgb,
                               rgb_to_tensor, tensor_to_rgb)
from leftrefill.model_dir import resolve_model_dir
from leftrefill.multiview_inpaint import ViewCountError, inpaint_views, references_per_sample
from leftrefill.multiview_prompt import MultiViewPromptCLIPEmbedder
from leftrefill.pipeline import (LeftRefillPipeline, WrongTaskError, paste_filled, target_and_hole,
                                 warn_if_sizes_differ)

log = logging.getLogger(__name__)

COND_STAGE_NODE = "model.params.cond_stage_config"


def is_multiview(embedder) -> bool:
    """Whether ``embedder`` conditions multi-view reference inpainting (not multi-view NVS, which needs poses)."""
    return isinstance(embedder, MultiViewPromptCLIPEmbedder) and not embedder.condition_keys


def config_conditioner(model_path: str | Path):
    """The conditioner of a model directory (or of a token file in one), built from its config on the meta
    device: no weight is read, so a command line can check the task and the views before loading anything.
    FileNotFoundError or ConfigError naming the directory or the file."""
    config_path = resolve_model_dir(model_path).config
    node = OmegaConf.select(load_config(config_path), COND_STAGE_NODE)
    if node is None:
        raise ConfigError(f"{config_path}: no {COND_STAGE_NODE}")
    try:
        with torch.device("meta"):
            return instantiate_from_config(node, COND_STAGE_NODE)
    except ConfigError as err:  # a bad parameter: say which file
        raise ConfigError(f"{config_path}: {err}") from None


def multiview_conditioner(model_path: str | Path) -> MultiViewPromptCLIPEmbedder:
    """:func:`config_conditioner`, checked to be a multi-view inpainting one (WrongTaskError otherwise): its
    ``num_views`` and ``concat_target`` say how many references each target needs."""
    embedder = config_conditioner(model_path)
    MultiViewPipeline._check_conditioner(embedder)
    return embedder


def inpainting_pipeline_class(model_path: str | Path) -> type[LeftRefillPipeline]:
    """MultiViewPipeline for a multi-view model directory, else LeftRefillPipeline (whose own check refuses
    a directory of another task)."""
    return MultiViewPipeline if is_multiview(config_conditioner(model_path)) else LeftRefillPipeline


class MultiViewPipeline(LeftRefillPipeline):
    """Frozen SD2 inpainting + per-view prompt tokens of a model trained for ``num_views`` views, sampling at
    ``test_size``. Construction as :class:`LeftRefillPipeline` (``from_model_dir``)."""

    @staticmethod
    def _check_conditioner(embedder) -> None:
        if not is_multiview(embedder):
            raise WrongTaskError(f"the model's cond_stage_model is {type(embedder).__name__}; multi-view "
                                 f"reference-guided inpainting needs leftrefill.multiview_prompt."
                                 f"MultiViewPromptCLIPEmbedder (e.g. checkpoints/multiview_ref_inpainting/"
                                 f"model_config.yaml); a one-reference model goes to "
                                 f"leftrefill.pipeline.LeftRefillPipeline")

    @property
    def num_views(self) -> int:
        """The number of views the model was trained for (the target is one of them)."""
        return self.model.cond_stage_model.num_views

    @property
    def num_references(self) -> int:
        """References per target: num_views - 1 (num_views with concat_target, METHOD 3.1)."""
        return references_per_sample(self.model.cond_stage_model)

    # -- sampling on tensors -----------------------------------------------------------------------
    def inpaint(self, references: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, sampler: str = "ddim",
                steps: int = 50, cfg: float = 2.5, eta: float | None = None, strength: float = 1.0,
                generator: Generators = None, progress: bool = False) -> torch.Tensor:
        """Fill ``mask`` in ``target`` from all ``references`` jointly, at the model resolution.

        references: (B, k, 3, S, S) in [-1, 1], k = ``num_references`` (ViewCountError otherwise), in order;
        target: (B, 3, S, S) in [-1, 1]; mask: (B, 1, S, S), 1 = fill (binarised at 0.5). Options as
        :meth:`LeftRefillPipeline.inpaint`; ``generator``: one, or one per sample. Returns the blended
        target (B, 3, S, S), float32 on the pipeline's device, not clamped.
        """
        check_sampling_options(steps=steps, cfg=cfg, eta=eta, strength=strength, sampler=sampler)
        return inpaint_views(self.model, references, target, mask, sampler=sampler, steps=steps, cfg=cfg,
                             strength=strength, generator=generator, progress=progress,
                             **sampler_options(sampler, eta, self.default_eta))

    # -- images in, images out ---------------------------------------------------------------------
    def __call__(self, references: Sequence[ImageSource] | ImageSource, target: ImageSource, mask: ImageSource, *,
                 sampler: str = "ddim", steps: int = 50, cfg: float = 2.5, eta: float | None = None,
                 strength: float = 1.0, seed: int = 42, num_samples: int = 1,
                 progress: bool = False) -> list[Image.Image]:
        """Fill the white part of ``mask`` in ``target`` with what the ``references`` show; PIL images out.

        references: a list of exactly ``num_references`` images (paths, PIL images or arrays, see
        leftrefill.images), in the order the model saw in training (the most overlapping first); a single
        image counts as a list of one. Outputs have the target's own size; pixels outside the mask are the
        target's, exactly. Sample k uses seed ``seed + k``. Other options: as :meth:`inpaint`.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        check_sampling_options(steps=steps, cfg=cfg, eta=eta, seed=seed, num_seeds=num_samples, strength=strength,
                               sampler=sampler)
        references = self._reference_list(references)
        reference_rgbs = [load_rgb(reference, f"reference {k}") for k, reference in enumerate(references)]
        target_rgb, hole = target_and_hole(target, mask)
        if not hole.any():
            log.warning("the mask is empty (no pixel > 127): nothing to fill, the target is returned unchanged")
            return [Image.fromarray(target_rgb) for _ in range(num_samples)]
        warn_if_sizes_differ(target_rgb, reference_rgbs, self.test_size)

        size = (self.test_size, self.test_size)
        references_t = torch.stack([rgb_to_tensor(resize_rgb(image, size)) for image in reference_rgbs])  # (k, 3, S, S)
        target_t = rgb_to_tensor(resize_rgb(target_rgb, size))
        mask_t = mask_to_tensor(resize_mask(hole, size, rule="cover"))
        batch = [x[None].expand(num_samples, *x.shape) for x in (references_t, target_t, mask_t)]
        filled = self.inpaint(*batch, sampler=sampler, steps=steps, cfg=cfg, eta=eta, strength=strength,
                              generator=item_generators(seed, range(num_samples)), progress=progress)
        return [Image.fromarray(paste_filled(tensor_to_rgb(image), target_rgb, hole)) for image in filled]

    def _reference_list(self, references) -> list[ImageSource]:
        """``references`` as a list of ``num_references`` images, or a ViewCountError saying how many to give."""
        if isinstance(references, (str, Path, Image.Image, np.ndarray)):
            references = [references]
        references = list(references)
        if len(references) != self.num_references:
            raise ViewCountError(view_count_message(self.model.cond_stage_model, len(references)))
        return references


def view_count_message(embedder, given: int) -> str:
    """Why ``given`` references do not fit this model, e.g. "this model was trained for 4 views: give 3
    references, got 2"."""
    expected = references_per_sample(embedder)
    what = " (each view stitches one reference to the target)" if embedder.concat_target else ""
    return (f"this model was trained for {embedder.num_views} views{what}: give {expected} "
            f"reference{'s' if expected != 1 else ''}, got {given}")
