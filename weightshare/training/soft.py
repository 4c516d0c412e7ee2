"""Soft weight-sharing (Nowlan and Hinton 1992; Ullrich, Meeds and Welling, "Soft Weight-Sharing for Neural
Network Compression", ICLR 2017): ``CodebookConfig(train="soft")``.

The weights keep their own values while the model trains; a Gaussian-mixture prior over each group's
weights, ``p(w) = sum_j pi_j N(w; mu_j, sigma_j^2)`` with ``2**bits`` components, is learned jointly with them
(its means, variances and mixing proportions are parameters the optimizer trains), and the training loss
gains ``soft_weight`` times the weights' mean negative log prior.  The prior pulls every weight towards a
component and the components towards the weights, so the weights collapse onto a few values.  The one
training loop adds the term itself (``training.penalty``); a loop of your own adds ``ws.training.penalty(model)``
to its loss.  ``ws.freeze_`` then assigns each weight to its most probable component and makes the means the
tables.  The mixture starts from exact k-means: the centroids, each cluster's variance and its share of the
weights.  A component's variance is kept above 1e-4 of its group's (a collapsed component would make the
prior unbounded).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from weightshare.sharing.codebook import TABLE_DTYPES
from weightshare.training.base import TrainingCodebook, register_mode

__all__ = ["SoftSharingParametrization", "log_prior"]

_FLOOR = 1e-4  # a component's variance, at least this share of its group's


def _log_components(x, means, log_var, logits) -> torch.Tensor:
    """log pi_j N(x; mu_j, sigma_j^2) for every weight and component: (groups, weights, components)."""
    log_pi = torch.log_softmax(logits, -1)[:, None, :]
    d = (x[..., None] - means[:, None, :]) ** 2
    return log_pi - 0.5 * (math.log(2 * math.pi) + log_var[:, None, :]) - d / (2 * log_var.exp()[:, None, :])


def log_prior(x: torch.Tensor, means: torch.Tensor, log_var: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log p(x) under each group's mixture: x (groups, weights); means, log_var, logits (groups, components)."""
    return torch.logsumexp(_log_components(x, means, log_var, logits), -1)


class SoftSharingParametrization(TrainingCodebook):
    """The latent weight as it is, and a learned Gaussian mixture over each group's weights."""

    def initial(self, weight: torch.Tensor) -> torch.Tensor:
        tables = super().initial(weight)  # exact k-means: the starting means, clusters and shares
        k = 1 << self.config.bits
        x = self.grouped(weight.detach()).double()
        index = self.labels.view(self.n_groups, self.group_len).long()
        counts = torch.zeros(self.n_groups, k, dtype=torch.float64).scatter_add_(1, index, torch.ones_like(x))
        means = tables.detach().double()
        sq = torch.zeros_like(counts).scatter_add_(1, index, (x - torch.gather(means, 1, index)) ** 2)
        floor = _FLOOR * x.var(1, unbiased=False, keepdim=True).clamp_min(1e-30)
        var = torch.maximum(sq / counts.clamp_min(1.0), floor)
        self.register_buffer("floor", floor.float())
        self.means = nn.Parameter(means.float())
        self.log_var = nn.Parameter(var.log().float())
        self.logits = nn.Parameter(torch.log(counts.clamp_min(0.5) / self.group_len).float())
        return weight.detach().clone()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def penalty(self, w: torch.Tensor) -> torch.Tensor:
        """``soft_weight`` times the mean negative log prior of the weights."""
        log_var = torch.maximum(self.log_var, self.floor.log())
        return -self.config.soft_weight * log_prior(self.grouped(w), self.means, log_var, self.logits).mean()

    def on_step(self, w: torch.Tensor) -> bool:
        return False

    @torch.no_grad()
    def frozen(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each weight to its most probable component; the means, sorted, are the tables."""
        order = self.means.argsort(1)
        means, log_var, logits = (torch.gather(t, 1, order) for t in (self.means, self.log_var, self.logits))
        log_var = torch.maximum(log_var, self.floor.log())
        x = self.grouped(w.detach())
        labels = _log_components(x, means, log_var, logits).argmax(-1)
        tables = means.to(TABLE_DTYPES[self.config.table_dtype]).to(w.dtype)
        return tables, labels.to(torch.uint8).reshape(self.layout)


register_mode("soft", SoftSharingParametrization)
