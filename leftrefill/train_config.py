"""Experiment configs: typed omegaconf sections, so that a new task is a YAML file plus a dataset class.

The nested form (``configs/ref_inpainting.yaml``)::

    model:      {config, base_checkpoint, random_init, gradient_checkpointing}
    trainable:  [{name, parameters: [exact names or fnmatch patterns], lr, weight_decay}, ...]
    data:       {target, params, image_size, batch_size, num_workers, n_sample_per_scene, ...}
    optim:      {lr_scheduler, eta_min, max_nan_steps}
    validation: {image_path, mask_path, limit, batch_size, steps, cfg, eta, use_lpips, monitor, ...}
    trainer:    {max_epochs, max_steps, accumulate_grad_batches, logger_freq, save_top_k, ..., seed}

The paper's flat config (``configs/ref_inpainting_training_config.yaml``, schema ``TrainingConfig``)
still loads as written: it is checked against the flat schema, then converted key by key with
``FLAT_TO_NESTED``. A key that no schema knows, or a value of the wrong type, is a ConfigError naming the
file, the key and the closest known key, before anything is built. ``load_training_config(path,
overrides)`` also takes command-line dotlist overrides, nested (``trainer.max_steps=3``) or flat
(``max_steps=3``, renamed through ``FLAT_TO_NESTED``).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.util import ConfigError, get_obj_from_str
from leftrefill.arguments import check_sampling_options
from leftrefill.lora import adapter_spec
from leftrefill.model_dir import TOKEN_KEY
from leftrefill.paths import locate, looked_in

MAX_TRAINING_SEED = 2**32 - 1  # lightning.seed_everything replaces a larger seed by a random one


# -- the nested form ------------------------------------------------------------------------------------
@dataclass
class ModelSection:
    config: str = MISSING  # model_config.yaml of a model directory (the trained tensors' structure)
    base_checkpoint: Optional[str] = None  # the frozen base: SD2 512-inpainting-ema.ckpt
    random_init: bool = False  # random weights instead of base_checkpoint: for trying the code path only
    gradient_checkpointing: bool = True
    # LoRA adapters (leftrefill.lora.adapter_spec), trained through a group: a UNet spec {rank, alpha,
    # target_modules, dropout} (NVS, METHOD 2.6: rank 16, alpha 16) or {unet: ..., text: ...} (RealFill)
    lora: Optional[Dict[str, Any]] = None
    cfg_dropout: float = 0.0  # per item, the whole conditioning -> the empty string (NVS: 0.15, METHOD 2.4)
    # the LightningModule: the stitched-canvas LeftRefill step, or leftrefill.realfill_module.RealFillModule
    training_module: str = "leftrefill.training_module.LeftRefillModule"


@dataclass
class TrainableGroup:
    """One AdamW parameter group; everything in no group is frozen (leftrefill.trainable)."""
    name: str = MISSING
    parameters: List[str] = MISSING  # exact names or fnmatch patterns over model.named_parameters()
    lr: float = 3e-5  # METHOD 1.9
    weight_decay: float = 0.01


def prompt_token_group() -> TrainableGroup:
    """The paper's trainable set: the 50 prompt tokens only (METHOD 1.9)."""
    return TrainableGroup(name="prompt_tokens", parameters=[TOKEN_KEY])


@dataclass
class DataSection:
    """The training set is ``target(size=image_size, **params)``; it needs ``scenes`` (a group label per
    item) for the balanced sampler."""
    target: str = "leftrefill.data.cross_view.cross_view_pairs"
    params: Dict[str, Any] = field(default_factory=dict)
    image_size: int = 512  # each view; the canvas is image_size x 2 image_size
    batch_size: int = 8  # per GPU
    num_workers: int = 4
    n_sample_per_scene: int = 150  # METHOD 1.13
    sample_with_replacement: bool = False  # allow scenes with fewer items than n_sample_per_scene


@dataclass
class OptimSection:
    lr_scheduler: str = "none"  # none | cosine (per optimiser step, down to eta_min)
    eta_min: float = 0.0
    max_nan_steps: int = 5  # consecutive non-finite losses (each skipped) before training stops


