"""Model directories: a ``model_config.yaml`` plus the trained prompt-token weights.

Layout (the official release's ``check_points/ref_guided_inpainting/`` works as it is once its
``model_config.yaml`` is this project's)::

    <model_dir>/model_config.yaml
    <model_dir>/ckpts/<name>.ckpt            # Lightning checkpoint holding the tokens, or
    <model_dir>/ckpts/<name>.safetensors     # (a .ckpt / .safetensors directly in <model_dir> works too)

A training run directory is a model directory with several checkpoints (the best ones and ``last.ckpt``)
and ``ckpts/index.json``, which names the best; ``resolve_model_dir`` picks that one, else ``last.ckpt``.

The weight file holds the trained tensors: the released one and every token file holds one tensor,
``cond_stage_model.special_embeddings.weight`` (N, width); a checkpoint written by training holds the
config's trainable set and names it in its metadata (``checkpoint["leftrefill"]["trainable"]``,
leftrefill.checkpoint_io). The loader is strict: every key must be in that set (the prompt tokens for a
file without metadata) and fit the model's parameter; everything else comes from the base checkpoint.
``load_with_base`` and ``build_random`` make the model for both inference (LeftRefillPipeline) and
training (leftrefill.trainer).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path


import torch
from torch import nn

from ldm.checkpoint import CheckpointError, load_weights, read_checkpoint, read_state_dict
from ldm.random_weights import liven_
from ldm.schedule import SCHEDULE_BUFFERS
from ldm.util import ConfigError
from leftrefill.lora import adapter_spec, add_lora
from leftrefill.paths import locate, looked_in

log = logging.getLogger(__name__)

CONFIG_NAME = "model_config.yaml"
INDEX_NAME = "index.json"  # written by training beside its checkpoints (leftrefill.callbacks.LastCheckpoint)
LAST_NAME = "last.ckpt"  # the newest training state, beside the best checkpoints
MAX_INDEX_BYTES = 1 << 20
TOKEN_KEY = "cond_stage_model.special_embeddings.weight"
METADATA_KEY = "leftrefill"  # leftrefill.checkpoint_io: {"config", "trainable", "base_checkpoint"}
WEIGHT_SUFFIXES = (".ckpt", ".safetensors")


@dataclass(frozen=True)
class ModelDirectory:
    config: Path
    weights: Path | None  # None: the directory holds a config only (e.g. checkpoints/tiny_random)


def resolve_model_dir(path: str | Path) -> ModelDirectory:
    """Find the config and the token weights from a model directory, or from a token file inside one.

    A directory with one weight file uses it. A training run directory holds several; then the best one by
    the monitored metric, as recorded by training in ``ckpts/index.json``, is used, else ``ckpts/last.ckpt``;
    the choice is logged. Several files and neither of these is an error listing them. A bare name
    (``ref_guided_inpainting``) or a relative path the working directory lacks is looked up as
    leftrefill.paths says ($LEFTREFILL_HOME, the project folder, the installed copies).
    """
    given, path = path, locate(path, "checkpoints")
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise FileNotFoundError(f"--model_path {path}: expected a model directory or a token checkpoint "
                                    f"({' / '.join(WEIGHT_SUFFIXES)})")
        for folder in (path.parent, path.parent.parent):
            if (folder / CONFIG_NAME).is_file():
                return ModelDirectory(folder / CONFIG_NAME, path)
        raise FileNotFoundError(f"--model_path {path}: no {CONFIG_NAME} beside the file or one folder above it")
    if not path.is_dir():
        raise FileNotFoundError(f"--model_path {given}: no such model directory{looked_in(given, 'checkpoints')}")
    config = path / CONFIG_NAME
    if not config.is_file():
        raise FileNotFoundError(f"--model_path {path}: no {CONFIG_NAME} in it (a model directory holds "
                                f"{CONFIG_NAME} and ckpts/*.ckpt or *.safetensors)")
    candidates = sorted(p for folder in (path, path / "ckpts") if folder.is_dir()
                        for p in folder.iterdir()
                        if p.suffix in WEIGHT_SUFFIXES and p.is_file() and not p.name.startswith("."))
    if len(candidates) > 1:
        return ModelDirectory(config, _choose_run_checkpoint(path, candidates))
    return ModelDirectory(config, candidates[0] if candidates else None)


def _choose_run_checkpoint(path: Path, candidates: list[Path]) -> Path:
    """The best checkpoint named by ``ckpts/index.json``, else ``ckpts/last.ckpt`` (logged), else an error."""
    index, best = path / "ckpts" / INDEX_NAME, best_checkpoint_from_index(path / "ckpts")
    if best is not None and best[0] in candidates:
        checkpoint, monitor, score = best
        log.info("--model_path %s: using the best checkpoint by %s (%s) as recorded in %s: %s", path, monitor,
                 score, index, checkpoint)
        return checkpoint
    why = (f"the best checkpoint {best[0].name} named by {index} is gone" if best is not None
           else f"no best checkpoint recorded in {index}")
    last = path / "ckpts" / LAST_NAME
    if last in candidates:
        log.info("--model_path %s: %s; using the newest state %s", path, why, last)
        return last
    listing = "\n  ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"--model_path {path}: holds several token checkpoints and neither a "
                            f"ckpts/{INDEX_NAME} naming the best one nor ckpts/last.ckpt; pass one of them as "
                            f"--model_path:\n  {listing}")


def best_checkpoint_from_index(ckpt_dir: Path) -> tuple[Path, str, float | None] | None:
    """(best checkpoint, monitored metric, its score) from ``<ckpt_dir>/index.json``, or None when the index
    is missing, unreadable or names no best checkpoint (a run without validation)."""
    index_path = ckpt_dir / INDEX_NAME
    if not index_path.is_file() or index_path.stat().st_size > MAX_INDEX_BYTES:
        return None
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        log.warning("%s: not a readable checkpoint index; ignored", index_path)
        return None
    best = index.get("best") if isinstance(index, dict) else None
    if not isinstance(best, str) or not best or Path(best).name != best:
        return None
    score = index.get("best_score")
    return ckpt_dir / best, str(index.get("monitor")), score if isinstance(score, (int, float)) else None


def _read_metadata(path: str | Path, entries: Mapping) -> dict | None:
    """``checkpoint["leftrefill"]`` from the top-level ``entries`` of the training checkpoint ``path``
    (``ldm.checkpoint.read_checkpoint``), or None (a released or older token file, a .safetensors file)."""
    metadata = entries.get(METADATA_KEY)
    if metadata is None:
        return None
    groups = metadata.get("trainable") if isinstance(metadata, Mapping) else None
    lists = isinstance(groups, Mapping) and all(isinstance(names, list) for names in groups.values())
    if not (lists and groups and all(isinstance(name, str) for names in groups.values() for name in names)):
        raise CheckpointError(f"{path}: its '{METADATA_KEY}' metadata has no trainable set ({{group: [parameter "
                              f"names]}})")
    return dict(metadata)


def _trainable_set(path: str | Path, entries: Mapping) -> set[str]:
    """The parameter names the file ``path`` may hold: its metadata's trainable set, else the prompt tokens."""
    metadata = _read_metadata(path, entries)
    if metadata is None:
        return {TOKEN_KEY}
    return {name for names in metadata["trainable"].values() for name in names}


