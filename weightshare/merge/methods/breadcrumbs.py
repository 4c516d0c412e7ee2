"""Model Breadcrumbs (Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model
Merging with Sparse Masks", arXiv:2312.06795).

Each task vector loses its largest-magnitude ``gamma`` fraction (outliers, which the paper
finds hurt a merge) and then its smallest entries, down to ``density`` of the tensor; the
masked task vectors are combined linearly (``breadcrumbs``) or with TIES's sign election
(``breadcrumbs_ties``), as mergekit's two methods of those names do
(merge_methods/registry.py, ``SparsificationMethod.magnitude_outliers``).

Counts follow mergekit/sparsify.py ``magnitude_outliers``: of n entries, ``int(density·n)``
are kept and ``int(gamma·n)`` outliers dropped, fewer outliers when both do not fit.  Two
differences, both where mergekit's numbers are degenerate: where no outlier is dropped
(``int(gamma·n) = 0``, any tensor under 100 entries at mergekit's gamma 0.01) mergekit's
``indices[n_bot:-0]`` selects nothing and zeroes the task vector, and we drop no outlier;
where ``int(density·n) = 0`` we keep one entry, as our TIES does.

The cuts are magnitudes, not ranks: the whole tensor's (n_top + kept)-th and n_top-th
largest |τ|, found by the radix select TIES uses, so that a large tensor merges piece by
piece exactly as whole; entries tied at the lower cut are all kept, at the upper cut all
dropped (real task vectors have no ties; mergekit breaks them by sort order).
"""

from __future__ import annotations

import torch

from weightshare.merge.registry import register_merge
from weightshare.merge.methods.task_arithmetic import (GTA_MODEL_PARAMS, combine, gta_params, l1_factor, per_model,
                                               task_vectors)
from weightshare.merge.methods.ties import elect_sign, kth_largest_rows

__all__ = ["breadcrumbs", "breadcrumbs_ties", "counts", "cut"]

MODEL_PARAMS = {**GTA_MODEL_PARAMS, "gamma": 0.01}  # mergekit's default gamma (generalized_task_arithmetic.py)


def counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(kept, outliers dropped) of a tensor of ``numel`` entries."""
    kept = max(1, int(density * numel)) if numel else 0
    top = min(int(gamma * numel), numel - kept)
    return kept, top


def _cuts(pieces, numel: int, params: list[tuple[float, float]]) -> list[tuple[float, float | None] | None]:
    """Per model, its (lower, upper) magnitude cuts, None where density >= 1 (nothing dropped);
    ``pieces`` gives the models' |τ| stacked (models, piece), a piece at a time."""
    asks = []  # (model, rank among the largest): each model's lower cut, and its upper one if it drops outliers
    for i, (density, gamma) in enumerate(params):
        if density < 1 and numel:
            kept, top = counts(numel, density, gamma)
            asks += [(i, top + kept)] + ([(i, top)] if top else [])
    out: list = [None] * len(params)
    if asks:
        rows = [i for i, _ in asks]
        values = kth_largest_rows(lambda: (piece[rows] for piece in pieces()), numel, [k for _, k in asks])
        for (i, _), v in zip(asks, values):
            out[i] = (v, None) if out[i] is None else (out[i][0], v)
    return out


def cut(delta: torch.Tensor, lower: float, upper: float | None) -> torch.Tensor:
    """``delta`` with the entries of magnitude below ``lower``, or from ``upper`` up, zeroed."""
    mag = delta.abs()
    keep = mag >= lower
    if upper is not None:
        keep &= mag < upper
    return delta * keep


def _prepare(read, numel: int, *, name: str, weight, density=None, gamma=None, rescale: bool = False, **_) -> dict:
    """For a large tensor (or a small one, merged whole): each model's two cuts, and with ``rescale``
    its L1 factor ‖τ‖₁ / ‖masked τ‖₁, in one more read of the inputs."""
    n = len(weight)
    params = list(zip(per_model("breadcrumbs", "density", density, n, 1.0),
                      per_model("breadcrumbs", "gamma", gamma, n, MODEL_PARAMS["gamma"])))

    def pieces():
        for models, base in read():
            yield torch.stack([(m - base).abs().reshape(-1) for m in models])

    cuts = _cuts(pieces, numel, params)
    if not rescale:
        return {"cuts": cuts}
    norms = torch.zeros(n, 2, dtype=torch.float64)
    for models, base in read():
        for i, c in enumerate(cuts):
            if c is not None:
                delta = models[i] - base
                norms[i, 0] += delta.abs().sum(dtype=torch.float64)
                norms[i, 1] += cut(delta, *c).abs().sum(dtype=torch.float64)
    return {"cuts": cuts, "l1_factors": [None if c is None else l1_factor(float(norms[i, 0]), float(norms[i, 1]))
                                         for i, c in enumerate(cuts)]}


