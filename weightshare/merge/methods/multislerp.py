"""Multi-SLERP (mergekit's ``multislerp``): a spherical mean of several models, or of their task
vectors when a base is given, each tensor taken as one vector."""

from __future__ import annotations

import torch

from weightshare.merge.registry import FINITE, Param, interval, register_merge

__all__ = ["multislerp"]


@register_merge("multislerp", source="mergekit semantics (merge_methods/multislerp.py)", takes_base=True,
                parameters=(Param("weight", required=True, per_model=True, rule=FINITE),
                            Param("normalize_weights", True), Param("eps", 1e-8, rule=interval("(0, 1)"))),
                models=(1, None))
def multislerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, name: str, weight,
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """The weighted mean direction of the unit vectors x_i / (‖x_i‖ + eps), on the sphere, times the
    weighted mean norm Σ w_i ‖x_i‖ (x_i = θ_i, or θ_i − base with a base, added back at the end).

    mergekit's steps in its order (merge_methods/multislerp.py): normalise the weights to sum 1 (when
    ``normalize_weights``), m = normalised Σ w_i u_i, the tangent vectors u_i − ⟨u_i, m⟩ m averaged and
    mapped back by the exponential map.  That average is zero up to rounding (Σ w_i u_i is parallel to
    m), so the result is m · Σ w_i ‖x_i‖ to float32 rounding; we keep mergekit's steps so that its
    rounding is ours.  One model is returned as it is, as mergekit does (its raw tensor, even with a
    base).  Where Σ w_i u_i is shorter than ``eps`` the mean direction is undefined: mergekit lerps two
    models and raises for more; so do we, naming the tensor.
    """
    if len(tensors) == 1:
        return tensors[0]
    x = torch.stack(tensors)
    if base is not None:
        x = x - base
    n = x.shape[0]
    flat = x.reshape(n, -1)
    w = torch.tensor([float(v) for v in weight], dtype=flat.dtype)
    if normalize_weights:
        total = float(w.sum())
        if total == 0:
            raise ValueError(f"multislerp: tensor {name!r}: the weights {list(map(float, weight))} sum to 0, so "
                             "normalize_weights cannot divide\n  expected: weights with a nonzero sum")
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    unit = flat / (norms + eps)
    mean = (unit * w[:, None]).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if n == 2:
            out = (x[0] * w[0] + x[1] * w[1]).reshape(tensors[0].shape)
            return out if base is None else out + base
        raise ValueError(f"multislerp: tensor {name!r}: the weighted unit vectors cancel (their sum is shorter "
                         f"than eps={eps}), so their spherical mean has no direction\n"
                         "  expected: models that do not cancel out; change the weights or merge fewer models")
    mean = mean / mean_norm
    dots = (unit * mean).sum(-1, keepdim=True)
    tangent = ((unit - dots * mean) * w[:, None]).sum(0)
    tn = tangent.norm() + eps
    out = mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
    out = (out * (norms.squeeze(-1) * w).sum()).reshape(tensors[0].shape)
    return out if base is None else out + base
