"""Passthrough (mergekit's ``passthrough``): one model's tensors as they are, or scaled; with ``slices``
(``weightshare/merge/slices.py``) it stacks layer ranges of several models (a frankenmerge)."""

from __future__ import annotations

import torch

from weightshare.merge.registry import FINITE, Param, register_merge

__all__ = ["passthrough"]


@register_merge("passthrough", source="mergekit semantics (merge_methods/passthrough.py)",
                parameters=(Param("scale", None, per_model=True, rule=FINITE),), models=(1, 1), elementwise=True)
def passthrough(tensors: list[torch.Tensor], base: torch.Tensor | None, *, name: str, scale=None) -> torch.Tensor:
    """The one model's tensor, times its ``scale`` when one is given (per model, no default: mergekit's)."""
    (x,) = tensors
    s = scale[0] if isinstance(scale, (list, tuple)) else scale
    return x if s is None else x * float(s)