def _masked(tensors, base, name, weight, density, gamma, rescale, cuts, l1_factors):
    """The masked task vectors (models, *shape) and the weights; a tensor merged whole finds its own cuts."""
    if cuts is None:
        prepared = _prepare(lambda: iter([(tensors, base)]), base.numel(), name=name, weight=weight, density=density,
                            gamma=gamma, rescale=rescale)
        cuts, l1_factors = prepared["cuts"], prepared.get("l1_factors")
    deltas = task_vectors(tensors, base)
    factors = l1_factors if l1_factors is not None else [None] * len(deltas)
    masked = [d if c is None else cut(d, *c) * (1.0 if f is None else f) for d, c, f in zip(deltas, cuts, factors)]
    return torch.stack(masked), per_model("breadcrumbs", "weight", weight, len(tensors), 1.0)


_DOC = """base + scale · Σ_i w_i τ̃_i{mask}, τ̃_i the task vector without its ``gamma`` largest and its
    smallest entries (``density`` kept).

    Parameters and defaults are mergekit's ({name} entry of merge_methods/registry.py):
    ``weight`` (per model, 1.0; mergekit requires it), ``density`` (per model, 1.0: nothing
    dropped), ``gamma`` (per model, 0.01), ``normalize`` (False), ``rescale`` (False; True
    L1-rescales each masked task vector to its norm), ``scale`` (mergekit's ``lambda``, 1.0);
    ``int8_mask`` is accepted and ignored.  ``cuts`` and ``l1_factors`` come from ``_prepare``
    when a large tensor merges piece by piece (``span`` changes nothing here).
    """


@register_merge("breadcrumbs", source="Davari & Belilovsky 2024, Model Breadcrumbs; mergekit defaults "
                "(merge_methods/registry.py, breadcrumbs)", needs_base=True, model_params=MODEL_PARAMS,
                params=gta_params(normalize=False, rescale=False), models=(1, None), prepare=_prepare)
def breadcrumbs(tensors: list[torch.Tensor], base: torch.Tensor, *, name: str, weight, density=None, gamma=None,
                normalize: bool = False, scale: float = 1.0, rescale: bool = False, int8_mask: bool = False,
                cuts: list | None = None, l1_factors: list | None = None, span=None) -> torch.Tensor:
    deltas, weights = _masked(tensors, base, name, weight, density, gamma, rescale, cuts, l1_factors)
    return combine(deltas, weights, base, normalize=normalize, scale=scale)


@register_merge("breadcrumbs_ties", source="Davari & Belilovsky 2024, Model Breadcrumbs, with TIES sign election; "
                "mergekit defaults (merge_methods/registry.py, breadcrumbs_ties)", needs_base=True,
                model_params=MODEL_PARAMS, params=gta_params(normalize=False, rescale=False), models=(1, None),
                prepare=_prepare)
def breadcrumbs_ties(tensors: list[torch.Tensor], base: torch.Tensor, *, name: str, weight, density=None, gamma=None,
                     normalize: bool = False, scale: float = 1.0, rescale: bool = False, int8_mask: bool = False,
                     cuts: list | None = None, l1_factors: list | None = None, span=None) -> torch.Tensor:
    deltas, weights = _masked(tensors, base, name, weight, density, gamma, rescale, cuts, l1_factors)
    w = torch.tensor(weights, dtype=deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))
    return combine(deltas, weights, base, normalize=normalize, scale=scale, mask=elect_sign(deltas * w))


breadcrumbs.__doc__ = _DOC.format(mask="", name="breadcrumbs")
breadcrumbs_ties.__doc__ = _DOC.format(mask=" m_i / (Σ_i w_i m_i when normalize), m_i its sign agreement",
                                       name="breadcrumbs_ties")
