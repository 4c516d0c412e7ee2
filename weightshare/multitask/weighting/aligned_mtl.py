"""Aligned-MTL (Senushkin et al. 2023): task gradients aligned to a condition number of one."""

from __future__ import annotations

import math

import numpy as np
import torch

from weightshare.multitask.weighting.base import register_method
from weightshare.multitask.weighting.solvers import combine, gram_matrix


@register_method("aligned_mtl", "gradient", "Senushkin et al. 2023, Aligned-MTL: a condition number of one")
def aligned_mtl(G: torch.Tensor) -> torch.Tensor:
    """The mean row of B·G, B = σ_min (G G^T)^{-1/2}: the task gradients' polar factor scaled by the
    smallest singular value, so that no task's gradient dominates the system (all singular values equal)."""
    gram = gram_matrix(G)
    lam, vec = np.linalg.eigh(gram)
    keep = lam > 1e-12 * max(float(lam[-1]), 1e-300)
    if not keep.any():
        return torch.zeros(G.shape[1], dtype=G.dtype, device=G.device)
    lam, vec = lam[keep], vec[:, keep]
    b = math.sqrt(float(lam.min())) * (vec / np.sqrt(lam)) @ vec.T  # σ_min · V Λ^{-1/2} V^T
    return combine(b.mean(0), G)
