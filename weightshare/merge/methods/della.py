"""DELLA (Deep, Bhardwaj & Chen 2024, "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling", arXiv:2406.11617).

DARE with keep probabilities that grow with magnitude: in each row of a task vector the
entries are ranked by |δ| and kept with probability from ``density − epsilon`` (smallest) to
``density + epsilon`` (largest), linearly in rank, then L1-rescaled; combined with TIES's sign
election (``della``) or linearly (``della_linear``), as mergekit's two methods of those names
(merge_methods/registry.py, ``SparsificationMethod.della_magprune``; sparsify.py
``della_magprune``).

A row is what mergekit ranks in for a matrix: the entries of one output row; a 1-D tensor is
one row, and a tensor of more dimensions is ranked per slice of its first dimension (mergekit
ranks along dimension 1 there).  Ties in magnitude rank by position (mergekit's ``argsort`` is
unstable).  The masks come from DARE's ``MaskStream``, seeded by ``seed``, the tensor's name and
the model's index: with ``epsilon = 0`` DELLA is DARE draw for draw.  A large tensor merges in
pieces of whole rows (the registry's ``rows``), with the L1 norms gathered first.
"""

from __future__ import annotations

import torch

from weightshare.merge.methods.dare import MaskStream, drop_and_rescale
from weightshare.merge.registry import register_merge, row_length
from weightshare.merge.methods.task_arithmetic import GTA_MODEL_PARAMS, combine, gta_params, l1_factor, per_model, task_vectors
from weightshare.merge.methods.ties import elect_sign

__all__ = ["della", "della_linear", "keep_probabilities"]

MODEL_PARAMS = {**GTA_MODEL_PARAMS, "epsilon": 0.15}  # mergekit's default epsilon (generalized_task_arithmetic.py)


def keep_probabilities(delta: torch.Tensor, row: int, density: float, epsilon: float) -> torch.Tensor:
    """Per entry of ``delta`` (whole rows of ``row`` entries, flat), its keep probability:
    density − ε + 2ε · rank / (row − 1), rank 0 the row's smallest |δ|."""
    mags = delta.reshape(-1, row).abs()
    if row == 1:
        return torch.full_like(delta, density)
    ranks = mags.argsort(dim=1, stable=True).argsort(dim=1, stable=True).to(delta.dtype)
    return ((density - epsilon) + ranks * (2 * epsilon / (row - 1))).reshape(delta.shape)


def _kept(delta, density, epsilon, uniform, row, factor=None, rescale=True):
    if density >= 1:
        return delta
    return drop_and_rescale(delta, keep_probabilities(delta, row, density, epsilon), uniform, rescale=rescale,
                            factor=factor)


def _prepare(read, numel: int, *, name: str, shape, weight, density=None, epsilon=None, seed: int = 0,
             rescale: bool = True, **_) -> dict:
    """For a large tensor, read in pieces of whole rows: the mask streams, and with ``rescale`` each
    model's L1 factor ‖δ‖₁ / ‖kept δ‖₁ of the whole tensor."""
    n = len(weight)
    densities = per_model("della", "density", density, n, 1.0)
    epsilons = per_model("della", "epsilon", epsilon, n, MODEL_PARAMS["epsilon"])
    row = row_length(shape)
    masks = [MaskStream(seed, name, i) if p < 1 else None for i, p in enumerate(densities)]
    if not rescale:
        return {"masks": masks, "row": row}
    norms = torch.zeros(n, 2, dtype=torch.float64)
    start = 0
    for models, base in read():
        stop = start + base.numel()
        for i, m in enumerate(masks):
            if m is not None:
                delta = models[i] - base
                kept = _kept(delta, densities[i], epsilons[i], m.uniform(start, stop), row, rescale=False)
                norms[i, 0] += delta.abs().sum(dtype=torch.float64)
                norms[i, 1] += kept.abs().sum(dtype=torch.float64)
        start = stop
    factors = [None if m is None else l1_factor(float(norms[i, 0]), float(norms[i, 1])) for i, m in enumerate(masks)]
    return {"masks": masks, "row": row, "l1_factors": factors}


