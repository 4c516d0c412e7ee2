"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", arXiv:2306.01708).

Trim each task vector to its largest-magnitude ``density`` fraction, elect a sign
per entry, and average (disjoint merge) only the entries that agree with it.
``elect_sign`` is reused by DARE-TIES (``dare.py``).
"""

from __future__ import annotations

import torch

from weightshare.merge.registry import register_merge
from weightshare.merge.methods.task_arithmetic import (GTA_MODEL_PARAMS, combine, gta_params, l1_factor, per_model,
                                               rescale_l1, task_vectors)

__all__ = ["ties", "trim", "trim_at", "elect_sign"]


def trim(delta: torch.Tensor, density: float, *, name: str = "", rescale: bool = False) -> torch.Tensor:
    """``delta`` with all but its ``int(density · numel)`` largest-magnitude entries zeroed.

    As mergekit/sparsify.py ``magnitude``: ``density >= 1`` returns ``delta`` untouched (no
    rescale either), and the count is truncated, not rounded.  Where that count is 0 (a
    bias of 4 entries at density 0.2) mergekit stops the whole merge with an assertion; we
    keep the one largest entry, so a density that suits the big matrices works on the
    small tensors too (mergekit has no numbers to match there).  ``rescale`` is mergekit's
    L1 rescale.
    """
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel())) if delta.numel() else 0
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k, sorted=False).indices] = 1
    mask = mask.view_as(delta)
    masked = delta * mask
    return rescale_l1(delta, masked) if rescale else masked


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


SORT_BELOW = 1 << 14  # kth_largest_rows sorts tensors smaller than this; the radix select needs no copy


def kth_largest(pieces, numel: int, k: int) -> float:
    """The k-th largest of non-negative float32 values given as pieces (a callable returning a
    fresh iterator of 1-D tensors); see ``kth_largest_rows``."""
    return kth_largest_rows(lambda: (piece.unsqueeze(0) for piece in pieces()), numel, [k])[0]


def kth_largest_rows(pieces, numel: int, ks: list[int]) -> list[float]:
    """For each row r, the ks[r]-th largest of its non-negative float32 values, the rows given as
    pieces (a callable returning a fresh iterator of (rows, piece) tensors), in two passes for
    all rows at once, with 2^15 + 2^16 counters per row: a radix select on the float bits,
    which order like the values for non-negative floats.  No piece is kept."""
    for k in ks:
        if not 1 <= k <= numel:
            raise ValueError(f"kth_largest: k\n  expected: 1..{numel}\n  got: {k}")
    rows = len(ks)
    if numel < SORT_BELOW:  # a small tensor (a bias, a norm): a sort is cheaper than 3 · 2^16 counters per row
        values = torch.cat(list(pieces()), dim=1).sort(dim=1, descending=True).values
        return [float(values[r, k - 1]) for r, k in enumerate(ks)]

    def pick(hist: torch.Tensor, rank: int) -> tuple[int, int]:  # bucket holding the rank-th largest, and rank in it
        from_top = hist.flip(0).cumsum(0)
        i = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
        above = int(from_top[i - 1]) if i else 0
        return len(hist) - 1 - i, rank - above

    def counts(values: torch.Tensor, buckets: int) -> torch.Tensor:  # one histogram per row, in one bincount
        offsets = torch.arange(rows).unsqueeze(1) * buckets
        return torch.bincount((values + offsets).reshape(-1), minlength=rows * buckets).view(rows, buckets)

    high = torch.zeros(rows, 1 << 15, dtype=torch.int64)
    for piece in pieces():
        high += counts(piece.contiguous().view(torch.int32) >> 16, 1 << 15)
    picked = [pick(high[r], ks[r]) for r in range(rows)]
    his = torch.tensor([hi for hi, _ in picked]).unsqueeze(1)
    low = torch.zeros(rows, 1 << 16, dtype=torch.int64)
    for piece in pieces():
        bits = piece.contiguous().view(torch.int32)
        # entries outside the row's chosen high bucket go to a spare bucket past the end
        low += counts(torch.where((bits >> 16) == his, bits & 0xFFFF, 1 << 16), (1 << 16) + 1)[:, :-1]
    out = []
    for r, (hi, rank) in enumerate(picked):
        lo, _ = pick(low[r], rank)
        out.append(float(torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32)))
    return out


def trim_at(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """``delta`` with the entries of magnitude below ``threshold`` zeroed: ``trim`` for a piece of a
    tensor, ``threshold`` being the whole tensor's k-th largest magnitude."""
    return delta * (delta.abs() >= threshold)


