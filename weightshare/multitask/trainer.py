"""The training loop: mini-batch or full-batch gradient descent, deterministic with a seed.

Every benchmark that trains goes through ``train`` (DESIGN.md: one training
loop), so that a figure never depends on which loop produced it.  Optimizers:
``"gd"`` (full-batch gradient descent), ``"sgd"`` (with momentum), ``"adam"``,
and ``"sgdr"`` (SGD with warm restarts, Loshchilov & Hutter 2017, torch's
``CosineAnnealingWarmRestarts``).  Each step's wall time is recorded, so that
step-time ratios come from the same loop as the accuracies.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from weightshare._progress import progress
from weightshare.errors import clip
from weightshare.multitask.models import batch_size_of
from weightshare.multitask.weighting import METHODS, Method, Step, aggregate

__all__ = ["IGNORE", "FitResult", "delta_p", "evaluate", "fit", "TrainConfig", "TrainResult", "train", "make_optimizer",
           "error_rate", "fold_splits", "num_rows", "select_rows"]

OPTIMIZERS = ("gd", "sgd", "adam", "sgdr")
SCHEDULES = ("constant", "cosine")


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
    schedule: str = "constant"  # constant | cosine (decay to 0 over all steps); gd, sgd, adam
    warmup_steps: int = 0  # linear warm-up from 0 before the schedule

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule\n  expected one of: {SCHEDULES}\n  got: {self.schedule!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError("TrainConfig.warmup_steps\n  expected: a non-negative integer\n"
                             f"  got: {self.warmup_steps!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer\n  expected one of: {OPTIMIZERS}\n  got: {self.optimizer!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"TrainConfig.epochs\n  expected: a positive integer\n  got: {self.epochs!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError("TrainConfig.batch_size\n  expected: a positive integer or None\n"
                             f"  got: {self.batch_size!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr\n  expected: > 0\n  got: {self.lr!r}")


@dataclass
class TrainResult:
    epoch_losses: list[float] = field(default_factory=list)  # mean training loss of each epoch
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step (forward to update)
    epoch_seconds: list[float] = field(default_factory=list)  # wall time of each epoch's shuffling and steps

    @property
    def median_step_seconds(self) -> float:
        s = sorted(self.step_seconds)
        return s[len(s) // 2] if s else float("nan")


def make_optimizer(params, config: TrainConfig, steps_per_epoch: int):
    """(optimizer, scheduler or None) for ``config``; the scheduler steps once per optimizer step."""
    params = list(params)
    if config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        momentum = 0.0 if config.optimizer == "gd" else config.momentum
        opt = torch.optim.SGD(params, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay)
    if config.optimizer == "sgdr":
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            opt, T_0=max(1, config.restart_epochs * steps_per_epoch))
        return opt, sched
    if config.schedule == "constant" and not config.warmup_steps:
        return opt, None
    total, warm = max(1, config.epochs * steps_per_epoch), config.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _batch_rows(config: TrainConfig, n: int) -> int:
    """Rows per optimizer step out of ``n``: all of them for full-batch gradient descent."""
    return n if config.batch_size is None or config.optimizer == "gd" else min(config.batch_size, n)


def _training_loop(model: nn.Module, params, rows: torch.Tensor, config: TrainConfig,
                   step: Callable[[torch.Tensor], object], desc: str,
                   on_step: Callable[[int], object] | None = None,
                   on_epoch: Callable[[int, object], bool] | None = None) -> TrainResult:
    """The one loop under ``train`` and ``fit``: ``config.epochs`` passes over ``rows`` (indices
    into the data), shuffled by ``config.seed`` into mini-batches, one optimizer step each.

    ``step(idx)`` computes the gradients of the batch ``idx`` (the loop zeroes them before and
    steps the optimizer and scheduler after) and returns its mean loss, a float or a (tasks,)
    tensor; ``result.epoch_losses`` holds their means per epoch.  ``on_step(k)`` runs after
    step k (1, 2, ...), outside the step's timing; ``on_epoch(e, mean_loss)`` after epoch e,
    and returning True stops training there."""
    n = len(rows)
    batch = _batch_rows(config, n)
    steps = -(-n // batch)
    opt, sched = make_optimizer(params, config, steps)
    order = torch.Generator().manual_seed(config.seed)
    result = TrainResult()
    model.train()
    from weightshare.training import step_, training_sharing

    sharing = training_sharing(model)  # training-time codebooks (train='recluster' / 'dkm' / 'soft'): looked up once
    for epoch in progress(range(config.epochs), desc=desc, unit="epoch", leave=False):
        t_epoch = time.perf_counter()
        perm = rows[torch.randperm(n, generator=order)] if batch < n else rows
        total = 0.0
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = step(idx)
            opt.step()
            if sched is not None:
                sched.step()
            if sharing:
                step_(model, sharing)
            result.step_seconds.append(time.perf_counter() - t0)
            total += loss * len(idx)
            if on_step is not None:
                on_step(len(result.step_seconds))
        result.epoch_seconds.append(time.perf_counter() - t_epoch)
        result.epoch_losses.append(total / n)
        if on_epoch is not None and on_epoch(epoch + 1, result.epoch_losses[-1]):
            break
    model.eval()
    return result


def train(model: nn.Module, x, y: torch.Tensor, config: TrainConfig | None = None,
          loss_fn: Callable = nn.functional.cross_entropy, desc: str = "train",
          on_step: Callable[[int], object] | None = None, params=None,
          on_epoch: Callable[[int], bool] | None = None) -> TrainResult:
    """Train ``model`` on (x, y) in place with ``config``; returns the per-epoch losses and step times.
    ``x``: a tensor, or a tokenizer's output (a dict of tensors; each batch cut to its longest sequence).

    ``on_step(k)``, if given, is called after the k-th optimizer step (k = 1, 2, ...), outside the
    step's timing: co-training (``weightshare.merge.cotrain.CoTrainer.step``) syncs there.
    ``params``: what the optimizer updates (default: every parameter of ``model``).
    ``on_epoch(e)`` is called after epoch e (1, 2, ...); returning True stops training there
    (early stopping on a held-out set)."""
    config = config or TrainConfig()
    rows = num_rows(x)
    if rows != len(y) or rows == 0:
        raise ValueError("train: inputs and targets\n  expected: the same, non-zero number of rows\n"
                         f"  got: {rows} and {len(y)}")

    from weightshare.training import penalty, training_sharing

    sharing = training_sharing(model)

    def step(idx: torch.Tensor) -> float:
        loss = loss_fn(model(select_rows(x, idx)), y[idx])
        extra = penalty(model, sharing) if sharing else None  # soft weight-sharing's prior, when the model has it
        (loss if extra is None else loss + extra).backward()
        return float(loss.detach())

    return _training_loop(model, model.parameters() if params is None else params, torch.arange(rows), config, step,
                          desc, on_step, None if on_epoch is None else lambda e, _: on_epoch(e))


@torch.no_grad()
def error_rate(model: nn.Module, x, y: torch.Tensor, batch: int = 256) -> float:
    """Fraction of rows whose arg-max prediction is not the label (0..1); ``x`` as in ``train``, scored
    ``batch`` rows at a time."""
    model.eval()
    rows = torch.arange(num_rows(x))
    wrong = sum(int((model(select_rows(x, idx)).argmax(-1) != y[idx]).sum()) for idx in rows.split(batch))
    return wrong / len(rows)


# ------------------------------------------------------------------------------------ multi-task


@dataclass
class FitResult:
    """What ``fit`` measured: per fold, per task, the held-out metric (accuracy for classification)."""

    method: str
    folds: list[dict[str, float]] = field(default_factory=list)
    seconds_per_epoch: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    models: list[nn.Module] = field(default_factory=list)  # the trained model of each fold, with keep_models=True
    splits: list[tuple] = field(default_factory=list)  # the (train, test) indices of each fold

    @property
    def metrics(self) -> dict[str, float]:
        """Mean over folds of each task's held-out metric."""
        tasks = self.folds[0].keys() if self.folds else []
        return {t: sum(f[t] for f in self.folds) / len(self.folds) for t in tasks}


