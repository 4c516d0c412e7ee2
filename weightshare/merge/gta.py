"""Generalized task arithmetic: one core for task arithmetic, TIES, DARE, DELLA and Model
Breadcrumbs, as mergekit's merge_methods/generalized_task_arithmetic.py (``GTATask``).

    θ = base + λ · Σ_i w_i m_i S(τ_i) / (Σ_i w_i m_i, when normalize),   τ_i = θ_i − base

``S`` is the method's sparsification (``sparsify.py``: none, magnitude trim, random drop,
magnitude-ranked drop, magnitude band) and ``m_i`` its consensus: TIES's sign election
(``elect_sign``) or none (m_i = 1).  A method is one file in ``methods/`` calling
``register_gta`` with its sparsification, its consensus and its parameters' defaults.
"""

from __future__ import annotations

from typing import Callable

import torch

from weightshare.merge.registry import FINITE, Param, interval, per_model, register_merge
from weightshare.merge.sparsify import Sparsification

__all__ = ["register_gta", "gta_parameters", "task_vectors", "combine", "elect_sign", "WEIGHT", "DENSITY", "SEED"]

# mergekit requires ``weight`` (no default); we default it to 1 (``merge(models, ...)`` without
# weights), which changes nothing for a config mergekit accepts.
WEIGHT = Param("weight", 1.0, per_model=True, rule=FINITE)
DENSITY = Param("density", 1.0, per_model=True, rule=interval("(0, 1]"))  # the fraction kept; 1: nothing dropped
SEED = Param("seed", 0)  # ours: with the tensor's name and the model's index it seeds random masks (DARE, DELLA)


def gta_parameters(*, normalize: bool, rescale: bool) -> tuple[Param, ...]:
    """mergekit's parameters of every generalized-task-arithmetic method, with a method's defaults.

    Every such method takes mergekit's full set, so a mergekit config that sets e.g. ``rescale``
    or ``int8_mask`` on ``task_arithmetic`` runs unchanged (mergekit accepts and, where the method
    does not sparsify, ignores them).  ``int8_mask`` only picks the dtype of mergekit's sign mask,
    never the result: accepted and ignored here.  ``scale`` is mergekit's ``lambda`` (a Python keyword).
    """
    return (WEIGHT, DENSITY, Param("int8_mask", False), Param("normalize", normalize), Param("rescale", rescale),
            Param("scale", 1.0))


def task_vectors(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """The (models, *shape) stack of task vectors θ_i − base."""
    return torch.stack([t - base for t in tensors], dim=0)


def combine(deltas: torch.Tensor, weights: list[float], base: torch.Tensor, *, normalize: bool, scale: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """base + scale · Σ_i w_i δ_i (over ``mask``ed entries), divided by the summed weights when ``normalize``.

    Follows mergekit/merge_methods/generalized_task_arithmetic.py, ``GTATask.execute``: the
    divisor is Σ_i w_i over the entries where model i agrees with the elected sign when there
    is a ``mask`` (a divisor of exactly 0 becomes 1), and Σ_i w_i otherwise (|Σ w| < 1e-8
    becomes 1); λ (``scale``) multiplies after the normalisation.
    """
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * w
    if mask is not None:
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if scale != 1:
        mixed = mixed * scale
    return base + mixed


def elect_sign(weighted: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """Bool mask (models, *shape): where model i's weighted delta has the elected sign.

    The elected sign is that of Σ_i w_i δ_i ("sum", the paper's total-mass election and
    mergekit's only registered choice, generalized_task_arithmetic.py ``get_mask``) or of
    the count of positive minus negative entries ("count"); a tie elects +.  A zero entry
    has sign 0, agrees with neither, and so is left out of the normalising divisor.
    """
    sign = weighted.sign()
    if method == "sum":
        total = weighted.sum(dim=0)
    elif method == "count":
        total = sign.sum(dim=0)
    else:
        raise ValueError(f"elect_sign: method\n  expected one of: count, sum\n  got: {method!r}")
    elected = torch.where(total >= 0, 1.0, -1.0).to(weighted.dtype)
    return sign == elected


def register_gta(method: str, *, source: str, sparsification: Sparsification, consensus: bool,
                 parameters: tuple[Param, ...], check: Callable | None = None, doc: str = "") -> Callable:
    """Register ``method``: each task vector sparsified by ``sparsification``, then, with ``consensus``,
    only the entries agreeing with the elected sign (TIES, on the weighted sparsified task vectors, by
    total mass, as mergekit), summed with the weights; ``parameters`` are all it takes, with its
    defaults (``gta_parameters`` and what its sparsification reads: ``seed``, ``epsilon``, ``gamma``).
    Returns the registered merge function."""
    declared = {p.name: p for p in parameters}

    def resolved(given: dict, n: int) -> dict:
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise TypeError(f"{method}() got unexpected keyword arguments {unknown} (it takes: {', '.join(declared)})")
        return {k: per_model(method, k, given.get(k), n, p.default) if p.per_model else given.get(k, p.default)
                for k, p in declared.items()}

    def merge_tensor(tensors: list[torch.Tensor], base: torch.Tensor, *, name: str, prepared: dict | None = None,
                     span: tuple[int, int] | None = None, **given) -> torch.Tensor:
        v = resolved(given, len(tensors))
        deltas = sparsification.apply(task_vectors(tensors, base), v, name=name, prepared=prepared, span=span)
        mask = None
        if consensus:
            w = torch.tensor(v["weight"], dtype=deltas.dtype, device=deltas.device)
            mask = elect_sign(deltas * w.view(-1, *([1] * (deltas.dim() - 1))))
        return combine(deltas, v["weight"], base, normalize=v["normalize"], scale=v["scale"], mask=mask)

    def prepare(read, numel: int, *, name: str, shape, **given) -> dict:
        """What the sparsification needs of the whole tensor, read in pieces: then each piece merges alone."""
        v = resolved(given, len(given["weight"]))
        task_vector_pieces = lambda: (task_vectors(models, base) for models, base in read())  # noqa: E731
        return {"prepared": sparsification.prepare(task_vector_pieces, numel, shape, v, name=name)}

    merge_tensor.__name__ = merge_tensor.__qualname__ = method
    merge_tensor.__doc__ = doc
    return register_merge(method, source=source, parameters=parameters, needs_base=True, models=(1, None),
                          elementwise=sparsification.prepare is None,
                          prepare=prepare if sparsification.prepare is not None else None, rows=sparsification.rows,
                          check=check)(merge_tensor)
