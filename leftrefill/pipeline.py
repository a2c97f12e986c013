"""LeftRefill reference-guided inpainting: the one object the CLI, the demo and user code call.

    pipe = LeftRefillPipeline.from_model_dir("checkpoints/ref_guided_inpainting")
    [filled] = pipe("reference.jpg", "target.jpg", "mask.png", seed=0)

What happens (METHOD 1.2 to 1.8):
1. reference and target are each resized to ``test_size`` x ``test_size`` (OpenCV INTER_AREA, aspect not
   kept, as the original) and stitched as the canvas ``[reference | target]`` (H x 2W); the mask covers
   only the target half;
2. the UNet sees cat(noisy latent, mask on the latent grid, VAE latent of canvas * (mask < 0.5));
3. the sampler (DDIM by default) with classifier-free guidance: the conditional context is the learned
   prompt tokens, the unconditional one the empty string; both branches share the concat channels and run
   in one batched UNet call per step;
4. decoded * mask + canvas * (1 - mask), right half;
5. ``__call__`` only: the result is resized back to the target's own size and pasted into the target
   through the user's mask at full resolution, so every pixel outside the mask is the original.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from ldm.checkpoint import CheckpointError
from ldm.latent_diffusion import LatentInpaintDiffusion, model_builder
from ldm.noise import Generators
from ldm.util import ConfigError
from leftrefill.arguments import check_sampling_options, item_generators, sampler_options
from leftrefill.cli import PRECISION_SPELLINGS
from leftrefill.images import (ImageSource, load_mask, load_rgb, mask_to_tensor, resize_mask, resize_rgb,
                               rgb_to_tensor, tensor_to_rgb)
from leftrefill.inpaint import inpaint
from leftrefill.model_dir import CONFIG_NAME, build_model, resolve_model_dir
from leftrefill.paths import locate
from leftrefill.prompt_tokens import PromptCLIPEmbedder

log = logging.getLogger(__name__)

# Bare names, found by leftrefill.paths: $LEFTREFILL_HOME, the project folder, the installed copies
DEFAULT_MODEL_DIR = Path("ref_guided_inpainting")  # checkpoints/ref_guided_inpainting: config + released tokens
DEFAULT_BASE_CKPT = Path("512-inpainting-ema.ckpt")  # pretrained_models/512-inpainting-ema.ckpt
DEFAULT_ETA = 1.0  # DDIM eta of the paper's test command
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RANDOM_WEIGHTS_WARNING = ("RANDOM WEIGHTS: this model was built with --random_init and loaded no SD2 checkpoint; "
                          "its outputs are noise and its metrics mean nothing. It only exercises the code path.")


class WrongTaskError(TypeError):
    """The model directory is for another task (an NVS model given to reference inpainting, or back)."""


def resolve_device_and_dtype(device: str | torch.device | None, precision: str) -> tuple[torch.device, torch.dtype]:
    """``device`` None -> CUDA when available, else CPU. ``precision`` "auto" -> fp16 on CUDA (the original
    runs under CUDA autocast), fp32 elsewhere; or one of fp32 / fp16 / bf16."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine (use cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    precision = PRECISION_SPELLINGS.get(precision, precision)  # also Lightning's 32 / 16-mixed / bf16-mixed
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return device, PRECISIONS[precision]


class ModelOnDevice:
    """What every pipeline shares: its ``model`` moved and cast as a whole; device and dtype read from the UNet."""

    model: LatentInpaintDiffusion

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.model.parameters()).dtype