@dataclass
class ValidationSection:
    image_path: Optional[str] = None  # folder in the test_inpainting.py layout; null: no validation
    target: Optional[str] = None  # or a dataset built as target(size=data.image_size, **params) (NVS)
    params: Dict[str, Any] = field(default_factory=dict)
    composite: str = "hard"  # hard: generated pixels in the mask only; none: the whole decoded half (NVS)
    mask_path: Optional[str] = None  # masks for validation folders without mask.png (cycled)
    limit: int = 150  # validation pairs, spread over the folder (METHOD 1.14)
    batch_size: int = 4
    sampler: str = "ddim"  # a name of ldm.sampling.SAMPLERS
    steps: int = 50
    cfg: float = 2.5
    eta: Optional[float] = 0.0  # DDIM's; the original validates with eta 0 (and tests with eta 1); null for others
    use_lpips: bool = True
    lpips_weights: Optional[str] = None  # AlexNet file; default: pretrained_models/ or $TORCH_HOME
    every_n_epochs: int = 1
    val_check_interval: float = 1.0  # validate every this fraction of an epoch, in (0, 1] (NVS: 0.1)
    monitor: str = "val/lpips"
    monitor_mode: str = "min"


@dataclass
class TrainerSection:
    max_epochs: int = 10
    max_steps: int = -1  # -1: no limit
    accumulate_grad_batches: int = 1  # the released tokens were trained with 2
    logger_freq: int = 500  # steps between preview grids in TensorBoard
    save_top_k: int = 2
    save_last_every_n_steps: int = 500  # ckpts/last.ckpt is also rewritten after each validation and at the end
    # also at the end of every epoch; false where an epoch is one step (RealFill: one batch holds the scene)
    save_each_epoch: bool = True
    gradient_clip_val: float = 0.0  # clip the gradient norm over all trainable tensors (0: no clipping)
    seed: int = 0


@dataclass
class ExperimentConfig:
    model: ModelSection = field(default_factory=ModelSection)
    trainable: List[TrainableGroup] = field(default_factory=lambda: [prompt_token_group()])
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)


SECTIONS = ("model", "trainable", "data", "optim", "validation", "trainer")


# -- the paper's flat form ------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    learning_rate: float = 3e-5
    weight_decay: float = 0.01
    lr_scheduler: str = "none"
    eta_min: float = 0.0


@dataclass
class MaskListConfig:
    irregular: Optional[str] = None  # the original's LaMa irregular masks
    segmentation: Optional[str] = None  # the original's COCO segmentation masks


@dataclass
class TrainingConfig:
    """The original LeftRefill training keys (METHOD 1.9); see FLAT_TO_NESTED for where each one goes."""
    model_config: str = MISSING
    resume_path: Optional[str] = None  # the original's name for the frozen base checkpoint
    random_init: bool = False
    image_path: str = MISSING
    train_pair: str = MISSING
    val_image_path: Optional[str] = None
    val_mask_path: Optional[str] = None
    train_mask_path: MaskListConfig = field(default_factory=MaskListConfig)
    match_path: Optional[str] = None
    match_mask_rate: float = 0.25
    constant_place: bool = False
    image_size: int = 512
    batch_size: int = 8
    num_workers: int = 4
    accumulate_grad_batches: Optional[int] = None  # null = 1
    max_epochs: int = 10
    max_steps: int = -1
    logger_freq: int = 500
    check_val_every_n_epoch: int = 1
    save_top_k: int = 2
    save_last_every_n_steps: int = 500
    monitor: str = "val/lpips"
    monitor_mode: str = "min"
    n_sample_per_scene: int = 150
    sample_with_replacement: bool = False
    val_limit: int = 150
    val_batch_size: int = 4
    val_steps: int = 50
    val_cfg: float = 2.5
    val_eta: float = 0.0
    use_lpips: bool = True
    lpips_weights: Optional[str] = None
    gradient_checkpointing: bool = True
    max_nan_steps: int = 5
    max_missing_fraction: float = 0.01
    seed: int = 0
    optim_cfg: OptimConfig = field(default_factory=OptimConfig)


