"""Model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned
models improves accuracy without increasing inference time", ICML, arXiv:2203.05482).

* ``uniform_soup``: the average of every ingredient (``linear`` with equal weights).
* ``greedy_soup`` (the paper's Algorithm 1): sort the ingredients by their own held-out
  score, best first; start the soup from the best; add each next ingredient if the
  average of the soup's ingredients and it scores at least as well (``>=``) as the
  soup without it.  The soup is never worse on held-out data than the best ingredient.
  ``greedy_soup_trace`` returns the soup and the trace: which ingredients were kept, and
  every score the decisions were made on.

Ingredients are fine-tunes of ONE pre-trained model (one basin): averaging models
trained from different initialisations collapses, and the greedy soup then keeps
only the best ingredient.

Float tensors (BatchNorm running statistics included) are averaged in float32 and
cast back to the ingredient's dtype (a tensor equal in every ingredient, e.g. a
frozen one, is copied exactly: a float32 mean of equal values can round); integer
and bool tensors (``num_batches_tracked``, position ids) are never averaged: they
are copied from the first ingredient, which in a greedy soup is the best one (the
merge package's buffer policy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from weightshare.errors import clip
from weightshare.merge.methods.linear import linear

__all__ = ["greedy_soup", "greedy_soup_trace", "uniform_soup", "SoupTrace", "SoupStep"]


class SoupStep(NamedTuple):
    ingredient: int  # index in the input list
    score_with: float  # the held-out score of the soup with this ingredient added
    score_before: float  # the soup's score without it
    kept: bool  # score_with >= score_before


@dataclass
class SoupTrace:
    scores: list[float]  # each ingredient's own held-out score, in input order
    order: list[int]  # ingredient indices, best first (ties keep input order)
    steps: list[SoupStep] = field(default_factory=list)  # one per ingredient after the best
    kept: list[int] = field(default_factory=list)  # the soup's ingredients, in the order they were added
    score: float = float("nan")  # the soup's held-out score

    def __str__(self) -> str:
        lines = [f"greedy soup: {len(self.kept)} of {len(self.scores)} ingredients kept {self.kept}, "
                 f"score {self.score:.4g} (best ingredient {self.scores[self.order[0]]:.4g})",
                 f"  start from ingredient {self.order[0]} (score {self.scores[self.order[0]]:.4g})"]
        lines += [f"  {'add ' if s.kept else 'skip'} ingredient {s.ingredient} (own {self.scores[s.ingredient]:.4g}): "
                  f"soup {s.score_before:.4g} -> {s.score_with:.4g}" for s in self.steps]
        return "\n".join(lines)


def _check(state_dicts, weight) -> list[float]:
    if not isinstance(state_dicts, (list, tuple)) or not state_dicts or \
            not all(isinstance(s, dict) for s in state_dicts):
        raise ValueError("soup: state_dicts\n  expected: a non-empty list of state dicts\n"
                         f"  got: {type(state_dicts).__name__}" + (f" of {len(state_dicts)}" if isinstance(
                             state_dicts, (list, tuple)) else ""))
    ref = state_dicts[0]
    for i, s in enumerate(state_dicts[1:], 1):
        if s.keys() != ref.keys():
            diff = sorted(set(s) ^ set(ref))[:5]
            raise ValueError(f"soup: ingredient {i}\n  expected: the tensor names of ingredient 0\n  got: "
                             f"{len(set(s) ^ set(ref))} names in one but not the other, e.g. {diff}")
        for k, v in s.items():
            r = ref[k]
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(r.shape) or \
                    v.is_floating_point() != r.is_floating_point():
                got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"soup: ingredient {i}, tensor {k!r}\n  expected: {tuple(r.shape)} {r.dtype} "
                                 f"(as in ingredient 0; float or not alike)\n  got: {got}")
    n = len(state_dicts)
    if weight is None:
        return [1.0] * n
    weight = list(weight) if isinstance(weight, (list, tuple)) else [weight] * n
    if len(weight) != n or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and
                                   math.isfinite(w) and w > 0 for w in weight):
        raise ValueError(clip(f"soup: weight\n  expected: one finite number > 0 per ingredient ({n})\n"
                              f"  got: {weight!r}"))
    return [float(w) for w in weight]


def _average(states: list[dict], weights: list[float]) -> dict:
    """The weighted average of ``states`` (float tensors, through ``linear``); other tensors from ``states[0]``."""
    out = {}
    for name, ref in states[0].items():
        if not ref.is_floating_point():
            out[name] = ref.detach().clone()
        elif all(torch.equal(s[name], ref) for s in states[1:]):  # exact: (x + x + x) / 3 need not be x in float32
            out[name] = ref.detach().clone()
        else:
            tensors = [s[name].detach().float() for s in states]
            out[name] = linear(tensors, None, name=name, weight=weights, normalize=True).to(ref.dtype)
    return out


def uniform_soup(state_dicts: list[dict], weight: list[float] | None = None) -> dict:
    """The average of every ingredient (weighted by ``weight``, one per ingredient, if given);
    integer and bool tensors from the first ingredient."""
    weights = _check(state_dicts, weight)
    return _average(list(state_dicts), weights)


def _score(evaluate, state: dict, what: str) -> float:
    value = evaluate(state)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"greedy_soup: evaluate({what})\n  expected: a number (higher is better)\n"
                         f"  got: {type(value).__name__}") from None
    if math.isnan(value):
        raise ValueError(f"greedy_soup: evaluate({what})\n  expected: a number (higher is better; "
                         "return -inf for a model that failed)\n  got: nan")
    return value


def greedy_soup_trace(state_dicts: list[dict], *, evaluate: Callable[[dict], float], weight=None,
                      scores: list[float] | None = None) -> tuple[dict, SoupTrace]:
    """(soup state dict, ``SoupTrace``) of the greedy soup; see ``greedy_soup``."""
    weights = _check(state_dicts, weight)
    if not callable(evaluate):
        raise ValueError("greedy_soup: evaluate\n  expected: a function state dict -> held-out score "
                         f"(higher is better)\n  got: {type(evaluate).__name__}")
    n = len(state_dicts)
    if scores is None:
        scores = [_score(evaluate, s, f"ingredient {i}") for i, s in enumerate(state_dicts)]
    else:
        scores = list(scores)
        if len(scores) != n or not all(isinstance(s, (int, float)) and not math.isnan(s) for s in scores):
            raise ValueError(clip(f"greedy_soup: scores\n  expected: one number per ingredient ({n}), the held-out "
                                  f"score evaluate would give it\n  got: {scores!r}"))
        scores = [float(s) for s in scores]
    order = sorted(range(n), key=lambda i: -scores[i])  # stable: ties keep input order
    trace = SoupTrace(scores=scores, order=order, kept=[order[0]], score=scores[order[0]])
    soup = _average([state_dicts[order[0]]], [weights[order[0]]])
    for i in order[1:]:
        members = trace.kept + [i]
        candidate = _average([state_dicts[j] for j in members], [weights[j] for j in members])
        score = _score(evaluate, candidate, f"soup of ingredients {members}")
        keep = score >= trace.score
        trace.steps.append(SoupStep(i, score, trace.score, keep))
        if keep:
            trace.kept.append(i)
            soup, trace.score = candidate, score
    return soup, trace


def greedy_soup(state_dicts: list[dict], *, evaluate: Callable[[dict], float], weight=None,
                scores: list[float] | None = None) -> dict:
    """The greedy soup of ``state_dicts`` (fine-tunes of one pre-trained model, one architecture).

    ``evaluate(state_dict) -> float`` scores a model on HELD-OUT data (higher is better; never
    the test set the soup is reported on).  ``scores``: the ingredients' own scores, if already
    known (saves one ``evaluate`` each).  ``weight``: one per ingredient (default equal: the
    paper's uniform average of the kept ingredients).  Returns the soup's state dict;
    ``greedy_soup_trace`` also returns which ingredients were kept and every score.
    """
    return greedy_soup_trace(state_dicts, evaluate=evaluate, weight=weight, scores=scores)[0]
