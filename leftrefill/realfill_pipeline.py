"""RealFill inference: fill a target photo with a scene's personalised SD2 inpainting model (METHOD 5.1, 7.1).

    pipe = RealFillPipeline.from_model_dir("checkpoints/realfill_sacre_coeur")
    samples = pipe("scene/target/target.png", "scene/target/mask.png", num_samples=16, seed=0)

What happens, per sample (the reference's infer.py, thuanz123/realfill):
1. the target is squashed to ``resolution`` x ``resolution`` (aspect not kept, as the reference's pipeline
   call with height = width = 512) and its mask resized so that it covers every hole pixel
   (leftrefill.data.realfill.model_inputs);
2. the shared fill core (ldm.fill) samples with the prompt the adapters were trained on ("a photo of sks"):
   DDPM, 200 steps, guidance 1 (the conditional branch alone) by default; sample k uses seed + k;
3. the decoded image is resized back to the target's own size and aspect;
4. soft composite at that size: alpha = the binary mask dilated with a 3 x 3 max filter and box-blurred with
   radius 1 (ldm.fill.soft_alpha); out = alpha * generated + (1 - alpha) * target, rounded. The blur
   widens the dilated mask by one more pixel (alpha 1/9 to 3/9 there); every pixel outside that support (the
   hole grown by 2 px, a 5 x 5 dilation) is the target's exactly.

The adapters are merged into the base weights after loading (same outputs, no adapter cost per step).
Ranking the samples by matches with the references is leftrefill.selection's (test_realfill.py --keep).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import cv2
import numpy as np
import torch

from ldm.checkpoint import CheckpointError
from ldm.fill import Conditioning, fill, soft_alpha
from ldm.latent_diffusion import LatentInpaintDiffusion, model_builder
from ldm.noise import Generators
from leftrefill.arguments import check_sampling_options, item_generators, sampler_options
from leftrefill.checkpoint_io import file_record
from leftrefill.data.realfill import PROMPT, model_inputs
from leftrefill.images import ImageSource, load_mask, load_rgb, resize_mask, tensor_to_rgb
from leftrefill.lora import merge_lora
from leftrefill.model_dir import CONFIG_NAME, ModelDirectory, build_model, read_trained_file, resolve_model_dir
from leftrefill.paths import locate, looked_in
from leftrefill.pipeline import (DEFAULT_BASE_CKPT, RANDOM_WEIGHTS_WARNING, ModelOnDevice, WrongTaskError,
                                 resolve_device_and_dtype)
from leftrefill.text_conditioner import TextConditioner

log = logging.getLogger(__name__)

DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_CFG = "ddpm", 200, 1.0  # the reference's infer.py
DEFAULT_NUM_SAMPLES = 16
ADAPTER_NAME = "adapters.safetensors"  # train_realfill.py's adapter file, preferred over the run's checkpoints


class RealFillPipeline(ModelOnDevice):
    """SD2 inpainting with a scene's merged LoRA adapters, sampling at ``resolution`` (a multiple of 64)."""

    def __init__(self, model: LatentInpaintDiffusion, *, resolution: int = 512, prompt: str = PROMPT,
                 random_weights: bool = False):
        if not isinstance(model.cond_stage_model, TextConditioner):
            raise WrongTaskError(f"the model's cond_stage_model is {type(model.cond_stage_model).__name__}; RealFill "
                                 f"needs leftrefill.text_conditioner.TextConditioner (checkpoints/realfill/"
                                 f"model_config.yaml); a LeftRefill model goes to LeftRefillPipeline")
        if resolution <= 0 or resolution % 64:
            raise ValueError(f"resolution must be a positive multiple of 64, got {resolution}")
        self.model = model.eval().requires_grad_(False)
        self.resolution, self.prompt, self.random_weights = resolution, prompt, random_weights
        self.loaded: dict[str, str | bool | None] = {"random_init": random_weights}

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_model_dir(cls, model_path: str | Path, base_ckpt: str | Path = DEFAULT_BASE_CKPT, *,
                       device: str | torch.device | None = None, precision: str = "auto", random_init: bool = False,
                       resolution: int | None = None, check_base: bool = True) -> RealFillPipeline:
        """Build from a RealFill model directory (train_realfill.py's output: model_config.yaml and
        adapters.safetensors or ckpts/*.ckpt) over the SD2 checkpoint ``base_ckpt``.

        The adapter's spec, prompt and training resolution come from the file's metadata. ``check_base``:
        the base checkpoint's sha256 must be the one the adapters were trained on (when the file records it;
        hashing 5 GB takes seconds), so adapters of another base model are refused, naming both files. A
        directory without adapter weights samples the base model alone: plain SD2 inpainting, or a merged
        RealFill model given as ``base_ckpt``. ``random_init``: seeded random weights (the code path only).
        """
        device, dtype = resolve_device_and_dtype(device, precision)
        base_ckpt = locate(base_ckpt, "pretrained_models") if base_ckpt is not None else None
        model_dir = adapter_source(model_path)
        build = model_builder(model_dir.config)
        trained = read_trained_file(model_dir.weights) if model_dir.weights is not None else None
        if random_init:
            log.warning(RANDOM_WEIGHTS_WARNING)
        elif trained is None:
            log.warning("%s holds no adapters: sampling %s as it is (plain SD2 inpainting, or a merged model)",
                        model_dir.config.parent, base_ckpt)
        elif check_base:
            check_base_checkpoint(trained.metadata, base_ckpt, trained.path)
        model = build_model(build, base_ckpt=None if random_init else base_ckpt, trained=trained.path if trained else None,
                            random_init=random_init)
        if not isinstance(model.cond_stage_model, TextConditioner):
            raise WrongTaskError(f"--model_path {model_path}: its model config {model_dir.config} is not a RealFill "
                                 f"model (cond_stage_config must be leftrefill.text_conditioner.TextConditioner)")
        merge_lora(model)
        params = _training_data_params(trained.metadata if trained else None)
        pipe = cls(model, resolution=resolution or params.get("size", 512), prompt=params.get("prompt", PROMPT),
                   random_weights=random_init)
        pipe.loaded = {"model_config": str(model_dir.config), "base_ckpt": None if random_init else str(base_ckpt),
                       "adapters": None if trained is None else str(trained.path), "random_init": random_init}
        return pipe.to(device, dtype)

    # -- sampling on tensors -----------------------------------------------------------------------
    def sample(self, image: torch.Tensor, mask: torch.Tensor, *, sampler: str = DEFAULT_SAMPLER,
               steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, eta: float | None = None,
               generator: Generators = None, progress: bool = False) -> torch.Tensor:
        """Decoded samples (B, 3, S, S), float32, not clamped, for ``image`` (B, 3, S, S) in [-1, 1] and ``mask``
        (B, 1, S, S) (1 = fill): the whole decoded image, composited later at the target's own size."""
        check_sampling_options(steps=steps, cfg=cfg, eta=eta, sampler=sampler)
        n = image.shape[0]
        embedder = self.model.cond_stage_model
        with torch.no_grad():
            cond = embedder.context({"prompt": self.prompt}, n)
            uncond = embedder.empty_context(n) if cfg != 1 else None
        return fill(self.model, image, mask, Conditioning(cond, uncond), sampler=sampler, steps=steps, guidance=cfg,
                    composite="none", generator=generator, progress=progress,
                    **sampler_options(sampler, eta, default_eta=0.0))

    # -- images in, images out ---------------------------------------------------------------------
    def __call__(self, target: ImageSource, mask: ImageSource, *, num_samples: int = DEFAULT_NUM_SAMPLES,
                 sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG,
                 eta: float | None = None, seed: int = 0, batch_size: int = 4, progress: bool = False,
                 on_batch=None) -> list[np.ndarray]:
        """``num_samples`` fills of the white part of ``mask`` in ``target``: RGB uint8 (H, W, 3) at the
        target's own size, soft-composited (module docstring). Sample k uses seed + k, in batches of
        ``batch_size`` (the result does not depend on it). ``on_batch(done, total)`` is called after each
        batch (progress bars)."""
        for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        check_sampling_options(steps=steps, cfg=cfg, eta=eta, seed=seed, num_seeds=num_samples, sampler=sampler)
        target_rgb, hole = load_rgb(target, "target"), load_mask(mask, "mask")
        if hole.shape != target_rgb.shape[:2]:
            log.warning("mask is %dx%d but the target is %dx%d; the mask was resized to the target (nearest)",
                        hole.shape[1], hole.shape[0], target_rgb.shape[1], target_rgb.shape[0])
            hole = resize_mask(hole, target_rgb.shape[:2])
        if not hole.any():
            raise ValueError("the mask marks nothing to fill (no pixel > 127)")
        image, mask_t = model_inputs(target_rgb, hole, self.resolution)
        results = []
        for start in range(0, num_samples, batch_size):
            indices = range(start, min(start + batch_size, num_samples))
            batch = [t[None].expand(len(indices), -1, -1, -1) for t in (image, mask_t)]
            decoded = self.sample(*batch, sampler=sampler, steps=steps, cfg=cfg, eta=eta,
                                  generator=item_generators(seed, indices), progress=progress)
            results += [soft_composite(tensor_to_rgb(sample), target_rgb, hole) for sample in decoded]
            if on_batch is not None:
                on_batch(len(results), num_samples)
        return results


