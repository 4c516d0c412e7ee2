"""Training with shared parameters: the training loop, and the multi-task weighting methods.

``METHODS`` is the one registry of weighting methods, one file each in ``weighting/``;
gradient aggregators are called as ``aggregate(name, G, **params)`` with ``G`` a
(tasks, params) tensor, loss weighting methods are ``LossWeighting`` subclasses.
"""

from weightshare.multitask.models import CrossStitch, MMoE, MultiTaskModel
from weightshare.multitask.trainer import (
                                          IGNORE,
                                          FitResult,
                                          TrainConfig,
                                          TrainResult,
                                          delta_p,
                                          error_rate,
                                          evaluate,
                                          fit,
                                          make_optimizer,
                                          train,
)
from weightshare.multitask.weighting import METHODS, LossWeighting, Method, Step, aggregate, register_method

__all__ = ["IGNORE", "METHODS", "CrossStitch", "evaluate", "FitResult", "LossWeighting", "MMoE", "Method",
           "MultiTaskModel", "Step", "TrainConfig", "delta_p", "fit", "TrainResult", "aggregate", "error_rate",
           "make_optimizer", "register_method", "train"]
