"""Multi-SLERP (mergekit's ``multislerp``): a spherical mean of several models, or of their task
vectors when a base is given, each tensor taken as one vector."""

from __future__ import annotations

import math

import torch

from weightshare.merge.registry import FINITE, Param, interval, register_merge

__all__ = ["multislerp"]


def _weights(weight, normalize_weights: bool, name: str) -> list[float]:
    w = [float(v) for v in weight]
    if normalize_weights:
        total = sum(w)
        if total == 0:
            raise ValueError(f"multislerp: tensor {name!r}: the weights {w} sum to 0, so normalize_weights cannot "
                             "divide\n  expected: weights with a nonzero sum")
        w = [v / total for v in w]
    return w


def _cancel(name: str, eps: float) -> ValueError:
    return ValueError(f"multislerp: tensor {name!r}: the weighted unit vectors cancel (their sum is shorter than "
                      f"eps={eps}), so their spherical mean has no direction\n"
                      "  expected: models that do not cancel out; change the weights or merge fewer models")


def _prepare(read, numel: int, *, name: str, weight, normalize_weights: bool = True, eps: float = 1e-8,
             **_) -> dict:
    """The result is Σ_i c_i x_i: the coefficients need only the dot products of the x_i (their Gram
    matrix, float64), gathered piece by piece; the merge then streams.  This is the closed form the
    exponential map reduces to (see ``multislerp``), equal to the whole-tensor steps up to rounding."""
    gram = None
    for models, base in read():
        x = torch.stack([m.reshape(-1) if base is None else (m - base).reshape(-1) for m in models]).double()
        g = x @ x.T
        gram = g if gram is None else gram + g
    n = gram.shape[0]
    if n == 1:
        return {"coefficients": [1.0]}
    w = torch.tensor(_weights(weight, normalize_weights, name), dtype=torch.float64)
    norms = gram.diagonal().clamp(min=0).sqrt()
    a = w / (norms + eps)  # Σ_i a_i x_i = Σ_i w_i u_i
    mean_norm = math.sqrt(abs(float(a @ gram @ a)))
    if mean_norm < eps:
        if n == 2:
            return {"coefficients": w.tolist()}
        raise _cancel(name, eps)
    return {"coefficients": (a / mean_norm * float((norms * w).sum())).tolist()}


@register_merge("multislerp", source="mergekit semantics (merge_methods/multislerp.py)", takes_base=True,
                parameters=(Param("weight", required=True, per_model=True, rule=FINITE),
                            Param("normalize_weights", True), Param("eps", 1e-8, rule=interval("(0, 1)"))),
                models=(1, None), prepare=_prepare)
def multislerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, name: str, weight,
               normalize_weights: bool = True, eps: float = 1e-8, coefficients: list[float] | None = None,
               span: tuple[int, int] | None = None) -> torch.Tensor:
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
    if coefficients is not None:
        out = sum(c * (t if base is None else t - base) for c, t in zip(coefficients, tensors))
        return out if base is None else out + base
    x = torch.stack(tensors)
    if base is not None:
        x = x - base
    n = x.shape[0]
    flat = x.reshape(n, -1)
    w = torch.tensor(_weights(weight, normalize_weights, name), dtype=flat.dtype)
    norms = flat.norm(dim=-1, keepdim=True)
    unit = flat / (norms + eps)
    mean = (unit * w[:, None]).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if n == 2:
            out = (x[0] * w[0] + x[1] * w[1]).reshape(tensors[0].shape)
            return out if base is None else out + base
        raise _cancel(name, eps)
    mean = mean / mean_norm
    dots = (unit * mean).sum(-1, keepdim=True)
    tangent = ((unit - dots * mean) * w[:, None]).sum(0)
    tn = tangent.norm() + eps
    out = mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
    out = (out * (norms.squeeze(-1) * w).sum()).reshape(tensors[0].shape)
    return out if base is None else out + base