def delta_p(multi: dict[str, float], single: dict[str, float],
            higher_is_better: dict[str, bool] | None = None) -> float:
    """Δp in percent: the mean over tasks of the relative improvement of ``multi`` over ``single``.

    Δp = 100 · mean_t (-1)^{l_t} (M_t - S_t) / S_t, l_t = 1 where lower is better
    (Maninis et al. 2019, as the multi-task literature reports it).
    """
    if set(multi) != set(single) or not multi:
        raise ValueError("delta_p: tasks\n  expected: the same tasks in both\n"
                         f"  got: {sorted(multi)} and {sorted(single)}")
    higher_is_better = higher_is_better or {}
    total = 0.0
    for t in multi:
        if single[t] == 0:
            raise ValueError(f"delta_p: task {t!r} has a single-task metric of 0: the relative change is undefined")
        sign = 1.0 if higher_is_better.get(t, True) else -1.0
        total += sign * (multi[t] - single[t]) / abs(single[t])
    return 100.0 * total / len(multi)


def fold_splits(y_first: torch.Tensor, cv: int | None, validation: float, seed: int):
    """(train, test) index arrays: k stratified folds, or one stratified holdout (scikit-learn's splitters)."""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold, train_test_split

    labels = y_first.cpu().numpy()
    idx = np.arange(len(labels))
    if cv is not None and not isinstance(cv, int):  # explicit (train, test) index pairs, as scikit-learn's cv= takes
        splits = [(np.asarray(a), np.asarray(b)) for a, b in cv]
        for a, b in splits:
            if not len(a) or not len(b) or a.min() < 0 or b.min() < 0 or max(a.max(), b.max()) >= len(labels):
                raise ValueError(f"fit: cv\n  expected: non-empty (train, test) index arrays in 0..{len(labels) - 1}")
        return splits
    if cv:
        if cv < 2:
            raise ValueError(f"fit: cv\n  expected: a number of folds >= 2 (or None for a holdout)\n  got: {cv}")
        return list(StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed).split(idx, labels))
    train, test = train_test_split(idx, test_size=validation, stratify=labels, random_state=seed)
    return [(train, test)]


