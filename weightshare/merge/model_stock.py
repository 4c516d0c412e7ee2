"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
arXiv:2403.19522): interpolate between the base and the fine-tunes' average by a ratio read
off the angle between their task vectors."""

from __future__ import annotations

import itertools

import torch

from weightshare.merge.registry import register_merge

__all__ = ["model_stock"]


@register_merge("model_stock",
                source="Jang et al. 2024, Model Stock; mergekit semantics (merge_methods/model_stock.py)",
                needs_base=True, params={"filter_wise": False}, models=(2, None))
def model_stock(tensors: list[torch.Tensor], base: torch.Tensor, *, name: str,
                filter_wise: bool = False) -> torch.Tensor:
    """t · mean_i θ_i + (1 − t) · base, t = N cos / (1 + (N − 1) cos).

    cos is the mean over pairs i < j of the cosine between task vectors θ_i − base and
    θ_j − base (the paper gives only the two-model angle; mergekit averages the pairwise
    cosines, and so do we).  As mergekit (merge_methods/model_stock.py,
    ``ModelStockMergeTask.execute``; ``ModelStockMerge.parameters``):

    - ``filter_wise`` (default False): one t per tensor (flattened); when True, one t per
      slice along the last dimension ("row"), a 1-D tensor (bias, norm) being one row.
    - each cosine divides by the product of norms clamped to >= 1e-6 (so a zero task vector
      has cos 0 and pulls t towards the base), and is clamped to [-1, 1].

    mergekit does not guard 1 + (N − 1) cos = 0 (e.g. two exactly opposite task vectors) and
    writes inf/NaN; here that is refused, naming the tensor.
    """
    if len(tensors) < 2:
        raise ValueError(f"model_stock: expected at least two models besides the base\n  got: {len(tensors)}")
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() <= 1 else base
        ws = [w.unsqueeze(0) if w.dim() <= 1 else w for w in tensors]
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for a, b in itertools.combinations(offsets, 2):
        norms = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
        cosines.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)
    if not torch.isfinite(t).all():
        raise ValueError(f"model_stock: tensor {name!r}: the task vectors' mean cosine is -1/(N-1) "
                         f"(N = {n}), so t = N cos / (1 + (N-1) cos) is infinite\n"
                         "  expected: fine-tunes whose task vectors are not exactly opposed")
    avg = sum(ws) / n
    return (t * avg + (1 - t) * w0).reshape(shape)
