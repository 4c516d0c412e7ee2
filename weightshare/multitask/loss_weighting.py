"""Loss weighting: how much each task's loss counts, one small pure function each.

Where a method keeps state between steps (loss history, learned log-variances,
the current weights), the state is an argument and the new state a result, so
that every function can be tested on its own and the training loop owns the
state.  Registered in ``METHODS`` with kind ``"loss"`` (equal weighting is
``"ew"``, the gradient of the summed losses, in ``aggregators.py``).
"""

from __future__ import annotations

import torch

from weightshare.multitask.aggregators import register_method

__all__ = ["uw", "dwa", "rlw", "gradnorm"]


@register_method("uw", "loss", "Kendall et al. 2018, homoscedastic uncertainty: exp(-s_t) L_t + s_t, s_t learned")
def uw(losses: torch.Tensor, log_vars: torch.Tensor) -> torch.Tensor:
    """The total loss Σ_t exp(-s_t) L_t + s_t; ``log_vars`` s is a trainable (tasks,) parameter.

    Its minimum over s_t is at s_t = log L_t: each task is weighted by the inverse of its
    current loss, learned along with the model.
    """
    if losses.shape != log_vars.shape:
        raise ValueError(f"uw: losses and log_vars\n  expected: the same shape\n  got: {tuple(losses.shape)} and "
                         f"{tuple(log_vars.shape)}")
    return (torch.exp(-log_vars) * losses + log_vars).sum()


@register_method("dwa", "loss", "Liu et al. 2019, dynamic weight average (temperature 2)")
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


@register_method("rlw", "loss", "Lin et al. 2021, random loss weighting: softmax of normal samples each step")
def rlw(num_tasks: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random task weights that sum to the number of tasks, drawn anew each step."""
    if num_tasks < 1:
        raise ValueError(f"rlw: num_tasks\n  expected: >= 1\n  got: {num_tasks}")
    return num_tasks * torch.softmax(torch.randn(num_tasks, generator=generator), dim=0)


@register_method("gradnorm", "loss", "Chen et al. 2018, GradNorm (alpha 1.5)")
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
