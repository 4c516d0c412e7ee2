"""The small linear algebra the gradient aggregators share, on the (tasks x tasks) Gram matrix.

With a handful of tasks the Gram matrix G G^T is where all the work is: the solvers run on it in
float64 (numpy) and ``combine`` turns their task weights back into a direction in the parameters.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

__all__ = ["combine", "gram_matrix", "min_norm_projected", "min_norm_weights", "project_simplex"]


def gram_matrix(G: torch.Tensor) -> np.ndarray:
    """(tasks, tasks) G G^T in float64, of per-task gradients ``G`` (tasks, params)."""
    g = G.double()
    return (g @ g.t()).cpu().numpy()


def combine(weights, G: torch.Tensor) -> torch.Tensor:
    """The direction Σ_i w_i g_i, in ``G``'s dtype and device, from task weights ``weights`` (tasks,)."""
    return (torch.as_tensor(np.asarray(weights), dtype=torch.float64) @ G.double().cpu()).to(G.dtype).to(G.device)


def min_norm_weights(gram: np.ndarray) -> np.ndarray:
    """λ on the simplex minimising ||λ^T G||^2 = λ^T gram λ, exactly, by enumerating supports.

    On a support S the optimum solves the KKT system [M_SS 1; 1^T 0][λ; ν] = [0; 1];
    the best candidate with λ >= 0 over all supports is the global optimum (a convex
    QP attains it on the relative interior of some face).  2^m - 1 small solves: exact
    and fast for the handful of tasks multi-task learning has (m <= 12).
    """
    m = gram.shape[0]
    if m > 12:
        return min_norm_projected(gram)
    best, best_val = None, math.inf
    for size in range(1, m + 1):
        for support in itertools.combinations(range(m), size):
            s = list(support)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = gram[np.ix_(s, s)]
            kkt[:size, size] = kkt[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if (sol < -1e-12).any() or abs(sol.sum() - 1) > 1e-9:
                continue
            lam = np.zeros(m)
            lam[s] = np.clip(sol, 0, None)
            lam /= lam.sum()
            val = lam @ gram @ lam
            if val < best_val - 1e-15:
                best, best_val = lam, val
    return best


def project_simplex(v: np.ndarray) -> np.ndarray:
    """The Euclidean projection onto the probability simplex (sort-based, Held et al.)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - css[k] / (k + 1), 0.0)


def min_norm_projected(gram: np.ndarray, iterations: int = 5000) -> np.ndarray:
    """Many tasks: accelerated projected gradient (FISTA) on the simplex, step 1 / largest eigenvalue."""
    m = gram.shape[0]
    step = 1.0 / max(float(np.linalg.eigvalsh(gram)[-1]), 1e-30)
    lam = y = np.full(m, 1.0 / m)
    t = 1.0
    for _ in range(iterations):
        nxt = project_simplex(y - step * (gram @ y))
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = nxt + (t - 1) / t_next * (nxt - lam)
        lam, t = nxt, t_next
    return lam
