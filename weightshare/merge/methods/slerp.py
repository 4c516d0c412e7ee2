"""Spherical linear interpolation between two models (Shoemake 1985, "Animating rotation with
quaternion curves"; for model weights as in mergekit's ``slerp``)."""

from __future__ import annotations

import math

import torch

from weightshare.merge.registry import Param, register_merge

__all__ = ["slerp", "DOT_THRESHOLD", "EPS"]

# mergekit/merge_methods/slerp.py, ``slerp``'s keyword defaults: above this |cos| the two
# tensors count as colinear and are lerped; a norm at or below EPS is not normalised.
DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _sums(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """(‖v0‖², ‖v1‖², v0·v1) in float64, what the angle needs: summed over a tensor's pieces, they
    are the whole tensor's (a float32 dot of a few million terms loses the digits arccos needs near 0)."""
    a, b = v0.reshape(-1).double(), v1.reshape(-1).double()
    return torch.stack([a @ a, b @ b, a @ b])


def _coefficients(sums: torch.Tensor, t: float) -> tuple[float, float]:
    """The slerp is c0 · θ_0 + c1 · θ_1: (c0, c1) from the ``_sums`` of the two tensors."""
    n0, n1, dot = math.sqrt(float(sums[0])), math.sqrt(float(sums[1])), float(sums[2])
    dot /= (n0 if n0 > EPS else 1.0) * (n1 if n1 > EPS else 1.0)
    if abs(dot) > DOT_THRESHOLD:
        return 1 - t, t
    omega = math.acos(dot)
    s = math.sin(omega)
    return math.sin((1 - t) * omega) / s, math.sin(t * omega) / s


def _prepare(read, numel: int, *, name: str, t: float, **_) -> dict:
    """For a large tensor: the angle's sums gathered from pieces, then the coefficients, so that
    the merge itself is element-wise and streams (``streaming.merge``)."""
    sums = torch.zeros(3, dtype=torch.float64)
    for (v0, v1), _ in read():
        sums += _sums(v0, v1)
    return {"coefficients": _coefficients(sums, float(t))}


@register_merge("slerp", source="Shoemake 1985 slerp; mergekit semantics (merge_methods/slerp.py)",
                parameters=(Param("t", required=True),), models=(2, 2), prepare=_prepare,
                base_endpoint="the t = 0 end")
def slerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, name: str, t: float,
          coefficients: tuple[float, float] | None = None, span: tuple[int, int] | None = None) -> torch.Tensor:
    """sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1, Ω the angle between the flattened tensors.

    ``t`` = 0 gives ``tensors[0]`` (mergekit's ``base_model``), ``t`` = 1 ``tensors[1]``; ``base``
    is not used.  mergekit (merge_methods/slerp.py, ``SlerpMerge.parameters``) requires ``t``:
    it has no default (declared required, refused by name when missing).  As mergekit's ``slerp``
    function: each tensor is divided by its norm only when that norm exceeds ``EPS`` = 1e-8,
    and when |cos Ω| > ``DOT_THRESHOLD`` = 0.9995 the result is the lerp (1−t) θ_0 + t θ_1.
    So an all-zero tensor is not "colinear": it has cos Ω = 0, and slerp against it gives
    sin(tπ/2) θ_1, not t θ_1 — mergekit's numbers, kept.

    ``coefficients`` (from ``_prepare``, the whole tensor's) merge a large tensor piece by piece;
    ``span``, the piece's place in it, changes nothing here.
    """
    if t is None:
        raise ValueError("slerp: missing required parameter 't' (0 gives the first model, 1 the second; "
                         "mergekit has no default for it)")
    if len(tensors) != 2:
        raise ValueError(f"slerp: expected exactly two models\n  got: {len(tensors)}")
    v0, v1 = tensors
    c0, c1 = coefficients if coefficients is not None else _coefficients(_sums(v0, v1), float(t))
    return c0 * v0 + c1 * v1
