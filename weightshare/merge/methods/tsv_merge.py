"""TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model
Merging", CVPR 2025, arXiv:2412.00081).

Task arithmetic adds whole task vectors, and where two tasks' layer updates share directions
they interfere.  TSV-Merge works on each weight matrix's task matrices δ_i = w_i (θ_i − base):
it keeps each one's top ``r / T`` singular triplets (r the matrix's rank bound, T the number
of models), stacks the kept left singular vectors of all tasks into U and the right ones into
V, replaces U and V by their nearest orthogonal matrices (the polar factors, from their SVDs),
so that no two tasks' directions overlap, and rebuilds Δ = U_⊥ diag(S) V_⊥ᵀ.  Tensors that are
not matrices (biases, norms) take the mean task vector, as the authors' code does
(src/utils/TSVM_utils.py, ``compute_and_sum_svd_mem_reduction``).  The result is
base + scale · Δ; the authors choose ``scale`` on validation data in (0, 3] (default 1 here).

An SVD needs the whole matrix, so a matrix whose task vectors are not all zero is merged
whole: one tensor per input, plus its SVD factors.  Everything else streams: a large tensor
is first read in pieces to find whether any model changed it (a frozen embedding matrix did
not, and is the base's, exactly), and a large non-matrix is averaged piece by piece.
"""

from __future__ import annotations

import torch

from weightshare.merge.registry import FINITE, Param, per_model, register_merge
from weightshare.merge.svd import svd_prepare

__all__ = ["tsv_merge", "orthogonal_factor"]


def orthogonal_factor(a: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns (or rows, when wider than tall) nearest ``a`` in
    Frobenius norm: P Qᵀ from a = P Σ Qᵀ (the polar factor)."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


@register_merge("tsv_merge", source="Gargiulo et al. 2025, Task Singular Vectors (TSV-Merge, CVPR 2025); "
                "the authors' code (src/utils/TSVM_utils.py): rank r / T per task, mean of non-matrix task vectors",
                needs_base=True, parameters=(Param("weight", 1.0, per_model=True, rule=FINITE), Param("scale", 1.0)),
                models=(1, None), prepare=svd_prepare)
def tsv_merge(tensors: list[torch.Tensor], base: torch.Tensor, *, name: str, weight, scale: float = 1.0,
              matrix: bool | None = None, unchanged: bool = False, span=None) -> torch.Tensor:
    """base + scale · Δ, Δ the decorrelated sum of the task matrices' top singular triplets
    (a matrix) or the mean task vector (anything else); see the module.

    ``weight`` (per model, 1.0) scales each task vector first; ``scale`` (1.0) is the authors'
    α.  ``matrix`` and ``unchanged`` come from ``svd_prepare`` when a large tensor merges in pieces.
    """
    weights = per_model("tsv_merge", "weight", weight, len(tensors), 1.0)
    if unchanged:
        return base.clone()
    deltas = [w * (t - base) for w, t in zip(weights, tensors)]
    if not (base.dim() == 2 if matrix is None else matrix):
        return base + scale * (torch.stack(deltas).sum(0) / len(deltas))
    if not any(bool(d.any()) for d in deltas):
        return base.clone()  # no model changed it: the base's, exactly
    k = max(1, min(base.shape) // len(deltas))  # the authors' int(r · 1/T); at least one triplet each
    us, ss, vhs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)  # float32, as the authors (a matrix of a large model)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u, vh = orthogonal_factor(torch.cat(us, 1)), orthogonal_factor(torch.cat(vhs, 0))
    merged = (u * torch.cat(ss)) @ vh
    return base + scale * merged
