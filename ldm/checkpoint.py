"""Reading weights safely and loading them into a model with a readable report.

Formats: ``.safetensors`` and PyTorch checkpoints (``.ckpt``/``.pt``/``.pth``/``.bin``: a Lightning dict
with a ``state_dict`` entry, or a bare state dict). PyTorch files are read with
``torch.load(weights_only=True)``, so a file whose pickle needs code to load is refused, and memory-mapped
when they are in the zip format, so a 5 GB checkpoint does not occupy RAM twice. With
``build_and_load`` the model is first built on the meta device (no random init, no memory) and the
checkpoint tensors are assigned to it directly.

Before torch reads a pickle, :func:`ldm.pickle_scan.scan_pickle` reads its instructions without running
any, so that every blocked global gets one refusal naming it, and hostile pickles are refused quickly.
Messages quote at most ``ldm.pickle_scan.SHOWN_CHARS`` characters of anything read from a file.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import re
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors
from torch import nn

from ldm.pickle_scan import REFUSAL, PickleRefused, clip, scan_pickle

# Keys of original LDM checkpoints that are not weights of the inference model.
IGNORED_PREFIXES = ("model_ema.",)  # EMA shadow copies and counters (LitEma); SD2 releases fold EMA in.

_ZIP_MAGIC = b"PK\x03\x04"
# Classes that checkpoints written by PyTorch Lightning 1.x (the CompVis / Stability LDM releases) name in
# their callback state; they carry no weights and are read as InertLightningObject (what A1111's and
# ComfyUI's checkpoint loaders allow for the same files).
LEGACY_LIGHTNING_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)
# Lightning's entries for resuming: without optimizer or scheduler state it stops with a KeyError.
RESUME_KEYS = ("pytorch-lightning_version", "state_dict", "loops", "optimizer_states", "lr_schedulers")
_TORCH_ADVICE = re.compile(r"weights_only|Weights only|torch\.load|trust")  # lines of torch's advice, not the cause


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``{key: tensor}`` from a checkpoint file on the CPU without executing pickled code."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, the file's other top-level entries) from one read of ``path``, as :func:`read_state_dict`
    checks it; the entries are a Lightning checkpoint's ("epoch", metadata, ...), {} for a bare state dict, and
    for a .safetensors file its header metadata whose values are JSON objects, parsed."""
    path = _existing_file(Path(path), "checkpoint")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
            return load_safetensors(str(path), device="cpu"), _json_entries(header, path)
        except SafetensorError as err:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None
    obj, entries = _torch_load(path), {}
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj, entries = obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: holds no state dict (expected a mapping of names to tensors, "
                              f"or a Lightning checkpoint with a 'state_dict' entry)")
    not_strings = [type(k).__name__ for k in obj if not isinstance(k, str)]
    if not_strings:
        raise CheckpointError(f"{path}: state dict keys that are not strings: {_preview(not_strings)}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {_preview(not_tensors)}")
    return dict(obj), entries


def _json_entries(header: Mapping[str, str], path: Path) -> dict:
    """The safetensors metadata values that are JSON objects, parsed (plain strings are left out); a value that
    starts like one and does not parse is a CheckpointError naming the key."""
    entries = {}
    for key, value in header.items():
        if value.startswith("{"):
            try:
                entries[key] = json.loads(value)
            except (json.JSONDecodeError, RecursionError) as err:
                raise CheckpointError(f"{path}: header metadata '{clip(key)}' is not valid JSON "
                                      f"({clip(str(err))})") from None
    return entries


def check_resumable_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError unless ``path`` is a training checkpoint Lightning can resume from: a PyTorch
    file that loads without pickled code (the same refusal as :func:`read_state_dict`) and holds the
    training state (``RESUME_KEYS``). For ``--resume``, before Lightning reads the file."""
    path = _existing_file(Path(path), "checkpoint to resume from")
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: a .safetensors file holds weights only; resuming needs the training "
                              f"checkpoint Lightning wrote (<run>/ckpts/last.ckpt)")
    obj = _torch_load(path)
    missing = [key for key in RESUME_KEYS if key not in obj] if isinstance(obj, Mapping) else list(RESUME_KEYS)
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint to resume from: it has no "
                              f"{', '.join(map(repr, missing))} (weights-only files such as the SD2 checkpoint "
                              f"or exported tokens cannot be resumed; pass <run>/ckpts/last.ckpt)")


def _existing_file(path: Path, what: str) -> Path:
    """``path``, or CheckpointError naming ``what`` when it is missing or not a file."""
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}" if not path.exists() else f"{what} is not a file: {path}")
    return path


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` after :func:`ldm.pickle_scan.scan_pickle`; CheckpointError naming the
    file for anything that is not a PyTorch checkpoint."""
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = zipfile.is_zipfile(path)
    if head == _ZIP_MAGIC and not is_zip:
        raise CheckpointError(f"{path}: incomplete checkpoint (the zip archive has no central directory; "
                              f"a truncated download looks like this). Download it again.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (empty file)")
    with torch.serialization.safe_globals([(InertLightningObject, name) for name in LEGACY_LIGHTNING_GLOBALS]):
        try:
            scan_pickle(path, is_zip)
        except PickleRefused as refused:
            raise CheckpointError(f"{path}: {refused}") from None
        try:
            # Zip-format files (torch >= 1.6) can be memory-mapped; legacy pickles cannot.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001  (a corrupt file fails in many ways; all mean "bad file")
            raise CheckpointError(f"{path}: {_load_failure(err)}") from None


