"""RAM (mergekit's ``ram``, arXiv:2601.13572): each position takes the task vector entry of the one
model that changed it, or the mean over the models that did; ``ramplus_tl`` (its tensor-local RAM+)
also scales each model's unique entries up by how much it shares with the others."""

from __future__ import annotations

import torch

from weightshare.merge.registry import Param, interval, register_merge

__all__ = ["ram", "ramplus_tl"]

EPSILON = Param("epsilon", 1e-5, rule=interval("[0, 1)"))


def _active(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float):
    """(task vectors with entries of |τ| <= epsilon zeroed, which are active, how many models are active
    at each position), flattened as mergekit's ``ram.py`` does."""
    tv = torch.stack([x - base for x in tensors]).reshape(len(tensors), -1)
    active = tv.abs() > epsilon
    count = active.sum(0, keepdim=True)
    return tv * active, active, count


@register_merge("ram", source="arXiv:2601.13572; mergekit semantics (merge_methods/ram.py, ram)", needs_base=True,
                parameters=(EPSILON,), models=(1, None), elementwise=True)
def ram(tensors: list[torch.Tensor], base: torch.Tensor | None, *, name: str, epsilon: float = 1e-5) -> torch.Tensor:
    """base + Σ_i τ̃_i / max(count, 1) where τ̃_i is τ_i with |τ_i| <= ``epsilon`` zeroed and count the
    number of models active (|τ_i| > ``epsilon``) at the position: a position one model changed takes its
    entry, one several changed their mean, one none changed the base.  Entry by entry, so it streams."""
    tv, _, count = _active(tensors, base, float(epsilon))
    return base + (tv / count.clamp(min=1)).sum(0).reshape(base.shape)


def _lambdas(shared: torch.Tensor, unique: torch.Tensor, epsilon: float, r: float, alpha: float) -> torch.Tensor:
    """λ_i = 1 + r · clamp(ρ_i, 0, alpha), ρ_i = shared_i / max(unique_i, epsilon), in float32 as mergekit."""
    rho = (shared / unique.clamp(min=float(epsilon))).to(torch.float32)
    return 1 + float(r) * rho.clamp(min=0, max=float(alpha))


def _prepare_plus(read, numel: int, *, name: str, epsilon: float = 1e-5, r: float = 0.1, alpha: float = 0.2,
                  **_) -> dict:
    """Each model's counts of active entries at shared and at unique positions, gathered piece by piece:
    then every position merges on its own, and the tensor streams."""
    shared = unique = None
    for models, base in read():
        _, active, count = _active(models, base, float(epsilon))
        s, u = (active & (count > 1)).sum(dim=1), (active & (count == 1)).sum(dim=1)
        shared, unique = (s, u) if shared is None else (shared + s, unique + u)
    return {"lam": _lambdas(shared, unique, epsilon, r, alpha)}


@register_merge("ramplus_tl", source="arXiv:2601.13572 (RAM+); mergekit semantics (merge_methods/ram.py, ramplus_tl)",
                needs_base=True, parameters=(EPSILON, Param("r", 0.1, rule=interval("[0, 1e3]")),
                                             Param("alpha", 0.2, rule=interval("[0, 1e3]"))), models=(1, None),
                prepare=_prepare_plus)
def ramplus_tl(tensors: list[torch.Tensor], base: torch.Tensor | None, *, name: str, epsilon: float = 1e-5,
               r: float = 0.1, alpha: float = 0.2, lam: torch.Tensor | None = None,
               span: tuple[int, int] | None = None) -> torch.Tensor:
    """RAM with each model's unique entries scaled by λ_i = 1 + r · clamp(ρ_i, 0, alpha), ρ_i = (its active
    entries at positions others share) / max(its unique entries, epsilon), counted over this tensor
    ("tensor-local"; the paper counts over the whole model).  λ is computed in float32 as mergekit does.
    ``lam`` (from ``_prepare_plus``, the whole tensor's) merges a large tensor piece by piece."""
    tv, active, count = _active(tensors, base, float(epsilon))
    overlap, unique = count > 1, count == 1
    if lam is None:
        lam = _lambdas((active & overlap).sum(dim=1), (active & unique).sum(dim=1), epsilon, r, alpha)
    merged = (tv * unique * lam[:, None].to(tv.dtype) + tv * overlap / count.clamp(min=1)).sum(0)
    return base + merged.reshape(base.shape)
