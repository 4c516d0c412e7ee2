"""What every way of training-time sharing has in common: the parametrization they build on, the one hook a
training loop calls after each optimizer step (``step_``), and ``freeze_``, which turns them into the ordinary
codebooks ``ws.save`` packs.  Each way is one file in this package and registers its parametrization under
its ``CodebookConfig.train`` name."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from weightshare.bitpack import packed_size
from weightshare.kmeans import all_finite
from weightshare.sharing.codebook import TABLE_DTYPES, CodebookParametrization, codebook_
from weightshare.space import share_parametrization_

__all__ = ["TrainingCodebook", "register_mode", "parametrization_for", "training_sharing", "penalty", "step_",
           "freeze_", "frozen_view"]

_MODES: dict[str, type] = {}


class TrainingCodebook(CodebookParametrization):
    """A codebook whose original is the latent dense weight while the model trains.  A subclass defines
    ``on_step(w)`` (after each optimizer step; returns whether its sharing changed) and ``frozen(w)`` (the
    ``(tables, labels)`` of the ordinary codebook it becomes)."""

    def __init__(self, shape, config, transposed: bool = False):
        super().__init__(shape, config, transposed=transposed)
        self.steps = 0
        self.view = None  # the frozen weights while inside ``frozen_view``

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return super().__call__(w) if self.view is None else self.view

    def grouped(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` as (groups, weights per group), over the channel layout."""
        return (w.t() if self.transposed else w).reshape(self.n_groups, self.group_len)

    def ungrouped(self, g: torch.Tensor) -> torch.Tensor:
        w = g.reshape(self.layout)
        return w.t() if self.transposed else w

    def decoded(self, tables: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The weight of ``tables`` (groups, 2**bits) and ``labels`` (the weight's layout): each its entry."""
        index = labels.reshape(self.n_groups, self.group_len).long()
        return self.ungrouped(torch.gather(tables, 1, index))

    def rows(self, w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """An embedding's rows: from the whole training-time weight (a packed lookup needs frozen tables)."""
        return self(w)[index]

    def describe(self, w: torch.Tensor) -> dict:
        """What ``ws.report`` counts: the latent weights stored while training, and what the frozen codebook will
        pack to (indices at ``bits`` bits, one table per group in the table dtype)."""
        numel, k = math.prod(self.shape), 1 << self.config.bits
        return {"shape": self.shape, "params_stored": numel, "bytes_dense": numel * w.element_size(),
                "detail": f"{self.config.bits}-bit {self.config.granularity} (training: {self.config.train})",
                "bytes_packed": packed_size(numel, self.config.bits)
                + self.n_groups * k * TABLE_DTYPES[self.config.table_dtype].itemsize}

    def penalty(self, w: torch.Tensor) -> torch.Tensor | None:
        """A term the training loss gains (soft weight-sharing's prior), or None."""
        return None

    def on_step(self, w: torch.Tensor) -> bool:
        raise NotImplementedError

    def frozen(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def register_mode(name: str, cls: type) -> type:
    """Make ``CodebookConfig(train=name)`` build ``cls`` (done once, at import of its file)."""
    _MODES[name] = cls
    return cls


def parametrization_for(config) -> type:
    import weightshare.training  # noqa: F401 - importing the package registers every mode

    return _MODES[config.train]


def training_sharing(model: nn.Module) -> list[tuple[str, nn.Module, parametrize.ParametrizationList]]:
    """(name, owner module, parametrization list) of every training-time codebook in ``model``, each once
    (a tied weight's list is listed with its first owner)."""
    out, seen = [], set()
    for fqn, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            if id(plist) not in seen and any(isinstance(p, TrainingCodebook) for p in plist):
                seen.add(id(plist))
                out.append((f"{fqn}.{attr}" if fqn else attr, module, plist))
    return out


def penalty(model: nn.Module, found: list | None = None) -> torch.Tensor | None:
    """The sum of the terms ``model``'s training-time sharing adds to the loss (None when none does): the one
    training loop adds it to every batch's loss; add it to yours in a loop of your own.  ``found``: the model's
    ``training_sharing`` list, when the caller holds it (a loop looks once, not at every step)."""
    found = training_sharing(model) if found is None else found
    terms = [t for _, _, plist in found if (t := plist[0].penalty(plist.original)) is not None]
    return torch.stack(terms).sum() if terms else None


def step_(model: nn.Module, found: list | None = None) -> int:
    """Count one optimizer step for every training-time codebook of ``model`` and let each act on it (re-cluster
    when due, anneal a temperature).  Returns how many changed their sharing.  Call it after each optimizer step
    of your own loop; the one training loop (``multitask.train`` / ``fit``) calls it itself.  A latent weight
    that is no longer finite stops training with the step and the tensor named.  ``found`` as in ``penalty``."""
    done = 0
    for name, _, plist in training_sharing(model) if found is None else found:
        p, w = plist[0], plist.original
        p.steps += 1
        if not all_finite(w):  # its min and max in one pass: this runs on every weight at every step
            raise FloatingPointError(f"step {p.steps}: {name} holds NaN or inf values\n  lower the learning rate, or "
                                     "clip gradients; the model is left as it was at this step")
        done += bool(p.on_step(w))
    return done


@contextlib.contextmanager
def frozen_view(model: nn.Module):
    """Inside, every training-time codebook of ``model`` computes the weights ``freeze_`` would give it now (hard
    assignments), without changing the model: to measure what freezing would keep.  (``freeze_`` on a deep copy
    is no way to do this: torch's parametrized classes are shared by a module and its copies, and removing the
    copy's parametrization takes the property off the original too.)"""
    found = [plist for _, _, plist in training_sharing(model)]
    try:
        with torch.no_grad():
            for plist in found:
                p = plist[0]
                p.view = p.decoded(*p.frozen(plist.original)).to(plist.original.dtype)
        yield model
    finally:
        for plist in found:
            plist[0].view = None


def freeze_(model: nn.Module) -> nn.Module:
    """End training-time sharing: every training-time codebook becomes the ordinary codebook of its current
    state (``frozen``: re-clustering, its clusters and their means; DKM, the hard assignment to its centroids).
    ``ws.save`` packs it; its tables can still be fine-tuned.  Freeze the model itself, not a deep copy of it:
    torch's parametrized class is shared by a module and its copies, and freezing a copy removes the original's
    ``weight`` (``frozen_view`` measures what freezing would keep without changing anything)."""
    found = training_sharing(model)
    if not found:
        raise ValueError("freeze_: this model has no training-time sharing to freeze\n  expected: a model shared "
                         "with ws.CodebookConfig(train='recluster', 'dkm' or 'soft') (ws.share_)")
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            owners.setdefault(id(module.parametrizations.weight), []).append(module)
    for name, module, plist in found:
        p = plist[0]
        if len(plist) != 1 or not name.endswith("weight"):
            raise ValueError(f"freeze_: {name}: a training-time codebook stacked on another map cannot be frozen yet")
        tables, labels = p.frozen(plist.original)
        config = dataclasses.replace(p.config, train=None)
        shared = owners.get(id(plist), [module])
        for owner in shared:  # each owner gets the latent tensor back as its plain weight (tied: the one tensor)
            parametrize.remove_parametrizations(owner, "weight", leave_parametrized=False)
        codebook_(shared[0], "weight", config, init=(tables, labels))
        for other in shared[1:]:
            share_parametrization_(shared[0], other)
    return model
