"""RLW (Lin et al. 2021): random loss weighting, new random task weights at every step."""

from __future__ import annotations

import torch

from weightshare.multitask.weighting.base import LossWeighting, Step, register_method


def rlw(num_tasks: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random task weights that sum to the number of tasks, drawn anew each step."""
    if num_tasks < 1:
        raise ValueError(f"rlw: num_tasks\n  expected: >= 1\n  got: {num_tasks}")
    return num_tasks * torch.softmax(torch.randn(num_tasks, generator=generator), dim=0)


@register_method("rlw", "loss", "Lin et al. 2021, random loss weighting: softmax of normal samples each step")
class RandomLossWeighting(LossWeighting):
    """``rlw`` drawn from the run's own generator: the same weights on every process."""

    def weights(self, step: Step) -> torch.Tensor:
        return rlw(self.num_tasks, self.generator)
