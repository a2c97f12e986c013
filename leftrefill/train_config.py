"""The training config: a typed omegaconf schema with the original LeftRefill keys (METHOD 1.9).

A key the schema does not know, or a value of the wrong type, is a ConfigError naming the file and the
key, before anything is built. ``load_training_config(path, overrides)`` also takes command-line dotlist
overrides (``optim_cfg.learning_rate=1e-4``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.util import ConfigError
from leftrefill.arguments import check_sampling_options

MAX_TRAINING_SEED = 2**32 - 1  # lightning.seed_everything replaces a larger seed by a random one


@dataclass
class OptimConfig:
    learning_rate: float = 3e-5  # METHOD 1.9: AdamW on the prompt tokens only
    weight_decay: float = 0.01
    lr_scheduler: str = "none"  # none | cosine (per optimiser step, down to eta_min)
    eta_min: float = 0.0


@dataclass
class MaskListConfig:
    """Optional mask list files (one image path per line) used beside the built-in irregular generator."""
    irregular: Optional[str] = None  # the original's LaMa irregular masks
    segmentation: Optional[str] = None  # the original's COCO segmentation masks


@dataclass
class TrainingConfig:
    model_config: str = MISSING  # model_config.yaml of a model directory (the trained tokens' structure)
    resume_path: Optional[str] = None  # the frozen base: SD2 512-inpainting-ema.ckpt (original key name)
    random_init: bool = False  # random weights instead of resume_path: for trying the code path only
    image_path: str = MISSING  # image table (images.json, or the original image_dict.pkl)
    train_pair: str = MISSING  # pair manifest (train_pairs.json, or the original *_pairs.pkl)
    val_image_path: Optional[str] = None  # validation folder in the test_inpainting.py layout
    val_mask_path: Optional[str] = None  # masks for validation folders without mask.png (cycled)
    train_mask_path: MaskListConfig = field(default_factory=MaskListConfig)
    match_path: Optional[str] = None  # per-pair matching files <id:08d>.npz (docs/data.md)
    match_mask_rate: float = 0.25  # METHOD 1.12
    constant_place: bool = False  # False: random masks go on either half with p = 0.5 (METHOD 1.2)
    image_size: int = 512  # each view; the canvas is image_size x 2 image_size
    batch_size: int = 8  # per GPU
    num_workers: int = 4
    accumulate_grad_batches: Optional[int] = None  # null = 1; the released tokens were trained with 2
    max_epochs: int = 10
    max_steps: int = -1  # -1: no limit
    logger_freq: int = 500  # steps between preview grids in TensorBoard
    check_val_every_n_epoch: int = 1
    save_top_k: int = 2
    save_last_every_n_steps: int = 500  # ckpts/last.ckpt is also rewritten after each validation and at the end
    monitor: str = "val/lpips"
    monitor_mode: str = "min"
    n_sample_per_scene: int = 150  # METHOD 1.13
    sample_with_replacement: bool = False  # allow scenes with fewer pairs than n_sample_per_scene
    val_limit: int = 150  # validation pairs, spread over the folder (METHOD 1.14)
    val_batch_size: int = 4
    val_steps: int = 50
    val_cfg: float = 2.5
    val_eta: float = 0.0  # the original validates with eta 0 (and tests with eta 1)
    use_lpips: bool = True
    lpips_weights: Optional[str] = None  # AlexNet file; default: pretrained_models/ or $TORCH_HOME
    gradient_checkpointing: bool = True
    max_nan_steps: int = 5  # consecutive non-finite losses (each skipped) before training stops
    max_missing_fraction: float = 0.01  # of the images a manifest lists; above it training stops
    seed: int = 0
    optim_cfg: OptimConfig = field(default_factory=OptimConfig)


def load_training_config(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """Read ``path``, check it against TrainingConfig, apply dotlist ``overrides``; return the merged config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config not found: {path}")
    schema = OmegaConf.structured(TrainingConfig)
    try:
        config = OmegaConf.merge(schema, OmegaConf.load(path))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {_describe(err)}") from None
    try:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(overrides or []))
    except OmegaConfBaseException as err:
        raise ConfigError(f"command-line override: {_describe(err)}") from None
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise ConfigError(f"{path}: required key(s) without a value: {', '.join(missing)}")
    _check_values(config, path)
    return config


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    message = str(err).splitlines()[0]
    return f"key '{key}': {message}" if key else message


def _check_values(config: DictConfig, path: Path) -> None:
    checks = [(config.optim_cfg.lr_scheduler in ("none", "cosine"), "optim_cfg.lr_scheduler must be none or cosine"),
              (config.monitor_mode in ("min", "max"), "monitor_mode must be min or max"),
              (config.random_init or config.resume_path, "resume_path (the SD2 checkpoint) is required unless "
                                                         "random_init is true"),
              (config.image_size > 0 and config.image_size % 64 == 0, "image_size must be a multiple of 64"),
              (0.0 <= config.match_mask_rate <= 1.0, "match_mask_rate must be in [0, 1]"),
              (config.batch_size >= 1 and config.n_sample_per_scene >= 1, "batch_size and n_sample_per_scene must be >= 1"),
              (config.max_steps == -1 or config.max_steps >= 1, f"max_steps must be -1 (no limit) or >= 1, got "
                                                                f"{config.max_steps}"),
              (0 <= config.seed <= MAX_TRAINING_SEED, f"seed must be in [0, {MAX_TRAINING_SEED}] (Lightning's "
                                                      f"seed_everything takes 32-bit seeds), got {config.seed}"),
              (config.save_last_every_n_steps >= 0, "save_last_every_n_steps must be >= 0 (0: only after "
                                                    "validation and at the end)"),

              (min(config.logger_freq, config.val_limit, config.val_batch_size, config.val_steps) >= 1,
               "logger_freq, val_limit, val_batch_size and val_steps must be >= 1")]
    if config.val_image_path:
        logged = ["val/psnr", "val/ssim"] + (["val/lpips"] if config.use_lpips else [])
        checks.append((config.monitor in logged, f"monitor is {config.monitor!r}, but validation logs only "
                                                 f"{', '.join(logged)} (val/lpips needs use_lpips: true)"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{path}: {message}")
    try:
        check_sampling_options(steps=config.val_steps, cfg=config.val_cfg, eta=config.val_eta)
    except ValueError as err:  # "steps must be ..." -> "val_steps must be ..."
        raise ConfigError(f"{path}: val_{err}") from None
