"""Karcher mean (Karcher 1977, "Riemannian center of mass and mollifier smoothing"; for model weights
as mergekit's ``karcher``): the mean of the models' directions on the unit sphere, found by
Riemannian gradient steps, scaled by their mean norm."""

from __future__ import annotations

import math

import torch

from weightshare.merge.registry import Param, interval, register_merge

__all__ = ["karcher"]


def _prepare(read, numel: int, *, name: str, max_iter: int = 10, tol: float = 1e-5, **_) -> dict:
    """The mean direction stays in the span of the models, so the iteration runs on coefficients over them
    with their Gram matrix (float64, gathered piece by piece): the same steps as ``karcher``, and the merge
    of a large tensor then streams (equal to the whole-tensor steps up to rounding)."""
    gram = None
    for models, _ in read():
        x = torch.stack([m.reshape(-1) for m in models]).double()
        gram = x @ x.T if gram is None else gram + x @ x.T
    n = gram.shape[0]
    if n == 1:
        return {"coefficients": [1.0]}
    norms = gram.diagonal().clamp(min=0).sqrt()
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return {"coefficients": [0.0] * n}

    def dot(c1: torch.Tensor, c2: torch.Tensor) -> float:
        return float(c1 @ gram @ c2)

    units = torch.diag(torch.where(norms > 0, 1 / norms, torch.zeros_like(norms)))  # row i: unit_i's coefficients
    a = 1.0 / len(valid)
    u = sum(a * units[i] for i in valid)
    nu = math.sqrt(max(dot(u, u), 0.0))
    u = units[valid[0]].clone() if nu < tol else u / nu
    for _ in range(int(max_iter)):
        step = torch.zeros(n, dtype=torch.float64)
        for i in valid:
            d = min(1.0, max(-1.0, dot(u, units[i])))
            theta = math.acos(d)
            if theta < tol:
                continue
            step = step + a * (theta / math.sin(theta)) * (units[i] - d * u)
        ns = math.sqrt(max(dot(step, step), 0.0))
        if ns < tol:
            break
        u = math.cos(ns) * u + math.sin(ns) * (step / ns)
        nu = math.sqrt(max(dot(u, u), 0.0))
        if nu > tol:
            u = u / nu
    return {"coefficients": (float(norms.sum()) / n * u).tolist()}


@register_merge("karcher", source="Karcher 1977; mergekit semantics (merge_methods/karcher.py)",
                parameters=(Param("max_iter", 10, rule=interval("[0, 1e6]")),
                            Param("tol", 1e-5, rule=interval("(0, 1)"))),
                models=(1, None), base_as_model=True, prepare=_prepare)
def karcher(tensors: list[torch.Tensor], base: torch.Tensor | None, *, name: str, max_iter: int = 10,
            tol: float = 1e-5, coefficients: list[float] | None = None,
            span: tuple[int, int] | None = None) -> torch.Tensor:
    """s · u: u the Karcher mean of the unit vectors θ_i / ‖θ_i‖ (each tensor one vector, equal weights),
    s the mean of the norms ‖θ_i‖.

    As mergekit's ``karcher_merge_tensors``, step for step: tensors with norm <= ``tol`` take no part in
    the direction (all of them: the result is zero) but their norms count in s; u starts at the
    normalised mean of the unit vectors; each of at most ``max_iter`` steps moves u along the mean of the
    log maps (angles below ``tol`` skipped) by the exponential map, stopping first when that mean is
    shorter than ``tol``.  A config's ``base_model`` is merged as one more model, as mergekit does (it
    appends the base to the models of a method that takes none).  ``coefficients`` (from ``_prepare``)
    merge a large tensor piece by piece.
    """
    if coefficients is not None:
        return sum(c * t for c, t in zip(coefficients, tensors))
    n = len(tensors)
    if n == 1:
        return tensors[0]
    alpha = 1.0 / n
    norms = [float(torch.linalg.norm(x.float())) for x in tensors]
    units = [torch.zeros_like(x) if nx == 0.0 else x / nx for x, nx in zip(tensors, norms)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    a = {i: alpha / (alpha * len(valid)) for i in valid}
    u = torch.zeros_like(units[valid[0]])
    for i in valid:
        u = u + a[i] * units[i]
    nu = float(torch.linalg.norm(u.float()))
    u = units[valid[0]].clone() if nu < tol else u / nu
    for _ in range(int(max_iter)):
        step = torch.zeros_like(u)
        for i in valid:
            d = float(torch.dot(u.reshape(-1), units[i].reshape(-1)).clamp(-1, 1))
            theta = math.acos(d)
            if theta < tol:
                continue
            step = step + a[i] * (theta / math.sin(theta)) * (units[i] - d * u)
        ns = float(torch.linalg.norm(step.float()))
        if ns < tol:
            break
        u = math.cos(ns) * u + math.sin(ns) * (step / ns)
        nu = float(torch.linalg.norm(u.float()))
        if nu > tol:
            u = u / nu
    return sum(alpha * nx for nx in norms) * u
