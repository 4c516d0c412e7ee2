"""GradNorm (Chen et al. 2018): task weights that balance the tasks' gradient norms at the last shared layer."""

from __future__ import annotations

import torch

from weightshare.multitask.weighting.base import LossWeighting, Step, register_method


def gradnorm(weights: torch.Tensor, grad_norms: torch.Tensor, loss_ratios: torch.Tensor, alpha: float = 1.5,
             lr: float = 0.025) -> torch.Tensor:
    """One update of the task weights towards balanced gradient norms; returns the new weights.

    ``grad_norms``: ||∇_W L_t|| of the last shared layer's weight W for each task (unweighted);
    ``loss_ratios``: L_t(now) / L_t(step 0).  The weighted norms G_t = w_t ||∇L_t|| are moved
    towards the target mean(G) · (r_t / mean r)^alpha by a gradient step on Σ_t |G_t - target_t|
    (the target held constant, as in the paper), then renormalised to sum to the number of tasks.
    """
    g = weights * grad_norms
    target = g.mean() * (loss_ratios / loss_ratios.mean()) ** alpha
    step = torch.sign(g - target) * grad_norms  # d/dw_t of |w_t ||∇L_t|| - target_t|
    new = (weights - lr * step).clamp(min=1e-6)
    return new * (len(new) / new.sum())


@register_method("gradnorm", "loss", "Chen et al. 2018, GradNorm (alpha 1.5)")
class GradNormWeighting(LossWeighting):
    """One ``gradnorm`` update of the weights per step, from unit weights; the loss ratios are to the first step's."""

    def __init__(self, num_tasks: int, generator: torch.Generator, alpha: float = 1.5, lr: float = 0.025):
        super().__init__(num_tasks, generator)
        self.alpha, self.lr = alpha, lr
        self.current = torch.ones(num_tasks)
        self.first: torch.Tensor | None = None

    def weights(self, step: Step) -> torch.Tensor:
        if self.first is None:
            self.first = step.mean_losses.clone()
        ratios = step.mean_losses / self.first.clamp(min=1e-12)
        self.current = gradnorm(self.current, step.shared_grad_norms(), ratios, self.alpha, self.lr)
        return self.current
