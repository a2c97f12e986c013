"""LeftRefill novel view synthesis: one reference view of an object and a relative camera pose in, the new view out.

    pipe = NVSPipeline.from_model_dir("checkpoints/NVS_OBJ_V0", "pretrained_models/512-inpainting-ema.ckpt")
    [view] = pipe("chair.png", pose=(0, 90, 0), seed=0)          # polar, azimuth (degrees), radius deltas
    [view] = pipe("chair.png", cameras=(reference_w2c, target_w2c))  # or both 3x4 world-to-camera matrices
    views = pipe.turntable("chair.png", num_views=8)

What happens (METHOD 2):
1. the reference (RGBA: alpha 0 -> white; RGB: a white background is assumed) is resized to
   ``test_size`` (256, the release's) and its silhouette taken (alpha > 0);
2. the canvas is ``[reference | target]``; the target is unknown, so the model sees a white target half
   and fills the mask: the reference's silhouette (``mask_mode="reference"``, the release's deployment
   setting, default) or the whole half (``"complete"``);
3. the conditioner writes the pose token (pose MLP of [d_polar, sin d_azimuth, cos d_azimuth, d_radius])
   into the prompt; classifier-free guidance against the empty string (cfg 2.5), DDIM (eta 0 by
   default: the release's validation setting; its test eta is not given);
4. the whole decoded right half is the new view (no compositing: the background is generated too).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.noise import Generators
from leftrefill.arguments import check_sampling_options, item_generators, sampler_options
from leftrefill.data.objaverse_nvs import load_view, reference_mask
from leftrefill.images import ImageSource, tensor_to_rgb
from leftrefill.inpaint import inpaint
from leftrefill.multiview_prompt import MultiViewPromptCLIPEmbedder
from leftrefill.nvs_pose import pose_from_deltas, relative_pose
from leftrefill.pipeline import LeftRefillPipeline, WrongTaskError
from leftrefill.pose_prompt import PosePromptCLIPEmbedder, checked_pose

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path("nvs_objaverse")  # checkpoints/nvs_objaverse (leftrefill.paths): config only until trained
NVS_MASK_MODES = ("reference", "complete")  # fixed masks need the unknown target's files: test_nvs.py only
TURNTABLE_OPTIONS = {"mask_mode", "sampler", "steps", "cfg", "eta", "seed", "progress"}


class NVSPipeline(LeftRefillPipeline):
    """Frozen SD2 inpainting + 73 pose-conditioned prompt tokens (+ a LoRA or a fine-tuned UNet), at
    ``test_size`` (256 by default). Construction as :class:`LeftRefillPipeline` (``from_model_dir``)."""

    default_eta = 0.0
    default_test_size = 256

    @staticmethod
    def _check_conditioner(embedder) -> None:
        if isinstance(embedder, MultiViewPromptCLIPEmbedder):  # would need its views' layout and grouping
            raise WrongTaskError(f"the model's cond_stage_model is {type(embedder).__name__}, a multi-view model "
                                 f"({embedder.num_views} views); one-view novel view synthesis needs "
                                 f"leftrefill.pose_prompt.PosePromptCLIPEmbedder. A block-causal multi-view NVS "
                                 f"model goes to leftrefill.nvs_autoregressive.AutoregressiveNVSPipeline")
        if not isinstance(embedder, PosePromptCLIPEmbedder):
            raise WrongTaskError(f"the model's cond_stage_model is {type(embedder).__name__}; novel view synthesis "
                            f"needs leftrefill.pose_prompt.PosePromptCLIPEmbedder (e.g. checkpoints/nvs_objaverse/"
                            f"model_config.yaml)")

    # -- tensors ---------------------------------------------------------------------------------------
    def synthesize(self, reference: torch.Tensor, pose: torch.Tensor, mask: torch.Tensor,
                   target_visible: torch.Tensor | None = None, *, sampler: str = "ddim", steps: int = 50,
                   cfg: float = 2.5, eta: float | None = None, generator: Generators = None,
                   progress: bool = False) -> torch.Tensor:
        """The new view (B, 3, S, S), float32, not clamped, the whole decoded target half.

        reference: (B, 3, S, S) in [-1, 1]; pose: (B, 4) or (4,) relative pose (leftrefill.nvs_pose);
        mask: (B, 1, S, S), 1 = generate; target_visible: what the model sees of the target outside the
        mask, (B, 3, S, S) (None: white, the target is unknown).
        """
        check_sampling_options(steps=steps, cfg=cfg, eta=eta, sampler=sampler)
        pose = checked_pose(pose, reference.shape[0])
        if target_visible is None:
            target_visible = torch.ones_like(reference)
        return inpaint(self.model, reference, target_visible, mask, sampler=sampler, steps=steps, cfg=cfg,
                       conditions={"pose": pose}, composite="none", generator=generator, progress=progress,
                       **sampler_options(sampler, eta, self.default_eta))

    # -- images ----------------------------------------------------------------------------------------
    def __call__(self, reference: ImageSource, *, pose=None, cameras=None, mask_mode: str = "reference",
                 sampler: str = "ddim", steps: int = 50, cfg: float = 2.5, eta: float | None = None,
                 seed: int = 42, num_samples: int = 1, progress: bool = False) -> list[Image.Image]:
        """The object of ``reference`` seen from another camera, as ``test_size`` x ``test_size`` PIL images.

        Give the camera change as ``pose`` = (d_polar, d_azimuth, d_radius) in degrees and world units (or
        an already encoded (4,) tensor), or as ``cameras`` = (reference_w2c, target_w2c), two 3x4
        world-to-camera matrices (Blender convention, as the Objaverse renders). Sample k uses seed + k.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        check_sampling_options(steps=steps, cfg=cfg, eta=eta, seed=seed, num_seeds=num_samples, sampler=sampler)
        encoded = encode_pose(pose, cameras)
        view, silhouette = load_view(reference, self.test_size, "reference")  # (3, S, S), (1, S, S)
        mask = generation_mask(silhouette, mask_mode)
        batch = [x[None].expand(num_samples, *x.shape) for x in (view, mask)]
        filled = self.synthesize(*batch[:1], encoded.expand(num_samples, -1), batch[1], sampler=sampler,
                                 steps=steps, cfg=cfg, eta=eta, generator=item_generators(seed, range(num_samples)),
                                 progress=progress)
        return [Image.fromarray(tensor_to_rgb(image)) for image in filled]

    def turntable(self, reference: ImageSource, num_views: int = 8, *, d_polar: float = 0.0, d_radius: float = 0.0,
                  **options) -> list[Image.Image]:
        """``num_views`` views at azimuths 0, 360/n, ... degrees from the reference (one batch; view k uses
        seed + k). ``options``: as ``__call__`` (mask_mode, sampler, steps, cfg, eta, seed, progress)."""
        if isinstance(num_views, bool) or not isinstance(num_views, int) or not 1 <= num_views <= 64:
            raise ValueError(f"num_views must be an integer in [1, 64], got {num_views!r}")
        unknown = sorted(set(options) - TURNTABLE_OPTIONS)
        if unknown:
            raise ValueError(f"turntable takes no option {', '.join(unknown)}; it takes "
                             f"{', '.join(sorted(TURNTABLE_OPTIONS))} (one view per azimuth, each its own seed)")
        seed, mask_mode = options.pop("seed", 42), options.pop("mask_mode", "reference")
        poses = torch.stack([pose_from_deltas(d_polar, 360.0 * k / num_views, d_radius) for k in range(num_views)])
        check_sampling_options(seed=seed, num_seeds=num_views)
        view, silhouette = load_view(reference, self.test_size, "reference")
        mask = generation_mask(silhouette, mask_mode)
        filled = self.synthesize(view[None].expand(num_views, -1, -1, -1), poses,
                                 mask[None].expand(num_views, -1, -1, -1),
                                 generator=item_generators(seed, range(num_views)), **options)
        return [Image.fromarray(tensor_to_rgb(image)) for image in filled]


