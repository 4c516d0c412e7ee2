"""Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025, arXiv:2502.04959).

Task arithmetic's summed update of a weight matrix has a few dominant singular directions,
so the tasks that live in the weaker ones are drowned out.  Iso-C keeps the singular vectors
of the sum Δ = Σ_i w_i (θ_i − base) and replaces its spectrum by a flat one at the mean
singular value: Δ_iso = mean(σ) · U Vᵀ.  Tensors that are not matrices take the mean task
vector, as in the authors' code.  One difference: the spectrum is flattened over the
numerical rank of Δ (numpy's ``matrix_rank`` tolerance), where the authors flatten all of it;
for the full-rank updates of fine-tuning the two agree, and for a low-rank update the
authors' version would add arbitrary directions (the SVD's completion of the zero singular
values) at the mean singular value.  The result is base + scale · Δ_iso; the authors choose
``scale`` on validation data (default 1 here).

Streaming is TSV-Merge's (``weightshare.merge.svd.svd_prepare``): a matrix some model changed is merged
whole (an SVD needs it), everything else in pieces.
"""

from __future__ import annotations

import torch

from weightshare.merge.registry import FINITE, Param, per_model, register_merge
from weightshare.merge.svd import svd_prepare

__all__ = ["iso_c"]


@register_merge("iso_c", source="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging (Iso-C, ICML 2025); "
                "the authors' iso-merging code: sum of task matrices with a flat spectrum, mean of the rest",
                needs_base=True, parameters=(Param("weight", 1.0, per_model=True, rule=FINITE), Param("scale", 1.0)),
                models=(1, None), prepare=svd_prepare)
def iso_c(tensors: list[torch.Tensor], base: torch.Tensor, *, name: str, weight, scale: float = 1.0,
          matrix: bool | None = None, unchanged: bool = False, span=None) -> torch.Tensor:
    """base + scale · mean(σ) U Vᵀ, U σ Vᵀ the SVD of the summed weighted task matrices (a matrix),
    or base + scale · the mean task vector (anything else).  ``weight`` (per model, 1.0) scales
    each task vector; ``matrix`` and ``unchanged`` come from ``svd_prepare`` for a large tensor."""
    weights = per_model("iso_c", "weight", weight, len(tensors), 1.0)
    if unchanged:
        return base.clone()
    total = sum(w * (t - base) for w, t in zip(weights, tensors))
    if not (base.dim() == 2 if matrix is None else matrix):
        return base + scale * (total / len(tensors))
    if not bool(total.any()):
        return base.clone()  # nothing to add (no model changed it, or the changes cancel): the base's, exactly
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    # the numerical rank, as numpy's matrix_rank: singular vectors of zero singular values are any
    # orthonormal completion, and flattening would add them as directions no model moved in
    rank = int((s > s[0] * max(total.shape) * torch.finfo(s.dtype).eps).sum())
    return base + scale * (s[:rank].mean() * (u[:, :rank] @ vh[:rank]))