# Every flat key and its nested place; a flat config trains the prompt tokens (trainable.0).
FLAT_TO_NESTED = {
    "model_config": "model.config", "resume_path": "model.base_checkpoint", "random_init": "model.random_init",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "optim_cfg.learning_rate": "trainable.0.lr", "optim_cfg.weight_decay": "trainable.0.weight_decay",
    "image_path": "data.params.image_path", "train_pair": "data.params.train_pair",
    "train_mask_path.irregular": "data.params.irregular_masks",
    "train_mask_path.segmentation": "data.params.segmentation_masks", "match_path": "data.params.match_path",
    "match_mask_rate": "data.params.match_mask_rate", "constant_place": "data.params.constant_place",
    "max_missing_fraction": "data.params.max_missing_fraction", "image_size": "data.image_size",
    "batch_size": "data.batch_size", "num_workers": "data.num_workers",
    "n_sample_per_scene": "data.n_sample_per_scene", "sample_with_replacement": "data.sample_with_replacement",
    "optim_cfg.lr_scheduler": "optim.lr_scheduler", "optim_cfg.eta_min": "optim.eta_min",
    "max_nan_steps": "optim.max_nan_steps",
    "val_image_path": "validation.image_path", "val_mask_path": "validation.mask_path",
    "val_limit": "validation.limit", "val_batch_size": "validation.batch_size", "val_steps": "validation.steps",
    "val_cfg": "validation.cfg", "val_eta": "validation.eta", "use_lpips": "validation.use_lpips",
    "lpips_weights": "validation.lpips_weights", "check_val_every_n_epoch": "validation.every_n_epochs",
    "monitor": "validation.monitor", "monitor_mode": "validation.monitor_mode",
    "max_epochs": "trainer.max_epochs", "max_steps": "trainer.max_steps",
    "accumulate_grad_batches": "trainer.accumulate_grad_batches", "logger_freq": "trainer.logger_freq",
    "save_top_k": "trainer.save_top_k", "save_last_every_n_steps": "trainer.save_last_every_n_steps",
    "seed": "trainer.seed",
}
GROUP_KEYS = ("optim_cfg.learning_rate", "optim_cfg.weight_decay")  # belong to one group: not renamed in nested files


