"""Tie: W_a = W_b = θ, one tensor used in several places (ALBERT-style cross-layer sharing)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from weightshare.space import SharingMap, match_names, register_map

__all__ = ["TieConfig", "tie"]


@dataclass
class TieConfig:
    """Tie every parameter matching ``params`` to one shared tensor."""

    params: list[str]  # exact names or glob patterns, e.g. "encoder.layer.*.attention.self.query.weight"
    init: str = "first"  # "first": the first match's value; "mean": the mean of all matches
    version: int = 1  # bumped when the meaning of a field changes (stored in packed files)


def tie(model: nn.Module, params: list[str], init: str = "first") -> nn.Parameter:
    """Make every parameter of ``model`` matching ``params`` the same ``nn.Parameter``.

    Returns the shared parameter.  The optimizer, ``state_dict`` and ``ws.report``
    see it once; ``ws.materialize_`` unties it again.
    """
    if init not in ("first", "mean"):
        raise ValueError(f"TieConfig.init must be 'first' or 'mean'\n  got: {init!r}")
    named = dict(model.named_parameters(remove_duplicate=False))
    names = match_names(named, params)
    if len(names) < 2:
        raise ValueError(
            "tie: fewer than two parameters match\n"
            f"  expected: >= 2 names matching {params}\n  got: {names}\n"
            "  see model.named_parameters() for the names"
        )
    shapes = {tuple(named[n].shape) for n in names}
    dtypes = {named[n].dtype for n in names}
    if len(shapes) > 1 or len(dtypes) > 1:
        detail = ", ".join(f"{n}: {tuple(named[n].shape)} {named[n].dtype}" for n in names)
        raise ValueError(f"tie: tied parameters must share shape and dtype\n  got: {detail}")
    with torch.no_grad():
        value = named[names[0]].detach().clone() if init == "first" else torch.stack([named[n].detach() for n in names]).mean(0)
    shared = nn.Parameter(value, requires_grad=named[names[0]].requires_grad)
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr not in owner._parameters:
            raise ValueError(f"tie: {name} is not a plain parameter (is it already shared by another map?)")
        setattr(owner, attr, shared)
    return shared


class TieMap(SharingMap):
    """Tied tensors are one object: the packed container stores them once and aliases the rest."""

    name = "tie"
    config = TieConfig

    def apply(self, model, config, filter_fn) -> None:
        tie(model, list(config.params), config.init)


register_map(TieMap())
