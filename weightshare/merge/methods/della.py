"""DELLA (Deep, Bhardwaj & Chen 2024, "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling", arXiv:2406.11617).

DARE with keep probabilities that grow with magnitude: in each row of a task vector the
entries are ranked by |δ| and kept with probability from ``density − epsilon`` (smallest) to
``density + epsilon`` (largest), linearly in rank, then L1-rescaled; combined with TIES's sign
election (``della``) or linearly (``della_linear``), as mergekit's two methods of those names
(merge_methods/registry.py, ``SparsificationMethod.della_magprune``; sparsify.py
``della_magprune``).  Generalized task arithmetic (``weightshare/merge/gta.py``) with
magnitude-ranked sparsification (``weightshare.merge.sparsify.MAGNITUDE_RANKED``: what a row is,
and how ties rank); with ``epsilon = 0`` DELLA is DARE draw for draw.  A large tensor merges in
pieces of whole rows, with the L1 norms gathered first.

Parameters and defaults are mergekit's (the ``della`` / ``della_linear`` entries of
merge_methods/registry.py), plus ``seed``: ``weight`` (per model, 1.0; mergekit requires it),
``density`` (per model, 1.0: nothing dropped; the mean keep probability), ``epsilon`` (per model,
0.15; density ± epsilon must lie in (0, 1)), ``normalize`` (``della`` True, ``della_linear``
False), ``rescale`` (True: L1-rescale each sampled task vector to its norm), ``scale``
(mergekit's ``lambda``, 1.0), ``int8_mask`` (accepted, ignored), ``seed`` (0; with the tensor's
name and the model's index it seeds the masks).
"""

from __future__ import annotations

from weightshare.merge.gta import SEED, gta_parameters, register_gta
from weightshare.merge.registry import Param, interval, is_number
from weightshare.merge.sparsify import MAGNITUDE_RANKED

__all__ = ["della", "della_linear", "keep_probabilities_in_range"]

# the spread of keep probabilities around density; 0.15 is mergekit's default (generalized_task_arithmetic.py)
EPSILON = Param("epsilon", 0.15, per_model=True, rule=interval("[0, 1)"))


def keep_probabilities_in_range(values: dict[str, list]) -> list[str]:
    """DELLA's keep probabilities, density ± epsilon, must be probabilities: every density a setting
    can give with every epsilon (a stricter check than per tensor, never a looser one)."""
    bad = {(d, e) for d in values.get("density", []) for e in values.get("epsilon", [])
           if is_number(d) and is_number(e) and 0 < d < 1 and 0 <= e < 1 and not (0 < d - e and d + e < 1)}
    return [f"density ± epsilon must lie in (0, 1); got density {d!r} with epsilon {e!r}" for d, e in sorted(bad)]


della = register_gta(
    "della", source="Deep et al. 2024, DELLA-Merging; mergekit defaults (merge_methods/registry.py, della)",
    sparsification=MAGNITUDE_RANKED, consensus=True,
    parameters=(*gta_parameters(normalize=True, rescale=True), EPSILON, SEED), check=keep_probabilities_in_range,
    doc="""base + scale · Σ_i w_i DELLA(θ_i − base) m_i, m_i where model i agrees with the elected sign
    (÷ Σ_i w_i m_i); parameters: see the module.""")

della_linear = register_gta(
    "della_linear", source="Deep et al. 2024, DELLA-Merging, linear; mergekit defaults "
    "(merge_methods/registry.py, della_linear)",
    sparsification=MAGNITUDE_RANKED, consensus=False,
    parameters=(*gta_parameters(normalize=False, rescale=True), EPSILON, SEED), check=keep_probabilities_in_range,
    doc="""base + scale · Σ_i w_i DELLA(θ_i − base); parameters: see the module.""")