class InertLightningObject:
    """Stands in for a PyTorch Lightning class that an old LDM checkpoint pickles beside its weights (the
    callback state is keyed by the callback's class): never imported, never run; its state kept as a dict."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _load_failure(err: Exception) -> str:
    """What went wrong in torch.load, without torch's advice to load with ``weights_only=False``."""
    text = str(err)
    named = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)", text)
    if isinstance(err, pickle.UnpicklingError) and named:  # the scan had no list of allowed globals
        return REFUSAL.format(what=f"the global {clip(named.group(1))}")
    lines = (line.strip().removeprefix("WeightsUnpickler error:").strip() for line in text.splitlines())
    kept = " ".join(line for line in lines if line and not _TORCH_ADVICE.search(line))
    kept = re.sub(r"Unsupported operand (\d+)", _name_opcode, kept)
    return f"not a PyTorch checkpoint ({type(err).__name__}: {clip(kept or 'unreadable')})"


def _name_opcode(match: re.Match) -> str:
    """torch's "Unsupported operand 149" with the instruction's name: "... 149 (FRAME)"."""
    code = int(match.group(1))
    opcode = pickletools.code2op.get(chr(code)) if code < 256 else None
    return match.group(0) + (f" ({opcode.name})" if opcode else "")


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str | Path,
                 computed_buffers: Iterable[str] = (), allow_missing: Callable[[str], bool] = lambda key: False,
                 ignored_prefixes: Iterable[str] = IGNORED_PREFIXES) -> None:
    """Load ``state_dict`` into ``model`` strictly, or raise CheckpointError with a report by submodule.

    * keys under ``ignored_prefixes`` are dropped;
    * ``computed_buffers`` (e.g. the noise schedule) are not loaded but compared with the model's own
      values, which must agree;
    * every other model key must be present with the same shape (unless ``allow_missing(key)``),
      and the checkpoint may hold nothing else.
    Tensors are assigned (not copied) when the model lives on the meta device, cast to the model's dtype.
    """
    ignored_prefixes = tuple(ignored_prefixes)
    expected = model.state_dict(keep_vars=True)
    computed = set(computed_buffers)
    checkpoint = {k: v for k, v in state_dict.items() if not k.startswith(ignored_prefixes)}
    problems = defaultdict(list)
    for key in sorted(set(expected) - set(checkpoint) - computed):
        if not allow_missing(key):
            problems[_group(key)].append(("missing", key, None))
    for key in sorted(set(checkpoint) - set(expected)):
        problems[_group(key)].append(("unexpected", key, None))
    for key in sorted(set(checkpoint) & set(expected)):
        if tuple(checkpoint[key].shape) != tuple(expected[key].shape):
            problems[_group(key)].append(("shape", key, (tuple(checkpoint[key].shape), tuple(expected[key].shape))))
    if problems:
        raise CheckpointError(_report(source, model, problems))
    for key in computed & set(checkpoint):
        _check_computed_buffer(key, checkpoint.pop(key), expected[key], source)
    on_meta = any(t.is_meta for t in expected.values())
    weights = {k: v.to(expected[k].dtype) for k, v in checkpoint.items()}
    model.load_state_dict(weights, strict=False, assign=on_meta)
    still_meta = [k for k, t in model.state_dict().items() if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{source}: no values for {_preview(still_meta)} (allowed to be missing, but the model "
                              f"was built on the meta device); build the model normally to initialise them")


def build_and_load(build: Callable[[], nn.Module], checkpoint: str | Path, **load_kwargs) -> nn.Module:
    """Build a model on the meta device and fill it from ``checkpoint``: one copy of the weights in RAM."""
    state_dict = read_state_dict(checkpoint)
    with torch.device("meta"):
        model = build()
    load_weights(model, state_dict, source=checkpoint, **load_kwargs)
    return model


def _check_computed_buffer(key: str, stored: torch.Tensor, computed: torch.Tensor, source) -> None:
    stored = stored.to(torch.float64)
    computed = computed.detach().to(torch.float64)
    if not torch.allclose(stored, computed, rtol=1e-5, atol=1e-7):
        diff = (stored - computed).abs().max().item()
        raise CheckpointError(f"{source}: '{key}' differs from the value computed from the config "
                              f"(max abs difference {diff:.3g}); the checkpoint was made with another "
                              f"noise schedule than the config describes")


def _group(key: str) -> str:
    """Submodule a key belongs to: ``model.diffusion_model``, ``first_stage_model``, ``cond_stage_model``..."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "model" and len(parts) > 2 else parts[0] if len(parts) > 1 else "<top level>"


def _report(source, model: nn.Module, problems: dict) -> str:
    lines = [f"{source}: the checkpoint does not fit {type(model).__name__}:"]
    for group in sorted(problems):
        items = problems[group]
        for kind, label in (("missing", "missing from the checkpoint"), ("unexpected", "not in the model")):
            keys = [key for k, key, _ in items if k == kind]
            if keys:
                lines.append(f"  {group}: {len(keys)} key(s) {label}: {_preview(keys)}")
        for k, key, (got, want) in (item for item in items if item[0] == "shape"):
            lines.append(f"  {group}: '{key}' has shape {list(got)} in the checkpoint but {list(want)} in the model")
    first_conv = "model.diffusion_model.input_blocks.0.0.weight"
    for k, key, shapes in problems.get("model.diffusion_model", []):
        if k == "shape" and key == first_conv and shapes[0][1] != shapes[1][1]:
            lines.append(f"  hint: the UNet's first conv takes {shapes[0][1]} input channels in this checkpoint; "
                         f"the inpainting model takes {shapes[1][1]} (latent 4 + mask 1 + masked-image latent 4). "
                         f"Use SD2's 512-inpainting-ema.ckpt, not a text-to-image checkpoint.")
    return "\n".join(lines)


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(clip(key, 100) for key in keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
