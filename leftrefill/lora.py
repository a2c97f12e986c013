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
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ldm.util import ConfigError

# Names relative to the UNet (model.diffusion_model); peft matches a string pattern in full.
LORA_TARGETS = r".*\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*\.ff\.net\.0\.proj"
ADAPTER = "default"  # peft's adapter name: part of every adapter parameter's name
LORA_KEYS = ("rank", "alpha", "target_modules")


def adapter_spec(spec: Mapping | None) -> dict | None:
    """A LoRA spec ``{"rank", "alpha", "target_modules"}`` checked and completed with defaults, or None."""
    if spec is None:
        return None
    unknown = sorted(set(spec) - set(LORA_KEYS))
    if unknown:
        raise ConfigError(f"LoRA spec: unknown key(s) {', '.join(unknown)}; it takes {', '.join(LORA_KEYS)}")
    full = {"rank": 16, "alpha": 16.0, "target_modules": LORA_TARGETS, **spec}
    if not (isinstance(full["rank"], int) and full["rank"] >= 1 and float(full["alpha"]) > 0):
        raise ConfigError(f"LoRA spec: rank must be an integer >= 1 and alpha > 0, got {full['rank']!r}, "
                          f"{full['alpha']!r}")
    return {"rank": int(full["rank"]), "alpha": float(full["alpha"]), "target_modules": str(full["target_modules"])}


def add_lora(model: nn.Module, spec: Mapping) -> None:
    """Wrap the target layers of ``model.model.diffusion_model`` (the SD2 UNet) with LoRA adapters, in place.

    ``spec`` as :func:`adapter_spec`. The adapter's tensors are created on the base layers' device and dtype,
    initialised as the release (B = 0). A pattern that matches no layer is a ConfigError."""
    from peft import LoraConfig, inject_adapter_in_model  # peft imports transformers: only when used

    spec = adapter_spec(spec)
    config = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], target_modules=spec["target_modules"],
                        lora_dropout=0.0, bias="none", init_lora_weights="gaussian")
    try:
        inject_adapter_in_model(config, model.model.diffusion_model, adapter_name=ADAPTER)
    except ValueError as err:
        raise ConfigError(f"LoRA target_modules {spec['target_modules']!r}: {str(err).splitlines()[0]}") from None


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
