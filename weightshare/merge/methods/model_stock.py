"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
arXiv:2403.19522): interpolate between the base and the fine-tunes' average by a ratio read
off the angle between their task vectors."""

from __future__ import annotations

import itertools

import torch

from weightshare.merge.registry import Param, register_merge

__all__ = ["model_stock"]


def _row_length(shape, filter_wise: bool) -> int:
    """Entries per row: one t per row, a row being a slice along the last dimension (``filter_wise``;
    a 1-D tensor is one row), or the whole tensor."""
    shape = torch.Size(shape)
    return max(1, shape[-1] if filter_wise and len(shape) > 1 else shape.numel())  # 1 for an empty tensor


def _rows(start: int, stop: int, length: int) -> torch.Tensor:
    """The row of each flat entry in [start, stop), rows of ``length`` entries (a piece may cut rows)."""
    return torch.div(torch.arange(start, stop), length, rounding_mode="floor")


def _gram(offsets: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per row, the Gram matrix of the task vectors, (rows, N, N) in float64: the dots and squared
    norms the cosines need, for entries ``offsets`` (N, entries) in ``rows``; summed over a
    tensor's pieces, they are the whole tensor's."""
    n = len(offsets)
    o = offsets.double()
    gram = torch.zeros(n_rows, n, n, dtype=torch.float64)
    for i, j in itertools.combinations_with_replacement(range(n), 2):
        gram[:, i, j].index_add_(0, rows, o[i] * o[j])
        gram[:, j, i] = gram[:, i, j]
    return gram


def _ratio(gram: torch.Tensor, name: str) -> torch.Tensor:
    """The interpolation ratio t = N cos / (1 + (N − 1) cos) of each row, cos the mean pairwise
    cosine, from the rows' ``_gram``."""
    n = gram.shape[-1]
    norms = gram.diagonal(dim1=-2, dim2=-1).sqrt()
    cosines = [(gram[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1, 1)
               for i, j in itertools.combinations(range(n), 2)]
    cos = torch.stack(cosines).mean(dim=0)
    t = n * cos / (1 + (n - 1) * cos)
    if not torch.isfinite(t).all():
        raise ValueError(f"model_stock: tensor {name!r}: the task vectors' mean cosine is -1/(N-1) "
                         f"(N = {n}), so t = N cos / (1 + (N-1) cos) is infinite\n"
                         "  expected: fine-tunes whose task vectors are not exactly opposed")
    return t


def _prepare(read, numel: int, *, name: str, shape, filter_wise: bool = False, **_) -> dict:
    """For a large tensor: each row's t from the sums gathered piece by piece (by row index, since
    a flat piece may cut rows), so that the merge itself is element-wise and streams
    (``streaming.merge``)."""
    length = _row_length(shape, filter_wise)
    n_rows = numel // length
    gram, start = 0, 0
    for models, base in read():
        stop = start + base.numel()
        gram = gram + _gram(torch.stack([w - base for w in models]), _rows(start, stop, length), n_rows)
        start = stop
    return {"t": _ratio(gram, name), "shape": torch.Size(shape)}


@register_merge("model_stock",
                source="Jang et al. 2024, Model Stock; mergekit semantics (merge_methods/model_stock.py)",
                needs_base=True, parameters=(Param("filter_wise", False),), models=(2, None), prepare=_prepare)
def model_stock(tensors: list[torch.Tensor], base: torch.Tensor, *, name: str, filter_wise: bool = False,
                t: torch.Tensor | None = None, shape=None, span: tuple[int, int] | None = None) -> torch.Tensor:
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
    writes inf/NaN; here that is refused, naming the tensor.  The dots and norms are summed in
    float64.

    ``t`` (one per row) and ``shape`` (the whole tensor's), from ``_prepare``, with ``span``
    (where the flat ``tensors`` lie in it) merge a large tensor piece by piece.
    """
    if len(tensors) < 2:
        raise ValueError(f"model_stock: expected at least two models besides the base\n  got: {len(tensors)}")
    length = _row_length(base.shape if shape is None else shape, filter_wise)
    start, stop = span if span is not None else (0, base.numel())
    w0, ws = base.reshape(-1), [w.reshape(-1) for w in tensors]
    if t is None:
        t = _ratio(_gram(torch.stack([w - w0 for w in ws]), _rows(start, stop, length), base.numel() // length), name)
    t = t.to(base.dtype)
    if len(t) > 1:  # one t per row: each entry takes its row's (one t for the tensor broadcasts as it is)
        t = t[_rows(start, stop, length)]
    avg = sum(ws) / len(ws)
    return (t * avg + (1 - t) * w0).reshape(base.shape)
