"""Linear merge, the model soup (Wortsman et al. 2022, "Model soups: averaging weights of multiple
fine-tuned models improves accuracy without increasing inference time", arXiv:2203.05482)."""

from __future__ import annotations

import torch

from weightshare.merge.registry import FINITE, Param, register_merge

__all__ = ["linear"]


@register_merge("linear", source="Wortsman et al. 2022, Model soups; mergekit defaults (merge_methods/linear.py)",
                parameters=(Param("weight", 1.0, per_model=True, rule=FINITE), Param("normalize", True)),
                models=(1, None), elementwise=True)
def linear(tensors: list[torch.Tensor], base: torch.Tensor | None, *, name: str, weight,
           normalize: bool = True) -> torch.Tensor:
    """Σ_i w_i θ_i, divided by Σ_i w_i when ``normalize``; ``base`` is not used.

    Parameters and defaults are mergekit's (merge_methods/linear.py, ``LinearMerge.parameters``
    / ``tensor_parameters`` and ``LinearMergeTask.execute``):

    - ``weight`` (per model, default 1.0): mergekit requires it (no default).
    - ``normalize`` (default **True**): divide by Σ w_i.  mergekit divides unguarded (a zero
      sum gives inf/NaN); here a zero sum is refused, naming the tensor.
    """
    w = [float(x) for x in weight]
    if len(w) != len(tensors):
        raise ValueError(f"linear: weight\n  expected: one value per model ({len(tensors)})\n  got: {len(w)} values")
    stacked = torch.stack(tensors, dim=0)
    wt = torch.tensor(w, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    out = (wt * stacked).sum(dim=0)
    if normalize:
        total = wt.sum(dim=0)
        if float(total) == 0:
            raise ValueError(f"linear: tensor {name!r}: the weights {w} sum to 0, so normalize=True cannot divide\n"
                             "  expected: weights with a nonzero sum, or normalize: false")
        out = out / total
    return out
