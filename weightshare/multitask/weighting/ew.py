"""EW, equal weighting: the gradient of the summed losses.

As an aggregator, ``G.sum(0)``.  ``fit`` trains EW as the unit weighting of the losses instead:
the same direction from one backward pass, not one per task."""

from __future__ import annotations

import torch

from weightshare.multitask.weighting.base import LossWeighting, Step, register_method


class EqualWeights(LossWeighting):
    """Every task's loss counts once: the total is Σ_t L_t."""

    def weights(self, step: Step) -> torch.Tensor:
        return torch.ones(self.num_tasks)


@register_method("ew", "gradient", "equal weighting: the gradient of the summed losses", weighting=EqualWeights)
def ew(G: torch.Tensor) -> torch.Tensor:
    return G.sum(0)
