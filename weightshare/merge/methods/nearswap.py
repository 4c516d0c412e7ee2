"""NearSwap (mergekit's ``nearswap``, by Charles Goddard and the mergekit authors): take the fine-tuned
model's value where it lies close to the base, and move towards it less the further it lies."""

from __future__ import annotations

import torch

from weightshare.merge.registry import FINITE, Param, register_merge

__all__ = ["nearswap"]


@register_merge("nearswap", source="mergekit semantics (merge_methods/nearswap.py)", needs_base=True,
                parameters=(Param("t", required=True, rule=FINITE),), models=(1, 1), elementwise=True)
def nearswap(tensors: list[torch.Tensor], base: torch.Tensor | None, *, name: str, t: float) -> torch.Tensor:
    """w · θ + (1 − w) · base with w = clamp(t / max(|θ − base|, 1e-6), 0, 1), entry by entry.

    As mergekit's ``nearswap_merge``: ``t`` is required (no default); where |θ − base| <= t the
    result is θ itself, a negative ``t`` gives the base.  One model besides the base.
    """
    (x,) = tensors
    w = (float(t) / (x - base).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * x + (1 - w) * base
