"""Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089).

θ = base + λ · Σ_i w_i (θ_i − base): add the weighted task vectors to the base.  The plainest
generalized task arithmetic (``weightshare/merge/gta.py``): no sparsification, no consensus.
"""

from __future__ import annotations

from weightshare.merge.gta import gta_parameters, register_gta
from weightshare.merge.sparsify import NONE

__all__ = ["task_arithmetic"]

task_arithmetic = register_gta(
    "task_arithmetic", source="Ilharco et al. 2023, Editing Models with Task Arithmetic; "
    "mergekit defaults (merge_methods/registry.py, task_arithmetic)",
    sparsification=NONE, consensus=False, parameters=gta_parameters(normalize=False, rescale=False),
    doc="""base + scale · Σ_i w_i (θ_i − base), divided by Σ_i w_i when ``normalize``.

    Parameters and defaults are mergekit's (merge_methods/generalized_task_arithmetic.py,
    ``GeneralizedTaskArithmeticMerge.parameters`` / ``tensor_parameters``, and the
    ``task_arithmetic`` entry of merge_methods/registry.py):

    - ``weight`` (per model, default 1.0): mergekit requires it (no default).
    - ``density`` (per model, default 1.0): accepted and ignored — task arithmetic does not sparsify.
    - ``normalize`` (default **False**): divide by Σ w_i (a sum with |Σ w| < 1e-8 is taken as 1).
    - ``scale`` (default 1.0): mergekit's ``lambda`` (a Python keyword, hence the rename).
    - ``rescale`` (default False), ``int8_mask`` (default False): accepted and ignored, as in mergekit.
    """)
