"""Basis: a group of same-shaped weights written over one shared basis.

Two forms:

* ``"lowrank"`` — ``W_l = B · C_l``: one (out, r) basis B shared by the group and
  an (r, in) coefficient matrix per layer.  This is Basis Sharing (Wang et al.,
  ICLR 2025): the SVD of the layers side by side, ``[W_1 … W_L] = U Σ V^T``,
  gives ``B = U_r Σ_r`` and ``C_l`` the l-th block of ``V_r^T``.  With
  calibration, each block is first whitened by the Cholesky factor S_l of its
  layer's input second moment E[x x^T] (so the truncation minimises the error of
  the layer's outputs, not of its weights) and ``C_l = (V_r^T)_l S_l^{-1}``.
* ``"mix"`` — ``W_l = Σ_j A[l,j] · B_j``: a bank of ``num_bases`` full-size templates
  and ``num_bases`` coefficients per layer (the seed article's ``w_i = Σ_j a_ij w_j``).
  SVD init is the PCA of the layers as L samples: ``vec(W_l) = U Σ V^T``,
  ``A = U_M``, ``B = Σ_M V_M^T``.

The low-rank form is the one that compresses a pretrained model well: a weight
keeps most of its energy in a rank far below its size, and sharing B lets every
layer have a larger rank than per-layer SVD could afford at the same size; the
mix form saves only when M < L and keeps only what the layers have in common.
``init="random"`` starts either form from scratch with the usual weight scale.

Packed entry: ``{"map": "basis", "shape", "dtype", "form", "rank", "basis": KEY}``
with the per-layer ``<name>.__coef`` and the shared basis stored once under KEY.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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

__all__ = ["BasisConfig", "basis_model_", "basis_params", "mix_groups"]

FORMS = ("lowrank", "mix")


@dataclass
class BasisConfig:
    """Write a group of same-shaped weights over one shared basis."""

    layers: list[str] | str = field(default_factory=list)  # exact names or glob patterns of the group's weights
    num_bases: int = 8  # lowrank: the rank r of B; mix: the number M of templates
    form: str = "lowrank"  # "lowrank": W_l = B C_l | "mix": W_l = sum_j A[l,j] B_j
    init: str = "svd"  # "svd": convert the weights as they are | "random": train from scratch
    side: str = "auto"  # lowrank: share the output side (W_l = B C_l), the input side (W_l = C_l B), or the larger
    version: int = 1

    def __post_init__(self):
        if isinstance(self.layers, str):
            self.layers = [self.layers]
        if not self.layers or not all(isinstance(p, str) for p in self.layers):
            raise ValueError("BasisConfig.layers\n  expected: names or glob patterns of weights\n"
                             f"  got: {self.layers!r}")
        if isinstance(self.num_bases, bool) or not isinstance(self.num_bases, int) or self.num_bases < 1:
            raise ValueError(f"BasisConfig.num_bases\n  expected: a positive integer\n  got: {self.num_bases!r}")
        if self.form not in FORMS:
            raise ValueError(f"BasisConfig.form\n  expected one of: {FORMS}\n  got: {self.form!r}")
        if self.side not in ("auto", "left", "right"):
            raise ValueError(f"BasisConfig.side\n  expected: 'auto', 'left' or 'right'\n  got: {self.side!r}")
        if self.init not in ("svd", "random"):
            raise ValueError(f"BasisConfig.init\n  expected: 'svd' or 'random'\n  got: {self.init!r}")
        if self.version != 1 or isinstance(self.version, bool):
            raise ValueError(f"BasisConfig.version\n  expected: 1\n  got: {self.version!r}")


def basis_params(form: str, layers: int, out: int, inp: int, rank: int, side: str = "left") -> int:
    """Stored parameters of a group of ``layers`` (out, in) weights in ``form`` with ``rank`` bases."""
    if form == "mix":
        return rank * out * inp + layers * rank
    return out * rank + layers * rank * inp if side == "left" else inp * rank + layers * rank * out


def resolve_side(side: str, out: int, inp: int) -> str:
    """"auto": share the larger side, where the basis saves the most (a wide FFN output projection shares its
    input side)."""
    return ("left" if out >= inp else "right") if side == "auto" else side


class _LowRank(Parametrization):
    """W = basis @ C, with ``basis`` one Parameter shared by the group's parametrizations."""

    def __init__(self, basis: nn.Parameter, coef: torch.Tensor | None = None):
        super().__init__(coef)  # the coefficients come from the group's joint init or a file
        self.basis = basis

    def forward(self, coef: torch.Tensor) -> torch.Tensor:
        return self.basis @ coef


