"""DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch", arXiv:2311.03099): Drop And REscale.

Each task-vector entry is dropped with probability 1 − density and the kept ones are
rescaled, then the task vectors are combined linearly (``dare_linear``) or with TIES's
sign election (``dare_ties``).

The masks are drawn from a ``torch.Generator`` seeded by a SHA-256 of ``seed``, the
tensor's name and the model's index, so a tensor's result depends on neither the order
tensors are merged in nor the process (mergekit draws from the global torch RNG, so its
masks depend on both, and its numbers cannot be reproduced draw for draw).

A large tensor merges piece by piece (``streaming.merge``): ``MaskStream`` hands out the
mask's uniform draws a span at a time, the same numbers as the whole draw, and with the L1
rescale ``_prepare`` first gathers each model's ‖δ‖₁ and ‖kept δ‖₁ over the whole tensor.
"""

from __future__ import annotations

import hashlib

import torch

from weightshare.merge.registry import register_merge
from weightshare.merge.methods.task_arithmetic import (GTA_MODEL_PARAMS, combine, gta_params, l1_factor, per_model, rescale_l1,
                                               task_vectors)
from weightshare.merge.methods.ties import elect_sign

__all__ = ["dare_linear", "dare_ties", "drop_and_rescale", "mask_generator", "MaskStream"]

_SKIP = 1 << 20  # draws discarded per call when a stream skips ahead: bounds the throwaway buffer to 4 MB


