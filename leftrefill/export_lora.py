"""LoRA adapters (NVS's UNet LoRA, RealFill's UNet + text-encoder LoRA) as diffusers or kohya LoRA files, and
back (METHOD 7.8).

This project's adapters are peft LoRA (leftrefill.lora) on the CompVis-layout UNet
(``model.diffusion_model.<path>``) and on the OpenCLIP text encoder's split attention
(``cond_stage_model.model.transformer.resblocks.N.attn.{q,k,v,out}_proj``): tensors ``<layer>.lora_A.default
.weight`` (rank, in) and ``<layer>.lora_B.default.weight`` (out, rank), scaled by alpha / rank. Formats written:

* ``diffusers-lora``: safetensors ``{"unet.<diffusers path>.lora_A.weight": A, "unet.<...>.lora_B.weight":
  (alpha / rank) B, "text_encoder.text_model.encoder.layers.N.self_attn.q_proj.lora_A.weight": ...}``, the
  form ``pipe.load_lora_weights`` reads. alpha / rank is folded into B because diffusers, given a state dict
  without adapter metadata, builds each adapter with alpha = rank (scale 1).
* ``kohya``: safetensors ``{"lora_unet_<diffusers path, dots as _>.lora_down.weight": A, ".lora_up.weight": B,
  ".alpha": alpha}`` and ``lora_te_text_model_encoder_layers_N_self_attn_q_proj.*`` (A1111, ComfyUI and
  diffusers' kohya converter apply alpha / rank themselves).

The module paths are not written by hand. UNet: :func:`unet_module_map` runs diffusers' own single-file
converter (``convert_ldm_unet_checkpoint``, a pure renaming for the SD2 UNet) over a state dict whose values
are its own key names, so the mapping is the one diffusers uses to load this UNet's weights. Text encoder:
:func:`text_module_name` applies diffusers' open_clip renaming table (the one ``convert_open_clip_checkpoint``
uses; our q/k/v layers are the slices it cuts from ``in_proj_weight``, under the names it gives them).

The reverse, :func:`import_lora`, reads either format into a model directory of this project: a trained
file holding the adapter tensors with the ``config.model.lora`` spec and ``trainable`` metadata that
leftrefill.model_dir needs.
"""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError
from ldm.latent_diffusion import model_builder
from ldm.util import load_config
from leftrefill.atomic import atomic_path, write_text_atomic
from leftrefill.export_tokens import ExportError
from leftrefill.lora import ADAPTER, LORA_TARGETS, PARTS, TEXT_PROJECTIONS, adapter_spec
from leftrefill.model_dir import CONFIG_NAME, METADATA_KEY, read_trained_file, resolve_model_dir

log = logging.getLogger(__name__)

FORMATS = ("diffusers-lora", "kohya")
# per part: this project's prefix (the SD2 checkpoint's names), diffusers' and kohya's
PREFIX = {"unet": "model.diffusion_model.", "text": "cond_stage_model.model.transformer."}
DIFFUSERS_PREFIX = {"unet": "unet.", "text": "text_encoder."}
KOHYA_PREFIX = {"unet": "lora_unet_", "text": "lora_te_"}
A_SUFFIX, B_SUFFIX = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"  # peft's names, adapter "default"


# -- the module-path mapping ---------------------------------------------------------------------------
@lru_cache(maxsize=8)
def unet_module_map(config_path: str) -> dict[str, str]:
    """``{CompVis module path: diffusers module path}`` for every Linear / Conv weight of the UNet of
    ``config_path`` (paths relative to the UNet), derived by diffusers' own checkpoint converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    build = model_builder(config_path)
    with torch.device("meta"):
        unet = build().model.diffusion_model  # meta: names only, no memory
    names = {f"{PREFIX['unet']}{key}": key for key in unet.state_dict()}
    layers = int(load_config(config_path).model.params.unet_config.params.num_res_blocks)
    converted = convert_ldm_unet_checkpoint(names, {"layers_per_block": layers})  # {diffusers key: our key}
    return {ours.removesuffix(".weight"): theirs.removesuffix(".weight")
            for theirs, ours in converted.items() if ours.endswith(".weight")}


def text_module_name(path: str) -> str:
    """diffusers' (transformers CLIPTextModel's) name of the text-encoder layer ``path`` (relative to the
    OpenCLIP transformer, ``resblocks.N.attn.q_proj``), by diffusers' open_clip renaming table."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    for new, old in DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"].items():
        path = path.replace(old, new)  # the loop of convert_open_clip_checkpoint
    return path


