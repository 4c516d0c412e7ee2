"""Shared parameter spaces: the registry of sharing maps, ``share_`` and ``materialize_``.

Every sharing map turns a small shared space θ into the weights a model uses
(see DESIGN.md section 1).  A map is one file in ``weightshare/sharing/`` that
registers an ``apply(model, config, filter_fn)`` function for its config
dataclass; nothing else is edited to add one.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["register_sharing", "share_", "materialize_", "config_from_dict", "match_names"]

FilterFn = Callable[[nn.Module, str], bool]
_REGISTRY: dict[type, Callable[[nn.Module, object, FilterFn | None], None]] = {}
_CONFIGS: dict[str, type] = {}


def register_sharing(config_cls: type):
    """Decorator: register ``apply(model, config, filter_fn)`` as the map for ``config_cls``."""

    def wrap(apply):
        _REGISTRY[config_cls] = apply
        _CONFIGS[config_cls.__name__] = config_cls
        return apply

    return wrap


def config_from_dict(d: dict):
    """Rebuild a config dataclass from ``{"type": name, ...fields}`` (as stored in packed files)."""
    d = dict(d)
    name = d.pop("type", None)
    if name not in _CONFIGS:
        raise ValueError(f"unknown sharing config\n  expected one of: {sorted(_CONFIGS)}\n  got: {name!r}")
    cls = _CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"{name}: unknown fields {sorted(unknown)}\n  expected a subset of: {sorted(fields)}")
    return cls(**d)


def config_to_dict(config) -> dict:
    return {"type": type(config).__name__, **dataclasses.asdict(config)}


def share_(model: nn.Module, config, filter_fn: FilterFn | None = None) -> nn.Module:
    """Apply one sharing map to ``model`` in place and return it.

    Args:
        model: any ``nn.Module``.
        config: a sharing config dataclass (``TieConfig``, ``CodebookConfig``, ...).
        filter_fn: optional ``(module, fully_qualified_name) -> bool`` choosing
            which modules the map applies to (maps that pick tensors by name ignore it).
    """
    apply = _REGISTRY.get(type(config))
    if apply is None:
        raise ValueError(
            "share_: no sharing map registered for this config\n"
            f"  expected one of: {sorted(c.__name__ for c in _REGISTRY)}\n"
            f"  got: {type(config).__name__}"
        )
    apply(model, config, filter_fn)
    return model


def materialize_(model: nn.Module) -> nn.Module:
    """Bake every shared weight into an ordinary, independent tensor, in place.

    Parametrized weights become plain parameters holding their current value;
    tied parameters get one copy per place they are used.
    """
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    seen: set[int] = set()
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) in seen:
                module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            else:
                seen.add(id(p))
    return model


def match_names(names, patterns) -> list[str]:
    """Names matching any of the exact names or glob patterns, in model order."""
    return [n for n in names if any(n == p or fnmatch.fnmatchcase(n, p) for p in patterns)]


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one and the same tensor (length >= 2)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]
