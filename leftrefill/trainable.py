"""The declared trainable set: which parameters a task trains, with which learning rate and weight decay.

A config lists groups (leftrefill.train_config.TrainableGroup); each names parameters by exact name or by
fnmatch pattern over ``model.named_parameters()``. Everything in no group is frozen: ``requires_grad``
False (no gradient is computed for it) and eval mode. The same set is what a checkpoint holds
(``trainable_state_dict``) and what the model-directory loader accepts.

Groups are parameter lists today (prompt tokens, a pose MLP, UNet layers, the whole UNet); an adapter kind
(peft LoRA, added to the model before the groups are resolved) fits the same structure.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ldm.util import ConfigError


@dataclass(frozen=True)
class ParamGroup:
    name: str
    names: tuple[str, ...]  # parameter names, in model order
    lr: float
    weight_decay: float


def resolve_groups(model: nn.Module, groups: Iterable) -> list[ParamGroup]:
    """The config's groups (``name``, ``parameters``, ``lr``, ``weight_decay``) as parameter names of
    ``model``. A pattern matching nothing, or a parameter in two groups, is a ConfigError naming it."""
    all_names = [name for name, _ in model.named_parameters()]
    owner: dict[str, str] = {}
    resolved = []
    for group in groups:
        chosen: set[str] = set()
        for pattern in group.parameters:
            hits = [name for name in all_names if fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                close = difflib.get_close_matches(pattern, all_names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"trainable group '{group.name}': '{pattern}' matches no parameter of the "
                                  f"model{hint}")
            chosen.update(hits)
        for name in chosen:
            if owner.setdefault(name, group.name) != group.name:
                raise ConfigError(f"parameter '{name}' is in two trainable groups: '{owner[name]}' and "
                                  f"'{group.name}'")
        names = tuple(name for name in all_names if name in chosen)
        resolved.append(ParamGroup(group.name, names, float(group.lr), float(group.weight_decay)))
    return resolved


def trainable_names(groups: list[ParamGroup]) -> set[str]:
    return {name for group in groups for name in group.names}


def freeze_all_but(model: nn.Module, groups: list[ParamGroup]) -> list[str]:
    """requires_grad only for the groups' parameters; returns the modules to keep in train mode (those
    whose parameters are all trainable: ``set_train_mode``)."""
    trained = trainable_names(groups)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trained)
    training_modules = []
    for prefix, module in model.named_modules():
        names = [f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters()]
        if names and all(name in trained for name in names):
            training_modules.append(prefix)
    return training_modules


def set_train_mode(model: nn.Module, training_modules: list[str], mode: bool = True) -> None:
    """Eval mode everywhere (frozen modules: no dropout, no norm statistics change) except, when ``mode``,
    the modules that train entirely."""
    model.eval()
    if mode:
        for prefix in training_modules:
            model.get_submodule(prefix).train()


def optimizer_groups(model: nn.Module, groups: list[ParamGroup]) -> list[dict]:
    """AdamW parameter groups, one per trainable group, each with its own lr and weight decay."""
    parameters = dict(model.named_parameters())
    return [{"params": [parameters[name] for name in group.names], "lr": group.lr,
             "weight_decay": group.weight_decay, "name": group.name} for group in groups]


def trainable_state_dict(model: nn.Module, groups: list[ParamGroup]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of exactly the trainable parameters (detached)."""
    parameters = dict(model.named_parameters())
    return {name: parameters[name].detach() for group in groups for name in group.names}