@lru_cache(maxsize=8)
def text_module_map(config_path: str) -> dict[str, str]:
    """``{our text layer path: diffusers path}`` for the q/k/v/out projections of every text block that runs
    (SD2 reads the penultimate layer: the last block, absent from diffusers' SD2 text encoder, never does)."""
    with torch.device("meta"):
        blocks = model_builder(config_path)().cond_stage_model.num_layers_used
    return {path: text_module_name(path) for path in
            (f"resblocks.{b}.attn.{name}" for b in range(blocks) for name in TEXT_PROJECTIONS)}


def module_map(part: str, config_path: str | Path) -> dict[str, str]:
    key = str(Path(config_path).resolve())
    return unet_module_map(key) if part == "unet" else text_module_map(key)


# -- export --------------------------------------------------------------------------------------------
def _split_spec(spec: dict | None) -> dict:
    """``{part: spec}`` for the parts an adapter spec (leftrefill.lora.adapter_spec) names."""
    if spec is None:
        return {}
    if set(spec) == set(PARTS):
        return {part: spec[part] for part in PARTS if spec[part] is not None}
    return {"unet": spec}


def read_adapters(model_path: str | Path) -> tuple[dict[str, tuple[dict, dict]], Path]:
    """``({part: (spec, {layer path: (A (rank, in), B (out, rank))})}, model config)`` of a model directory
    (or a trained file inside one); layer paths relative to PREFIX[part]. ExportError without an adapter."""
    model_dir = resolve_model_dir(model_path)
    if model_dir.weights is None:
        raise ExportError(f"{model_path}: nothing to export: the model directory holds {CONFIG_NAME} only, no "
                          f"trained file with a LoRA adapter")
    file = read_trained_file(model_dir.weights)
    specs = _split_spec(file.adapter)
    if not specs:
        raise ExportError(f"{model_dir.weights}: nothing to export as a LoRA: its metadata names no adapter "
                          f"(config.model.lora); prompt tokens export with --format diffusers-ti or a1111")
    parts = {}
    for part, spec in specs.items():
        prefix, adapter = PREFIX[part], {}
        for key, a in file.state_dict.items():
            if key.startswith(prefix) and key.endswith(A_SUFFIX):
                layer = key[len(prefix):-len(A_SUFFIX)]
                adapter[layer] = (a.float(), file.state_dict[f"{prefix}{layer}{B_SUFFIX}"].float())
        if not adapter:
            raise ExportError(f"{model_dir.weights}: names a {part} adapter but holds none of its tensors")
        parts[part] = (spec, adapter)
    left = sorted(k for k in file.state_dict if ".lora_" not in k)
    if left:
        log.warning("%s: a LoRA file carries the adapters only; not exported: %s%s", model_dir.weights,
                    ", ".join(left[:3]), " ..." if len(left) > 3 else "")
    return parts, model_dir.config


