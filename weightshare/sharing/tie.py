"""Tie: W_a = W_b = θ, one tensor used in several places (ALBERT-style cross-layer sharing).

The matched tensors form ``groups`` groups (ALBERT: all layers one group), by
consecutive blocks or in a cycle (layer i joins group i mod G, the CYCLE
strategy of Relaxed Recursive Transformers).  Plainly tied tensors are one
``nn.Parameter``; the packed container stores them once and aliases the rest.

With ``delta_rank`` r > 0 the ties are relaxed: each layer computes with its
group's shared weight plus its own rank-r delta, ``W_l = θ_g + U_l V_l^T``
(Relaxed Recursive Transformers, Bae et al. 2024), both factors initialised from
the SVD of the layer's residual ``W_l - θ_g`` so that a converted model starts as
close to the original as rank r allows.  Packed entry: ``{"map": "tie", "shape",
"dtype", "rank", "shared": KEY}`` with the layer's ``<name>.__delta`` ((out + in, r):
U stacked on V) and the group's θ stored once under KEY.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from weightshare.errors import clip
from weightshare.space import (
    Parametrization,
    SharingMap,
    dtype_name,
    match_names,
    register_map,
    shared_parameter,
    unmeta_,
)

__all__ = ["TieConfig", "tie_", "tie_groups"]


@dataclass
class TieConfig:
    """Tie the parameters matching ``params``: one shared tensor per group."""

    params: list[str]  # exact names or glob patterns, e.g. "encoder.layer.*.attention.self.query.weight"
    init: str = "first"  # "first": the group's first match's value; "mean": the mean of the group
    groups: int = 1  # how many shared tensors the matches are split into
    strategy: str = "block"  # "block": consecutive matches share one tensor | "cycle": match i joins group i mod groups
    delta_rank: int = 0  # > 0: each tensor is its group's shared weight plus its own rank-r delta
    version: int = 1  # bumped when the meaning of a field changes

    def __post_init__(self):
        if isinstance(self.params, str):
            self.params = [self.params]
        if self.init not in ("first", "mean"):
            raise ValueError(f"TieConfig.init must be 'first' or 'mean'\n  got: {self.init!r}")
        if self.strategy not in ("block", "cycle"):
            raise ValueError(f"TieConfig.strategy\n  expected: 'block' or 'cycle'\n  got: {self.strategy!r}")
        for field in ("groups", "delta_rank"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if field == "groups" else 0):
                raise ValueError(f"TieConfig.{field}\n  expected: an integer >= {1 if field == 'groups' else 0}\n"
                                 f"  got: {v!r}")


def tie_groups(names: list[str], groups: int, strategy: str) -> list[list[str]]:
    """Split matched names (model order) into ``groups`` groups by consecutive blocks or in a cycle."""
    if groups > len(names):
        raise ValueError(f"tie: {groups} groups for {len(names)} matching tensors\n  expected: at most {len(names)}")
    if strategy == "cycle":
        return [names[g::groups] for g in range(groups)]
    size = math.ceil(len(names) / groups)
    return [names[i:i + size] for i in range(0, len(names), size)]


def _matches(model: nn.Module, params: list[str]) -> tuple[dict, list[str]]:
    named = dict(model.named_parameters(remove_duplicate=False))
    names = match_names(named, params)
    if len(names) < 2:
        raise ValueError(
            "tie: fewer than two parameters match\n"
            f"  expected: >= 2 names matching {params}\n  got: {names}\n"
            "  see model.named_parameters() for the names"
        )
    for n in names[1:]:
        if named[n].shape != named[names[0]].shape or named[n].dtype != named[names[0]].dtype:
            raise ValueError(f"tie: tied parameters must share shape and dtype\n"
                             f"  got: {names[0]} {tuple(named[names[0]].shape)} {named[names[0]].dtype} and "
                             f"{n} {tuple(named[n].shape)} {named[n].dtype}")
    return named, names


def tie_(model: nn.Module, params: list[str], init: str = "first", groups: int = 1, strategy: str = "block",
        delta_rank: int = 0) -> list[nn.Parameter]:
    """Tie the parameters of ``model`` matching ``params``, group by group; returns the shared parameters.

    Everything is checked before the model is changed.  Without ``delta_rank``
    the optimizer, ``state_dict`` and ``ws.report`` see each shared tensor once
    and ``ws.materialize_`` unties them again.
    """
    named, names = _matches(model, params)
    parts = tie_groups(names, groups, strategy)
    owners = {}
    for n in names:
        owner_name, _, attr = n.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr not in owner._parameters or parametrize.is_parametrized(owner, attr):
            raise ValueError(f"tie: {n} is not a plain parameter (is it already shared by another map?)")
        owners[n] = (owner, attr)
    if delta_rank:
        shape = named[names[0]].shape
        if len(shape) != 2 or delta_rank > min(shape):
            raise ValueError(f"tie: delta_rank {delta_rank} for weights of shape {tuple(shape)}\n"
                             "  expected: 2-D weights and a rank of at most "
                             f"{min(shape) if len(shape) == 2 else 'their smaller side'}")
    shared_params = []
    for part in parts:
        with torch.no_grad():
            value = (named[part[0]].detach().clone() if init == "first"
                     else torch.stack([named[n].detach() for n in part]).mean(0))
        shared = nn.Parameter(value, requires_grad=named[part[0]].requires_grad)
        shared_params.append(shared)
        for n in part:
            owner, attr = owners[n]
            if delta_rank:
                delta = _svd_delta(named[n].detach() - value, delta_rank)
                parametrize.register_parametrization(owner, attr, _TiedDelta(shared, delta), unsafe=True)
            else:
                setattr(owner, attr, shared)
    return shared_params


def _svd_delta(residual: torch.Tensor, rank: int) -> torch.Tensor:
    """(out + in, r): U √Σ stacked on V √Σ from the residual's SVD, so that U V^T is its best rank-r fit.

    A zero residual (the group's first layer, tied as it was) would give U = V = 0, where
    the product has no gradient; V then starts small and random, U at zero, as LoRA does.
    """
    out, inp = residual.shape
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, vh[:rank].t() * root
    if float(s[0]) <= 1e-12 * max(1.0, float(residual.abs().max())):
        g = torch.Generator().manual_seed(rank * 7919 + out * 31 + inp)
        up = torch.zeros(out, rank, dtype=torch.float64)
        down = torch.randn(inp, rank, generator=g, dtype=torch.float64) / math.sqrt(inp)
    return torch.cat([up, down]).to(residual.dtype)


class _TiedDelta(Parametrization):
    """W = shared + U V^T, with ``shared`` one Parameter for the group and (U; V) the layer's own."""

    def __init__(self, shared: nn.Parameter, delta: torch.Tensor | None = None):
        super().__init__(delta)  # (U; V) from the residual's SVD or a file
        self.shared = shared

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        out = self.shared.shape[0]
        return self.shared + delta[:out] @ delta[out:].t()


class TieMap(SharingMap):
    """Plain ties are one object (the container's aliases); relaxed ties are a parametrization."""

    name = "tie"
    config = TieConfig
    parametrizations = (_TiedDelta,)

    def apply(self, model, config, filter_fn) -> None:
        tie_(model, list(config.params), config.init, config.groups, config.strategy, config.delta_rank)

    def pack(self, name, plist, put) -> dict:
        p, delta = plist[0], plist.original.detach()
        key = put(f"{name}.__shared", p.shared)  # the group's first layer stores it; the others name that key
        put(f"{name}.__delta", delta)
        return {"shape": list(p.shared.shape), "dtype": dtype_name(delta.dtype), "rank": int(delta.shape[1]),
                "shared": key}

    def check(self, name, entry, shape, dtype):
        if set(entry) != {"map", "shape", "dtype", "rank", "shared"}:
            raise ValueError(clip(f"tie entry keys\n  expected: rank, shared\n  got: {sorted(entry)}"))
        if dtype not in ("float16", "bfloat16", "float32", "float64") or len(shape) != 2:
            raise ValueError(clip(f"a relaxed tie needs a 2-D float weight\n  got: {list(shape)} {dtype!r}"))
        r, key = entry["rank"], entry["shared"]
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(shape):
            raise ValueError(clip(f"rank\n  expected: an integer in 1..{min(shape)}\n  got: {r!r}"))
        if not isinstance(key, str) or not key.endswith(".__shared"):
            raise ValueError(clip(f"shared key\n  expected: '<weight name>.__shared'\n  got: {key!r}"))
        return {key: ({dtype}, tuple(shape)), f"{name}.__delta": ({dtype}, (shape[0] + shape[1], r))}

    def install(self, module, attr, name, entry, fetch) -> None:
        weight = getattr(module, attr)
        shared = shared_parameter(fetch(entry["shared"]), requires_grad=weight.requires_grad)
        unmeta_(module, attr)
        parametrize.register_parametrization(module, attr, _TiedDelta(shared, fetch(f"{name}.__delta")), unsafe=True)

    def decode(self, name, entry, fetch) -> torch.Tensor:
        with torch.no_grad():
            return _TiedDelta(fetch(entry["shared"]))(fetch(f"{name}.__delta"))

    def describe(self, plist, seen) -> dict:
        p, delta = plist[0], plist.original
        stored = delta.numel() + (0 if id(p.shared) in seen else p.shared.numel())
        seen.add(id(p.shared))
        return {"detail": f"tied + rank-{delta.shape[1]} delta", "shape": tuple(p.shared.shape),
                "params_stored": stored, "bytes_dense": p.shared.numel() * delta.element_size(),
                "bytes_packed": stored * delta.element_size()}


register_map(TieMap())
