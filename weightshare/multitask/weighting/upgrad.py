"""UPGrad (Quinton & Rey 2024, torchjd): the mean of every task's gradient projected onto the dual cone."""

from __future__ import annotations

import numpy as np
import torch

from weightshare.multitask.weighting.base import register_method
from weightshare.multitask.weighting.solvers import combine, gram_matrix


def project_onto_dual_cone(gram: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Weights v with v^T G the projection of u^T G onto the cone {x : G x >= 0}.

    The projection is (u + w)^T G with w >= 0 minimising ||(u + w)^T G||^2 subject to
    G G^T (u + w) >= 0 at w's support (the dual of the cone projection): the
    non-negative least squares min_w ||L^T (u + w)||, L L^T = gram.
    """
    from scipy.optimize import nnls

    m = gram.shape[0]
    ridge = 1e-12 * max(np.trace(gram) / m, 1e-300)
    chol = np.linalg.cholesky(gram + ridge * np.eye(m))
    w, _ = nnls(chol.T, -(chol.T @ u))
    return u + w


@register_method("upgrad", "gradient", "Quinton & Rey 2024 (torchjd), unconflicting projection of gradients")
def upgrad(G: torch.Tensor) -> torch.Tensor:
    gram = gram_matrix(G)
    m = gram.shape[0]
    weights = sum(project_onto_dual_cone(gram, np.eye(m)[i]) for i in range(m)) / m
    return combine(weights, G)