def soft_composite(generated: np.ndarray, target: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """RealFill's post-processing at the target's own size: ``generated`` RGB uint8 (h, w, 3) at any size is
    resized to the target (H, W, 3) (bicubic when enlarging, area otherwise), then blended through alpha =
    ldm.fill.soft_alpha(hole) (3 x 3 dilation, radius-1 box blur). Pixels where alpha is 0 are the target's
    exactly. Returns RGB uint8 (H, W, 3)."""
    h, w = target.shape[:2]
    enlarging = h > generated.shape[0] or w > generated.shape[1]
    resized = cv2.resize(generated, (w, h), interpolation=cv2.INTER_CUBIC if enlarging else cv2.INTER_AREA)
    alpha = soft_alpha(torch.from_numpy(hole)[None, None].float())[0, 0].numpy()[..., None]  # (H, W, 1)
    blended = np.clip(np.rint(alpha * resized + (1 - alpha) * target), 0, 255).astype(np.uint8)
    return np.where(alpha > 0, blended, target)


def adapter_source(model_path: str | Path) -> ModelDirectory:
    """The config and trained file of a RealFill model directory: a finished run's adapter file
    (``adapters.safetensors`` beside ``model_config.yaml``), else what resolve_model_dir picks."""
    path = locate(model_path, "checkpoints")
    if (path / ADAPTER_NAME).is_file() and (path / CONFIG_NAME).is_file():
        return ModelDirectory(path / CONFIG_NAME, path / ADAPTER_NAME)
    return resolve_model_dir(path)


def check_base_checkpoint(metadata: dict | None, base_ckpt: str | Path, adapters: Path) -> None:
    """The base checkpoint must be the one the adapters were trained on (its sha256), when that is recorded."""
    recorded = (metadata or {}).get("base_checkpoint")
    if not isinstance(recorded, dict) or "sha256" not in recorded:
        return
    base_ckpt = Path(base_ckpt)
    if not base_ckpt.is_file():
        raise CheckpointError(f"base SD2 checkpoint not found: {base_ckpt}{looked_in(base_ckpt, 'pretrained_models')} "
                              f"(the adapters {adapters} were trained on {recorded.get('name')})")
    actual = _hashed(str(base_ckpt.resolve()), *_stamp(base_ckpt))
    if actual["sha256"] != recorded["sha256"]:
        raise CheckpointError(f"{adapters}: trained on the base checkpoint {recorded.get('name')} (sha256 "
                              f"{recorded['sha256'][:16]}...), but {base_ckpt} has sha256 {actual['sha256'][:16]}...: "
                              f"adapters only fit the base model they were trained on")


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _hashed(path: str, size: int, mtime_ns: int) -> dict[str, str]:
    """file_record of ``path``, hashed once per (path, size, modification time): a benchmark loads one base
    checkpoint per scene, and 5 GB take seconds to hash."""
    return file_record(path)


def _training_data_params(metadata: dict | None) -> dict:
    """{"size", "prompt"} the adapters were trained with (from the metadata's resolved config), or {}."""
    config = (metadata or {}).get("config") or {}
    data = config.get("data") or {} if isinstance(config, dict) else {}
    params = data.get("params") or {}
    found = {"size": data.get("image_size"), "prompt": params.get("prompt")}
    return {key: value for key, value in found.items() if value is not None}
