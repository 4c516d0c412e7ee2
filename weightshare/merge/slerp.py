"""Spherical linear interpolation between two models (Shoemake 1985, "Animating rotation with
quaternion curves"; for model weights as in mergekit's ``slerp``)."""

from __future__ import annotations

import math

import torch

from weightshare.merge.registry import register_merge

__all__ = ["slerp", "DOT_THRESHOLD", "EPS"]

# mergekit/merge_methods/slerp.py, ``slerp``'s keyword defaults: above this |cos| the two
# tensors count as colinear and are lerped; a norm at or below EPS is not normalised.
DOT_THRESHOLD = 0.9995
EPS = 1e-8


@register_merge("slerp", source="Shoemake 1985 slerp; mergekit semantics (merge_methods/slerp.py)",
                params={"t": None}, models=(2, 2))
def slerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, name: str, t: float) -> torch.Tensor:
    """sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1, Ω the angle between the flattened tensors.

    ``t`` = 0 gives ``tensors[0]`` (mergekit's ``base_model``), ``t`` = 1 ``tensors[1]``; ``base``
    is not used.  mergekit (merge_methods/slerp.py, ``SlerpMerge.parameters``) requires ``t``:
    it has no default (registered as ``None``, refused here by name).  As mergekit's ``slerp``
    function: each tensor is divided by its norm only when that norm exceeds ``EPS`` = 1e-8,
    and when |cos Ω| > ``DOT_THRESHOLD`` = 0.9995 the result is the lerp (1−t) θ_0 + t θ_1.
    So an all-zero tensor is not "colinear": it has cos Ω = 0, and slerp against it gives
    sin(tπ/2) θ_1, not t θ_1 — mergekit's numbers, kept.
    """
    if t is None:
        raise ValueError("slerp: missing required parameter 't' (0 gives the first model, 1 the second; "
                         "mergekit has no default for it)")
    if len(tensors) != 2:
        raise ValueError(f"slerp: expected exactly two models\n  got: {len(tensors)}")
    v0, v1 = tensors
    t = float(t)
    # the angle in float64: a float32 dot of a few million terms loses the digits arccos needs near 0
    a, b = v0.reshape(-1).double(), v1.reshape(-1).double()
    n0, n1 = float(a.norm()), float(b.norm())
    dot = float(a @ b) / ((n0 if n0 > EPS else 1.0) * (n1 if n1 > EPS else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    omega = math.acos(dot)
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * v0 + (math.sin(t * omega) / s) * v1