IGNORE = -100  # a task's label for rows it has no label for (cross_entropy's ignore_index)


def num_rows(x) -> int:
    """Rows of ``fit``'s inputs (``batch_size_of``), or an error that says what inputs it takes."""
    rows = batch_size_of(x)
    if rows is None:
        raise ValueError("fit: inputs\n  expected: a tensor, or a dict of tensors with one row per sample "
                         f"(a tokenizer's output)\n  got: {type(x).__name__}")
    return rows


def select_rows(x, idx: torch.Tensor):
    """Rows ``idx`` of the inputs.  Tokenizer output (a dict with an ``attention_mask``) is cut to
    the longest sequence in the batch: padding the whole data set to its longest sentence would
    make every batch pay for it."""
    if isinstance(x, torch.Tensor):
        return x[idx]
    tensor = lambda v: isinstance(v, torch.Tensor) and v.dim() > 0  # noqa: E731
    batch = {k: v[idx] if tensor(v) else v for k, v in x.items()}
    mask = batch.get("attention_mask")
    if tensor(mask) and mask.dim() == 2 and mask.shape[0]:
        length = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
        batch = {k: v[:, :length] if tensor(v) and v.dim() == 2 and v.shape[1] == mask.shape[1] else v
                 for k, v in batch.items()}
    return batch


def _world() -> tuple[int, int]:
    """(world size, rank) of an initialised torch.distributed process group, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean over processes (all-reduce SUM, then divide: gloo's AVG is not to be trusted)."""
    import torch.distributed as dist

    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


@torch.no_grad()
def evaluate(model: nn.Module, x, targets: dict[str, torch.Tensor], rows=None,
             batch_size: int = 128) -> dict[str, float]:
    """Each task's accuracy over its labelled ``rows`` (default: all), in batches of ``batch_size``
    (a transformer on a whole held-out set at once is not cheap)."""
    model.eval()
    rows = torch.arange(num_rows(x)) if rows is None else torch.as_tensor(rows)
    correct = {t: 0 for t in targets}
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        out = model(select_rows(x, chunk))
        for t in targets:
            correct[t] += int((out[t].argmax(-1) == targets[t][chunk]).sum())
    return {t: correct[t] / max(1, int((targets[t][rows] != IGNORE).sum())) for t in targets}


