"""Model Breadcrumbs (Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model
Merging with Sparse Masks", arXiv:2312.06795).

Each task vector loses its largest-magnitude ``gamma`` fraction (outliers, which the paper
finds hurt a merge) and then its smallest entries, down to ``density`` of the tensor; the
masked task vectors are combined linearly (``breadcrumbs``) or with TIES's sign election
(``breadcrumbs_ties``), as mergekit's two methods of those names do
(merge_methods/registry.py, ``SparsificationMethod.magnitude_outliers``).  Generalized task
arithmetic (``weightshare/merge/gta.py``) with the magnitude band sparsification
(``weightshare.merge.sparsify.BAND``: how it counts, and where it differs from mergekit).

Parameters and defaults are mergekit's (the ``breadcrumbs`` / ``breadcrumbs_ties`` entries of
merge_methods/registry.py): ``weight`` (per model, 1.0; mergekit requires it), ``density``
(per model, 1.0: nothing dropped), ``gamma`` (per model, 0.01), ``normalize`` (False),
``rescale`` (False; True L1-rescales each masked task vector to its norm), ``scale``
(mergekit's ``lambda``, 1.0); ``int8_mask`` is accepted and ignored.
"""

from __future__ import annotations

from weightshare.merge.gta import gta_parameters, register_gta
from weightshare.merge.registry import Param, interval
from weightshare.merge.sparsify import BAND

__all__ = ["breadcrumbs", "breadcrumbs_ties"]

# the fraction of largest-magnitude entries dropped; 0.01 is mergekit's default (generalized_task_arithmetic.py)
GAMMA = Param("gamma", 0.01, per_model=True, rule=interval("[0, 1)"))

breadcrumbs = register_gta(
    "breadcrumbs", source="Davari & Belilovsky 2024, Model Breadcrumbs; mergekit defaults "
    "(merge_methods/registry.py, breadcrumbs)",
    sparsification=BAND, consensus=False, parameters=(*gta_parameters(normalize=False, rescale=False), GAMMA),
    doc="""base + scale · Σ_i w_i τ̃_i, τ̃_i the task vector without its ``gamma`` largest and its smallest
    entries (``density`` kept); parameters: see the module.""")

breadcrumbs_ties = register_gta(
    "breadcrumbs_ties", source="Davari & Belilovsky 2024, Model Breadcrumbs, with TIES sign election; "
    "mergekit defaults (merge_methods/registry.py, breadcrumbs_ties)",
    sparsification=BAND, consensus=True, parameters=(*gta_parameters(normalize=False, rescale=False), GAMMA),
    doc="""base + scale · Σ_i w_i τ̃_i m_i / (Σ_i w_i m_i when normalize), τ̃_i the task vector without its
    ``gamma`` largest and its smallest entries (``density`` kept), m_i its sign agreement; parameters:
    see the module.""")
