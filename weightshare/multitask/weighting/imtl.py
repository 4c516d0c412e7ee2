"""IMTL-G (Liu et al. 2021): the direction with equal projections onto every task's unit gradient."""

from __future__ import annotations

import torch

from weightshare.multitask.weighting.base import register_method


@register_method("imtl", "gradient", "Liu et al. 2021 (IMTL-G): equal projections onto every task's unit gradient")
def imtl(G: torch.Tensor) -> torch.Tensor:
    g = G.double()
    m = g.shape[0]
    if m == 1:
        return G[0].clone()
    u = g / g.norm(dim=1, keepdim=True).clamp(min=1e-30)
    D = g[:1] - g[1:]  # (m-1, n): g_1 - g_i
    U = u[:1] - u[1:]
    # α_{2..m} = g_1 U^T (D U^T)^{-1}; α_1 = 1 - Σ α_{2..m}
    rest = torch.linalg.lstsq((D @ U.t()).t(), (g[0] @ U.t()).unsqueeze(1)).solution.squeeze(1)
    alpha = torch.cat([1 - rest.sum().unsqueeze(0), rest])
    return (alpha @ g).to(G.dtype)
