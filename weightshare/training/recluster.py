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

import dataclasses
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from weightshare.sharing.codebook import TABLE_DTYPES, CodebookParametrization, codebook_
from weightshare.space import share_parametrization_

__all__ = ["ReclusterParametrization", "step_", "freeze_", "training_sharing"]


class ReclusterParametrization(CodebookParametrization):
    """The merged weight (each weight its cluster's mean) forward, W's own gradient back (straight-through)."""

    def __init__(self, shape, config, transposed: bool = False):
        super().__init__(shape, config, transposed=transposed)
        self.steps = 0

    def initial(self, weight: torch.Tensor) -> torch.Tensor:
        super().initial(weight)  # exact k-means: the labels (its tables are the means, recomputed below)
        return weight.detach().clone()

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        return (w.t() if self.transposed else w).reshape(self.n_groups, self.group_len)

    @torch.no_grad()
    def tables(self, w: torch.Tensor) -> torch.Tensor:
        """(groups, 2**bits): each cluster's mean of the current latent weights, in the table dtype; a cluster
        with no weight (a group with fewer distinct values than 2**bits) takes its group's largest mean."""
        k = 1 << self.config.bits
        x = self._grouped(w.detach()).double()
        index = self.labels.view(self.n_groups, self.group_len).long()
        sums = torch.zeros(self.n_groups, k, dtype=torch.float64).scatter_add_(1, index, x)
        counts = torch.zeros(self.n_groups, k, dtype=torch.float64).scatter_add_(1, index, torch.ones_like(x))
        means = sums / counts.clamp_min(1.0)
        top = torch.where(counts > 0, means, torch.full_like(means, -math.inf)).amax(1, keepdim=True)
        means = torch.where(counts > 0, means, top)
        return means.to(TABLE_DTYPES[self.config.table_dtype]).to(w.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        index = self.labels.view(self.n_groups, self.group_len).long()
        merged = torch.gather(self.tables(w), 1, index).view(self.layout)
        merged = merged.t() if self.transposed else merged
        if torch.is_grad_enabled() and w.requires_grad:
            return merged + (w - w.detach())  # the value is the merged weight exactly; the gradient is W's
        return merged

    def rows(self, w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.forward(w)[index]

    @torch.no_grad()
    def recluster(self, w: torch.Tensor) -> None:
        super().initial(w.detach())


def _due(p) -> bool:
    c = p.config
    return p.steps % c.recluster_every == 0 and (c.recluster_until is None or p.steps <= c.recluster_until)


def training_sharing(model: nn.Module) -> list[tuple[str, nn.Module, parametrize.ParametrizationList]]:
    """(name, owner module, parametrization list) of every training-time codebook in ``model``, each once
    (a tied weight's list is listed with its first owner)."""
    out, seen = [], set()
    for fqn, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            if id(plist) not in seen and any(isinstance(p, ReclusterParametrization) for p in plist):
                seen.add(id(plist))
                out.append((f"{fqn}.{attr}" if fqn else attr, module, plist))
    return out


def step_(model: nn.Module) -> int:
    """Count one optimizer step for every training-time codebook of ``model`` and re-cluster those that are due
    (every ``recluster_every`` steps, up to ``recluster_until``).  Returns how many re-clustered.  Call it after
    each optimizer step of your own loop; the one training loop (``multitask.train`` / ``fit``) calls it itself.
    A latent weight that is no longer finite stops training with the step and the tensor named."""
    done = 0
    for name, _, plist in training_sharing(model):
        p = plist[0]
        p.steps += 1
        if not _due(p):
            continue
        w = plist.original
        if not torch.isfinite(w).all():
            raise FloatingPointError(f"step {p.steps}: {name} holds NaN or inf values\n  lower the learning rate, or "
                                     "clip gradients; the model is left as it was at this step")
        p.recluster(w)
        done += 1
    return done


def freeze_(model: nn.Module) -> nn.Module:
    """End training-time sharing: every re-clustering codebook becomes an ordinary codebook of its current
    clusters and their means (``ws.save`` packs it; its tables can still be fine-tuned).  Outputs are unchanged:
    the frozen model computes what the training-time one computes in eval mode."""
    found = training_sharing(model)
    if not found:
        raise ValueError("freeze_: this model has no training-time sharing to freeze\n  expected: a model shared "
                         "with ws.CodebookConfig(train='recluster') (ws.share_)")
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            owners.setdefault(id(module.parametrizations.weight), []).append(module)
    for name, module, plist in found:
        p = plist[0]
        if len(plist) != 1 or not name.endswith("weight"):
            raise ValueError(f"freeze_: {name}: a re-clustering codebook stacked on another map cannot be frozen yet")
        tables, labels = p.tables(plist.original), p.labels.clone()
        config = dataclasses.replace(p.config, train=None)
        shared = owners.get(id(plist), [module])
        for owner in shared:  # each owner gets the latent tensor back as its plain weight (tied: the one tensor)
            parametrize.remove_parametrizations(owner, "weight", leave_parametrized=False)
        codebook_(shared[0], "weight", config, init=(tables, labels))
        for other in shared[1:]:
            share_parametrization_(shared[0], other)
    return model