def mask_generator(seed: int, name: str, model: int) -> torch.Generator:
    """A CPU generator seeded from ``seed``, the tensor ``name`` and the ``model``'s index alone
    (hashlib, not ``hash()``, which is salted per process).  Four bytes of the digest: torch's
    CPU generator (mt19937) reads only the low 32 bits of a seed anyway."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}\x00{int(model)}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:4], "little"))
    return g


class MaskStream:
    """The uniform draws behind one (tensor, model) DARE mask, a span of the flattened tensor at a time.

    Entry k of the tensor gets draw k of ``mask_generator(seed, name, model)``, so the whole
    span is exactly ``torch.rand(shape, generator=mask_generator(seed, name, model))``.  A CPU
    generator's draws go on where its last call stopped, so the stream keeps one generator and
    its position: the next span is drawn straight on, and any other span re-seeds (when it lies
    behind) and draws up to its start, so the draws never depend on the order spans are asked for.
    """

    def __init__(self, seed: int, name: str, model: int):
        self.seed, self.name, self.model = seed, name, model
        self._generator: torch.Generator | None = None
        self._position = 0

    def uniform(self, start: int, stop: int) -> torch.Tensor:
        """Draws ``start`` to ``stop`` (flat entries [start, stop) of the tensor), as a 1-D tensor."""
        if not 0 <= start <= stop:
            raise ValueError(f"MaskStream.uniform: span\n  expected: 0 <= start <= stop\n  got: ({start}, {stop})")
        if self._generator is None or start < self._position:
            self._generator, self._position = mask_generator(self.seed, self.name, self.model), 0
        while self._position < start:
            skip = min(start - self._position, _SKIP)
            torch.rand(skip, generator=self._generator)
            self._position += skip
        self._position = stop
        return torch.rand(stop - start, generator=self._generator)


def drop_and_rescale(delta: torch.Tensor, density: float, uniform: torch.Tensor, *, rescale: bool = True,
                     factor: float | None = None) -> torch.Tensor:
    """``delta`` with each entry kept where its ``uniform`` draw (same number of entries) is below
    ``density``, then (``rescale``) scaled back to its original L1 norm.

    As mergekit/sparsify.py ``bernoulli``: ``density >= 1`` returns ``delta`` untouched, and
    the rescale is ``rescaled_masked_tensor(..., RescaleNorm.l1)`` — kept · ||δ||₁ / ||kept||₁,
    the paper's 1/density in expectation (mergekit switched to it in PR #245).  When ``delta``
    is a piece of a tensor, ``factor`` is that L1 factor for the whole tensor (``_prepare``).
    """
    if not isinstance(density, torch.Tensor) and density >= 1:
        return delta
    keep = uniform.view(delta.shape) < density  # a tensor density: one keep probability per entry (DELLA)
    masked = delta * keep.to(device=delta.device, dtype=delta.dtype)
    if not rescale:
        return masked
    return rescale_l1(delta, masked) if factor is None else masked * factor


def _prepare(read, numel: int, *, name: str, weight, density=None, seed: int = 0, rescale: bool = True,
             **_) -> dict:
    """For a large tensor: a mask stream per model, kept across the pieces so that each piece's draws
    go straight on from the last, and with ``rescale`` each model's L1 factor ‖δ‖₁ / ‖kept δ‖₁ of the
    whole tensor, gathered in one read of the inputs (drawing the masks once more; the merge's
    first piece then re-seeds the streams)."""
    densities = per_model("dare", "density", density, len(weight), 1.0)
    masks = [MaskStream(seed, name, i) if p < 1 else None for i, p in enumerate(densities)]
    if not rescale:
        return {"masks": masks}
    dropped = [i for i, p in enumerate(densities) if p < 1]
    norms = torch.zeros(len(dropped), 2, dtype=torch.float64)  # ‖δ‖₁ and ‖kept δ‖₁, per dropped model
    start = 0
    for models, base in read():
        stop = start + base.numel()
        for j, i in enumerate(dropped):
            delta = models[i] - base
            kept = drop_and_rescale(delta, densities[i], masks[i].uniform(start, stop), rescale=False)
            norms[j, 0] += delta.abs().sum(dtype=torch.float64)
            norms[j, 1] += kept.abs().sum(dtype=torch.float64)
        start = stop
    l1_factors: list = [None] * len(densities)
    for j, i in enumerate(dropped):
        l1_factors[i] = l1_factor(float(norms[j, 0]), float(norms[j, 1]))
    return {"masks": masks, "l1_factors": l1_factors}


def _dropped(tensors, base, name, weight, density, seed, rescale, method, masks, l1_factors, span):
    n = len(tensors)
    weights = per_model(method, "weight", weight, n, 1.0)
    densities = per_model(method, "density", density, n, 1.0)
    deltas = task_vectors(tensors, base)
    start, stop = span if span is not None else (0, deltas[0].numel())
    if masks is None:  # one stream per (tensor, model): a mask never depends on the other models or their densities
        masks = [MaskStream(seed, name, i) for i in range(n)]
    dropped = [d if p >= 1 else drop_and_rescale(d, p, masks[i].uniform(start, stop), rescale=rescale,
                                                   factor=None if l1_factors is None else l1_factors[i])
               for i, (d, p) in enumerate(zip(deltas, densities))]
    return torch.stack(dropped), weights


@register_merge("dare_linear", source="Yu et al. 2024, Language Models are Super Mario (DARE); "
                "mergekit defaults (merge_methods/registry.py, dare_linear)",
                needs_base=True, model_params=GTA_MODEL_PARAMS,
                params={**gta_params(normalize=False, rescale=True), "seed": 0}, models=(1, None), prepare=_prepare)
def dare_linear(tensors: list[torch.Tensor], base: torch.Tensor, *, name: str, weight, density=None,
                normalize: bool = False, scale: float = 1.0, rescale: bool = True, int8_mask: bool = False,
                seed: int = 0, masks: list | None = None, l1_factors: list | None = None,
                span: tuple[int, int] | None = None) -> torch.Tensor:
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

    ``masks``, ``l1_factors`` (one per model, from ``_prepare``) and ``span`` (where ``tensors`` lie
    in the flattened tensor) merge a large tensor piece by piece, with the whole merge's result.
    """
    deltas, weights = _dropped(tensors, base, name, weight, density, seed, rescale, "dare_linear",
                               masks, l1_factors, span)
    return combine(deltas, weights, base, normalize=normalize, scale=scale)


@register_merge("dare_ties", source="Yu et al. 2024, Language Models are Super Mario (DARE) with TIES sign election; "
                "mergekit defaults (merge_methods/registry.py, dare_ties)",
                needs_base=True, model_params=GTA_MODEL_PARAMS,
                params={**gta_params(normalize=False, rescale=True), "seed": 0}, models=(1, None), prepare=_prepare)
def dare_ties(tensors: list[torch.Tensor], base: torch.Tensor, *, name: str, weight, density=None,
              normalize: bool = False, scale: float = 1.0, rescale: bool = True, int8_mask: bool = False,
              seed: int = 0, masks: list | None = None, l1_factors: list | None = None,
              span: tuple[int, int] | None = None) -> torch.Tensor:
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
    ``masks``, ``l1_factors`` and ``span``: as ``dare_linear``'s.
    """
    deltas, weights = _dropped(tensors, base, name, weight, density, seed, rescale, "dare_ties",
                               masks, l1_factors, span)
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * (deltas.dim() - 1)))
    return combine(deltas, weights, base, normalize=normalize, scale=scale, mask=elect_sign(deltas * w))
