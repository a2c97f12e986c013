"""LoRA adapters on the SD2 UNet through peft (METHOD 2.6, the release's ``lora_type: default``).

Targets: every attention projection (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of the self- and
cross-attention) and the GEGLU input projection (``ff.net.0.proj``) of every transformer block: the
Linear layers the release's cloneofsimo-style LoRA wraps. Rank 16 and alpha 16 give the release's scale
1.0 (peft scales by alpha / rank); no dropout; A ~ N(0, 1/rank), B = 0 (peft's "gaussian", the
release's ``lora_down`` / ``lora_up`` initialisation), so a fresh adapter leaves the UNet's output as it is.

peft wraps each target: the base weight moves to ``<layer>.base_layer.weight`` and the adapter adds
``<layer>.lora_A.default.weight`` (rank, in) and ``<layer>.lora_B.default.weight`` (out, rank). An adapter
is therefore added after the base weights are loaded (leftrefill.model_dir does so), and the trained
checkpoint holds the ``lora_`` tensors only. ``merge_lora`` folds them into the base weights for
inference (same outputs, no adapter cost per step).

Text-encoder LoRA (RealFill, METHOD 5.1 / 7.1): adapters on the query, key, value and output projections
of the OpenCLIP text transformer's attention (thuanz123's ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``
of the HF CLIP text model), rank 8, alpha 16, dropout 0.1 by default. Only the blocks that run get them:
SD2 takes the penultimate layer's output, so the last residual block never runs and an adapter there
would never train (blocks 0..L-2; ``target_blocks`` may name a subset of those).

open_clip's blocks use ``nn.MultiheadAttention``, whose q/k/v projection is one fused parameter
(``in_proj_weight`` (3W, W)). peft's own MultiheadAttention LoRA was not chosen: it puts one rank-r
adapter on the fused (3W, W) matrix (q, k and v share A: not the per-projection LoRA of the RealFill
implementations), it merges the adapter into the weights before every forward and unmerges it after
(deleting and re-registering parameters: fragile under gradient checkpointing's recomputation), and
merging a weight cannot apply LoRA dropout, so ``lora_dropout`` is silently ignored. Instead
``add_text_lora`` replaces each targeted block's attention by :class:`SplitAttention`, the same math
with four ``nn.Linear`` layers loaded from the fused weights, and wraps those with plain peft Linear
LoRA (exactly as the UNet's). SplitAttention's state dict stays in ``nn.MultiheadAttention``'s format
(``attn.in_proj_weight``, ``attn.in_proj_bias``, ``attn.out_proj.weight``, ``attn.out_proj.bias``, also
when peft has wrapped the layers; the ``lora_`` tensors are added beside them), so SD2 checkpoints load
strictly into an adapted model and a merged model saves as a plain SD2 state dict.

Spec format: the UNet spec ``{"rank", "alpha", "target_modules", "dropout", "init"}`` (NVS configs and
checkpoints) or, for a model with both, ``{"unet": <UNet spec or None>, "text": <text spec or None>}``
with the text spec ``{"rank", "alpha", "dropout", "target_blocks", "target_modules", "init"}``. ``init``
(LORA_INITS) draws a fresh A: "gaussian" (the UNet default, the release's) or "kaiming" (peft's default,
which the RealFill re-implementations use: the text default, and configs/realfill.yaml's for the UNet).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.util import ConfigError

# Names relative to the UNet (model.diffusion_model); peft matches a string pattern in full.
LORA_TARGETS = r".*\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*\.ff\.net\.0\.proj"
ADAPTER = "default"  # peft's adapter name: part of every adapter parameter's name
LORA_KEYS = ("rank", "alpha", "target_modules", "dropout", "init")
TEXT_LORA_KEYS = ("rank", "alpha", "dropout", "target_blocks", "target_modules", "init")
# How a fresh adapter's A is drawn (B = 0 either way): "gaussian", N(0, 1/rank), the LeftRefill release's
# lora_down; "kaiming", peft's default (nn.Linear's kaiming-uniform), the RealFill re-implementations'.
LORA_INITS = {"gaussian": "gaussian", "kaiming": True}
TEXT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")  # SplitAttention's layers (HF CLIP's names)
# RealFill's READMEs (METHOD 5.1): rank 8, alpha 16 (scale 2), dropout 0.1; None: every block that runs
TEXT_LORA_DEFAULTS = {"rank": 8, "alpha": 16.0, "dropout": 0.1, "target_blocks": None, "init": "kaiming",
                      "target_modules": list(TEXT_PROJECTIONS)}
PARTS = ("unet", "text")  # the keys of a spec for a model with adapters on both networks


def adapter_spec(spec: Mapping | None) -> dict | None:
    """A LoRA spec checked and completed with defaults, or None.

    A UNet spec ``{"rank", "alpha", "target_modules", "dropout"}`` comes back in the same form (``dropout``
    only when non-zero, so older specs compare equal); a spec with ``unet`` / ``text`` keys comes back as
    ``{"unet": UNet spec or None, "text": text spec or None}`` (:func:`text_adapter_spec`)."""
    if spec is None:
        return None
    if set(spec) & set(PARTS):
        unknown = sorted(set(spec) - set(PARTS))
        if unknown:
            raise ConfigError(f"LoRA spec: unknown key(s) {', '.join(unknown)} beside 'unet' / 'text'")
        full = {"unet": _unet_spec(spec.get("unet")), "text": text_adapter_spec(spec.get("text"))}
        if full["unet"] is None and full["text"] is None:
            raise ConfigError("LoRA spec: 'unet' and 'text' are both empty; give one, or no adapter at all")
        return full
    return _unet_spec(spec)


def _unet_spec(spec: Mapping | None) -> dict | None:
    if spec is None:
        return None
    _check_keys("LoRA spec", spec, LORA_KEYS)
    full = {"rank": 16, "alpha": 16.0, "target_modules": LORA_TARGETS, "dropout": 0.0, "init": "gaussian", **spec}
    _check_rank(full)
    _check_init(full)
    checked = {"rank": int(full["rank"]), "alpha": float(full["alpha"]), "target_modules": str(full["target_modules"])}
    # dropout and init only when they differ from the release's 0 and "gaussian", so older specs compare equal
    return {**checked, **({"dropout": float(full["dropout"])} if float(full["dropout"]) else {}),
            **({"init": full["init"]} if full["init"] != "gaussian" else {})}


def text_adapter_spec(spec: Mapping | None) -> dict | None:
    """A text-encoder LoRA spec ``{"rank", "alpha", "dropout", "target_blocks", "target_modules"}`` with the
    RealFill defaults (TEXT_LORA_DEFAULTS), or None. ``target_blocks``: residual block indices (None: every
    block the encoder runs, checked in :func:`add_text_lora`); ``target_modules``: names from
    TEXT_PROJECTIONS."""
    if spec is None:
        return None
    _check_keys("text LoRA spec", spec, TEXT_LORA_KEYS)
    full = {**TEXT_LORA_DEFAULTS, **spec}
    _check_rank(full)
    _check_init(full)
    modules = [str(name) for name in full["target_modules"]]
    if not modules or set(modules) - set(TEXT_PROJECTIONS) or isinstance(full["target_modules"], str):
        raise ConfigError(f"text LoRA spec: target_modules must be a non-empty list of {', '.join(TEXT_PROJECTIONS)}; "
                          f"got {full['target_modules']!r}")
    blocks = full["target_blocks"]
    if blocks is not None and (isinstance(blocks, str) or not isinstance(blocks, Sequence) or not blocks):
        raise ConfigError(f"text LoRA spec: target_blocks must be null or a non-empty list of block indices, "
                          f"got {blocks!r}")
    return {"rank": int(full["rank"]), "alpha": float(full["alpha"]), "dropout": float(full["dropout"]),
            "target_blocks": None if blocks is None else sorted({int(b) for b in blocks}),
            "target_modules": [name for name in TEXT_PROJECTIONS if name in modules], "init": full["init"]}


def _check_keys(what: str, spec: Mapping, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {', '.join(unknown)}; it takes {', '.join(allowed)}")


def _check_init(full: Mapping) -> None:
    if full["init"] not in LORA_INITS:
        raise ConfigError(f"LoRA spec: init must be one of {', '.join(LORA_INITS)}, got {full['init']!r}")


def _check_rank(full: Mapping) -> None:
    if not (isinstance(full["rank"], int) and full["rank"] >= 1 and float(full["alpha"]) > 0
            and 0.0 <= float(full["dropout"]) < 1.0):
        raise ConfigError(f"LoRA spec: rank must be an integer >= 1, alpha > 0 and dropout in [0, 1), got "
                          f"{full['rank']!r}, {full['alpha']!r}, {full['dropout']!r}")


def add_lora(model: nn.Module, spec: Mapping) -> None:
    """Add the LoRA adapters ``spec`` names (:func:`adapter_spec`), in place: a UNet spec wraps the target
    layers of ``model.model.diffusion_model`` (the SD2 UNet); a ``{"unet", "text"}`` spec also (or only)
    adds the text encoder's (:func:`add_text_lora`).

    The adapter's tensors are created on the base layers' device and dtype, initialised as the release
    (B = 0). A pattern that matches no layer is a ConfigError."""
    spec = adapter_spec(spec)
    if set(spec) == set(PARTS):
        if spec["unet"] is not None:
            _add_unet_lora(model, spec["unet"])
        if spec["text"] is not None:
            add_text_lora(model, spec["text"])
    else:
        _add_unet_lora(model, spec)


def _add_unet_lora(model: nn.Module, spec: Mapping) -> None:
    from peft import LoraConfig, inject_adapter_in_model  # peft imports transformers: only when used

    config = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], target_modules=spec["target_modules"],
                        lora_dropout=spec.get("dropout", 0.0), bias="none",
                        init_lora_weights=LORA_INITS[spec.get("init", "gaussian")])
    try:
        inject_adapter_in_model(config, model.model.diffusion_model, adapter_name=ADAPTER)
    except ValueError as err:
        raise ConfigError(f"LoRA target_modules {spec['target_modules']!r}: {str(err).splitlines()[0]}") from None


def add_text_lora(model: nn.Module, spec: Mapping) -> list[str]:
    """Put LoRA adapters on the attention projections of ``model.cond_stage_model`` (an OpenCLIP text
    encoder, ldm.text_encoder), in place; returns the wrapped layers' names relative to its
    ``model.transformer`` (``resblocks.N.attn.q_proj``, ...).

    ``spec`` as :func:`text_adapter_spec`. Each targeted block's ``nn.MultiheadAttention`` becomes a
    :class:`SplitAttention` with the same weights, then peft wraps its Linear layers (B = 0: the context is
    unchanged). A block the encoder never runs (the last one with SD2's penultimate layer) is a ConfigError."""
    from peft import LoraConfig, inject_adapter_in_model

    spec = text_adapter_spec(spec)
    embedder = model.cond_stage_model
    transformer = embedder.model.transformer
    used = embedder.num_layers_used  # SD2: layers - 1 (the last block's output is never read)
    blocks = spec["target_blocks"] if spec["target_blocks"] is not None else list(range(used))
    unused = [b for b in blocks if not 0 <= b < used]
    if unused:
        raise ConfigError(f"text LoRA target_blocks {unused}: the text encoder runs blocks 0..{used - 1} only")
    for index in blocks:
        block = transformer.resblocks[index]
        if not isinstance(block.attn, SplitAttention):
            block.attn = SplitAttention.from_multihead(block.attn)
    names = [f"resblocks.{b}.attn.{name}" for b in blocks for name in spec["target_modules"]]
    config = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], target_modules=names, lora_dropout=spec["dropout"],
                        bias="none", init_lora_weights=LORA_INITS[spec["init"]])
    inject_adapter_in_model(config, transformer, adapter_name=ADAPTER)
    return names


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers of ``model`` (duck-typed: models without adapters never import peft)."""
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "reset_lora_parameters")]


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (W + scale * B A), in place; returns the number of layers.
    The adapter then no longer runs at each step (peft keeps it, unmerged by ``unmerge_lora``)."""
    layers = lora_layers(model)
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def set_lora_dropout_mode(model: nn.Module, mode: bool = True) -> None:
    """Train (``mode``) or eval mode for the LoRA dropout layers alone: frozen modules are kept in eval mode
    during training (leftrefill.trainable.set_train_mode), which would also switch their adapters' dropout
    off."""
    for layer in lora_layers(model):
        for dropout in layer.lora_dropout.values():
            dropout.train(mode)


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch-first, one width for q, k and v, no bias_k / bias_v / zero
    attention) with its fused in-projection split into ``q_proj``, ``k_proj``, ``v_proj`` Linear layers,
    so that peft can wrap each of them; ``out_proj`` as before.

    The state dict keeps ``nn.MultiheadAttention``'s keys (``in_proj_weight`` (3W, W) = [q; k; v],
    ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``), also under peft's wrapping (whose base
    weights it reads and writes through ``<layer>.base_layer``): SD2 checkpoints load into it unchanged.
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(width, width, bias=bias, device=device, dtype=dtype) for _ in range(4))
        self.num_heads, self.dropout, self.batch_first = heads, dropout, True
        self.register_state_dict_post_hook(_fuse_in_projection)
        self.register_load_state_dict_pre_hook(_split_in_projection)

    @classmethod
    def from_multihead(cls, attn: nn.MultiheadAttention) -> SplitAttention:
        """The same attention, its weights copied (keeping their ``requires_grad``)."""
        if not (attn.batch_first and attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn):
            raise ValueError("SplitAttention replaces batch-first nn.MultiheadAttention with one q/k/v width, "
                             "no bias_k / bias_v and no add_zero_attn (open_clip's)")
        weight = attn.in_proj_weight
        new = cls(attn.embed_dim, attn.num_heads, attn.dropout, bias=attn.in_proj_bias is not None,
                  device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for name, part in zip(("q_proj", "k_proj", "v_proj"), range(3)):
                rows = slice(part * attn.embed_dim, (part + 1) * attn.embed_dim)
                getattr(new, name).weight.copy_(weight[rows])
                if attn.in_proj_bias is not None:
                    getattr(new, name).bias.copy_(attn.in_proj_bias[rows])
            new.out_proj.load_state_dict(attn.out_proj.state_dict())
        new.requires_grad_(weight.requires_grad)
        return new.train(attn.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """query, key, value (B, L, W) -> ((B, L, W), None), as ``nn.MultiheadAttention``. ``attn_mask``
        (L, L): float, added to the logits, or bool with True = may not attend (MultiheadAttention's
        meaning, the opposite of scaled_dot_product_attention's)."""
        if need_weights:
            raise ValueError("SplitAttention does not return attention weights (open_clip never asks for them)")
        batch, length, width = query.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, W) -> (B, heads, L, W / heads)
            return x.view(batch, x.shape[1], self.num_heads, width // self.num_heads).transpose(1, 2)

        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask
        out = F.scaled_dot_product_attention(heads(self.q_proj(query)), heads(self.k_proj(key)),
                                             heads(self.v_proj(value)), attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width)), None


def _base_path(module: SplitAttention, name: str) -> str:
    """Where the plain Linear ``name`` of ``module`` lives: peft moves a wrapped layer to ``base_layer``."""
    return f"{name}.base_layer" if hasattr(getattr(module, name), "base_layer") else name


def _fuse_in_projection(module: SplitAttention, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: q/k/v weights and biases -> ``in_proj_weight`` / ``in_proj_bias``; a peft-wrapped
    ``out_proj.base_layer.*`` -> ``out_proj.*`` (MultiheadAttention's keys)."""
    with torch.no_grad():
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{_base_path(module, name)}.{kind}" for name in ("q_proj", "k_proj", "v_proj")]
            if keys[0] in state_dict:  # no bias: no key
                state_dict[f"{prefix}in_proj_{kind}"] = torch.cat([state_dict.pop(key) for key in keys])
            out = f"{prefix}{_base_path(module, 'out_proj')}.{kind}"
            if out in state_dict:
                state_dict[f"{prefix}out_proj.{kind}"] = state_dict.pop(out)


def _split_in_projection(module: SplitAttention, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook, the inverse of :func:`_fuse_in_projection`."""
    for kind in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}in_proj_{kind}", None)
        if fused is not None:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3)):
                state_dict[f"{prefix}{_base_path(module, name)}.{kind}"] = part
        out = state_dict.pop(f"{prefix}out_proj.{kind}", None)
        if out is not None:
            state_dict[f"{prefix}{_base_path(module, 'out_proj')}.{kind}"] = out
