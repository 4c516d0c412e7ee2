"""Arcee Fusion (mergekit's ``arcee_fusion``, by Arcee AI): move the base towards the fine-tuned model
only where the change matters, scored by the change times a per-row KL divergence of the rows taken as
logits, cut at Tukey's upper fence of the scores."""

from __future__ import annotations

import torch

from weightshare.merge.registry import register_merge

__all__ = ["arcee_fusion"]


def _order_statistic(sorted_values: torch.Tensor, q: float) -> torch.Tensor:
    """mergekit's quantile: the entry at ⌊q (n − 1)⌋ of the sorted values (no interpolation), the product
    taken in float32 as mergekit takes it."""
    at = int((torch.tensor([q]) * (sorted_values.numel() - 1)).long())
    return sorted_values[at]


@register_merge("arcee_fusion", source="mergekit semantics (merge_methods/arcee_fusion.py)", needs_base=True,
                models=(1, 1))
def arcee_fusion(tensors: list[torch.Tensor], base: torch.Tensor | None, *, name: str) -> torch.Tensor:
    """base + (θ − base) · [score >= Q2 + 1.5 (Q3 − Q1)], score = |θ − base| · KL(softmax θ ‖ softmax base)
    row by row (the last dimension), Q the quartiles of the scores.

    As mergekit's ``ArceeFusionMergeTask``: softmaxes get 1e-8 added before the KL; quartiles are order
    statistics (the entry at ⌊q (n − 1)⌋ of the sorted scores).  mergekit takes them from a random sample
    of a million scores for a tensor larger than that, so its result there changes from run to run;
    here they are the whole tensor's, always (the same as mergekit's up to 10^6 entries).  mergekit also
    returns float32 for half-precision inputs; the merge's output dtype rule applies here as for every
    method.
    """
    (x,) = tensors
    delta = x - base
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1)
    score = delta.abs() * kl.unsqueeze(-1)
    s = torch.sort(score.reshape(-1)).values
    threshold = _order_statistic(s, 0.5) + 1.5 * (_order_statistic(s, 0.75) - _order_statistic(s, 0.25))
    return base + delta * (score >= threshold).to(delta.dtype)