def lora_state_dict(parts: dict[str, tuple[dict, dict]], config_path: str | Path, fmt: str) -> dict[str, torch.Tensor]:
    """The adapters ``{part: (spec, {layer: (A, B)})}`` (scale alpha / rank) as a ``fmt`` state dict."""
    out = {}
    for part, (spec, adapter) in parts.items():
        mapping = module_map(part, config_path)
        for layer, (a, b) in sorted(adapter.items()):
            theirs = mapping[layer]
            if fmt == "diffusers-lora":
                name = DIFFUSERS_PREFIX[part] + theirs
                out[f"{name}.lora_A.weight"] = a.contiguous()
                out[f"{name}.lora_B.weight"] = (b * (spec["alpha"] / spec["rank"])).contiguous()
            else:
                name = KOHYA_PREFIX[part] + theirs.replace(".", "_")
                out[f"{name}.lora_down.weight"] = a.contiguous()
                out[f"{name}.lora_up.weight"] = b.contiguous()
                out[f"{name}.alpha"] = torch.tensor(float(spec["alpha"]))
    return out


def export_lora(model_path: str | Path, fmt: str, out: str | Path) -> Path:
    """Write the LoRA adapters of ``model_path`` to ``out`` (.safetensors) in format ``fmt`` (FORMATS)."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if Path(out).suffix != ".safetensors":
        raise ExportError(f"--out {out}: the {fmt} format is written as .safetensors")
    parts, config = read_adapters(model_path)
    tensors = lora_state_dict(parts, config, fmt)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp))
    return Path(out)


# -- import --------------------------------------------------------------------------------------------
def is_lora_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file of diffusers (``*.lora_A.weight``) or kohya (``*.lora_down``)
    LoRA keys (the CLI's ``--import`` tells LoRA files from textual inversions by this)."""
    if Path(path).suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError):
        return False
    return any(".lora_A." in k or ".lora_down." in k for k in keys)


