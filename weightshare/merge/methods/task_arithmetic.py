"""Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089).

θ = base + λ · Σ_i w_i (θ_i − base): add the weighted task vectors to the base.

This file also holds the machinery mergekit shares between all its "generalized
task arithmetic" methods (``task_arithmetic``, ``ties``, ``dare_linear``,
``dare_ties``): every one of them has the same parameters, with per-method
defaults, and the same last step (weighted sum of task vectors, optional
normalisation, scale by λ, add to the base).  ``ties.py`` and ``dare.py``
import it from here.
"""

from __future__ import annotations

import torch

from weightshare.merge.registry import register_merge

__all__ = ["task_arithmetic", "task_vectors", "combine", "rescale_l1", "l1_factor", "per_model"]


def per_model(method: str, key: str, values, n: int, default) -> list[float]:
    """Per-model parameter ``key`` as ``n`` floats (``default`` for each when not given)."""
    if values is None:
        return [float(default)] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{method}: {key}\n  expected: one value per model ({n})\n  got: {len(values)} values")
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
        raise ValueError(f"{method}: {key}\n  expected: numbers\n  got: {values!r}"[:300])
    return [float(v) for v in values]


def task_vectors(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """The (models, *shape) stack of task vectors θ_i − base."""
    return torch.stack([t - base for t in tensors], dim=0)


def rescale_l1(tensor: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``masked`` scaled so its L1 norm is ``tensor``'s.

    This, not 1/density, is mergekit's ``rescale: true`` (mergekit/sparsify.py,
    ``rescaled_masked_tensor`` with ``RescaleNorm.l1``, since mergekit PR #245): with a
    random mask the kept mass is ≈ density · ||tensor||₁, so it is DARE's 1/density in
    expectation, and it is also defined for magnitude pruning.  Like mergekit, a norm
    below ``eps`` (before or after masking) leaves ``masked`` unscaled.
    """
    return masked * l1_factor(tensor.abs().sum(), masked.abs().sum(), eps)


def l1_factor(before, after, eps: float = 1e-7):
    """The factor of ``rescale_l1``: ``before / after``, the L1 norms of a tensor and of its masked
    copy, or 1 where either is below ``eps``.  A merge that streams a tensor gathers the two norms
    from pieces and scales each piece by it."""
    if before < eps or after < eps:
        return 1.0
    return before / after


def combine(deltas: torch.Tensor, weights: list[float], base: torch.Tensor, *, normalize: bool, scale: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """base + scale · Σ_i w_i δ_i (over ``mask``ed entries), divided by the summed weights when ``normalize``.

    Follows mergekit/merge_methods/generalized_task_arithmetic.py, ``GTATask.execute``: the
    divisor is Σ_i w_i over the entries where model i agrees with the elected sign when there
    is a ``mask`` (a divisor of exactly 0 becomes 1), and Σ_i w_i otherwise (|Σ w| < 1e-8
    becomes 1); λ (``scale``) multiplies after the normalisation.
    """
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * w
    if mask is not None:
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if scale != 1:
        mixed = mixed * scale
    return base + mixed


# mergekit requires ``weight`` (no default); we default it to 1 (``merge(models, ...)`` without
# weights), which changes nothing for a config mergekit accepts.
# Every generalized-task-arithmetic method takes mergekit's full parameter set, so a mergekit
# config that sets e.g. ``rescale`` or ``int8_mask`` on ``task_arithmetic`` runs unchanged
# (mergekit accepts and, where the method does not sparsify, ignores them).  ``int8_mask`` only
# picks the dtype of mergekit's sign mask, never the result: accepted and ignored here.
GTA_MODEL_PARAMS = {"weight": 1.0, "density": 1.0}


def gta_params(*, normalize: bool, rescale: bool) -> dict:
    return {"int8_mask": False, "normalize": normalize, "rescale": rescale, "scale": 1.0}


@register_merge("task_arithmetic", source="Ilharco et al. 2023, Editing Models with Task Arithmetic; "
                "mergekit defaults (merge_methods/registry.py, task_arithmetic)",
                needs_base=True, model_params=GTA_MODEL_PARAMS,
                params=gta_params(normalize=False, rescale=False), models=(1, None), elementwise=True)
def task_arithmetic(tensors: list[torch.Tensor], base: torch.Tensor, *, name: str, weight, density=None,
                    normalize: bool = False, scale: float = 1.0, rescale: bool = False,
                    int8_mask: bool = False) -> torch.Tensor:
    """base + scale · Σ_i w_i (θ_i − base), divided by Σ_i w_i when ``normalize``.

    Parameters and defaults are mergekit's (merge_methods/generalized_task_arithmetic.py,
    ``GeneralizedTaskArithmeticMerge.parameters`` / ``tensor_parameters``, and the
    ``task_arithmetic`` entry of merge_methods/registry.py):

    - ``weight`` (per model, default 1.0): mergekit requires it (no default).
    - ``density`` (per model, default 1.0): accepted and ignored — task arithmetic does not sparsify.
    - ``normalize`` (default **False**): divide by Σ w_i (a sum with |Σ w| < 1e-8 is taken as 1).
    - ``scale`` (default 1.0): mergekit's ``lambda`` (a Python keyword, hence the rename).
    - ``rescale`` (default False), ``int8_mask`` (default False): accepted and ignored, as in mergekit.
    """
    weights = per_model("task_arithmetic", "weight", weight, len(tensors), 1.0)
    return combine(task_vectors(tensors, base), weights, base, normalize=normalize, scale=scale)
