"""Sharing that changes while the model trains, one file per way, each registered under its
``CodebookConfig.train`` name: ``recluster.py`` (codebooks re-clustered as the weights move), ``dkm.py``
(differentiable k-means) and ``soft.py`` (soft weight-sharing: a learned Gaussian-mixture prior);
``merge_layers.py`` merges alike layers of a mix basis (seed 003's merge step).
``step_`` is the one hook a training loop calls after each optimizer step and ``penalty`` the term its loss
gains (the one trainer does both itself); ``freeze_`` turns training-time sharing into the ordinary
codebooks ``ws.save`` packs."""

import importlib
import pkgutil

from weightshare.training.base import freeze_, penalty, step_, training_sharing
from weightshare.training.merge_layers import merge_layers_

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["freeze_", "merge_layers_", "penalty", "step_", "training_sharing"]