def read_lora_file(path: str | Path, config_path: str | Path) -> dict[str, dict[str, tuple]]:
    """``{part: {our layer path: (A, B, scale)}}`` from a diffusers or kohya LoRA file, keys mapped onto the
    model of ``config_path``. ExportError for keys that are no adapted layer of this model."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            entries = {key: handle.get_tensor(key) for key in handle.keys()}
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from None
    alphas = _diffusers_alphas(path, header)
    inverse = {part: {theirs: ours for ours, theirs in module_map(part, config_path).items()} for part in PARTS}
    kohya = {(KOHYA_PREFIX[part] + theirs.replace(".", "_")): (part, theirs)
             for part in PARTS for theirs in inverse[part]}
    layers, unknown = {}, []
    for key, a in entries.items():
        stem, down = _stem(key)
        if stem is None:
            if not re.search(r"\.(lora_B\.weight|lora_up\.weight|alpha)$", key):
                unknown.append(key)
            continue
        found = kohya.get(stem) if not down.startswith(".lora_A") else _diffusers_layer(stem)
        if found is None or found[1] not in inverse[found[0]]:
            unknown.append(key)
            continue
        part, theirs = found
        up = entries.get(stem + (".lora_B.weight" if down.startswith(".lora_A") else ".lora_up.weight"))
        if up is None or a.ndim != 2 or up.ndim != 2 or a.shape[0] != up.shape[1]:
            raise ExportError(f"{path}: {key}: no matching up / B matrix of rank {a.shape[0]}")
        alpha = entries.get(f"{stem}.alpha", alphas.get(part))
        scale = float(alpha) / a.shape[0] if alpha is not None else 1.0  # diffusers: alpha = rank without one
        layers.setdefault(part, {})[inverse[part][theirs]] = (a.float(), up.float(), scale)
    if unknown or not layers:
        raise ExportError(f"{path}: {', '.join(sorted(unknown)[:3]) or 'no LoRA keys'}"
                          f"{' ...' if len(unknown) > 3 else ''}: not a layer this project adapts in the model of "
                          f"{config_path} (UNet attention / GEGLU projections, text q/k/v/out); the LoRA was "
                          f"trained for another base model or other layers")
    return layers


def _diffusers_alphas(path, header: dict) -> dict[str, float]:
    """``{part: lora_alpha}`` from the adapter metadata diffusers' ``save_lora_weights`` writes into the
    safetensors header (``"lora_adapter_metadata"``: ``{"unet.lora_alpha": ..., "text_encoder.r": ...}``)."""
    if "lora_adapter_metadata" not in header:
        return {}
    try:
        metadata = json.loads(header["lora_adapter_metadata"])
    except json.JSONDecodeError:
        raise ExportError(f"{path}: its lora_adapter_metadata header is not JSON") from None
    alphas = {}
    for part, prefix in DIFFUSERS_PREFIX.items():
        if metadata.get(f"{prefix}alpha_pattern"):
            raise ExportError(f"{path}: per-layer alphas ({prefix}alpha_pattern) are not supported; this project's "
                              f"adapter has one alpha per network")
        if metadata.get(f"{prefix}lora_alpha") is not None:
            alphas[part] = float(metadata[f"{prefix}lora_alpha"])
    return alphas


def _stem(key: str) -> tuple[str | None, str]:
    for down in (".lora_A.weight", ".lora_down.weight"):
        if key.endswith(down):
            return key[:-len(down)], down
    return None, ""


def _diffusers_layer(stem: str) -> tuple[str, str] | None:
    for part, prefix in DIFFUSERS_PREFIX.items():
        if stem.startswith(prefix):
            return part, stem[len(prefix):]
    return None


def import_lora(file: str | Path, model_dir_out: str | Path, base_model: str | Path, *,
                name: str = "lora", overwrite: bool = False) -> Path:
    """Make a model directory of this project from a diffusers or kohya LoRA file (UNet and / or text encoder).

    ``base_model``: a model directory. Its config is written to ``model_dir_out``; when it holds a trained
    file whose metadata names an adapter, the LoRA must have that adapter's parts, ranks and layers, takes
    its alphas and joins that file's other trained tensors (prompt tokens, a pose MLP: e.g. an NVS model whose
    adapter was edited in diffusers). Otherwise the spec comes from the file: its rank, alpha = rank (the
    file's alpha / rank folded into B) and exactly its layers as targets. ExportError for a rank or layer
    (base model) mismatch, each naming both sides. Writes ``ckpts/<name>.safetensors``; returns the directory.
    """
    out, base = Path(model_dir_out), resolve_model_dir(base_model)
    if (out / CONFIG_NAME).exists() and not overwrite:
        raise ExportError(f"{out}: already a model directory (holds {CONFIG_NAME}); choose another or overwrite")
    layers = read_lora_file(file, base.config)
    trained = read_trained_file(base.weights) if base.weights is not None else None
    existing = _split_spec(trained.adapter) if trained is not None else {}
    tensors = {k: v for k, v in trained.state_dict.items() if ".lora_" not in k} if trained is not None else {}
    specs = {}
    for part, found in layers.items():
        rank = _one_rank(file, part, found)
        spec = existing.get(part)
        if spec is not None:
            _check_against(file, part, rank, found, spec, trained)
        else:
            spec = _derived_spec(file, part, rank, set(found), base.config)
        specs[part] = spec
        target = spec["alpha"] / spec["rank"]
        for layer, (a, b, scale) in found.items():
            tensors[f"{PREFIX[part]}{layer}{A_SUFFIX}"] = a.contiguous()
            tensors[f"{PREFIX[part]}{layer}{B_SUFFIX}"] = (b * (scale / target)).contiguous()
    if existing and set(existing) != set(specs):
        raise ExportError(f"{file}: adapts {', '.join(sorted(specs))}, but the adapter of {base.weights} adapts "
                          f"{', '.join(sorted(existing))}")
    _check_shapes(file, base.config, tensors)
    spec = specs["unet"] if set(specs) == {"unet"} else {part: specs.get(part) for part in PARTS}
    metadata = (trained.metadata or {}) if trained is not None else {}
    config = dict(metadata.get("config") or {})
    config["model"] = {**(config.get("model") or {}), "lora": spec}
    header = {"config": config, "trainable": {"imported": sorted(tensors)},
              "base_checkpoint": metadata.get("base_checkpoint")}
    with atomic_path(out / "ckpts" / f"{name}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(header, allow_nan=False)})
    write_text_atomic(out / CONFIG_NAME, base.config.read_text(encoding="utf-8"))
    return out


def _one_rank(file, part: str, found: dict) -> int:
    ranks = sorted({a.shape[0] for a, _, _ in found.values()})
    if len(ranks) != 1:
        raise ExportError(f"{file}: {part} layers of ranks {ranks}; this project's adapter has one rank per network")
    return ranks[0]


def _check_against(file, part: str, rank: int, found: dict, spec: dict, trained) -> None:
    if spec["rank"] != rank:
        raise ExportError(f"{file}: {part} LoRA rank {rank}, but the adapter of {trained.path} has rank {spec['rank']}")
    prefix = PREFIX[part]
    wanted = {k[len(prefix):-len(A_SUFFIX)] for k in trained.state_dict
              if k.startswith(prefix) and k.endswith(A_SUFFIX)}
    if wanted != set(found):
        diff = sorted(wanted ^ set(found))
        raise ExportError(f"{file}: its {part} layers differ from the adapter of {trained.path} ({', '.join(diff[:3])}"
                          f"{' ...' if len(diff) > 3 else ''}): trained for another base model or other targets")


def _derived_spec(file, part: str, rank: int, layers: set[str], config_path: Path) -> dict:
    """The spec of an adapter on exactly ``layers`` (alpha = rank: the file's scales are folded into B)."""
    if part == "unet":
        everything = module_map("unet", config_path)
        default = {m for m in everything if re.fullmatch(LORA_TARGETS, m)}
        targets = LORA_TARGETS if default == layers else "|".join(re.escape(m) for m in sorted(layers))
        return adapter_spec({"rank": rank, "alpha": float(rank), "target_modules": targets})
    blocks = sorted({int(layer.split(".")[1]) for layer in layers})
    modules = sorted({layer.split(".")[-1] for layer in layers})
    if {f"resblocks.{b}.attn.{m}" for b in blocks for m in modules} != layers:
        raise ExportError(f"{file}: its text-encoder layers are not the same projections in every block; this "
                          f"project's text adapter is target_blocks x target_modules")
    return {"rank": rank, "alpha": float(rank), "dropout": 0.0, "target_blocks": blocks,
            "target_modules": [m for m in TEXT_PROJECTIONS if m in modules], "init": "kaiming"}


def _check_shapes(file: str | Path, config_path: Path, tensors: dict) -> None:
    """Each adapter matrix must fit its layer of the base model (an SD1 LoRA has 768-wide attn2.to_k / to_v)."""
    with torch.device("meta"):
        model = model_builder(config_path)()
    weights = {name: p.shape for name, p in model.named_parameters()}
    for key, tensor in tensors.items():
        if ".lora_" not in key:
            continue
        layer = key.split(".lora_")[0]
        shape = weights.get(f"{layer}.weight") or _fused_shape(weights, layer)
        out_features, in_features = shape[:2]
        fits = tensor.shape[1] == in_features if key.endswith(A_SUFFIX) else tensor.shape[0] == out_features
        if not fits:
            raise ExportError(f"{file}: the LoRA of {layer} has shape {list(tensor.shape)}, but that layer of "
                              f"{config_path} is {out_features} x {in_features}: trained for another base model")


def _fused_shape(weights: dict, layer: str) -> tuple[int, int]:
    """(out, in) of a text q/k/v/out projection, read from nn.MultiheadAttention's fused parameters."""
    attn, name = layer.rsplit(".", 1)
    if name == "out_proj":
        return tuple(weights[f"{attn}.out_proj.weight"])
    fused = weights[f"{attn}.in_proj_weight"]
    return fused[0] // 3, fused[1]
