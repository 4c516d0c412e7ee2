"""Training with shared parameters: the training loop, and the multi-task weighting methods.

``METHODS`` is the one registry of weighting methods; gradient aggregators are
called as ``aggregate(name, G, **params)`` with ``G`` a (tasks, params) tensor.
"""

from weightshare.multitask.aggregators import METHODS, Method, aggregate, register_method
from weightshare.multitask import loss_weighting  # noqa: F401  (registers the loss weighting methods)
from weightshare.multitask.models import MMoE, CrossStitch, MultiTaskModel
from weightshare.multitask.trainer import (IGNORE, FitResult, TrainConfig, TrainResult, delta_p, error_rate, evaluate, fit,
                                          make_optimizer, train)

__all__ = ["IGNORE", "METHODS", "CrossStitch", "evaluate", "FitResult", "MMoE", "Method", "MultiTaskModel", "TrainConfig", "delta_p", "fit", "TrainResult", "aggregate", "error_rate", "make_optimizer",
           "register_method", "train"]
