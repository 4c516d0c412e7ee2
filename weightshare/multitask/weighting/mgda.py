"""MGDA (Sener & Koltun 2018): the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import torch

from weightshare.multitask.weighting.base import register_method
from weightshare.multitask.weighting.solvers import combine, gram_matrix, min_norm_weights


@register_method("mgda", "gradient", "Sener & Koltun 2018, the min-norm point of the convex hull of the gradients")
def mgda(G: torch.Tensor) -> torch.Tensor:
    return combine(min_norm_weights(gram_matrix(G)), G)
