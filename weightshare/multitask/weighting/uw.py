"""UW (Kendall et al. 2018): each task weighted by its homoscedastic uncertainty, learned with the model."""

from __future__ import annotations

import torch
from torch import nn

from weightshare.multitask.weighting.base import LossWeighting, Step, register_method


def uw(losses: torch.Tensor, log_vars: torch.Tensor) -> torch.Tensor:
    """The total loss Σ_t exp(-s_t) L_t + s_t; ``log_vars`` s is a trainable (tasks,) parameter.

    Its minimum over s_t is at s_t = log L_t: each task is weighted by the inverse of its
    current loss, learned along with the model.
    """
    if losses.shape != log_vars.shape:
        raise ValueError(f"uw: losses and log_vars\n  expected: the same shape\n  got: {tuple(losses.shape)} and "
                         f"{tuple(log_vars.shape)}")
    return (torch.exp(-log_vars) * losses + log_vars).sum()


@register_method("uw", "loss", "Kendall et al. 2018, homoscedastic uncertainty: exp(-s_t) L_t + s_t, s_t learned")
class UncertaintyWeighting(LossWeighting):
    """``uw`` with the log-variances s a parameter trained with the model, from s = 0 (unit weights)."""

    def __init__(self, num_tasks: int, generator: torch.Generator):
        super().__init__(num_tasks, generator)
        self.log_vars = nn.Parameter(torch.zeros(num_tasks))

    def total_loss(self, step: Step) -> torch.Tensor:
        return uw(step.losses, self.log_vars)
