"""CAGrad (Liu et al. 2021): conflict-averse gradient descent, the best worst-task gain near the mean."""

from __future__ import annotations

import math

import numpy as np
import torch

from weightshare.multitask.weighting.base import register_method
from weightshare.multitask.weighting.solvers import combine, gram_matrix


@register_method("cagrad", "gradient", "Liu et al. 2021, conflict-averse gradient descent (c = 0.5)")
def cagrad(G: torch.Tensor, c: float = 0.5) -> torch.Tensor:
    """d = g0 + sqrt(φ) g_w / ||g_w||, g0 the mean gradient, φ = c² ||g0||², w on the simplex minimising
    g_w·g0 + sqrt(φ) ||g_w|| (the dual of max_d min_i g_i·d within a ball of radius c||g0|| around g0)."""
    from scipy.optimize import minimize

    if not c >= 0:
        raise ValueError(f"cagrad: c\n  expected: >= 0\n  got: {c!r}")
    gram = gram_matrix(G)
    m = gram.shape[0]
    g0_gram = gram.mean(1)  # G g0, with g0 = mean of the rows
    g0_norm2 = float(gram.mean())
    sqrt_phi = c * math.sqrt(max(g0_norm2, 0.0))

    def objective(z):
        w = np.exp(z - z.max())
        w /= w.sum()
        return float(w @ g0_gram + sqrt_phi * math.sqrt(max(w @ gram @ w, 1e-30)))

    res = minimize(objective, np.zeros(m), method="Nelder-Mead" if m <= 2 else "BFGS",
                   options={"maxiter": 2000, "xatol": 1e-10, "fatol": 1e-14} if m <= 2 else {"maxiter": 2000})
    w = np.exp(res.x - res.x.max())
    w /= w.sum()
    gw_norm = math.sqrt(max(w @ gram @ w, 1e-30))
    weights = np.full(m, 1.0 / m) + (sqrt_phi / gw_norm) * w
    return combine(weights, G)
