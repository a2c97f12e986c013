"""The learned prompt tokens as a textual-inversion embedding for other tools, and back (METHOD 7.8).

LeftRefill's tokens are a textual inversion of n vectors (n = 50 for the release): the table
``cond_stage_model.special_embeddings.weight`` (n, width) fills the n token slots of the prompt, which then
goes through SD2's frozen text encoder. Formats written:

* ``diffusers-ti``: a safetensors file ``{token: (n, width)}``. diffusers' ``load_textual_inversion``
  registers ``token``, ``token_1`` ... ``token_{n-1}`` and expands ``token`` in a prompt to all n, so the
  prompt ``token`` alone gives the LeftRefill context.
* ``a1111``: the AUTOMATIC1111 embedding, ``.pt`` ``{"string_to_token": {"*": 265}, "string_to_param":
  {"*": (n, width)}, "name", "step"}`` (torch.save of tensors, ints and strings only) or ``.safetensors``
  ``{"emb_params": (n, width)}``; ComfyUI reads both.

The reverse, :func:`import_textual_inversion`, turns such a file into a model directory of this project.
Every file is written atomically (leftrefill.atomic).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError, _torch_load
from ldm.util import instantiate_from_config, load_config
from leftrefill.atomic import atomic_path, write_text_atomic
from leftrefill.model_dir import CONFIG_NAME, TOKEN_KEY, read_trained_file, resolve_model_dir
from leftrefill.paths import RESOURCES
from leftrefill.prompt_tokens import PromptCLIPEmbedder

DEFAULT_TOKEN = "<leftrefill>"
FORMATS = ("diffusers-ti", "a1111")
A1111_TOKEN_ID = 265  # the id A1111 writes for its placeholder "*"; readers ignore it
A1111_SAFETENSORS_KEY = "emb_params"
DEFAULT_BASE_CONFIG = RESOURCES / "checkpoints" / "ref_guided_inpainting" / CONFIG_NAME  # installed with the package


class ExportError(ValueError):
    """Input that cannot be exported or imported; the message says what and why."""


@dataclass(frozen=True)
class Embedding:
    """A textual-inversion embedding read from a file: ``vectors`` (n, width) float32 and the token name the
    file gives (None for an A1111 file, whose placeholder "*" is not a name)."""

    vectors: torch.Tensor
    token: str | None


# -- export --------------------------------------------------------------------------------------------
def table_shape(config_path: str | Path) -> tuple[int, int]:
    """(rows, width) of the token table of the model config's conditioner, built on the meta device (no
    weights, no memory). ExportError unless the conditioner is LeftRefill's plain prompt tuning: a pose MLP
    (NVS) or per-view token sets (multi-view) are more than one textual inversion can carry, and a plain text
    conditioner (RealFill) has no learned tokens."""
    return _table_shape(load_config(config_path), config_path)


def _table_shape(config, where) -> tuple[int, int]:
    node = config.model.params.cond_stage_config
    with torch.device("meta"):
        conditioner = instantiate_from_config(node, where=f"{where}: cond_stage_config")
    if type(conditioner) is not PromptCLIPEmbedder:
        what = ("has no learned prompt tokens" if not isinstance(conditioner, PromptCLIPEmbedder) else
                "adds more than one prompt of learned tokens (a pose MLP or per-view tokens), which a textual "
                "inversion cannot carry")
        raise ExportError(f"{where}: its text conditioner {node.target} {what}; only "
                          f"leftrefill.prompt_tokens.PromptCLIPEmbedder models export as a textual inversion")
    return tuple(conditioner.special_embeddings.weight.shape)


def read_tokens(model_path: str | Path) -> torch.Tensor:
    """The prompt-token table (n, width) float32 of a model directory or of a token file inside one, checked
    against its model config. ExportError for a directory that holds a config only, or a trained file that
    holds more than the tokens (a LoRA adapter would be lost)."""
    model_dir = resolve_model_dir(model_path)
    if model_dir.weights is None:
        raise ExportError(f"{model_path}: nothing to export: the model directory holds {CONFIG_NAME} only, no "
                          f"trained token file (ckpts/*.ckpt or *.safetensors); random-weight directories such as "
                          f"checkpoints/tiny_random have no learned tokens")
    shape = table_shape(model_dir.config)
    trained = read_trained_file(model_dir.weights).state_dict  # one read; keys within its trainable set
    others = sorted(set(trained) - {TOKEN_KEY})
    if others:
        raise ExportError(f"{model_dir.weights}: holds more than the prompt tokens ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}); a textual inversion would drop them")
    tokens = trained.get(TOKEN_KEY)
    if tokens is None or tuple(tokens.shape) != shape:
        got = "no prompt tokens" if tokens is None else f"tokens of shape {list(tokens.shape)}"
        raise ExportError(f"{model_dir.weights}: holds {got}, but {model_dir.config} expects {shape[0]} tokens of "
                          f"width {shape[1]}")
    return tokens.detach().float().contiguous()


def write_diffusers_ti(vectors: torch.Tensor, token: str, out: str | Path) -> Path:
    """``{token: (n, width)}`` as safetensors at ``out`` (diffusers' ``load_textual_inversion``)."""
    _check_suffix(out, (".safetensors",), "diffusers-ti")
    with atomic_path(out) as tmp:
        save_file({token: vectors.float().contiguous()}, str(tmp))
    return Path(out)


def write_a1111(vectors: torch.Tensor, name: str, out: str | Path, step: int = 0) -> Path:
    """An A1111 embedding at ``out``: the ``.pt`` dict (torch.save) or the ``.safetensors`` form, by suffix.
    ``name``: the embedding's name in A1111 (its prompt word is the file name)."""
    suffix = _check_suffix(out, (".pt", ".safetensors"), "a1111")
    vectors = vectors.float().contiguous()
    with atomic_path(out) as tmp:
        if suffix == ".safetensors":
            save_file({A1111_SAFETENSORS_KEY: vectors}, str(tmp))
        else:
            torch.save({"string_to_token": {"*": A1111_TOKEN_ID}, "string_to_param": {"*": vectors},
                        "name": name, "step": int(step)}, tmp)
    return Path(out)


def export_tokens(model_path: str | Path, fmt: str, out: str | Path, token: str = DEFAULT_TOKEN) -> Path:
    """Write the prompt tokens of ``model_path`` to ``out`` in format ``fmt`` (one of ``FORMATS``)."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    vectors = read_tokens(model_path)
    if fmt == "diffusers-ti":
        return write_diffusers_ti(vectors, token, out)
    return write_a1111(vectors, token.strip("<>") or "leftrefill", out)


def _check_suffix(out: str | Path, allowed: tuple[str, ...], fmt: str) -> str:
    suffix = Path(out).suffix
    if suffix not in allowed:
        raise ExportError(f"--out {out}: the {fmt} format is written as {' or '.join(allowed)}, got {suffix!r}")
    return suffix


# -- import --------------------------------------------------------------------------------------------
def read_embedding(path: str | Path) -> Embedding:
    """A textual-inversion embedding from a diffusers file (safetensors or .bin, one key ``{token: (n, width)}``)
    or an A1111 one (``.pt`` with ``string_to_param``, or safetensors with ``emb_params``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                entries = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from None
    else:
        entries = _torch_load(path)
    if not isinstance(entries, dict):
        raise ExportError(f"{path}: not a textual-inversion embedding (expected a dict of tensors)")
    if A1111_SAFETENSORS_KEY in entries:
        return _embedding(path, entries[A1111_SAFETENSORS_KEY], None)
    if isinstance(entries.get("string_to_param"), dict):
        params = entries["string_to_param"]
        if len(params) != 1:
            raise ExportError(f"{path}: an A1111 embedding with {len(params)} vectors sets; expected one")
        return _embedding(path, next(iter(params.values())), None)
    if len(entries) == 1:
        token, vectors = next(iter(entries.items()))
        return _embedding(path, vectors, str(token))
    raise ExportError(f"{path}: not a textual-inversion embedding: expected one key {{token: (n, width)}}, "
                      f"'{A1111_SAFETENSORS_KEY}' or 'string_to_param'; found {sorted(map(str, entries))[:5]}")


def _embedding(path: Path, vectors, token: str | None) -> Embedding:
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2) or not vectors.is_floating_point():
        raise ExportError(f"{path}: the embedding is not a float tensor of shape (n, width)")
    vectors = vectors[None] if vectors.ndim == 1 else vectors  # a one-vector diffusers file stores (width,)
    return Embedding(vectors.detach().float().contiguous(), token)


def import_textual_inversion(file: str | Path, model_dir_out: str | Path,
                             base_model_config: str | Path = DEFAULT_BASE_CONFIG, *, name: str = "prompt_tokens",
                             overwrite: bool = False) -> Path:
    """Make a model directory of this project from a textual-inversion file (diffusers or A1111).

    ``model_dir_out`` gets ``model_config.yaml`` (``base_model_config``, by default the released LeftRefill
    config) and ``ckpts/<name>.safetensors`` holding ``cond_stage_model.special_embeddings.weight`` (n, width).
    The embedding's width must equal the text encoder's (ExportError naming both). Its number of vectors n
    may differ from the config's ``num_tokens``: the config is then written with ``num_tokens: n`` (the
    prompt is the n tokens), checked by building the conditioner. An existing model directory is refused
    unless ``overwrite``. Returns the directory.
    """
    embedding, out = read_embedding(file), Path(model_dir_out)
    if (out / CONFIG_NAME).exists() and not overwrite:
        raise ExportError(f"{out}: already a model directory (holds {CONFIG_NAME}); choose another or overwrite")
    n, width = embedding.vectors.shape
    rows, model_width = table_shape(base_model_config)
    if width != model_width:
        raise ExportError(f"{file}: the embedding has width {width}, but the text encoder of {base_model_config} has "
                          f"width {model_width} (SD2's OpenCLIP ViT-H: 1024; SD1's CLIP ViT-L: 768): it was trained "
                          f"for another base model")
    config_text = Path(base_model_config).read_text(encoding="utf-8")
    if n != rows:  # a config for n tokens (its comments are lost), checked by building its conditioner
        config = load_config(base_model_config)
        config.model.params.cond_stage_config.params.num_tokens = n
        if _table_shape(config, base_model_config) != (n, width):
            raise ExportError(f"{file}: {n} vectors, but the conditioner of {base_model_config} does not take "
                              f"num_tokens = {n} (its table stays {rows} rows); use a config for {n} tokens")
        config_text = OmegaConf.to_yaml(config)
    token_file = out / "ckpts" / f"{name}.safetensors"
    with atomic_path(token_file) as tmp:
        save_file({TOKEN_KEY: embedding.vectors}, str(tmp))
    write_text_atomic(out / CONFIG_NAME, config_text)
    return out