def fit(model_factory: Callable[[], nn.Module], x: torch.Tensor, targets: dict[str, torch.Tensor],
        method: str = "ew", config: TrainConfig | None = None, cv=None, validation: float = 0.2,
        keep_models: bool = False, **method_params) -> FitResult:
    """Train a multi-task model per fold with ``method`` and measure each task's held-out accuracy.

    ``model_factory()`` builds a fresh model (a ``MultiTaskModel``, ``CrossStitch`` or ``MMoE``)
    whose heads are named as ``targets``; ``targets`` maps each task to its class labels for
    the rows of ``x``.  ``method`` is any name in ``METHODS``: gradient aggregators combine the
    per-task gradients of the shared parameters (``aggregate``), loss weighting methods weight
    the losses; ``method_params`` go to the aggregator, or to the ``LossWeighting`` it builds.
    ``cv``: a number of folds (stratified on the first task's labels), explicit
    (train, test) index pairs, or ``None`` for one stratified holdout of ``validation``.
    ``keep_models=True`` keeps each fold's trained model in ``result.models``.

    ``x`` is a tensor, or a tokenizer's output (a dict of tensors, e.g. ``input_ids`` and
    ``attention_mask``, which a transformer trunk reads; each batch is cut to its longest
    sequence).  A task may leave rows unlabelled with ``IGNORE`` (-100): they cost that task
    nothing and are not scored; every task needs labelled rows on both sides of every fold.

    Under ``torch.distributed`` (an initialised process group, e.g. launched with torchrun)
    each process takes its share of every batch; gradient methods all-reduce the per-task
    gradients (tasks x shared params) and then aggregate, so every process computes the
    aggregate of the global gradients, not an average of local aggregates (which differs
    for every non-linear method); all other gradients are averaged.  Pass the plain model,
    not a DistributedDataParallel wrapper.  Batches must split evenly across processes.
    """
    config = config or TrainConfig()
    if method not in METHODS:
        raise ValueError(f"fit: unknown method\n  expected one of: {', '.join(sorted(METHODS))}\n  got: {method!r}")
    if not targets:
        raise ValueError("fit: targets\n  expected: at least one task's labels")
    rows = num_rows(x)
    for t, y in targets.items():
        if len(y) != rows:
            raise ValueError(f"fit: task {t!r} has {len(y)} labels for {rows} inputs")
    tasks = list(targets)
    result = FitResult(method)
    epoch_seconds = []
    for fold, (train_idx, test_idx) in enumerate(fold_splits(targets[tasks[0]], cv, validation, config.seed)):
        for t in tasks:
            for part, part_idx in (("training", train_idx), ("held-out", test_idx)):
                if not bool((targets[t][torch.as_tensor(part_idx)] != IGNORE).any()):
                    raise ValueError(f"fit: task {t!r} has no labelled samples in the {part} part of fold {fold + 1}\n"
                                     "  expected: labelled rows on both sides of every fold\n"
                                     "  way out: fewer folds (cv), a larger validation share, or more labelled rows")
        torch.manual_seed(config.seed + fold)
        model = model_factory()
        if set(getattr(model, "tasks", tasks)) != set(tasks):
            raise ValueError(f"fit: the model's heads {sorted(model.tasks)} are not the tasks {sorted(tasks)}")
        run = _fit_fold(model, x, targets, torch.as_tensor(train_idx), METHODS[method], config, method_params,
                        desc=f"{method} fold {fold + 1}")
        result.step_seconds += run.step_seconds
        epoch_seconds += run.epoch_seconds
        result.folds.append(evaluate(model, x, targets, test_idx, _batch_rows(config, len(train_idx))))
        result.splits.append((train_idx, test_idx))
        if keep_models:
            result.models.append(model)
    result.seconds_per_epoch = sum(epoch_seconds) / len(epoch_seconds)
    return result


