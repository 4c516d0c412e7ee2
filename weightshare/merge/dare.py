"""DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch", arXiv:2311.03099): Drop And REscale.

Each task-vector entry is dropped with probability 1 − density and the kept ones are
rescaled, then the task vectors are combined linearly (``dare_linear``) or with TIES's
sign election (``dare_ties``).

The masks are drawn from a ``torch.Generator`` seeded by a SHA-256 of ``seed``, the
tensor's name and the model's index, so a tensor's result depends on neither the order
tensors are merged in nor the process (mergekit draws from the global torch RNG, so its
masks depend on both, and its numbers cannot be reproduced draw for draw).
"""

from __future__ import annotations

import hashlib

import torch

from weightshare.merge.registry import register_merge
from weightshare.merge.task_arithmetic import GTA_MODEL_PARAMS, combine, gta_params, per_model, rescale_l1, task_vectors
from weightshare.merge.ties import elect_sign

__all__ = ["dare_linear", "dare_ties", "drop_and_rescale", "mask_generator"]


def mask_generator(seed: int, name: str, model: int) -> torch.Generator:
    """A CPU generator seeded from ``seed``, the tensor ``name`` and the ``model``'s index alone
    (hashlib, not ``hash()``, which is salted per process).  Four bytes of the digest: torch's
    CPU generator (mt19937) reads only the low 32 bits of a seed anyway."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}\x00{int(model)}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:4], "little"))
    return g


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator, *,
                     rescale: bool = True) -> torch.Tensor:
    """``delta`` with each entry kept with probability ``density``, then (``rescale``) scaled back
    to its original L1 norm.

    As mergekit/sparsify.py ``bernoulli``: ``density >= 1`` returns ``delta`` untouched, and
    the rescale is ``rescaled_masked_tensor(..., RescaleNorm.l1)`` — kept · ||δ||₁ / ||kept||₁,
    the paper's 1/density in expectation (mergekit switched to it in PR #245).
    """
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    masked = delta * keep.to(device=delta.device, dtype=delta.dtype)
    return rescale_l1(delta, masked) if rescale else masked


def _dropped(tensors, base, name, weight, density, seed, rescale, method):
    n = len(tensors)
    weights = per_model(method, "weight", weight, n, 1.0)
    densities = per_model(method, "density", density, n, 1.0)
    # one generator per (tensor, model): a mask never depends on the other models or their densities
    deltas = torch.stack([drop_and_rescale(d, p, mask_generator(seed, name, i), rescale=rescale)
                          for i, (d, p) in enumerate(zip(task_vectors(tensors, base), densities))])
    return deltas, weights


@register_merge("dare_linear", source="Yu et al. 2024, Language Models are Super Mario (DARE); "
                "mergekit defaults (merge_methods/registry.py, dare_linear)",
                needs_base=True, model_params=GTA_MODEL_PARAMS,
                params={**gta_params(normalize=False, rescale=True), "seed": 0}, models=(1, None))
def dare_linear(tensors: list[torch.Tensor], base: torch.Tensor, *, name: str, weight, density=None,
                normalize: bool = False, scale: float = 1.0, rescale: bool = True, int8_mask: bool = False,
                seed: int = 0) -> torch.Tensor:
    """base + scale · Σ_i w_i DARE(θ_i − base), divided by Σ_i w_i when ``normalize``.

    Parameters and defaults are mergekit's (merge_methods/registry.py, ``dare_linear`` entry:
    ``SparsificationMethod.random``, no consensus, ``default_normalize=False``,
    ``default_rescale=True``; generalized_task_arithmetic.py
    ``GeneralizedTaskArithmeticMerge.parameters`` / ``tensor_parameters``), plus ``seed``:

    - ``weight`` (per model, default 1.0): mergekit requires it (no default).
    - ``density`` (per model, default **1.0**, i.e. nothing dropped): probability of keeping an entry.
    - ``normalize`` (default **False**): divide by Σ w_i (|Σ w| < 1e-8 is taken as 1).
    - ``rescale`` (default **True**): L1-rescale each dropped task vector to its original norm.
    - ``scale`` (default 1.0): mergekit's ``lambda``.
    - ``int8_mask`` (default False): accepted and ignored (mask storage only).
    - ``seed`` (default 0): ours; with the tensor name and model index it seeds the masks.
    """
    deltas, weights = _dropped(tensors, base, name, weight, density, seed, rescale, "dare_linear")
    return combine(deltas, weights, base, normalize=normalize, scale=scale)


@register_merge("dare_ties", source="Yu et al. 2024, Language Models are Super Mario (DARE) with TIES sign election; "
                "mergekit defaults (merge_methods/registry.py, dare_ties)",
                needs_base=True, model_params=GTA_MODEL_PARAMS,
                params={**gta_params(normalize=False, rescale=True), "seed": 0}, models=(1, None))
def dare_ties(tensors: list[torch.Tensor], base: torch.Tensor, *, name: str, weight, density=None,
              normalize: bool = False, scale: float = 1.0, rescale: bool = True, int8_mask: bool = False,
              seed: int = 0) -> torch.Tensor:
    """base + scale · Σ_i w_i m_i DARE(θ_i − base), m_i where model i agrees with the elected sign.

    Parameters and defaults are mergekit's (merge_methods/registry.py, ``dare_ties`` entry:
    ``SparsificationMethod.random``, ``ConsensusMethod.sum``, ``default_normalize=False``,
    ``default_rescale=True``; generalized_task_arithmetic.py
    ``GeneralizedTaskArithmeticMerge.parameters`` / ``tensor_parameters``), plus ``seed``:

    - ``weight`` (per model, default 1.0): mergekit requires it (no default).
    - ``density`` (per model, default **1.0**, i.e. nothing dropped): probability of keeping an entry.
    - ``normalize`` (default **False**, unlike ``ties``): divide, entry by entry, by the summed
      weights of the models agreeing with the elected sign.
    - ``rescale`` (default **True**): L1-rescale each dropped task vector to its original norm.
    - ``scale`` (default 1.0): mergekit's ``lambda``.
    - ``int8_mask`` (default False): accepted and ignored (mask storage only).
    - ``seed`` (default 0): ours; with the tensor name and model index it seeds the masks.

    The sign is elected on the weighted dropped deltas, by total mass (``elect_sign``, "sum").
    """
    deltas, weights = _dropped(tensors, base, name, weight, density, seed, rescale, "dare_ties")
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * (deltas.dim() - 1)))
    return combine(deltas, weights, base, normalize=normalize, scale=scale, mask=elect_sign(deltas * w))
