"""NuSlerp (mergekit's ``nuslerp``): spherical interpolation of two models, or of their task vectors
when a base is given, over the whole tensor or row by row / column by column."""

from __future__ import annotations

import math

import torch

from weightshare.merge.registry import FINITE, Param, register_merge

__all__ = ["nuslerp"]


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-7)


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int, flatten: bool) -> torch.Tensor:
    """mergekit's ``nuslerp``: slerp of the unnormalised vectors along ``dim`` (or of the flattened tensors),
    the lerp where the angle's sine is below 1e-8."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos = (_normalize(v0) * _normalize(v1)).sum(dim=-1, keepdim=True)
    theta = torch.acos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    colinear = sin.abs() < 1e-8
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(shape)


def _t(weight) -> float:
    w0, w1 = (float(x) for x in weight)
    return 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)


def _prepare(read, numel: int, *, name: str, weight, nuslerp_flatten: bool = True, **_) -> dict | None:
    """Flattened (the default), the slerp is c0 · v0 + c1 · v1 with the whole tensor's angle: its sums are
    gathered piece by piece (float64), and the merge then streams.  Row or column slerps: merged whole."""
    if not nuslerp_flatten:
        return None
    sums = torch.zeros(3, dtype=torch.float64)
    for (x0, x1), base in read():
        v0, v1 = (x0, x1) if base is None else (x0 - base, x1 - base)
        a, b = v0.reshape(-1).double(), v1.reshape(-1).double()
        sums += torch.stack([a @ a, b @ b, a @ b])
    n0, n1 = max(math.sqrt(float(sums[0])), 1e-7), max(math.sqrt(float(sums[1])), 1e-7)
    t = _t(weight)
    theta = math.acos(min(1.0, max(-1.0, float(sums[2]) / (n0 * n1))))
    s = math.sin(theta)
    if abs(s) < 1e-8:
        return {"coefficients": (1 - t, t)}
    return {"coefficients": (math.sin((1 - t) * theta) / s, math.sin(t * theta) / s)}


@register_merge("nuslerp", source="mergekit semantics (merge_methods/nuslerp.py)", takes_base=True,
                parameters=(Param("weight", required=True, per_model=True, rule=FINITE),
                            Param("nuslerp_flatten", True), Param("nuslerp_row_wise", False)),
                models=(2, 2), prepare=_prepare)
def nuslerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, name: str, weight,
            nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False,
            coefficients: tuple[float, float] | None = None, span: tuple[int, int] | None = None) -> torch.Tensor:
    """The slerp of θ_0 and θ_1 at t = w_1 / (w_0 + w_1) (0.5 when |w_0 + w_1| < 1e-6); with a base,
    base + the slerp of θ_0 − base and θ_1 − base.

    Parameters and defaults are mergekit's (merge_methods/nuslerp.py, ``NuSlerpMerge``): ``weight`` per
    model, required; ``nuslerp_flatten`` (default True) interpolates the flattened tensors as one vector;
    with it False, ``nuslerp_row_wise`` picks the vectors.  mergekit's code, which we follow, interpolates
    each row (slices along the last dimension) when ``nuslerp_row_wise`` is False and each column (along
    the first) when it is True: the opposite of mergekit's documentation, which says row-wise "SLERPs row
    vectors instead of column vectors".  The vectors keep their norms (the slerp of the unnormalised
    vectors); a zero vector has cosine 0 with anything, so it is slerped at a right angle, not lerped.
    ``coefficients`` (from ``_prepare``) merge a large flattened tensor piece by piece.
    """
    v0, v1 = tensors
    if base is not None:
        v0, v1 = v0 - base, v1 - base
    if coefficients is not None:  # a large flattened tensor, piece by piece (_prepare)
        out = coefficients[0] * v0 + coefficients[1] * v1
    else:
        out = nuslerp_vectors(_t(weight), v0, v1, dim=0 if nuslerp_row_wise else -1, flatten=nuslerp_flatten)
    return out if base is None else base + out
