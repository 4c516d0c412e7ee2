"""PCGrad (Yu et al. 2020): each task's gradient loses its components that conflict with the others'."""

from __future__ import annotations

import torch

from weightshare.multitask.weighting.base import register_method


@register_method("pcgrad", "gradient", "Yu et al. 2020, gradient surgery: project away conflicting components")
def pcgrad(G: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = G.double()
    gen = torch.Generator().manual_seed(seed)
    out = g.clone()
    m = g.shape[0]
    for i in range(m):
        for j in torch.randperm(m, generator=gen).tolist():
            if j == i:
                continue
            dot = out[i] @ g[j]
            if dot < 0:
                out[i] -= dot / (g[j] @ g[j]).clamp(min=1e-30) * g[j]
    return out.sum(0).to(G.dtype)
