"""Co-training's sync: N workers, each with its own model, optimizer and data, average a shared subset.

Each worker declares which of its model's parameters are shared, and under what name,
with a map of glob patterns ``{model parameter pattern: shared name pattern}``; each
``*`` in the shared name takes what the parameter's ``*`` matched, in order::

    CoTrainer(cnn, {"proj.*": "proj.*", "head.*": "head.*"}, every=4)   # worker 0
    CoTrainer(gru, {"inp.*": "proj.*", "out.*": "head.*"}, every=4)     # worker 1

so a CNN and a GRU can share an input projection and a classifier head.  Every ``every``
local steps (``CoTrainer.step``, e.g. as ``train(..., on_step=trainer.step)``) the shared
tensors are averaged across the workers: one flat buffer per dtype, ``all_reduce(SUM)``,
then divided by the world size (gloo's ``ReduceOp.AVG`` is not to be trusted).  With an
outer optimizer (``OuterSGD``: DiLoCo, Douillard et al. 2023) the workers all-reduce their
pseudo-gradients ``anchor - local`` instead, and Nesterov SGD applies the average to the
anchor (the shared values after the last sync); with ``lr=1, momentum=0`` that is plain
averaging.  Parameters outside the subset are never read or written by a sync, nor are
buffers.  After a sync the shared tensors are bit-identical on every worker.

Before anything is averaged the workers exchange their subsets (``all_gather_object``):
shared names that are not on every worker, shapes or dtypes that differ (both tensors
named), and differing ``every``, ``steps`` or outer optimizer fail on every worker with the
same ``ValueError``.  Then rank 0's shared values are broadcast, so all start equal.

Communication runs on a gloo group of its own with ``timeout``: a worker that dies makes
the others raise ``CoTrainError`` at their next sync (at once, when the connection drops;
at the latest after ``timeout`` seconds for a worker that stalls), never hang.

Bytes: ``bytes_sent`` is the payload each rank contributes to the all-reduces, i.e. shared
elements x element size x syncs.  What a ring all-reduce actually transmits per rank is
2(N-1)/N of that (reduce-scatter, then all-gather): ``ring_bytes_sent``.  The broadcast of
the initial values (``bytes_broadcast``, the payload once) and the metadata exchange are
not in ``bytes_sent``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from weightshare.errors import clip
from weightshare.merge.transfer import pattern_regex, substitute

__all__ = ["CoTrainError", "CoTrainer", "OuterSGD", "shared_names"]


class CoTrainError(RuntimeError):
    """A sync could not complete: a worker stopped, or did not reach it within the timeout."""


@dataclass(frozen=True)
class OuterSGD:
    """DiLoCo's outer optimizer: SGD on the averaged pseudo-gradient (anchor - local), Nesterov
    momentum when ``momentum > 0`` and ``nesterov`` (DiLoCo's lr 0.7, momentum 0.9)."""

    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"OuterSGD.lr\n  expected: a number > 0\n  got: {self.lr!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ValueError(f"OuterSGD.momentum\n  expected: a number in [0, 1)\n  got: {self.momentum!r}")


def shared_names(model: nn.Module, shared: Mapping[str, str]) -> dict[str, str]:
    """{parameter name: shared name} for ``model`` under the pattern map ``shared``.

    Every problem (a pattern that matches no parameter, a parameter matched by two
    patterns, two parameters given one shared name, more ``*`` in a shared name than in its
    pattern) is reported at once in one ``ValueError``.
    """
    if not isinstance(shared, Mapping) or not shared:
        raise ValueError(f"co-training: shared\n  expected: a non-empty map {{parameter pattern: shared name pattern}}"
                         f"\n  got: {shared!r}")
    names = [n for n, _ in model.named_parameters()]
    problems, out, by = [], {}, {}
    for pattern, target in shared.items():
        if not isinstance(pattern, str) or not isinstance(target, str) or not pattern or not target:
            problems.append(f"{pattern!r}: {target!r}: expected non-empty strings")
            continue
        if target.count("*") > pattern.count("*"):
            problems.append(f"{pattern!r}: {target!r}: the shared name has more '*' than the pattern")
            continue
        rx = pattern_regex(pattern)  # the same pattern rule as ws.transfer
        hits = [n for n in names if rx.match(n)]
        if not hits:
            problems.append(f"{pattern!r} matches no parameter of the {type(model).__name__} "
                            f"(it has: {', '.join(names) or 'none'})")
        for n in hits:
            name = substitute(rx.match(n), target)
            if n in out:
                problems.append(f"parameter {n!r} is matched by two patterns ({by[n]!r} and {pattern!r})")
                continue
            clash = [m for m, s in out.items() if s == name]
            if clash:
                problems.append(f"parameters {clash[0]!r} and {n!r} both map to the shared name {name!r}")
                continue
            out[n], by[n] = name, pattern
    if problems:
        raise ValueError("co-training: shared subset of the " + type(model).__name__ + "\n  "
                         + "\n  ".join(problems))
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return clip(text[0]) if text else type(exc).__name__


class CoTrainer:
    """The shared subset of one worker's model, and its syncs.  Every worker constructs one
    (a collective call: the subsets are checked across workers and rank 0's values broadcast).

    ``every``: sync every ``every`` local steps (H).  ``steps``: this worker's total number of
    steps, if known: checked equal on all workers (each sync is a collective, so all must
    make the same number), and a last sync is made at step ``steps`` when it is not a
    multiple of ``every``.  ``outer``: ``OuterSGD`` for DiLoCo, ``None`` for plain averaging.
    ``timeout``: seconds to wait for the other workers at each collective: the construction
    (all workers must construct within ``timeout`` of each other) and every sync.
    """

    def __init__(self, model: nn.Module, shared: Mapping[str, str], every: int = 1, outer: OuterSGD | None = None,
                 steps: int | None = None, timeout: float = 60.0, broadcast: bool = True):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"co-training: every\n  expected: a positive integer (steps between syncs)"
                             f"\n  got: {every!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"co-training: steps\n  expected: a positive integer or None\n  got: {steps!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"co-training: timeout\n  expected: seconds > 0\n  got: {timeout!r}")
        if outer is not None and not isinstance(outer, OuterSGD):
            raise ValueError(f"co-training: outer\n  expected: an OuterSGD or None\n  got: {outer!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("co-training needs an initialised torch.distributed process group\n"
                             "  way out: launch with torchrun (or call torch.distributed.init_process_group)")
        self.model, self.every, self.outer, self.steps, self.timeout = model, every, outer, steps, float(timeout)
        self.map = shared_names(model, shared)  # parameter name -> shared name
        params = dict(model.named_parameters())
        self.params = {s: params[n] for n, s in sorted(self.map.items(), key=lambda kv: kv[1])}  # shared name order
        for s, p in self.params.items():
            if not p.is_floating_point():
                raise ValueError(f"co-training: shared tensor {s!r} is {p.dtype}, expected a floating-point tensor")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.group = self._collective("the set-up of the co-training group", lambda: dist.new_group(
            backend="gloo", timeout=timedelta(seconds=self.timeout)))
        self.syncs = 0
        self.bytes_sent = 0
        self.bytes_broadcast = 0
        self.sync_seconds = 0.0
        self.local_steps = 0
        self._pending = 0  # local steps since the last sync
        self._check_across_workers()
        dtypes = sorted({p.dtype for p in self.params.values()}, key=str)
        self._groups = [(dt, [s for s, p in self.params.items() if p.dtype == dt]) for dt in dtypes]
        if broadcast:
            self._broadcast()
        self._anchors, self._outer_opt = [], None
        if outer is not None:
            self._anchors = [nn.Parameter(self._flat(names)) for _, names in self._groups]
            momentum = float(outer.momentum)
            self._outer_opt = torch.optim.SGD(self._anchors, lr=float(outer.lr), momentum=momentum,
                                              nesterov=bool(outer.nesterov) and momentum > 0)

    # ------------------------------------------------------------------ sizes

    @property
    def numel(self) -> int:
        """Elements in the shared subset."""
        return sum(p.numel() for p in self.params.values())

    @property
    def payload_bytes(self) -> int:
        """Bytes each rank contributes to one sync's all-reduce(s): shared elements x element size."""
        return sum(p.numel() * p.element_size() for p in self.params.values())

    @property
    def ring_bytes_sent(self) -> float:
        """What a ring all-reduce transmits per rank for ``bytes_sent``: 2(N-1)/N of it."""
        return self.bytes_sent * 2 * (self.world - 1) / self.world

    def stats(self) -> dict:
        return {"shared_tensors": len(self.params), "shared_params": self.numel, "syncs": self.syncs,
                "bytes_sent": self.bytes_sent, "ring_bytes_sent": self.ring_bytes_sent,
                "bytes_broadcast": self.bytes_broadcast, "sync_seconds": self.sync_seconds, "world": self.world}

    # ------------------------------------------------------------------ collectives

    def _collective(self, what: str, fn):
        try:
            return fn()
        except (RuntimeError, ConnectionError, TimeoutError) as exc:
            raise CoTrainError(f"co-training: rank {self.rank} of {self.world} could not complete {what}\n"
                               f"  a worker stopped (crashed or was killed) or did not arrive within "
                               f"{self.timeout:g} s\n  cause: {_first_line(exc)}") from exc

    def _check_across_workers(self) -> None:
        mine = {"shared": {s: (n, tuple(self.params[s].shape), str(self.params[s].dtype).replace("torch.", ""))
                           for n, s in self.map.items()},
                "every": self.every, "steps": self.steps,
                "outer": None if self.outer is None else (self.outer.lr, self.outer.momentum, self.outer.nesterov),
                "model": type(self.model).__name__}
        everyone: list = [None] * self.world
        self._collective("the check of the shared subsets",
                         lambda: dist.all_gather_object(everyone, mine, group=self.group))
        problems = []

        def show(r, entry):
            n, shape, dtype = entry
            return f"rank {r} {everyone[r]['model']} {n!r} {tuple(shape)} {dtype}"

        for s in sorted(set().union(*(e["shared"] for e in everyone))):
            have = [r for r in range(self.world) if s in everyone[r]["shared"]]
            if len(have) < self.world:
                missing = [r for r in range(self.world) if r not in have]
                problems.append(f"shared name {s!r} is held by rank(s) {have} "
                                f"({', '.join(show(r, everyone[r]['shared'][s]) for r in have)}) "
                                f"but not by rank(s) {missing}")
                continue
            first = everyone[0]["shared"][s]
            for r in range(1, self.world):
                other = everyone[r]["shared"][s]
                if other[1:] != first[1:]:
                    what = "shapes" if other[1] != first[1] else "dtypes"
                    problems.append(f"shared name {s!r}: {what} differ: {show(0, first)} vs {show(r, other)}")
        for key in ("every", "steps", "outer"):
            values = [e[key] for e in everyone]
            if len(set(values)) > 1:
                problems.append(f"{key} differs across workers: "
                                + ", ".join(f"rank {r} {v}" for r, v in enumerate(values)))
        if problems:
            raise ValueError("co-training: the workers' shared subsets do not agree\n  " + "\n  ".join(problems))

    def _flat(self, names: list[str]) -> torch.Tensor:
        return torch.cat([self.params[s].detach().reshape(-1).cpu() for s in names])  # a copy, never a view

    @torch.no_grad()
    def _write(self, names: list[str], flat: torch.Tensor) -> None:
        offset = 0
        for s in names:
            p = self.params[s]
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def _broadcast(self) -> None:
        for _, names in self._groups:
            buf = self._flat(names)
            self._collective("the broadcast of rank 0's shared values",
                             lambda: dist.broadcast(buf, 0, group=self.group))
            self._write(names, buf)
            self.bytes_broadcast += buf.numel() * buf.element_size()

    # ------------------------------------------------------------------ syncs

    def step(self, k: int | None = None) -> bool:
        """Count one local step (``k``, the trainer's step number, is not needed); sync when due.
        Returns whether it synced.  Usable as ``train(..., on_step=trainer.step)``."""
        self.local_steps += 1
        self._pending += 1
        if self.steps is not None and self.local_steps > self.steps:
            raise ValueError(f"co-training: rank {self.rank} took step {self.local_steps}, beyond the declared "
                             f"steps={self.steps}")
        if self.local_steps % self.every == 0 or self.local_steps == self.steps:
            self.sync()
            return True
        return False

    def finish(self) -> bool:
        """A last sync if there were local steps since the previous one (every worker must call it
        alike; with ``steps`` given, the last step has already synced).  Returns whether it synced."""
        if self._pending:
            self.sync()
            return True
        return False

    @torch.no_grad()
    def sync(self) -> None:
        """Average the shared subset across workers (with ``outer``: one outer optimizer step)."""
        t0 = time.perf_counter()
        what = f"sync {self.syncs + 1}"
        averaged = []
        for i, (_, names) in enumerate(self._groups):
            local = self._flat(names)
            buf = self._anchors[i].detach() - local if self._outer_opt is not None else local
            self._collective(what, lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group))
            buf.div_(self.world)  # SUM then divide: the same operation, so the same bits, on every rank
            self.bytes_sent += buf.numel() * buf.element_size()
            averaged.append(buf)
        if self._outer_opt is not None:
            for anchor, g in zip(self._anchors, averaged):
                anchor.grad = g
            self._outer_opt.step()
            averaged = [a.detach() for a in self._anchors]
        for (_, names), flat in zip(self._groups, averaged):
            self._write(names, flat)
        self.syncs += 1
        self._pending = 0
        self.sync_seconds += time.perf_counter() - t0