@dataclass(frozen=True)
class TrainedFile:
    """A trained-tensor file read once: its tensors (every key within its trainable set) and its training
    metadata (None for the released token file, an older one, or a bare .safetensors)."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    metadata: dict | None

    @property
    def adapter(self) -> dict | None:
        """The LoRA spec the tensors were trained with (``config.model.lora`` of the metadata), or None."""
        config = (self.metadata or {}).get("config")
        spec = ((config or {}).get("model") or {}).get("lora") if isinstance(config, Mapping) else None
        try:
            return adapter_spec(spec)
        except ConfigError as err:
            raise CheckpointError(f"{self.path}: {err}") from None


def read_trained_file(path: str | Path) -> TrainedFile:
    """Read ``path`` once, keys checked against its trainable set (CheckpointError naming the file)."""
    state_dict, entries = read_checkpoint(path)  # one read: the tensors and the training metadata
    metadata = _read_metadata(path, entries)
    _check_within_set(path, state_dict, _trainable_set(path, entries))
    return TrainedFile(Path(path), state_dict, metadata)


def read_trained(path: str | Path | TrainedFile, model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of ``path``, strictly: each key in the file's trainable set and a parameter of
    ``model`` (which may be on the meta device) of the same shape; CheckpointError naming file and keys."""
    file = path if isinstance(path, TrainedFile) else read_trained_file(path)
    parameters = dict(model.named_parameters())
    unknown = sorted(set(file.state_dict) - set(parameters))
    if unknown:
        raise CheckpointError(f"{file.path}: {_preview(unknown)}: not a parameter of the model config's model; the "
                              f"checkpoint was trained for another model config")
    describe_rows = getattr(getattr(model, "cond_stage_model", None), "describe_token_rows", None)
    for key, tensor in file.state_dict.items():
        _check_shape(file.path, key, tensor, tuple(parameters[key].shape), describe_rows)
    return file.state_dict


