"""A model's LoRA adapters folded into its base SD2 weights, written as one SD2-format checkpoint (METHOD 7.8).

RealFill (UNet + text-encoder LoRA) and any other model whose conditioning is SD2's own text encoder
merge into a plain SD2 inpainting model: each adapted weight becomes W + (alpha / rank) B A, and the state
dict has exactly the keys of ``512-inpainting-ema.ckpt`` (peft's ``base_layer`` level removed, no ``lora_``
tensors; the text encoder's split q/k/v projections save as OpenCLIP's fused ``in_proj_weight``,
leftrefill.lora.SplitAttention). Such a file is an SD2 checkpoint to every tool: this project's
``--base_ckpt`` beside a config-only model directory, diffusers' ``from_single_file``, A1111, ComfyUI.
Formats, by the suffix of ``out``:

* ``.safetensors``: the tensors, with the provenance header ``{"leftrefill": JSON {"merged_from",
  "base_checkpoint", "prompt", "image_size"}}`` (:func:`merged_header`);
* ``.ckpt``: ``{"state_dict": {key: tensor}}``, tensors only, so ``torch.load(weights_only=True)`` reads it.

A model that adds parameters to SD2 (LeftRefill's prompt tokens, an NVS pose MLP, per-view tokens) is
refused: an SD2 checkpoint has no place for them, and no SD2 tool would compute its conditioning.
Files are written atomically (leftrefill.atomic).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ldm.latent_diffusion import model_builder
from ldm.util import instantiate_from_config, load_config
from leftrefill.atomic import atomic_path
from leftrefill.export_tokens import ExportError
from leftrefill.lora import lora_layers, merge_lora, unmerge_lora
from leftrefill.model_dir import CONFIG_NAME, METADATA_KEY, TrainedFile, build_model, read_trained_file
from leftrefill.paths import locate
from leftrefill.pipeline import DEFAULT_BASE_CKPT
from leftrefill.prompt_tokens import PromptCLIPEmbedder
from leftrefill.realfill_pipeline import adapter_source, check_base_checkpoint

FORMAT = "sd2"
SUFFIXES = (".safetensors", ".ckpt")


# -- the merge -----------------------------------------------------------------------------------------
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` with its LoRA adapters folded into the base weights (W + scale B A), under
    the keys the model has without adapters (SD2's): peft's ``base_layer`` level removed, no ``lora_``
    tensors. ``model`` is left as it was (unmerged). Tensors are copies, on the CPU, contiguous."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to merge")
    # unmerging subtracts B A again, which rounds: the base weights are restored from copies instead
    saved = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    merge_lora(model)
    try:
        state = {key.replace(".base_layer.", "."): tensor.detach().cpu().clone().contiguous()
                 for key, tensor in model.state_dict().items() if ".lora_" not in key}
    finally:
        unmerge_lora(model)
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                layer.get_base_layer().weight.copy_(weight)
    return state


def merged_header(file: TrainedFile, config: Mapping | None = None) -> dict[str, str]:
    """The merged file's safetensors header: the adapter file it came from, the base checkpoint the adapters
    were trained on (``{"name", "sha256"}``, None with random weights) and the prompt and resolution they were
    trained with (sampling the merged model should use them; None when unknown). JSON under ``"leftrefill"``.
    ``config``: the run's resolved config; by default the one in ``file``'s metadata."""
    metadata = file.metadata or {}
    config = config if config is not None else metadata.get("config") or {}
    data = config.get("data") or {}
    size = data.get("image_size")
    return {METADATA_KEY: json.dumps({"merged_from": str(file.path), "base_checkpoint": metadata.get("base_checkpoint"),
                                      "prompt": (data.get("params") or {}).get("prompt"),
                                      "image_size": None if size is None else int(size)}, allow_nan=False)}


def save_merged_model(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write :func:`merged_state_dict` of ``model`` to ``path``, atomically: ``.safetensors`` with the header
    ``metadata``, or ``.ckpt`` as ``{"state_dict": ...}`` (tensors only; the header is not kept)."""
    path = Path(path)
    _check_suffix(path)
    state = merged_state_dict(model)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            save_file(state, str(tmp), metadata=metadata)
        else:
            torch.save({"state_dict": state}, tmp)
    return path


# -- export --------------------------------------------------------------------------------------------
def check_sd2_conditioner(config_path: str | Path) -> None:
    """ExportError unless the model of ``config_path`` conditions through SD2's text encoder alone (built on
    the meta device: no weights). Prompt tokens, a pose MLP or per-view tokens have no place in SD2."""
    node = load_config(config_path).model.params.cond_stage_config
    with torch.device("meta"):
        conditioner = instantiate_from_config(node, where=f"{config_path}: cond_stage_config")
    extra = sorted(getattr(conditioner, "new_modules", dict)())
    if not extra:
        return
    names = ", ".join(f"cond_stage_model.{name}" for name in extra)
    if type(conditioner) is PromptCLIPEmbedder:
        raise ExportError(f"{config_path}: a LeftRefill model: its prompt tokens ({names}) have no place in an "
                          f"SD2 checkpoint, whose text encoder reads words; export them with --format diffusers-ti "
                          f"(a textual inversion for the unchanged SD2 inpainting model)")
    raise ExportError(f"{config_path}: its conditioner {node.target} adds {names} to SD2 (learned tokens, a pose "
                      f"MLP): an SD2 checkpoint has no place for them and no SD2 tool computes that conditioning, "
                      f"so a merged file would not be this model; export the LoRA alone with --format diffusers-lora")


def export_merged(model_path: str | Path, out: str | Path, *, base_ckpt: str | Path | None = DEFAULT_BASE_CKPT,
                  random_init: bool = False) -> Path:
    """Write the model of ``model_path`` with its LoRA adapters merged into ``base_ckpt`` (the SD2 checkpoint
    they were trained on, checked by sha256 when the adapter file records it) to ``out`` (.safetensors or
    .ckpt). ``random_init``: on the seeded random base weights instead (tests). ExportError for a directory
    with nothing to merge, a model SD2 cannot hold (check_sd2_conditioner) or a wrong suffix."""
    out = _check_suffix(Path(out))
    model_dir = adapter_source(model_path)
    if model_dir.weights is None:
        raise ExportError(f"{model_path}: nothing to merge: the model directory holds {CONFIG_NAME} only, no trained "
                          f"file with LoRA adapters")
    check_sd2_conditioner(model_dir.config)
    file = read_trained_file(model_dir.weights)
    if file.adapter is None:
        raise ExportError(f"{model_dir.weights}: nothing to merge: its metadata names no LoRA adapter "
                          f"(config.model.lora)")
    if not random_init and base_ckpt is not None:  # None: load_with_base says where to get SD2
        base_ckpt = locate(base_ckpt, "pretrained_models")
        if base_ckpt.resolve() == out.resolve():
            raise ExportError(f"--out {out} is the base checkpoint: write the merged model to another file")
        check_base_checkpoint(file.metadata, base_ckpt, file.path)
    model = build_model(model_builder(model_dir.config), base_ckpt=None if random_init else base_ckpt,
                        trained=file.path, random_init=random_init)
    return save_merged_model(model, out, merged_header(file))


def _check_suffix(out: Path) -> Path:
    if out.suffix not in SUFFIXES:
        raise ExportError(f"--out {out}: the merged model is written as {' or '.join(SUFFIXES)}, got {out.suffix!r}")
    return out
