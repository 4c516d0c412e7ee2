"""DWA (Liu et al. 2019): dynamic weight average, more weight to a task whose loss falls more slowly."""

from __future__ import annotations

import torch

from weightshare.multitask.weighting.base import LossWeighting, Step, register_method


def dwa(history: list[torch.Tensor], temperature: float = 2.0) -> torch.Tensor:
    """Task weights for the next epoch from the mean losses of the epochs so far.

    w_t = T · softmax(r / temperature)_t with r_t = L_t(k-1) / L_t(k-2): a task whose loss
    falls more slowly weighs more.  Equal weights (all 1) for the first two epochs.
    """
    if not history:
        raise ValueError("dwa: history\n  expected: the per-epoch mean losses so far (a list, possibly empty)")
    n = history[-1].numel()
    if len(history) < 2:
        return torch.ones(n)
    ratio = history[-1] / history[-2].clamp(min=1e-12)
    return n * torch.softmax(ratio / temperature, dim=0)


@register_method("dwa", "loss", "Liu et al. 2019, dynamic weight average (temperature 2)")
class DynamicWeightAverage(LossWeighting):
    """``dwa`` over the epochs' mean training losses; the weights change once per epoch."""

    def __init__(self, num_tasks: int, generator: torch.Generator, temperature: float = 2.0):
        super().__init__(num_tasks, generator)
        self.temperature = temperature
        self.history: list[torch.Tensor] = []
        self.current = torch.ones(num_tasks)

    def on_epoch_end(self, mean_losses: torch.Tensor) -> None:
        self.history.append(mean_losses)
        self.current = dwa(self.history, self.temperature)

    def weights(self, step: Step) -> torch.Tensor:
        return self.current