def _sampled(tensors, base, name, weight, density, epsilon, seed, rescale, masks, row, l1_factors, span):
    n = len(tensors)
    weights = per_model("della", "weight", weight, n, 1.0)
    densities = per_model("della", "density", density, n, 1.0)
    epsilons = per_model("della", "epsilon", epsilon, n, MODEL_PARAMS["epsilon"])
    deltas = task_vectors(tensors, base)
    start, stop = span if span is not None else (0, deltas[0].numel())
    row = row_length(base.shape) if row is None else row
    masks = masks or [MaskStream(seed, name, i) for i in range(n)]
    factors = l1_factors or [None] * n
    return torch.stack([_kept(d, p, e, None if p >= 1 else masks[i].uniform(start, stop), row, factors[i], rescale)
                        for i, (d, p, e) in enumerate(zip(deltas, densities, epsilons))]), weights


_DOC = """base + scale · Σ_i w_i DELLA(θ_i − base){mask}.

    Parameters and defaults are mergekit's ({name} entry of merge_methods/registry.py), plus
    ``seed``: ``weight`` (per model, 1.0; mergekit requires it), ``density`` (per model, 1.0:
    nothing dropped; the mean keep probability), ``epsilon`` (per model, 0.15; density ± epsilon
    must lie in (0, 1)), ``normalize`` ({normalize}), ``rescale`` (True: L1-rescale each sampled
    task vector to its norm), ``scale`` (mergekit's ``lambda``, 1.0), ``int8_mask`` (accepted,
    ignored), ``seed`` (0; with the tensor's name and the model's index it seeds the masks).
    ``masks``, ``row`` and ``l1_factors`` come from ``_prepare`` when a large tensor merges in
    pieces of whole rows, ``span`` being the piece's place in the flattened tensor.
    """


@register_merge("della", source="Deep et al. 2024, DELLA-Merging; mergekit defaults (merge_methods/registry.py, della)",
                needs_base=True, model_params=MODEL_PARAMS, params={**gta_params(normalize=True, rescale=True), "seed": 0},
                models=(1, None), prepare=_prepare, rows=True)
def della(tensors: list[torch.Tensor], base: torch.Tensor, *, name: str, weight, density=None, epsilon=None,
          normalize: bool = True, scale: float = 1.0, rescale: bool = True, int8_mask: bool = False, seed: int = 0,
          masks: list | None = None, row: int | None = None, l1_factors: list | None = None,
          span: tuple[int, int] | None = None) -> torch.Tensor:
    deltas, weights = _sampled(tensors, base, name, weight, density, epsilon, seed, rescale, masks, row, l1_factors,
                               span)
    w = torch.tensor(weights, dtype=deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))
    return combine(deltas, weights, base, normalize=normalize, scale=scale, mask=elect_sign(deltas * w))


@register_merge("della_linear", source="Deep et al. 2024, DELLA-Merging, linear; mergekit defaults "
                "(merge_methods/registry.py, della_linear)", needs_base=True, model_params=MODEL_PARAMS,
                params={**gta_params(normalize=False, rescale=True), "seed": 0}, models=(1, None), prepare=_prepare,
                rows=True)
def della_linear(tensors: list[torch.Tensor], base: torch.Tensor, *, name: str, weight, density=None, epsilon=None,
                 normalize: bool = False, scale: float = 1.0, rescale: bool = True, int8_mask: bool = False,
                 seed: int = 0, masks: list | None = None, row: int | None = None, l1_factors: list | None = None,
                 span: tuple[int, int] | None = None) -> torch.Tensor:
    deltas, weights = _sampled(tensors, base, name, weight, density, epsilon, seed, rescale, masks, row, l1_factors,
                               span)
    return combine(deltas, weights, base, normalize=normalize, scale=scale)


della.__doc__ = _DOC.format(mask=" m_i, m_i where model i agrees with the elected sign (÷ Σ_i w_i m_i)",
                            name="della", normalize="True")
della_linear.__doc__ = _DOC.format(mask="", name="della_linear", normalize="False")