# -- loading --------------------------------------------------------------------------------------------
def load_training_config(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """Read ``path`` (nested or flat form), apply dotlist ``overrides``, check every section; return the
    resolved nested config (an ExperimentConfig)."""
    given, path = path, locate(path, "configs")
    if not path.is_file():
        raise ConfigError(f"training config not found: {given}{looked_in(given, 'configs')}")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001  (YAML errors come in many types)
        raise ConfigError(f"{path}: not a readable YAML file ({err})") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    overrides = list(overrides or [])
    if any(key in SECTIONS for key in raw):
        config = _merge(OmegaConf.structured(ExperimentConfig), raw, str(path))
    else:  # the paper's flat form: its own overrides apply before the conversion, as they always did
        flat_overrides = [item for item in overrides if _key(item).split(".")[0] not in SECTIONS]
        overrides = [item for item in overrides if item not in flat_overrides]
        flat = _merge(OmegaConf.structured(TrainingConfig), raw, str(path))
        flat = _merge(flat, OmegaConf.from_dotlist(flat_overrides), "command-line override")
        _check_missing(flat, path)
        config = nest(flat)
    for item in overrides:
        _override(config, item)
    _check_missing(config, path)
    config.data.params = resolve_data_params(config.data, path)
    if config.model.lora is not None:  # checked, every default named (the saved config says what was trained)
        try:
            config.model.lora = adapter_spec(OmegaConf.to_container(config.model.lora, resolve=True))
        except ConfigError as err:
            raise ConfigError(f"{path}: model.lora: {err}") from None
    if config.validation.target:
        config.validation.params = resolve_data_params(config.validation, path, section="validation")
    check_config(config, path)
    return config


def nest(flat: DictConfig) -> DictConfig:
    """A flat TrainingConfig as an ExperimentConfig, key by key (FLAT_TO_NESTED)."""
    config = OmegaConf.structured(ExperimentConfig)
    for flat_key, nested_key in FLAT_TO_NESTED.items():
        value = OmegaConf.select(flat, flat_key)
        if flat_key == "accumulate_grad_batches" and value is None:
            value = 1
        OmegaConf.update(config, nested_key, value, merge=False)
    return config


def experiment_config(config: DictConfig) -> DictConfig:
    """``config`` as an ExperimentConfig: nested as it is, a flat TrainingConfig converted."""
    return nest(config) if "model_config" in config else config


def resolve_data_params(data: DictConfig, path: Path, section: str = "data") -> dict:
    """``data.params`` with the dataset's defaults filled in from its signature (so the saved config names
    every value used); an unknown or missing parameter is a ConfigError. ``size`` comes from image_size."""
    try:
        target = get_obj_from_str(data.target)
    except ConfigError as err:
        raise ConfigError(f"{path}: {section}.target: {err}") from None
    signature = inspect.signature(target).parameters
    accepted = [name for name in signature if name not in ("self", "size")]
    params = OmegaConf.to_container(data.params, resolve=True)
    for name in params:
        if name not in accepted:
            raise ConfigError(f"{path}: {section}.params.{name}: {data.target} takes no parameter '{name}'"
                              f"{_suggestion(name, accepted)}; it takes: {', '.join(accepted)}")
    missing = [name for name in accepted if name not in params and signature[name].default is inspect.Parameter.empty]
    if missing:
        raise ConfigError(f"{path}: {section}.params: {data.target} needs {', '.join(missing)}")
    return {name: params.get(name, signature[name].default) for name in accepted}


def _key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def _override(config: DictConfig, item: str) -> None:
    """Apply one ``key=value`` to the nested ``config``; a flat key is renamed to its nested place."""
    if "=" not in item:
        raise ConfigError(f"command-line override {item!r}: expected key=value")
    key, value = _key(item), OmegaConf.from_dotlist([f"value={item.split('=', 1)[1]}"]).value
    if key.split(".")[0] not in SECTIONS:
        if key in GROUP_KEYS:
            raise ConfigError(f"command-line override '{key}': a nested config sets learning rates per trainable "
                              f"group: trainable.<i>.lr, trainable.<i>.weight_decay")
        if key not in FLAT_TO_NESTED:
            raise ConfigError(f"command-line override: unknown key '{key}'{_suggestion(key, _known_keys())}")
        key = FLAT_TO_NESTED[key]
    try:
        OmegaConf.update(config, key, value, merge=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"command-line override: {_describe(err)}") from None


def _merge(config: DictConfig, other: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(config, other)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {_describe(err)}") from None


def _check_missing(config: DictConfig, path: Path) -> None:
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise ConfigError(f"{path}: required key(s) without a value: {', '.join(missing)}")


def _describe(err: OmegaConfBaseException) -> str:
    """One line: the key and the problem; for an unknown key the closest known one."""
    key = getattr(err, "full_key", None)
    message = str(err).splitlines()[0].split(". Did you mean")[0]
    if key and "not in" in message:
        flat = FLAT_TO_NESTED.get(key)
        hint = f" (a key of the flat form; in the nested form: {flat})" if flat else _suggestion(key, _known_keys())
        return f"unknown key '{key}'{hint}"
    return f"key '{key}': {message}" if key else message


def _known_keys() -> list[str]:
    """Every key of both forms, dotted (list elements as 0)."""
    nested = OmegaConf.to_container(OmegaConf.structured(ExperimentConfig), throw_on_missing=False)
    return sorted(set(_dotted(nested)) | set(FLAT_TO_NESTED))


def _dotted(node: Any, prefix: str = "") -> list[str]:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    keys = []
    for name, value in items:
        key = f"{prefix}{name}"
        keys += [key, *_dotted(value, key + ".")]
    return keys


def _suggestion(key: str, known: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known key, by the whole key and then by its last part."""
    key = key.replace("[", ".").replace("]", "")
    close = difflib.get_close_matches(key, known, n=1)
    if not close:
        leaves = sorted({k.rsplit(".", 1)[-1] for k in known})
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], leaves, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def has_validation(config: DictConfig) -> bool:
    """Whether the run validates: a test folder (``validation.image_path``) or a dataset (``validation.target``)."""
    return bool(config.validation.image_path or config.validation.target)


def check_config(config: DictConfig, path: Path | str) -> None:
    """Value checks across sections, before anything is built; ConfigError naming the file."""
    data, val, run, optim = config.data, config.validation, config.trainer, config.optim
    names = [group.name for group in config.trainable]
    checks = [
        (optim.lr_scheduler in ("none", "cosine"), "optim.lr_scheduler must be none or cosine"),
        (val.monitor_mode in ("min", "max"), "validation.monitor_mode must be min or max"),
        (0 < val.val_check_interval <= 1, "validation.val_check_interval must be a fraction of an epoch in (0, 1]"),
        (val.composite in ("hard", "none"), f"validation.composite must be hard or none, got {val.composite!r}"),
        (not (val.image_path and val.target), "validation: give image_path (test_inpainting.py layout) or target "
                                             "(a dataset), not both"),
        (0.0 <= config.model.cfg_dropout < 1.0, "model.cfg_dropout must be in [0, 1)"),
        (config.model.lora is None or any("lora_" in pattern for g in config.trainable for pattern in g.parameters),
         "model.lora adds an adapter but no trainable group trains it: add a group with parameters "
         "[model.diffusion_model.*.lora_A.*, model.diffusion_model.*.lora_B.*] (configs/nvs_lora.yaml), and for "
         "a text-encoder adapter [cond_stage_model.*.lora_A.*, cond_stage_model.*.lora_B.*] (configs/realfill.yaml)"),
        (config.model.random_init or config.model.base_checkpoint,
         "model.base_checkpoint (resume_path: the SD2 checkpoint) is required unless random_init is true"),
        (len(names) >= 1, "trainable: at least one group is needed"),
        (len(set(names)) == len(names), f"trainable: group names must differ, got {names}"),
        (all(group.parameters for group in config.trainable), "trainable: every group needs parameters"),
        (all(g.lr > 0 and g.weight_decay >= 0 for g in config.trainable),
         "trainable: lr must be > 0 and weight_decay >= 0"),
        (data.image_size > 0 and data.image_size % 64 == 0, "data.image_size must be a multiple of 64"),
        (data.batch_size >= 1 and data.n_sample_per_scene >= 1,
         "data.batch_size and data.n_sample_per_scene must be >= 1"),
        (run.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches must be >= 1"),
        (run.max_steps == -1 or run.max_steps >= 1, f"trainer.max_steps must be -1 (no limit) or >= 1, got "
                                                    f"{run.max_steps}"),
        (0 <= run.seed <= MAX_TRAINING_SEED, f"trainer.seed must be in [0, {MAX_TRAINING_SEED}] (Lightning's "
                                             f"seed_everything takes 32-bit seeds), got {run.seed}"),
        (run.gradient_clip_val >= 0, f"trainer.gradient_clip_val must be >= 0 (0: no clipping), got "
                                     f"{run.gradient_clip_val}"),
        (isinstance(config.model.training_module, str) and "." in config.model.training_module,
         "model.training_module must be a dotted class path"),
        (run.save_last_every_n_steps >= 0, "trainer.save_last_every_n_steps must be >= 0 (0: only after "
                                           "validation and at the end)"),
        (min(run.logger_freq, val.limit, val.batch_size, val.steps) >= 1,
         "trainer.logger_freq, validation.limit, validation.batch_size and validation.steps must be >= 1")]
    if has_validation(config):
        logged = ["val/psnr", "val/ssim"] + (["val/lpips"] if val.use_lpips else [])
        checks.append((val.monitor in logged, f"validation.monitor is {val.monitor!r}, but validation logs only "
                                              f"{', '.join(logged)} (val/lpips needs use_lpips: true)"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{path}: {message}")
    try:
        check_sampling_options(steps=val.steps, cfg=val.cfg, eta=val.eta, sampler=val.sampler)
    except ValueError as err:  # "steps must be ..." -> "validation.steps must be ..."
        raise ConfigError(f"{path}: validation.{err}") from None
