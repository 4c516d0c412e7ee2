"""DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch", arXiv:2311.03099): Drop And REscale.

Each task-vector entry is dropped with probability 1 − density and the kept ones are
rescaled, then the task vectors are combined linearly (``dare_linear``) or with TIES's sign
election (``dare_ties``): generalized task arithmetic (``weightshare/merge/gta.py``) with random
sparsification (``weightshare.merge.sparsify.RANDOM``: masks seeded by ``seed``, the tensor's
name and the model's index, so reproducible and independent of tensor order).

Parameters and defaults are mergekit's (merge_methods/registry.py, ``dare_linear`` and
``dare_ties`` entries: ``SparsificationMethod.random``, ``default_normalize=False``,
``default_rescale=True``; generalized_task_arithmetic.py ``GeneralizedTaskArithmeticMerge.parameters``
/ ``tensor_parameters``), plus ``seed``:

- ``weight`` (per model, default 1.0): mergekit requires it (no default).
- ``density`` (per model, default **1.0**, i.e. nothing dropped): probability of keeping an entry.
- ``normalize`` (default **False**): ``dare_linear`` divides by Σ w_i (|Σ w| < 1e-8 is taken as 1);
  ``dare_ties`` (unlike ``ties``, whose default is True) divides, entry by entry, by the summed
  weights of the models agreeing with the elected sign.
- ``rescale`` (default **True**): L1-rescale each dropped task vector to its original norm.
- ``scale`` (default 1.0): mergekit's ``lambda``.
- ``int8_mask`` (default False): accepted and ignored (mask storage only).
- ``seed`` (default 0): ours; with the tensor name and model index it seeds the masks.

``prepared`` (the mask streams and the whole tensor's L1 factors) and ``span`` (where ``tensors``
lie in the flattened tensor) merge a large tensor piece by piece, with the whole merge's result.
"""

from __future__ import annotations

from weightshare.merge.gta import SEED, gta_parameters, register_gta
from weightshare.merge.sparsify import RANDOM

__all__ = ["dare_linear", "dare_ties"]

dare_linear = register_gta(
    "dare_linear", source="Yu et al. 2024, Language Models are Super Mario (DARE); "
    "mergekit defaults (merge_methods/registry.py, dare_linear)",
    sparsification=RANDOM, consensus=False, parameters=(*gta_parameters(normalize=False, rescale=True), SEED),
    doc="""base + scale · Σ_i w_i DARE(θ_i − base), divided by Σ_i w_i when ``normalize``; parameters:
    see the module.""")

dare_ties = register_gta(
    "dare_ties", source="Yu et al. 2024, Language Models are Super Mario (DARE) with TIES sign election; "
    "mergekit defaults (merge_methods/registry.py, dare_ties)",
    sparsification=RANDOM, consensus=True, parameters=(*gta_parameters(normalize=False, rescale=True), SEED),
    doc="""base + scale · Σ_i w_i m_i DARE(θ_i − base), m_i where model i agrees with the elected sign
    (elected on the weighted dropped deltas, by total mass, ``elect_sign``); parameters: see the module.""")