def read_prompt_tokens(path: str | Path, expected_shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """``{TOKEN_KEY: (N, width)}`` from a trained-tensor file (its keys checked as by ``read_trained``),
    checked against the model's table shape."""
    tokens = _read_within_set(path, need_tokens=True)[TOKEN_KEY]
    _check_shape(path, TOKEN_KEY, tokens, tuple(expected_shape))
    return {TOKEN_KEY: tokens}


def _read_within_set(path: str | Path, need_tokens: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of ``path`` if every key is in its trainable set."""
    state_dict, entries = read_checkpoint(path)
    allowed = _trainable_set(path, entries)
    if TOKEN_KEY not in state_dict and need_tokens:
        raise CheckpointError(f"{path}: no prompt tokens in it (expected the key '{TOKEN_KEY}'; found "
                              f"{_preview(sorted(state_dict))}). Is this a LeftRefill token checkpoint?")
    _check_within_set(path, state_dict, allowed)
    return state_dict


def _check_within_set(path: str | Path, state_dict: Mapping, allowed: set[str]) -> None:
    if TOKEN_KEY not in state_dict and allowed == {TOKEN_KEY}:
        raise CheckpointError(f"{path}: no prompt tokens in it (expected the key '{TOKEN_KEY}'; found "
                              f"{_preview(sorted(state_dict))}). Is this a LeftRefill token checkpoint?")
    outside = sorted(set(state_dict) - allowed)
    if outside:
        what = "the prompt tokens only" if allowed == {TOKEN_KEY} else f"its trainable set, {_preview(sorted(allowed))}"
        raise CheckpointError(f"{path}: holds {_preview(outside)}, outside {what} (a file without training "
                              f"metadata holds only '{TOKEN_KEY}')")


def _check_shape(path: str | Path, key: str, tensor: torch.Tensor, expected: tuple[int, ...],
                 describe_rows: Callable[[int], str] | None = None) -> None:
    """CheckpointError unless ``tensor`` has the ``expected`` shape. ``describe_rows``: the conditioner's
    account of a token count (multi-view: shared + per-view tokens), to say a file of the right width was
    trained for another number of views."""
    if tuple(tensor.shape) == expected:
        return
    if key == TOKEN_KEY and describe_rows is not None and tensor.ndim == 2 and tensor.shape[1] == expected[1]:
        raise CheckpointError(f"{path}: holds {describe_rows(tensor.shape[0])}, but the model config expects "
                              f"{describe_rows(expected[0])}: the checkpoint was trained for another number of "
                              f"views (num_views in cond_stage_config) or other token counts")
    if key == TOKEN_KEY and len(expected) == 2:
        got = (f"{tensor.shape[0]} tokens of width {tensor.shape[1]}" if tensor.ndim == 2
               else f"shape {list(tensor.shape)}")
        problem = (f"holds {got}, but the model config expects {expected[0]} tokens of width {expected[1]} "
                   f"(num_tokens in cond_stage_config, and the text encoder's width)")
    else:
        problem = f"'{key}' has shape {list(tensor.shape)}, but the model's parameter has {list(expected)}"
    raise CheckpointError(f"{path}: {problem}; the checkpoint was trained for another model config")


def _preview(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "") if keys else "nothing"


def build_model(build: Callable[[], nn.Module], *, base_ckpt: str | Path | None = None,
                trained: str | Path | None = None, random_init: bool = False, adapter: Mapping | None = None) -> nn.Module:
    """The model a pipeline or a training run uses, reading the trained file once.

    ``trained`` (a token file or a training checkpoint) supplies the trained tensors and, from its metadata,
    the LoRA adapter they need; ``adapter`` (a LoRA spec, leftrefill.lora) adds one explicitly (training).
    ``random_init``: seeded random weights everywhere (``build_random``), then the trained tensors on top;
    otherwise the frozen base from ``base_ckpt`` (``load_with_base``).
    """
    file = read_trained_file(trained) if trained is not None else None
    spec = adapter_spec(adapter) if adapter is not None else (file.adapter if file is not None else None)
    if not random_init:
        return load_with_base(build, base_ckpt, file, adapter=spec)
    model = build_random(build, adapter=spec)
    if file is not None:
        _check_adapter_complete(file, model)
        load_trained(model, file)
    return model


def build_random(build: Callable[[], nn.Module], adapter: Mapping | None = None) -> nn.Module:
    """The model with seeded random weights (the same on every call), without touching the global RNG; with
    a LoRA ``adapter``, that same random backbone plus the adapter.

    No parameter tensor is constant (``ldm.random_weights.liven_``): SD2's zero-initialised output layers,
    and LoRA's zero B, would otherwise make their outputs exactly 0, so that no input changed any result.
    B gets small values (``RANDOM_LORA_B_STD``): large ones make the tiny network chaotic (a 1e-6 change of
    the input then changes the output by 0.7).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build()
        liven_(model, seed=0)
        if adapter is not None:
            add_lora(model, adapter)  # A ~ N(0, 1/rank), B = 0
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if ".lora_B." in name:
                        parameter.normal_(std=RANDOM_LORA_B_STD)
    return model


RANDOM_LORA_B_STD = 0.01


def load_trained(model: nn.Module, path: str | Path | TrainedFile) -> None:
    """Copy the trained tensors of ``path`` (the prompt tokens, or a checkpoint's whole trainable set) into
    ``model``, checked by ``read_trained``, in place."""
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in read_trained(path, model).items():
            parameters[key].copy_(tensor.to(parameters[key].dtype))


def load_with_base(build: Callable[[], nn.Module], base_ckpt: str | Path, tokens: str | Path | TrainedFile | None, *,
                   adapter: Mapping | None = None) -> nn.Module:
    """Build on the meta device and fill the model in one strict load: the (memory-mapped) SD2 checkpoint
    plus the trained tensors of ``tokens`` (the prompt tokens, or a checkpoint's trainable set, replacing
    the base's values). With ``tokens`` None the modules an SD2 checkpoint lacks (the prompt tokens, an NVS
    pose MLP: ``new_parameter_names``) start fresh, the tokens at the mean embedding of the init text
    (training from scratch). A LoRA ``adapter`` (default: the one the trained file names) is added after the
    base weights are in (peft renames the wrapped weights), then gets the file's adapter tensors, or starts
    at B = 0. Returns the model in eval mode.
    """
    given, base_ckpt = base_ckpt, locate(base_ckpt, "pretrained_models") if base_ckpt is not None else None
    if base_ckpt is None or not base_ckpt.is_file():
        where = looked_in(given, "pretrained_models") if given is not None else ""
        raise CheckpointError(f"base SD2 checkpoint not found: {given}{where}. Download 512-inpainting-ema.ckpt "
                              f"(see pretrained_models/README.md) and pass its path (--base_ckpt / resume_path) or "
                              f"put it in $LEFTREFILL_HOME/pretrained_models/, or use --random_init to try the code "
                              f"path with random weights")
    file = tokens if isinstance(tokens, TrainedFile) or tokens is None else read_trained_file(tokens)
    spec = adapter if adapter is not None else (file.adapter if file is not None else None)
    with torch.device("meta"):
        model = build()
    embedder = model.cond_stage_model
    if not all(hasattr(embedder, name) for name in ("context", "empty_context", "new_modules")):
        raise ConfigError(f"the model's cond_stage_config must be a conditioner (leftrefill.prompt_tokens."
                          f"PromptCLIPEmbedder, leftrefill.pose_prompt.PosePromptCLIPEmbedder or leftrefill."
                          f"text_conditioner.TextConditioner), not {type(embedder).__name__}")
    # 1. the base and the trained tensors outside the adapter, in one strict load
    new = new_parameter_names(model)
    plain = {k: v for k, v in file.state_dict.items() if not _is_adapter_key(k)} if file is not None else {}
    if file is None:
        for module in new_modules(model):
            module.to_empty(device="cpu", recurse=False)
    else:
        read_trained(TrainedFile(file.path, plain, file.metadata), model)
    base = read_state_dict(base_ckpt)
    if TOKEN_KEY in base:
        raise CheckpointError(f"{base_ckpt}: already holds prompt tokens; pass the plain SD2 inpainting checkpoint")
    source = str(base_ckpt) if file is None else f"{base_ckpt} + {file.path}"
    load_weights(model, {**base, **plain}, source=source, computed_buffers=SCHEDULE_BUFFERS,
                 allow_missing=lambda key: file is None and key in new)
    if file is None:
        model.cond_stage_model.reset_new_parameters()  # the tokens need the CLIP token embeddings: after loading
    # 2. the adapter, on the loaded base layers
    if spec is not None:
        add_lora(model, spec)
        if file is not None:
            _check_adapter_complete(file, model)
            load_trained(model, TrainedFile(file.path, {k: v for k, v in file.state_dict.items()
                                                        if _is_adapter_key(k)}, file.metadata))
    elif file is not None and len(plain) != len(file.state_dict):
        raise CheckpointError(f"{file.path}: holds LoRA tensors but its metadata names no adapter (config.model.lora)")
    return model.eval()


def _is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def _check_adapter_complete(file: TrainedFile, model: nn.Module) -> None:
    """Every adapter parameter of ``model`` must be in the file: a file trained with another adapter (other
    targets, another base model's layer names) is refused, naming the file."""
    wanted = {name for name, _ in model.named_parameters() if _is_adapter_key(name)}
    missing = sorted(wanted - set(file.state_dict))
    if missing:
        raise CheckpointError(f"{file.path}: the LoRA adapter lacks {_preview(missing)}: it was trained for "
                              f"another base model or other target layers")


def new_modules(model: nn.Module) -> list[nn.Module]:
    """Every module holding parameters that no SD2 checkpoint has, before adapters are added: the
    conditioner's (prompt tokens, an NVS pose MLP)."""
    return [sub for module in model.cond_stage_model.new_modules().values() for sub in module.modules()]


def new_parameter_names(model: nn.Module) -> set[str]:
    """Names (in ``model.named_parameters()``) of the parameters of ``new_modules``."""
    ids = {id(p) for module in new_modules(model) for p in module.parameters(recurse=False)}
    return {name for name, p in model.named_parameters() if id(p) in ids}