def _fit_fold(model: nn.Module, x, targets: dict[str, torch.Tensor], rows: torch.Tensor, method: Method,
              config: TrainConfig, params: dict, desc: str) -> TrainResult:
    """Train ``model`` in place on ``rows`` with ``method``, through the one training loop.

    A method with a ``LossWeighting`` trains on the total loss it gives; any other aggregates
    the per-task gradients of the shared parameters.  Each step returns the batch's per-task
    mean losses over all processes (what ``on_epoch_end`` is told, averaged per epoch)."""
    from weightshare.training import penalty, training_sharing

    sharing = training_sharing(model)
    world, rank = _world()
    shared = list(model.shared_parameters())
    # the weighting's own random draws (RLW): seeded from the config, the same on every process
    weighting = None if method.weighting is None else \
        method.weighting(len(targets), torch.Generator().manual_seed(config.seed + 1), **params)
    extra = [] if weighting is None else list(weighting.parameters())
    aggregated = shared if weighting is None else []  # their gradients are global already

    def step(idx: torch.Tensor) -> torch.Tensor:
        if world > 1:  # this process's share of the global batch (equal shares: see _all_reduce_mean)
            idx = idx[rank::world]
        losses = _task_losses(model(select_rows(x, idx)), targets, idx)
        L = torch.stack(losses)
        mean_losses = _all_reduce_mean(L) if world > 1 else L.detach()  # the same on every process
        if weighting is None:
            _aggregate_into_grads(method.name, losses, shared, world, params)
        else:
            norms = lambda: _grad_norms(losses, shared[-1], world)  # noqa: E731
            weighting.total_loss(Step(L, mean_losses, norms)).backward()
        if world > 1:
            for p in list(model.parameters()) + extra:
                if p.grad is not None and not any(p is q for q in aggregated):
                    p.grad = _all_reduce_mean(p.grad)
        prior = penalty(model, sharing) if sharing else None  # the same on every process: not averaged
        if prior is not None:
            prior.backward()
        return mean_losses

    on_epoch = None if weighting is None else lambda e, mean_losses: weighting.on_epoch_end(mean_losses)
    return _training_loop(model, list(model.parameters()) + extra, rows, config, step, desc, on_epoch=on_epoch)


def _task_losses(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], idx: torch.Tensor) -> list:
    """Each task's cross-entropy on its labelled rows of the batch ``idx`` (a zero with a graph if none)."""
    losses = []
    for t in targets:
        if out[t].shape[0] != len(idx):
            raise ValueError(f"fit: head {t!r} returned {out[t].shape[0]} rows for a batch of {len(idx)}")
        labels = targets[t][idx]
        try:
            if bool((labels == IGNORE).all()):  # no label in this batch: no loss, a zero gradient
                loss = out[t].sum() * 0.0
            else:
                loss = nn.functional.cross_entropy(out[t], labels, ignore_index=IGNORE)
        except (IndexError, RuntimeError) as exc:
            raise ValueError(clip(f"fit: head {t!r} does not match its labels ({exc})")) from None
        if not torch.isfinite(loss):
            raise ValueError(f"fit: the loss of task {t!r} is {float(loss)}\n  expected: a finite loss\n"
                             "  way out: a lower learning rate (TrainConfig.lr), or check the inputs for NaN")
        losses.append(loss)
    return losses


def _aggregate_into_grads(name: str, losses: list, shared: list, world: int, params: dict) -> None:
    """Set the shared parameters' gradients to aggregator ``name``'s direction for the per-task
    gradients (all-reduced first under torch.distributed), the others' to those of Σ_t L_t."""
    grads = [torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True) for loss in losses]
    G = torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                for g, p in zip(gs, shared)]) for gs in grads])
    if world > 1:  # every process aggregates the same, global per-task gradients
        G = _all_reduce_mean(G)
    d = aggregate(name, G, **params)
    torch.stack(losses).sum().backward()  # the heads' (task-specific) gradients; the shared ones are replaced
    offset = 0
    for p in shared:
        p.grad = d[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _grad_norms(losses: list, weight: torch.Tensor, world: int) -> torch.Tensor:
    """(tasks,) ||∇_W L_t|| of one parameter W, averaged over processes before the norm."""
    grads = [torch.autograd.grad(loss, weight, retain_graph=True)[0] for loss in losses]
    if world > 1:
        grads = [_all_reduce_mean(g) for g in grads]
    return torch.stack([g.norm() for g in grads])
