"""SCE (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv:2408.07990; mergekit's
``sce``): Select the positions where the task vectors vary most, Calculate per-model weights from
their squared magnitudes, Erase the entries whose sign disagrees with the elected one."""

from __future__ import annotations

import torch

from weightshare.merge.registry import Param, interval, register_merge

__all__ = ["sce"]


@register_merge("sce", source="Wan et al. 2024, FuseChat; mergekit semantics (merge_methods/sce.py)",
                needs_base=True, parameters=(Param("select_topk", 1.0, rule=interval("[0, 1]")),), models=(1, None))
def sce(tensors: list[torch.Tensor], base: torch.Tensor | None, *, name: str, select_topk: float = 1.0) -> torch.Tensor:
    """base + Σ_i τ_i e_i w_i / max(Σ_i e_i w_i, 1e-6), τ_i = θ_i − base.

    As mergekit's ``sce_merge``, step for step:

    - **select**: with ``select_topk`` < 1, keep the ⌊select_topk · (positions of nonzero variance)⌋
      positions whose variance across the task vectors is largest; zero every τ_i elsewhere;
    - **calculate**: w_i = mean(τ_i²) over the whole (masked) tensor, divided by their sum, or 1/N each
      when that sum is below 1e-6 in absolute value (mergekit's test; fine-tune deltas of 1e-3 fall
      under it, and then the weights are equal);
    - **erase**: elect each position's sign from Σ_i τ_i (unweighted; a zero sum elects +) and keep
      e_i = 1 where sign(τ_i) agrees (a zero entry never does).

    ``select_topk`` (default 1.0) is mergekit's only parameter; there are no per-model weights.  Where
    nothing is selected (``select_topk`` 0, one model, task vectors that never differ) mergekit returns
    a tensor of shape (N, *shape), each slice the base, and writes it; the value meant is the base, which
    we return, in the tensor's own shape.
    """
    tv = torch.stack([x - base for x in tensors])
    n = tv.shape[0]
    if select_topk < 1:
        var = torch.var(tv, dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * float(select_topk))
        if select_topk <= 0 or k == 0:
            return base.clone()
        _, idx = torch.topk(var.abs().reshape(-1), k=k, largest=True)
        mask = torch.zeros(var.numel(), dtype=tv.dtype)
        mask[idx] = 1
        tv = tv * mask.reshape(var.shape)[None]
    elected = (tv.sum(0) >= 0).to(tv.dtype) * 2 - 1
    agree = tv.sign() == elected
    w = (tv**2).reshape(n, -1).mean(dim=1)
    total = float(w.sum())
    w = torch.ones_like(w) / n if abs(total) < 1e-6 else w / total
    ew = w.reshape(n, *([1] * (tv.dim() - 1))) * agree
    return base + (tv * ew).sum(0) / ew.sum(0).clamp(min=1e-6)