class _LowRankRight(_LowRank):
    """W = C @ basis: the input side shared."""

    def forward(self, coef: torch.Tensor) -> torch.Tensor:
        return coef @ self.basis


class _Mix(Parametrization):
    """W = Σ_j a[j] · bank[j], with ``bank`` one Parameter shared by the group's parametrizations."""

    def __init__(self, bank: nn.Parameter, coef: torch.Tensor | None = None):
        super().__init__(coef)  # the coefficients come from the group's joint init or a file
        self.bank = bank

    def forward(self, coef: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(coef, self.bank, dims=1)


def mix_groups(model: nn.Module) -> list[tuple[nn.Parameter, list[tuple[str, parametrize.ParametrizationList]]]]:
    """Every mix-form group of ``model``: its bank of templates and its layers (weight name, parametrization
    list, whose ``original`` is the layer's coefficients), in model order."""
    groups: dict[int, tuple[nn.Parameter, list]] = {}
    for fqn, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            if isinstance(plist[0], _Mix):
                bank = plist[0].bank
                groups.setdefault(id(bank), (bank, []))[1].append((f"{fqn}.{attr}" if fqn else attr, plist))
    return list(groups.values())


def _group(model: nn.Module, config: BasisConfig) -> list[str]:
    named = dict(model.named_parameters(remove_duplicate=False))
    names = match_names(named, config.layers)
    if not names:
        raise ValueError(f"basis: no parameter matches {config.layers}\n  see model.named_parameters() for the names")
    first = named[names[0]]
    for n in names[1:]:
        if named[n].shape != first.shape:
            raise ValueError(f"basis: a group's weights must share one shape\n"
                             f"  got: {names[0]} {tuple(first.shape)} and {n} {tuple(named[n].shape)}")
    if first.dim() != 2:
        raise ValueError(f"basis: {names[0]} has shape {tuple(first.shape)}\n  expected: 2-D (out, in) weights")
    out, inp = first.shape
    side = resolve_side(config.side, out, inp)
    limit = len(names) if config.form == "mix" else (min(out, len(names) * inp) if side == "left"
                                                     else min(inp, len(names) * out))
    if config.num_bases > limit:
        raise ValueError(f"basis: {config.num_bases} bases for {len(names)} weights of shape {tuple(first.shape)}\n"
                         f"  expected: at most {limit} "
                         f"({'one template per layer' if config.form == 'mix' else 'the rank of the stacked weights'})")
    return names


def _whitener(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) with S S^T = gram + a small ridge: the Cholesky factor of a layer's input second moment."""
    g = gram.double()
    ridge = 1e-6 * g.diagonal().mean().clamp(min=1e-12)
    s = torch.linalg.cholesky(g + ridge * torch.eye(g.shape[0], dtype=g.dtype))
    return s, torch.linalg.inv(s)


def _svd_init(weights: list[torch.Tensor], config: BasisConfig, grams: list[torch.Tensor | None]):
    """(shared basis, per-layer coefficients) from the SVD of the group's weights."""
    r = config.num_bases
    side = resolve_side(config.side, *weights[0].shape)
    if config.form == "lowrank" and side == "right":
        # the layers stacked vertically share their row space: [W_1 S; ...; W_L S] = U Σ V^T, B S = Σ_r V_r^T,
        # with one whitener S for all (a shared B sees every layer's inputs), from the pooled second moments
        known = [g for g in grams if g is not None]
        s, s_inv = _whitener(sum(known) / len(known)) if known else (None, None)
        stacked = torch.cat([w.double() if s is None else w.double() @ s for w in weights], dim=0)
        u, sigma, vh = torch.linalg.svd(stacked, full_matrices=False)
        basis = sigma[:r, None] * vh[:r]
        basis = basis if s_inv is None else basis @ s_inv
        out = weights[0].shape[0]
        return basis, [u[i * out:(i + 1) * out, :r] for i in range(len(weights))]
    if config.form == "lowrank":
        blocks, inverses = [], []
        for w, g in zip(weights, grams):
            w = w.double()
            if g is not None:
                s, s_inv = _whitener(g)
                w = w @ s
                inverses.append(s_inv)
            else:
                inverses.append(None)
            blocks.append(w)
        u, sigma, vh = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
        basis = u[:, :r] * sigma[:r]
        inp = weights[0].shape[1]
        coefs = []
        for i, s_inv in enumerate(inverses):
            c = vh[:r, i * inp:(i + 1) * inp]
            coefs.append(c if s_inv is None else c @ s_inv)
        return basis, coefs
    stacked = torch.stack([w.double().reshape(-1) for w in weights])  # (L, out*in): the layers as samples
    u, sigma, vh = torch.linalg.svd(stacked, full_matrices=False)
    bank = (sigma[:r, None] * vh[:r]).reshape(r, *weights[0].shape)
    return bank, [u[i, :r] for i in range(len(weights))]


def _random_init(shape, layers: int, config: BasisConfig, std: float, generator: torch.Generator):
    """Factors whose product has the dense init's scale (variance std^2 per weight)."""
    out, inp = shape
    r = config.num_bases
    if config.form == "lowrank":
        if resolve_side(config.side, out, inp) == "right":
            basis = torch.randn(r, inp, generator=generator, dtype=torch.float64) / math.sqrt(r)
            return basis, [torch.randn(out, r, generator=generator, dtype=torch.float64) * std for _ in range(layers)]
        basis = torch.randn(out, r, generator=generator, dtype=torch.float64) / math.sqrt(r)
        return basis, [torch.randn(r, inp, generator=generator, dtype=torch.float64) * std for _ in range(layers)]
    bank = torch.randn(r, out, inp, generator=generator, dtype=torch.float64) * std
    coefs = []
    for _ in range(layers):
        a = torch.randn(r, generator=generator, dtype=torch.float64)
        coefs.append(a / a.norm())
    return bank, coefs


def basis_model_(model: nn.Module, config: BasisConfig, grams: dict[str, torch.Tensor] | None = None,
                 seed: int = 0) -> nn.Module:
    """Write the weights matching ``config.layers`` over one shared basis, in place.

    ``grams`` maps a weight's name to its layer's input second moment E[x x^T]
    (in, in) from calibration data: the low-rank SVD is then whitened by it.
    Everything is checked before the model is changed.
    """
    grams = grams or {}
    names = _group(model, config)
    owners = []
    for n in names:
        owner_name, _, attr = n.rpartition(".")
        owner = model.get_submodule(owner_name)
        if parametrize.is_parametrized(owner, attr) or attr not in owner._parameters:
            raise ValueError(f"basis: {n} is not a plain parameter (is it already shared by another map?)")
        if n in grams and tuple(grams[n].shape) != (owner._parameters[attr].shape[1],) * 2:
            raise ValueError(f"basis: calibration second moment of {n}\n  expected: shape "
                             f"{(owner._parameters[attr].shape[1],) * 2}\n  got: {tuple(grams[n].shape)}")
        owners.append((owner, attr))
    weights = [getattr(o, a).detach() for o, a in owners]
    dtype = weights[0].dtype
    if config.init == "svd":
        shared, coefs = _svd_init(weights, config, [grams.get(n) for n in names])
    else:
        std = float(torch.stack([w.float().std() for w in weights]).mean())
        shared, coefs = _random_init(weights[0].shape, len(weights), config, std, torch.Generator().manual_seed(seed))
    shared = nn.Parameter(shared.to(dtype), requires_grad=owners[0][0]._parameters[owners[0][1]].requires_grad)
    side = resolve_side(config.side, *weights[0].shape)
    cls = _Mix if config.form == "mix" else _LowRank if side == "left" else _LowRankRight
    for (owner, attr), coef in zip(owners, coefs):
        parametrize.register_parametrization(owner, attr, cls(shared, coef.to(dtype)), unsafe=True)
    return model


class BasisMap(SharingMap):
    name = "basis"
    config = BasisConfig
    parametrizations = (_LowRank, _LowRankRight, _Mix)

    def apply(self, model, config, filter_fn) -> None:
        basis_model_(model, config)

    def pack(self, name, plist, put) -> dict:
        p, coef = plist[0], plist.original.detach()
        form, side = _form_side(p)
        key = put(f"{name}.__basis", _shared(p))  # the group's first layer stores it; the others name that key
        put(f"{name}.__coef", coef)
        return {"shape": list(_weight_shape(p, coef)), "dtype": dtype_name(coef.dtype), "form": form, "side": side,
                "rank": _rank(p), "basis": key}

    def check(self, name, entry, shape, dtype):
        if set(entry) != {"map", "shape", "dtype", "form", "side", "rank", "basis"}:
            raise ValueError(clip(f"basis entry keys\n  expected: form, side, rank, basis\n  got: {sorted(entry)}"))
        if entry["side"] not in ("left", "right"):
            raise ValueError(clip(f"side\n  expected: 'left' or 'right'\n  got: {entry['side']!r}"))
        if dtype not in ("float16", "bfloat16", "float32", "float64"):
            raise ValueError(f"basis dtype\n  expected: a float dtype\n  got: {dtype!r}")
        form, r, key = entry["form"], entry["rank"], entry["basis"]
        if form not in FORMS:
            raise ValueError(clip(f"form\n  expected one of: {FORMS}\n  got: {form!r}"))
        if len(shape) != 2:
            raise ValueError(f"shape {list(shape)}: a basis map needs a 2-D weight")
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= max(shape[0], 1) * max(shape[1], 1):
            raise ValueError(clip(f"rank\n  expected: an integer in 1..{shape[0] * shape[1]}\n  got: {r!r}"))
        if not isinstance(key, str) or not key.endswith(".__basis"):
            raise ValueError(clip(f"basis key\n  expected: '<weight name>.__basis'\n  got: {key!r}"))
        out, inp = shape
        if form == "mix":
            return {key: ({dtype}, (r, out, inp)), f"{name}.__coef": ({dtype}, (r,))}
        if entry["side"] == "left":
            return {key: ({dtype}, (out, r)), f"{name}.__coef": ({dtype}, (r, inp))}
        return {key: ({dtype}, (r, inp)), f"{name}.__coef": ({dtype}, (out, r))}

    def install(self, module, attr, name, entry, fetch) -> None:
        weight = getattr(module, attr)
        shared = shared_parameter(fetch(entry["basis"]), requires_grad=weight.requires_grad)
        coef = fetch(f"{name}.__coef")
        unmeta_(module, attr)
        parametrize.register_parametrization(module, attr, _class(entry["form"], entry["side"])(shared, coef),
                                             unsafe=True)

    def decode(self, name, entry, fetch) -> torch.Tensor:
        shared, coef = fetch(entry["basis"]), fetch(f"{name}.__coef")
        with torch.no_grad():
            return _class(entry["form"], entry["side"])(shared)(coef)

    def describe(self, plist, seen) -> dict:
        p, coef = plist[0], plist.original
        shared = _shared(p)
        stored = coef.numel() + (0 if id(shared) in seen else shared.numel())
        seen.add(id(shared))
        shape = _weight_shape(p, coef)
        form, side = _form_side(p)
        return {"detail": f"{form} r={_rank(p)}" + (" (input side)" if side == "right" else ""), "shape": shape,
                "params_stored": stored, "bytes_dense": math.prod(shape) * coef.element_size(),
                "bytes_packed": stored * coef.element_size()}


def _class(form: str, side: str) -> type:
    return _Mix if form == "mix" else _LowRank if side == "left" else _LowRankRight


def _form_side(p) -> tuple[str, str]:
    return ("mix", "left") if isinstance(p, _Mix) else ("lowrank", "right" if isinstance(p, _LowRankRight) else "left")


def _shared(p) -> nn.Parameter:
    return p.bank if isinstance(p, _Mix) else p.basis


def _rank(p) -> int:
    return int(p.bank.shape[0] if isinstance(p, _Mix) else p.basis.shape[0 if isinstance(p, _LowRankRight) else 1])


def _weight_shape(p, coef) -> tuple[int, int]:
    if isinstance(p, _Mix):
        return tuple(p.bank.shape[1:])
    return (coef.shape[0], p.basis.shape[1]) if isinstance(p, _LowRankRight) else (p.basis.shape[0], coef.shape[1])


register_map(BasisMap())