def _prepare(read, numel: int, *, name: str, weight, density=None, rescale: bool = False, **_) -> dict:
    """For a large tensor: each task vector's trim threshold from pieces, and with ``rescale`` its
    L1 factor ‖τ‖₁ / ‖trimmed τ‖₁ in one more read of the inputs, so that the merge itself is
    element-wise and streams (``streaming.merge``)."""
    densities = per_model("ties", "density", density, len(weight), 1.0)
    trimmed = [i for i, p in enumerate(densities) if p < 1]
    thresholds: list = [None] * len(densities)
    if not trimmed:
        return {"thresholds": thresholds}

    def pieces():  # every trimmed task vector's piece in one read of the inputs
        for models, base in read():
            yield torch.stack([(models[i] - base).abs() for i in trimmed])

    ks = [max(1, int(densities[i] * numel)) for i in trimmed]
    for i, t in zip(trimmed, kth_largest_rows(pieces, numel, ks)):
        thresholds[i] = t
    if not rescale:
        return {"thresholds": thresholds}
    norms = torch.zeros(len(trimmed), 2, dtype=torch.float64)  # ‖τ‖₁ and ‖trimmed τ‖₁, per trimmed model
    for models, base in read():
        for j, i in enumerate(trimmed):
            delta = models[i] - base
            norms[j, 0] += delta.abs().sum(dtype=torch.float64)
            norms[j, 1] += trim_at(delta, thresholds[i]).abs().sum(dtype=torch.float64)
    l1_factors: list = [None] * len(densities)
    for j, i in enumerate(trimmed):
        l1_factors[i] = l1_factor(float(norms[j, 0]), float(norms[j, 1]))
    return {"thresholds": thresholds, "l1_factors": l1_factors}


@register_merge("ties", source="Yadav et al. 2023, TIES-Merging; mergekit defaults (merge_methods/registry.py, ties)",
                needs_base=True, model_params=GTA_MODEL_PARAMS, params=gta_params(normalize=True, rescale=False),
                models=(1, None), prepare=_prepare)
def ties(tensors: list[torch.Tensor], base: torch.Tensor, *, name: str, weight, density=None,
         normalize: bool = True, scale: float = 1.0, rescale: bool = False, int8_mask: bool = False,
         thresholds: list | None = None, l1_factors: list | None = None,
         span: tuple[int, int] | None = None) -> torch.Tensor:
    """base + scale · Σ_i w_i τ̂_i m_i / Σ_i w_i m_i, τ̂_i the trimmed task vector, m_i its sign agreement.

    Parameters and defaults are mergekit's (merge_methods/registry.py, ``ties`` entry:
    magnitude sparsification, ``ConsensusMethod.sum``; generalized_task_arithmetic.py
    ``GeneralizedTaskArithmeticMerge.parameters`` / ``tensor_parameters``):

    - ``weight`` (per model, default 1.0): mergekit requires it (no default).
    - ``density`` (per model, default **1.0**): fraction kept by magnitude.  At 1 nothing is
      trimmed but the signs are still elected.
    - ``normalize`` (default **True**): divide, entry by entry, by the summed weights of the
      models that agree with the elected sign (not by Σ w_i).
    - ``scale`` (default 1.0): mergekit's ``lambda``.
    - ``rescale`` (default False): L1-rescale each trimmed task vector to its original norm.
    - ``int8_mask`` (default False): accepted and ignored (it only sets mergekit's mask dtype).

    The sign is elected on the *weighted* trimmed deltas w_i τ̂_i, as mergekit does.

    ``thresholds`` (one per model, from ``_prepare``) trims by |τ_i| >= threshold instead of
    top-k, and ``l1_factors`` (with ``rescale``) are the whole tensor's, so that a large tensor
    merges piece by piece (``span``, the piece's place in it, changes nothing here); the two
    agree but where entries tie at the threshold (then all tied entries are kept, where top-k
    keeps an arbitrary k).
    """
    weights = per_model("ties", "weight", weight, len(tensors), 1.0)
    densities = per_model("ties", "density", density, len(tensors), 1.0)
    deltas = task_vectors(tensors, base)
    if thresholds is not None:
        factors = l1_factors if l1_factors is not None else [1.0] * len(deltas)
        deltas = torch.stack([d if t is None else trim_at(d, t) * f for d, t, f in zip(deltas, thresholds, factors)])
    else:
        deltas = torch.stack([trim(d, p, name=name, rescale=rescale) for d, p in zip(deltas, densities)])
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * (deltas.dim() - 1)))
    mask = elect_sign(deltas * w)
    return combine(deltas, weights, base, normalize=normalize, scale=scale, mask=mask)
