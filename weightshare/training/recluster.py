"""Codebooks that keep re-clustering while the model trains: seed 003's loop of merging and gradient steps.

``ws.share_(model, ws.CodebookConfig(bits=2, train="recluster", recluster_every=N))`` clusters every
selected weight as a codebook does, but keeps the dense weight W as the trained tensor (the latent
weight).  The forward pass uses the weight *merged*: each weight replaced by the mean of its
cluster, ``w_i = sum_j a_ij w_j`` with ``a_ij = 1 / |cluster|`` for the j in i's cluster (the
means rounded to the table dtype, so that they are the tables a packed file will hold).  Its
gradient reaches W unchanged (straight-through), so the optimizer moves the latent weights, and
the means follow them at once.  Every N optimizer steps (``ws.step_(model)``; the one training loop
calls it) the weights are clustered again by exact k-means, so a weight whose value has moved
changes cluster: the one-shot assignment of post-training clustering is no longer final.  Up to
``recluster_until`` steps (``None``: for the whole run); after it the clusters stay and only
their means move.  Re-clustering is exact k-means of the current weights, so it never leaves a
clustering objective above what one-shot k-means reaches on the same weights.

``ws.freeze_(model)`` ends training-time sharing: each weight becomes the ordinary codebook of its
current clusters and means (tables that may still be fine-tuned), which ``ws.save`` packs as usual;
the frozen model computes exactly what the training-time model computes in eval mode.
"""

from __future__ import annotations

import math

import torch

from weightshare.sharing.codebook import TABLE_DTYPES
from weightshare.training.base import TrainingCodebook, register_mode

__all__ = ["ReclusterParametrization"]


class ReclusterParametrization(TrainingCodebook):
    """The merged weight (each weight its cluster's mean) forward, W's own gradient back (straight-through)."""

    def initial(self, weight: torch.Tensor) -> torch.Tensor:
        super().initial(weight)  # exact k-means: the labels (its tables are the means, recomputed below)
        return weight.detach().clone()

    @torch.no_grad()
    def tables(self, w: torch.Tensor) -> torch.Tensor:
        """(groups, 2**bits): each cluster's mean of the current latent weights, in the table dtype; a cluster
        with no weight (a group with fewer distinct values than 2**bits) takes its group's largest mean."""
        k = 1 << self.config.bits
        x = self.grouped(w.detach()).double()
        index = self.labels.view(self.n_groups, self.group_len).long()
        sums = torch.zeros(self.n_groups, k, dtype=torch.float64).scatter_add_(1, index, x)
        counts = torch.zeros(self.n_groups, k, dtype=torch.float64).scatter_add_(1, index, torch.ones_like(x))
        means = sums / counts.clamp_min(1.0)
        top = torch.where(counts > 0, means, torch.full_like(means, -math.inf)).amax(1, keepdim=True)
        means = torch.where(counts > 0, means, top)
        return means.to(TABLE_DTYPES[self.config.table_dtype]).to(w.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        merged = self.decoded(self.tables(w), self.labels)
        if torch.is_grad_enabled() and w.requires_grad:
            return merged + (w - w.detach())  # the value is the merged weight exactly; the gradient is W's
        return merged

    @torch.no_grad()
    def recluster(self, w: torch.Tensor) -> None:
        super().initial(w.detach())

    def on_step(self, w: torch.Tensor) -> bool:
        c = self.config
        if self.steps % c.recluster_every or (c.recluster_until is not None and self.steps > c.recluster_until):
            return False
        self.recluster(w)
        return True

    def frozen(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tables(w), self.labels.clone()


register_mode("recluster", ReclusterParametrization)