def encode_pose(pose=None, cameras=None) -> torch.Tensor:
    """The (4,) pose vector from deltas (d_polar, d_azimuth, d_radius) in degrees, an encoded (4,) tensor, or
    a (reference_w2c, target_w2c) pair of 3x4 cameras; exactly one of ``pose`` and ``cameras``."""
    if (pose is None) == (cameras is None):
        raise ValueError("give the camera change as pose=(d_polar, d_azimuth, d_radius) or as "
                         "cameras=(reference_w2c, target_w2c), exactly one of them")
    if cameras is not None:
        if not isinstance(cameras, (tuple, list)) or len(cameras) != 2:
            raise ValueError("cameras must be a pair (reference_w2c, target_w2c) of 3x4 world-to-camera matrices")
        reference_w2c, target_w2c = (np.asarray(c) if not isinstance(c, torch.Tensor) else c for c in cameras)
        for name, camera in (("reference_w2c", reference_w2c), ("target_w2c", target_w2c)):
            if tuple(camera.shape) != (3, 4):
                raise ValueError(f"cameras: {name} must be one 3x4 world-to-camera matrix, got shape "
                                 f"{tuple(camera.shape)}")
        return relative_pose(target_w2c, reference_w2c)
    if isinstance(pose, torch.Tensor):
        return checked_pose(pose, 1)[0]
    if not isinstance(pose, (tuple, list)) or len(pose) not in (2, 3):
        raise ValueError(f"pose must be (d_polar, d_azimuth[, d_radius]) in degrees and world units, got {pose!r}")
    return pose_from_deltas(*pose)


def generation_mask(silhouette: torch.Tensor, mask_mode: str) -> torch.Tensor:
    """The region to generate (1, S, S): the reference's silhouette (``"reference"``; the whole view when it is
    empty), or everything (``"complete"``)."""
    if mask_mode not in NVS_MASK_MODES:
        raise ValueError(f"mask_mode must be one of {', '.join(NVS_MASK_MODES)}, got {mask_mode!r}")
    return reference_mask(silhouette) if mask_mode == "reference" else torch.ones_like(silhouette)
