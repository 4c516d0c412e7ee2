"""NuSlerp (mergekit's ``nuslerp``): spherical interpolation of two models, or of their task vectors
when a base is given, over the whole tensor or row by row / column by column."""

from __future__ import annotations

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


@register_merge("nuslerp", source="mergekit semantics (merge_methods/nuslerp.py)", takes_base=True,
                parameters=(Param("weight", required=True, per_model=True, rule=FINITE),
                            Param("nuslerp_flatten", True), Param("nuslerp_row_wise", False)),
                models=(2, 2))
def nuslerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, name: str, weight,
            nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False) -> torch.Tensor:
    """The slerp of θ_0 and θ_1 at t = w_1 / (w_0 + w_1) (0.5 when |w_0 + w_1| < 1e-6); with a base,
    base + the slerp of θ_0 − base and θ_1 − base.

    Parameters and defaults are mergekit's (merge_methods/nuslerp.py, ``NuSlerpMerge``): ``weight`` per
    model, required; ``nuslerp_flatten`` (default True) interpolates the flattened tensors as one vector;
    with it False, ``nuslerp_row_wise`` picks the vectors.  mergekit's code, which we follow, interpolates
    each row (slices along the last dimension) when ``nuslerp_row_wise`` is False and each column (along
    the first) when it is True: the opposite of mergekit's documentation, which says row-wise "SLERPs row
    vectors instead of column vectors".  The vectors keep their norms (the slerp of the unnormalised
    vectors); a zero vector has cosine 0 with anything, so it is slerped at a right angle, not lerped.
    """
    w0, w1 = (float(x) for x in weight)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    v0, v1 = tensors
    if base is not None:
        v0, v1 = v0 - base, v1 - base
    out = nuslerp_vectors(t, v0, v1, dim=0 if nuslerp_row_wise else -1, flatten=nuslerp_flatten)
    return out if base is None else base + out
