"""Building modules from configs in the original LDM layout (``{target: dotted.path, params: {...}}``)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A model config that cannot be read or built; the message names the file and the node."""


def get_obj_from_str(target: str) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``; raise ConfigError if it does not exist."""
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise ConfigError(f"target {target!r} is not a dotted path 'package.module.Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"unknown target {target!r}: cannot import module {module_name!r} ({err})") from None
    if not hasattr(module, attr):
        raise ConfigError(f"unknown target {target!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def instantiate_from_config(node: DictConfig | dict, where: str = "config") -> Any:
    """Build ``target(**params)`` for one config node; ``where`` names the node in error messages."""
    if not isinstance(node, (dict, DictConfig)) or "target" not in node:
        raise ConfigError(f"{where}: expected a node with a 'target' key, got {_describe(node)}")
    cls = get_obj_from_str(str(node["target"]))
    params = node.get("params") or {}
    if isinstance(params, (DictConfig, ListConfig)):
        params = OmegaConf.to_container(params, resolve=True)
    _check_params(cls, params, where)
    return cls(**params)


def load_config(path: str | Path) -> DictConfig:
    """Read a YAML config and check that every ``target`` in it can be imported.

    Raises ConfigError naming the file (and the node) when the file is missing, is not YAML,
    or names a target that does not exist, before any (possibly large) module is built.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, ValueError) as err:
        raise ConfigError(f"{path}: not a valid YAML config ({err})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level, got a list")
    for where, node in _target_nodes(cfg, ""):
        try:
            get_obj_from_str(str(node["target"]))
        except ConfigError as err:
            raise ConfigError(f"{path}: {where}.target: {err}") from None
    return cfg


def _target_nodes(node: Any, where: str):
    """Yield ``(key path, node)`` for every mapping with a ``target`` key, depth first."""
    if isinstance(node, DictConfig):
        if "target" in node:
            yield where or "<root>", node
        for key in node.keys():
            yield from _target_nodes(node._get_node(key), f"{where}.{key}" if where else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _target_nodes(item, f"{where}[{i}]")


def _check_params(cls: Any, params: dict, where: str) -> None:
    """Reject parameter names the constructor does not take, naming them (instead of a TypeError).

    A class whose ``__init__`` forwards ``**kwargs`` accepts what its base classes' ``__init__`` take.
    """
    accepted = _accepted_params(cls)
    if accepted is None:
        return
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(f"{where}: {cls.__qualname__} has no parameter(s) {unknown}; it takes: {', '.join(accepted)}")


def _accepted_params(cls: Any) -> list[str] | None:
    """Keyword names ``cls(...)`` accepts, or None when that cannot be known (a bare ``**kwargs``)."""
    callables = [klass.__init__ for klass in cls.__mro__ if "__init__" in vars(klass)] if inspect.isclass(cls) else [cls]
    names: list[str] = []
    for fn in callables:
        try:
            parameters = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return None
        names += [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                  and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names
    return None


def _describe(node: Any) -> str:
    if isinstance(node, (dict, DictConfig)):
        return f"a mapping with keys {sorted(map(str, node.keys()))}"
    return type(node).__name__
