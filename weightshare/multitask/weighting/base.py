"""The interface every weighting method implements, and the registry ``METHODS`` that holds them.

Two kinds, as in the literature:

* ``"gradient"``: a function ``fn(G, **params) -> d`` from ``G``, a (tasks, params) tensor whose
  row i is task i's gradient of the shared parameters, to one (params,) update direction ``d``
  (a descent step is ``θ -= lr · d``).  Called as ``aggregate(name, G, **params)``.
* ``"loss"``: a ``LossWeighting`` subclass, which ``fit`` builds once per training run and asks
  at every step for the total loss to backpropagate.  State between steps (a loss history,
  learned log-variances, the current weights) lives in the instance; what the trainer offers
  it is ``Step`` and ``on_epoch_end``.

``fit`` calls only this interface, so a method is one file that calls ``register_method``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["KINDS", "METHODS", "LossWeighting", "Method", "Step", "aggregate", "register_method"]

KINDS = ("gradient", "loss")


@dataclass(frozen=True)
class Step:
    """What a loss weighting sees at one training step (built by ``fit``)."""

    losses: torch.Tensor  # (tasks,) this process's batch losses, with their graph: the total is built from them
    mean_losses: torch.Tensor  # (tasks,) detached, averaged over processes: the same on every process
    # (tasks,) ||∇_W L_t|| of the last shared parameter W, averaged over processes; computed when called,
    # because it costs one backward pass per task (GradNorm's input)
    shared_grad_norms: Callable[[], torch.Tensor]


class LossWeighting(nn.Module):
    """How much each task's loss counts: the interface of a ``"loss"`` method.

    ``fit`` builds one instance per training run as ``cls(num_tasks, generator, **params)`` and
    at every step backpropagates ``total_loss(step)``.  Override ``weights`` (the total is then
    Σ_t w_t L_t) or, for a total of another form, ``total_loss``.  Extra trainable quantities
    are ``nn.Parameter`` attributes: ``fit`` optimises them with the model (and averages their
    gradients over processes).  Random draws come from ``generator`` (seeded from the training
    config, the same on every process), never from torch's global generator, so that the data
    order and the model's initialisation do not depend on the method.
    """

    def __init__(self, num_tasks: int, generator: torch.Generator):
        super().__init__()
        self.num_tasks = num_tasks
        self.generator = generator

    def weights(self, step: Step) -> torch.Tensor:
        """(tasks,) the weight of each task's loss at this step."""
        raise NotImplementedError(f"{type(self).__name__}.weights\n  expected: a loss weighting overrides "
                                  "weights(step) or total_loss(step)")

    def total_loss(self, step: Step) -> torch.Tensor:
        """The scalar to backpropagate at this step."""
        return (self.weights(step) * step.losses).sum()

    def on_epoch_end(self, mean_losses: torch.Tensor) -> None:
        """Called after every epoch with its (tasks,) mean training losses (averaged over processes)."""


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "gradient": aggregates per-task gradients | "loss": weights the task losses
    fn: Callable  # gradient: fn(G, **params) -> direction | loss: the LossWeighting subclass
    source: str  # the paper it follows
    # the LossWeighting fit trains with; for a gradient method an equivalent it may train with instead
    # (one backward pass instead of one per task), e.g. EW's unit weights
    weighting: type[LossWeighting] | None = None


METHODS: dict[str, Method] = {}


def register_method(name: str, kind: str, source: str, weighting: type[LossWeighting] | None = None):
    """Decorator: register a gradient aggregator function or a ``LossWeighting`` subclass as ``name``.

    ``source`` names the paper it follows.  A gradient aggregator that equals a fixed weighting of
    the losses may pass that weighting as ``weighting``: ``fit`` then trains with it."""
    if kind not in KINDS:
        raise ValueError(f"register_method {name!r}: kind\n  expected one of: {KINDS}\n  got: {kind!r}")

    def wrap(fn):
        is_weighting = isinstance(fn, type) and issubclass(fn, LossWeighting)
        if kind == "loss" and not is_weighting:
            raise TypeError(f"register_method {name!r}: a loss weighting method\n  expected: a LossWeighting subclass"
                            f"\n  got: {fn!r}\n  way out: subclass weightshare.multitask.LossWeighting")
        if weighting is not None and not (isinstance(weighting, type) and issubclass(weighting, LossWeighting)):
            raise TypeError(f"register_method {name!r}: weighting\n  expected: a LossWeighting subclass\n"
                            f"  got: {weighting!r}")
        METHODS[name] = Method(name, kind, fn, source, fn if kind == "loss" else weighting)
        return fn

    return wrap


def aggregate(name: str, G: torch.Tensor, **params) -> torch.Tensor:
    """The update direction of gradient aggregator ``name`` for per-task gradients ``G`` (tasks, params)."""
    gradient = sorted(n for n, m in METHODS.items() if m.kind == "gradient")
    if name not in METHODS or METHODS[name].kind != "gradient":
        raise ValueError(f"unknown gradient aggregator\n  expected one of: {', '.join(gradient)}\n  got: {name!r}")
    if not isinstance(G, torch.Tensor) or G.dim() != 2 or G.shape[0] < 1:
        raise ValueError(f"aggregate: G\n  expected: a (tasks, params) tensor with at least one task\n"
                         f"  got: {tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__}")
    if not torch.isfinite(G).all():
        bad = sorted({int(i) for i in torch.nonzero(~torch.isfinite(G))[:, 0]})
        raise ValueError(f"aggregate: task gradients {bad} contain NaN or inf\n  expected: finite gradients")
    return METHODS[name].fn(G, **params)
