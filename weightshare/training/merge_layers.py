"""Seed 003's merge step on a mix basis: layers whose weights have become alike are merged into one.

``BasisConfig(form="mix")`` writes each layer of a group as ``W_l = sum_j A[l, j] B_j`` over one bank of
templates, and training moves the coefficients.  ``merge_layers_(model, threshold=..., target=...)`` is
the seed article's merge, ``w_i = sum_j a_ij w_j``: the layers of a group whose weights are most alike
(cosine similarity of the whole weights, computed from the coefficients and the bank's Gram matrix, so no
weight is built) are merged, pair by pair, while the most similar pair is at least ``threshold`` alike
and / or until ``target`` distinct weights remain.  A merged layer's coefficients become the mean of its
members' (so its weight is the mean of their weights, the map being linear) and one tensor for all of
them, so they train as one from then on.  Called between stretches of training (every few epochs), it
runs the seed's loop as written: merge, gradient steps, merge again, until nothing is alike enough.
"""

from __future__ import annotations

import torch
from torch import nn

from weightshare.sharing.basis import mix_groups

__all__ = ["merge_layers_"]


def merge_layers_(model: nn.Module, threshold: float | None = None, target: int | None = None) -> list[list[str]]:
    """Merge alike layers of every mix-basis group of ``model`` in place; returns the groups merged by this call
    (each a list of weight names, layers already tied included)."""
    if threshold is None and target is None:
        raise ValueError("merge_layers_: say when to stop\n  expected: threshold= (a cosine similarity in [-1, 1]), "
                         "target= (distinct weights per group), or both")
    if threshold is not None and not (isinstance(threshold, (int, float)) and -1 <= threshold <= 1):
        raise ValueError(f"merge_layers_: threshold\n  expected: a cosine similarity in [-1, 1]\n  got: {threshold!r}")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 1):
        raise ValueError(f"merge_layers_: target\n  expected: a number of distinct weights >= 1\n  got: {target!r}")
    groups = mix_groups(model)
    if not groups:
        raise ValueError("merge_layers_: the model has no mix-basis group\n  expected: a model shared with "
                         "ws.BasisConfig(form='mix', layers=...)")
    merged = []
    for bank, layers in groups:
        merged += _merge_group(bank, layers, threshold, target)
    return merged


@torch.no_grad()
def _merge_group(bank: nn.Parameter, layers: list, threshold: float | None, target: int | None) -> list[list[str]]:
    # units: one per coefficient tensor (layers tied by an earlier merge are one unit already)
    units: dict[int, dict] = {}
    for name, plist in layers:
        u = units.setdefault(id(plist.original), {"coef": plist.original, "names": [], "plists": []})
        u["names"].append(name)
        u["plists"].append(plist)
    units = list(units.values())
    flat = bank.detach().reshape(bank.shape[0], -1).double()
    gram = flat @ flat.T  # <W_u, W_v> = a_u^T (B B^T) a_v
    coefs = [u["coef"].detach().double() for u in units]
    counts = [len(u["names"]) for u in units]
    members = [[i] for i in range(len(units))]
    alive = list(range(len(units)))
    while len(alive) > 1 and (target is None or len(alive) > target):
        a = torch.stack([coefs[i] for i in alive])
        inner = a @ gram @ a.T
        norm = inner.diagonal().clamp_min(1e-300).sqrt()
        cos = inner / (norm[:, None] * norm[None, :])
        cos.fill_diagonal_(-torch.inf)
        best = int(cos.argmax())
        i, j = sorted(divmod(best, len(alive)))  # the earlier layer first: names come out in model order
        if threshold is not None and float(cos[i, j]) < threshold:
            break
        x, y = alive[i], alive[j]
        coefs[x] = (coefs[x] * counts[x] + coefs[y] * counts[y]) / (counts[x] + counts[y])  # the mean weight
        counts[x] += counts[y]
        members[x] += members[y]
        alive.remove(y)
    out = []
    for x in alive:
        if len(members[x]) == 1:
            continue
        first = units[members[x][0]]["coef"]
        tied = nn.Parameter(coefs[x].to(first.dtype), requires_grad=first.requires_grad)
        names = []
        for m in sorted(members[x]):  # units are numbered in model order
            for plist in units[m]["plists"]:
                plist.original = tied
            names += units[m]["names"]
        out.append(names)
    return out
