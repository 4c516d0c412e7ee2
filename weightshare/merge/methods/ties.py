"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", arXiv:2306.01708).

Trim each task vector to its largest-magnitude ``density`` fraction, elect a sign per entry,
and average (disjoint merge) only the entries that agree with it: generalized task arithmetic
(``weightshare/merge/gta.py``) with magnitude sparsification and sign consensus.
"""

from __future__ import annotations

from weightshare.merge.gta import gta_parameters, register_gta
from weightshare.merge.sparsify import MAGNITUDE

__all__ = ["ties"]

ties = register_gta(
    "ties", source="Yadav et al. 2023, TIES-Merging; mergekit defaults (merge_methods/registry.py, ties)",
    sparsification=MAGNITUDE, consensus=True, parameters=gta_parameters(normalize=True, rescale=False),
    doc="""base + scale · Σ_i w_i τ̂_i m_i / Σ_i w_i m_i, τ̂_i the trimmed task vector, m_i its sign agreement.

    Parameters and defaults are mergekit's (merge_methods/registry.py, ``ties`` entry:
    magnitude sparsification, ``ConsensusMethod.sum``; generalized_task_arithmetic.py
    ``GeneralizedTaskArithmeticMerge.parameters`` / ``tensor_parameters``):

    - ``weight`` (per model, default 1.0): mergekit requires it (no default).
    - ``density`` (per model, default **1.0**): fraction kept by magnitude.  At 1 nothing is
      trimmed but the signs are still elected.
    - ``normalize`` (default **True**): divide, entry by entry, by the summed weights of the
      models that agree with the elected sign (not by Σ w_i).
    - ``scale`` (default 1.0): mergekit's ``lambda``.
    - ``rescale`` (default False): L1-rescale each trimmed task vector to its original norm.
    - ``int8_mask`` (default False): accepted and ignored (it only sets mergekit's mask dtype).

    The sign is elected on the *weighted* trimmed deltas w_i τ̂_i, as mergekit does.
    ``prepared`` (the whole tensor's trim thresholds and L1 factors) and ``span`` merge a large
    tensor piece by piece (``weightshare.merge.sparsify.MAGNITUDE``).
    """)