class LeftRefillPipeline(ModelOnDevice):
    """Frozen SD2 inpainting model + learned prompt tokens, sampling at ``test_size`` (a multiple of 64)."""

    default_eta = DEFAULT_ETA
    default_test_size = 512

    def __init__(self, model: LatentInpaintDiffusion, *, test_size: int | None = None, random_weights: bool = False):
        test_size = self.default_test_size if test_size is None else test_size
        self._check_conditioner(model.cond_stage_model)
        if test_size <= 0 or test_size % 64:
            raise ValueError(f"test_size must be a positive multiple of 64, got {test_size}")
        self.model = model.eval().requires_grad_(False)
        self.test_size = test_size
        self.random_weights = random_weights
        # Files the weights came from (set by from_model_dir; written to summary.json by the evaluation).
        self.loaded: dict[str, str | bool | None] = {"random_init": random_weights}

    @staticmethod
    def _check_conditioner(embedder) -> None:
        from leftrefill.multiview_prompt import MultiViewPromptCLIPEmbedder

        # A multi-view embedder is a PromptCLIPEmbedder too: it is refused first, with its own pipeline's name.
        if isinstance(embedder, MultiViewPromptCLIPEmbedder) and not embedder.condition_keys:
            raise WrongTaskError(f"the model's cond_stage_model is {type(embedder).__name__}, a multi-view model "
                                 f"trained for {embedder.num_views} views; it fills a target from all its references "
                                 f"at once: use leftrefill.multiview_pipeline.MultiViewPipeline "
                                 f"(test_multiview_inpainting.py)")
        if not isinstance(embedder, PromptCLIPEmbedder) or embedder.condition_keys:
            raise WrongTaskError(f"the model's cond_stage_model is {type(embedder).__name__}; reference-guided "
                            f"inpainting needs leftrefill.prompt_tokens.PromptCLIPEmbedder (see the model directory's "
                            f"config; an NVS model goes to leftrefill.nvs_pipeline.NVSPipeline)")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_model_dir(cls, model_path: str | Path = DEFAULT_MODEL_DIR, base_ckpt: str | Path = DEFAULT_BASE_CKPT, *,
                       device: str | torch.device | None = None, precision: str = "auto", random_init: bool = False,
                       test_size: int | None = None) -> LeftRefillPipeline:
        """Build from a model directory (``model_config.yaml`` + token weights, see leftrefill.model_dir)
        and the SD2 inpainting checkpoint ``base_ckpt``.

        The model is built on the meta device and filled from the memory-mapped base checkpoint merged with
        the tokens in one strict, key-checked load. ``random_init`` skips the base checkpoint and draws
        random weights (seeded, reproducible, none constant: see ldm.random_weights); the directory's token
        file, when it has one, is still loaded onto that random backbone (a tiny training run evaluated on
        the backbone it was trained with). ``pipe.loaded`` records which files were used.
        """
        device, dtype = resolve_device_and_dtype(device, precision)
        model_dir = resolve_model_dir(model_path)
        build = _builder(model_dir.config)
        if random_init:
            log.warning(RANDOM_WEIGHTS_WARNING)
            _warn_if_large(build, model_dir.config)
            if model_dir.weights is not None:
                log.warning("random backbone with the trained tensors of %s", model_dir.weights)
            model = build_model(build, trained=model_dir.weights, random_init=True)
        else:
            if model_dir.weights is None:
                raise CheckpointError(f"{model_dir.config.parent}: no token weights (ckpts/*.ckpt or *.safetensors) "
                                      f"beside {CONFIG_NAME}; pass a trained model directory, or --random_init to "
                                      f"try the code path")
            base_ckpt = locate(base_ckpt, "pretrained_models") if base_ckpt is not None else None  # for pipe.loaded
            model = build_model(build, base_ckpt=base_ckpt, trained=model_dir.weights)
        pipe = cls(model, test_size=test_size, random_weights=random_init)
        pipe.loaded = {"model_config": str(model_dir.config), "base_ckpt": None if random_init else str(base_ckpt),
                       "prompt_tokens": None if model_dir.weights is None else str(model_dir.weights),
                       "random_init": random_init}
        return pipe.to(device, dtype)

    # -- sampling on tensors -----------------------------------------------------------------------
    def inpaint(self, reference: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, sampler: str = "ddim",
                steps: int = 50, cfg: float = 2.5, eta: float | None = None, strength: float = 1.0,
                generator: Generators = None, progress: bool = False) -> torch.Tensor:
        """Fill ``mask`` in ``target`` from ``reference``, all at the model resolution (leftrefill.inpaint).

        reference: (B, 3, H, W), or (B, K, 3, H, W) for K references of each target: training-free
        multi-reference (METHOD 7.3), K canvases [reference_k | target] sampled with one shared target half,
        K times the work of one reference (see leftrefill.inpaint.inpaint); target: (B, 3, H, W); both in
        [-1, 1]. mask: (B, 1, H, W), 1 = fill (binarised at 0.5).
        sampler: a name of ldm.sampling.SAMPLERS; eta: DDIM's eta (default 1.0, the paper's test setting),
        refused for samplers without one; strength in (0, 1]: SDEdit start from the noised target (1 = noise).
        generator: one, or one per batch item (item i's result then does not depend on the batch).
        Returns the blended target half (B, 3, H, W), float32 on the pipeline's device, not clamped.
        """
        check_sampling_options(steps=steps, cfg=cfg, eta=eta, strength=strength, sampler=sampler)
        return inpaint(self.model, reference, target, mask, sampler=sampler, steps=steps, cfg=cfg, strength=strength,
                       generator=generator, progress=progress, **sampler_options(sampler, eta, self.default_eta))

    # -- images in, images out ---------------------------------------------------------------------
    def __call__(self, reference: ImageSource | list[ImageSource] | tuple[ImageSource, ...], target: ImageSource,
                 mask: ImageSource, *, sampler: str = "ddim", steps: int = 50, cfg: float = 2.5,
                 eta: float | None = None, strength: float = 1.0, seed: int = 42, num_samples: int = 1,
                 progress: bool = False) -> list[Image.Image]:
        """Fill the white part of ``mask`` in ``target`` with what ``reference`` shows; PIL images out.

        Inputs: paths, PIL images or numpy arrays (see leftrefill.images). ``reference`` may also be a list or
        tuple of K images of the same scene: training-free multi-reference (METHOD 7.3), each step K times
        the work of one reference (see :meth:`inpaint`). Outputs have the target's own size; pixels outside
        the mask are the target's, exactly. Sample k uses seed ``seed + k``, so the same seed gives the same
        output. A mask of another size than the target is resized to it. sampler, eta, strength: as
        :meth:`inpaint`.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        check_sampling_options(steps=steps, cfg=cfg, eta=eta, seed=seed, num_seeds=num_samples, strength=strength,
                               sampler=sampler)
        references = list(reference) if isinstance(reference, (list, tuple)) else [reference]
        if not references:
            raise ValueError("reference must be an image or a non-empty list of images, got an empty list")
        reference_rgbs = [load_rgb(image, "reference" if len(references) == 1 else f"reference {k}")
                          for k, image in enumerate(references)]
        target_rgb, hole = target_and_hole(target, mask)
        if len(reference_rgbs) > 1:
            warn_if_sizes_differ(target_rgb, reference_rgbs, self.test_size)
        if not hole.any():
            log.warning("the mask is empty (no pixel > 127): nothing to fill, the target is returned unchanged")
            return [Image.fromarray(target_rgb) for _ in range(num_samples)]

        size = (self.test_size, self.test_size)
        reference_t = torch.stack([rgb_to_tensor(resize_rgb(rgb, size)) for rgb in reference_rgbs])  # (K, 3, S, S)
        reference_t = reference_t[None].expand(num_samples, -1, -1, -1, -1)
        target_t, mask_t = (x[None].expand(num_samples, -1, -1, -1) for x in (
            rgb_to_tensor(resize_rgb(target_rgb, size)), mask_to_tensor(resize_mask(hole, size, rule="cover"))))
        generators = item_generators(seed, range(num_samples))
        filled = self.inpaint(reference_t, target_t, mask_t, sampler=sampler, steps=steps, cfg=cfg, eta=eta,
                              strength=strength, generator=generators, progress=progress)
        return [Image.fromarray(paste_filled(tensor_to_rgb(image), target_rgb, hole)) for image in filled]


def target_and_hole(target: ImageSource, mask: ImageSource) -> tuple[np.ndarray, np.ndarray]:
    """The target RGB uint8 (H, W, 3) and the hole bool (H, W), True = fill; a mask of another size is
    resized to the target (nearest) with a warning."""
    target_rgb, hole = load_rgb(target, "target"), load_mask(mask, "mask")
    if hole.shape != target_rgb.shape[:2]:
        log.warning("mask is %dx%d but the target is %dx%d; the mask was resized to the target (nearest)",
                    hole.shape[1], hole.shape[0], target_rgb.shape[1], target_rgb.shape[0])
        hole = resize_mask(hole, target_rgb.shape[:2])
    return target_rgb, hole


def warn_if_sizes_differ(target: np.ndarray, references: list[np.ndarray], test_size: int) -> None:
    """One warning when the target and the references are not all of one size: each is squashed to
    test_size x test_size, so their aspect ratios change differently."""
    sizes = [f"{image.shape[1]}x{image.shape[0]}" for image in (target, *references)]
    if len(set(sizes)) > 1:
        log.warning("the target (%s) and the references (%s) differ in size; each is resized to %dx%d, so their "
                    "aspect ratios change differently", sizes[0], ", ".join(sizes[1:]), test_size, test_size)


def paste_filled(filled: np.ndarray, target: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Resize the model-resolution result (S, S, 3) to the target (H, W, 3) and take it inside ``hole`` only."""
    h, w = target.shape[:2]
    enlarging = h > filled.shape[0] or w > filled.shape[1]
    resized = cv2.resize(filled, (w, h), interpolation=cv2.INTER_CUBIC if enlarging else cv2.INTER_AREA)
    return np.where(hole[..., None], resized, target)


LARGE_MODEL_PARAMETERS = 100_000_000


def _warn_if_large(build, config: Path) -> None:
    """Say so before a full-size random model is drawn: it takes minutes and gigabytes on a CPU."""
    with torch.device("meta"):
        count = sum(p.numel() for p in build().parameters())
    if count >= LARGE_MODEL_PARAMETERS:
        log.warning("--random_init with %s builds the full-size model: %.2f B parameters drawn at random (minutes "
                    "and about %d GB of RAM on a CPU). To try the code path quickly use --model_path "
                    "checkpoints/tiny_random", config, count / 1e9, math.ceil(count * 4 * 1.5 / 2**30))


def _builder(config: Path):
    try:
        return model_builder(config)
    except ConfigError as err:
        if "ldm.models." in str(err) or "ldm.modules." in str(err):
            raise ConfigError(f"{err}\nThis looks like the official LeftRefill release's config. Put this project's "
                              f"checkpoints/ref_guided_inpainting/model_config.yaml in its place; the token "
                              f"checkpoint can stay as it is.") from None
        raise
