"""The training loop: mini-batch or full-batch gradient descent, deterministic with a seed.

Every benchmark that trains goes through ``train`` (DESIGN.md: one training
loop), so that a figure never depends on which loop produced it.  Optimizers:
``"gd"`` (full-batch gradient descent), ``"sgd"`` (with momentum), ``"adam"``,
and ``"sgdr"`` (SGD with warm restarts, Loshchilov & Hutter 2017, torch's
``CosineAnnealingWarmRestarts``).  Each step's wall time is recorded, so that
step-time ratios come from the same loop as the accuracies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from weightshare._progress import progress

__all__ = ["TrainConfig", "TrainResult", "train", "make_optimizer", "error_rate"]

OPTIMIZERS = ("gd", "sgd", "adam", "sgdr")


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int | None = 128  # None (or optimizer "gd"): the whole training set each step
    optimizer: str = "adam"  # gd | sgd | adam | sgdr
    lr: float = 1e-3
    momentum: float = 0.9  # sgd, sgdr
    weight_decay: float = 0.0
    restart_epochs: int = 10  # sgdr: length of the first cosine cycle, in epochs
    seed: int = 0  # data order (and nothing else: build the model under your own seed)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer\n  expected one of: {OPTIMIZERS}\n  got: {self.optimizer!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"TrainConfig.epochs\n  expected: a positive integer\n  got: {self.epochs!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"TrainConfig.batch_size\n  expected: a positive integer or None\n  got: {self.batch_size!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr\n  expected: > 0\n  got: {self.lr!r}")


@dataclass
class TrainResult:
    epoch_losses: list[float] = field(default_factory=list)  # mean training loss of each epoch
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step (forward to update)

    @property
    def median_step_seconds(self) -> float:
        s = sorted(self.step_seconds)
        return s[len(s) // 2] if s else float("nan")


def make_optimizer(params, config: TrainConfig, steps_per_epoch: int):
    """(optimizer, scheduler or None) for ``config``; the scheduler steps once per optimizer step."""
    params = list(params)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay), None
    momentum = 0.0 if config.optimizer == "gd" else config.momentum
    opt = torch.optim.SGD(params, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay)
    if config.optimizer == "sgdr":
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=max(1, config.restart_epochs * steps_per_epoch))
        return opt, sched
    return opt, None


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig | None = None,
          loss_fn: Callable = nn.functional.cross_entropy, desc: str = "train") -> TrainResult:
    """Train ``model`` on (x, y) in place with ``config``; returns the per-epoch losses and step times."""
    config = config or TrainConfig()
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"train: inputs and targets\n  expected: the same, non-zero number of rows\n  got: {len(x)} and {len(y)}")
    n = len(x)
    batch = n if config.batch_size is None or config.optimizer == "gd" else min(config.batch_size, n)
    steps = -(-n // batch)
    opt, sched = make_optimizer(model.parameters(), config, steps)
    order = torch.Generator().manual_seed(config.seed)
    result = TrainResult()
    model.train()
    for _ in progress(range(config.epochs), desc=desc, unit="epoch", leave=False):
        perm = torch.randperm(n, generator=order) if batch < n else torch.arange(n)
        total = 0.0
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            result.step_seconds.append(time.perf_counter() - t0)
            total += float(loss.detach()) * len(idx)
        result.epoch_losses.append(total / n)
    model.eval()
    return result


@torch.no_grad()
def error_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose arg-max prediction is not the label (0..1)."""
    model.eval()
    return float((model(x).argmax(-1) != y).float().mean())
