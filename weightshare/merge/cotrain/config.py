"""The co-training config: its fields, its defaults, and every check that needs no process.

Worker r (torchrun's RANK) builds ``workers[r].model``, trains it on the r-th of N disjoint
stratified parts of the data's training split with the one training loop
(``weightshare.multitask.trainer.train``), and averages its shared subset with the other
workers every ``sync_every`` steps (``weightshare.merge.cotrain.sync.CoTrainer``).  All
workers are scored on the same held-out test split.  The config is checked field by field
before anything runs: unknown keys are refused by name, every problem is reported at once,
and the workers' shared subsets are resolved against their models and compared (shapes)
before a process group exists.  A model is a built-in name or a model directory (``zoo.py``), the
data a built-in name or a labelled file (``data.py``): never code from the config.  Paths are
relative to the working directory.

``timeout`` bounds every wait for the other workers: the start of each run (with
``compare_alone`` the workers arrive there as far apart as their alone runs took), each sync
and the end.  A worker that crashes is noticed at the next sync at once (its connection
drops); one that hangs, after ``timeout`` seconds; either way the others stop with an error.

Example::

    sync_every: 4              # H: average the shared subset every 4 local steps
    outer: {lr: 0.7, momentum: 0.9, nesterov: true}   # optional: DiLoCo; omit for plain averaging
    seeds: [0, 1, 2]           # one co-training run per seed (default [0])
    timeout: 120               # seconds a worker waits for the others at any meeting point (see below)
    compare_alone: true        # also train each model alone on its part, from the same start
    results: cotrain.json      # optional: rank 0 writes every figure there
    data: digits               # built-in, or a .jsonl / .csv / .npz file (data.py): one part per worker
    workers:                   # one per process, in rank order
      - model: cnn             # built-in: cnn | gru, or a model directory (weightshare.merge.cotrain.zoo)
        width: 32
        shared: {"proj.*": "proj.*", "head.*": "head.*"}    # parameter pattern -> shared name
        train: {epochs: 20, batch_size: 64, optimizer: adam, lr: 0.003}
      - model: gru
        shared: {"proj.*": "proj.*", "head.*": "head.*"}
        train: {epochs: 20, batch_size: 64, optimizer: adam, lr: 0.003}

A worker naming a model directory trains it as a text classifier on text data::

      - model: models/all-MiniLM-L6-v2     # transformers, sentence-transformers, or packed
        trainable_layers: 2                # optional: train only the last 2 transformer layers (and the head)
        shared: {"transformer.encoder.layer.5.*": "layer5.*", "head.*": "head.*"}
        data: {path: mine.csv, text: sentence, label: topic}   # optional: this worker's own data, own test split
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

from weightshare.merge.cotrain.data import DataError, DataSpec, Rows, parse_data, read_rows, split_parts, split_test
from weightshare.merge.cotrain.sync import OuterSGD, shared_names
from weightshare.merge.cotrain.zoo import DATA, MODELS, build_model

__all__ = ["CoTrainConfig", "WorkerSpec", "parse_config", "read_config", "check", "steps_per_run", "worker_rows",
           "worker_split"]

TOP_KEYS = ("workers", "sync_every", "outer", "seeds", "timeout", "data", "test_size", "compare_alone", "results")
WORKER_KEYS = ("model", "width", "shared", "train", "trainable_layers", "data")
TRAIN_KEYS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "restart_epochs")
OUTER_KEYS = ("lr", "momentum", "nesterov")
TRAIN_DEFAULTS = {"epochs": 20, "batch_size": 64, "optimizer": "adam", "lr": 0.003}


@dataclass
class WorkerSpec:
    model: str
    shared: dict[str, str]
    width: int = 32
    train: object = None  # a TrainConfig (its seed is set per run from ``seeds``)
    trainable_layers: int | None = None  # a model directory's last layers that train (None: all)
    data: str | DataSpec | None = None  # this worker's own data (None: its part of the config's ``data``)


@dataclass
class CoTrainConfig:
    workers: list[WorkerSpec]
    sync_every: int
    outer: OuterSGD | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    timeout: float = 120.0
    data: str | DataSpec = "digits"
    test_size: float = 0.25
    compare_alone: bool = False
    results: str | None = None


# ------------------------------------------------------------------------------------ validation


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _unknown(where: str, mapping: dict, known: tuple, problems: list) -> None:
    for k in mapping:
        if k not in known:
            close = difflib.get_close_matches(str(k), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}{k}: unknown key{hint}; known keys: {', '.join(known)}")


def _check(problems, where, value, ok: bool, expected: str) -> bool:
    if not ok:
        problems.append(f"{where}: expected {expected}, got {value!r}")
    return ok


def parse_config(raw, source: str = "config") -> CoTrainConfig:
    """A ``CoTrainConfig`` from the loaded YAML; every problem in one ``ValueError``."""
    p: list[str] = []
    if not isinstance(raw, dict):
        raise ValueError(f"cotrain config {source}\n  expected: a mapping of keys ({', '.join(TOP_KEYS)})\n"
                         f"  got: {type(raw).__name__}")
    _unknown("", raw, TOP_KEYS, p)
    for key in ("workers", "sync_every"):
        if key not in raw:
            p.append(f"{key}: missing (required)")
    if "sync_every" in raw:
        _check(p, "sync_every", raw["sync_every"], _is_int(raw["sync_every"]) and raw["sync_every"] >= 1,
               "a positive integer (local steps between syncs)")
    timeout = raw.get("timeout", 120)
    _check(p, "timeout", timeout, _is_num(timeout) and timeout > 0, "seconds > 0")
    seeds = raw.get("seeds", [0])
    _check(p, "seeds", seeds, isinstance(seeds, list) and len(seeds) >= 1 and all(_is_int(s) and s >= 0 for s in seeds)
           and len(set(seeds)) == len(seeds), "a non-empty list of distinct integers >= 0")
    data = parse_data(raw.get("data", "digits"), "data", p)
    test_size = raw.get("test_size", 0.25)
    _check(p, "test_size", test_size, _is_num(test_size) and 0.05 <= test_size <= 0.5, "a fraction in [0.05, 0.5]")
    compare = raw.get("compare_alone", False)
    _check(p, "compare_alone", compare, isinstance(compare, bool), "true or false")
    results = raw.get("results")
    _check(p, "results", results, results is None or (isinstance(results, str) and results != ""),
           "a file path or null")
    outer = _parse_outer(raw.get("outer"), p)
    workers = []
    raw_workers = raw.get("workers")
    if "workers" in raw and _check(p, "workers", raw_workers, isinstance(raw_workers, list) and len(raw_workers) >= 1,
                                   "a non-empty list, one entry per process"):
        workers = [_parse_worker(w, f"workers[{i}]", p) for i, w in enumerate(raw_workers)]
    if p:
        raise ValueError(f"cotrain config {source}: {len(p)} problem{'s' if len(p) > 1 else ''}\n  " + "\n  ".join(p))
    return CoTrainConfig(workers=workers, sync_every=raw["sync_every"], outer=outer, seeds=list(seeds),
                         timeout=float(timeout), data=data, test_size=float(test_size), compare_alone=compare,
                         results=results)


def _parse_outer(outer, p: list[str]) -> OuterSGD | None:
    """The ``outer`` mapping as an ``OuterSGD`` (None: plain averaging, or a problem appended to ``p``)."""
    if outer is None or not _check(p, "outer", outer, isinstance(outer, dict),
                                   "a mapping (lr, momentum, nesterov) or null"):
        return None
    _unknown("outer.", outer, OUTER_KEYS, p)
    lr, mom, nest = outer.get("lr", 0.7), outer.get("momentum", 0.9), outer.get("nesterov", True)
    good = _check(p, "outer.lr", lr, _is_num(lr) and lr > 0, "a number > 0")
    good &= _check(p, "outer.momentum", mom, _is_num(mom) and 0 <= mom < 1, "a number in [0, 1)")
    good &= _check(p, "outer.nesterov", nest, isinstance(nest, bool), "true or false")
    return OuterSGD(lr=float(lr), momentum=float(mom), nesterov=nest) if good else None


def _parse_worker(w, at: str, p: list[str]) -> WorkerSpec | None:
    """One ``workers`` entry as a ``WorkerSpec`` (None if it has a problem: appended to ``p``)."""
    if not _check(p, at, w, isinstance(w, dict), f"a mapping ({', '.join(WORKER_KEYS)})"):
        return None
    _unknown(at + ".", w, WORKER_KEYS, p)
    for key in ("model", "shared"):
        if key not in w:
            p.append(f"{at}.{key}: missing (required)")
    model = w.get("model")
    built_in = isinstance(model, str) and model in MODELS
    found = isinstance(model, str) and (built_in or Path(model).is_dir())
    good = "model" in w and _check(p, f"{at}.model", model, found,
                                   f"a built-in model ({', '.join(MODELS)}) or a model directory (none found there)")
    width = w.get("width", 32)
    good &= _check(p, f"{at}.width", width, _is_int(width) and 1 <= width <= 4096, "an integer in 1..4096")
    layers = w.get("trainable_layers")
    good &= _check(p, f"{at}.trainable_layers", layers, layers is None or (_is_int(layers) and layers >= 0),
                   "an integer >= 0 or null (train every layer)")
    if layers is not None and built_in:
        p.append(f"{at}.trainable_layers: only for a model directory; the built-in {model} trains whole")
        good = False
    shared = w.get("shared")
    good &= "shared" in w and _check(
        p, f"{at}.shared", shared, isinstance(shared, dict) and len(shared) >= 1
        and all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in shared.items()),
        "a non-empty mapping of strings {parameter pattern: shared name pattern}")
    data = None
    if "data" in w:
        n = len(p)
        data = parse_data(w["data"], f"{at}.data", p)
        good &= len(p) == n
    tc = _parse_train(w.get("train", {}), f"{at}.train", p)
    if not (good and tc is not None):
        return None
    return WorkerSpec(model=model, shared=dict(shared), width=width, train=tc, trainable_layers=layers, data=data)


def _parse_train(tr, at: str, p: list[str]):
    """A worker's ``train`` mapping over ``TRAIN_DEFAULTS`` as a ``TrainConfig`` (None if it has a problem)."""
    from weightshare.multitask.trainer import OPTIMIZERS, TrainConfig

    if not _check(p, at, tr, isinstance(tr, dict), f"a mapping ({', '.join(TRAIN_KEYS)})"):
        return None
    _unknown(f"{at}.", tr, TRAIN_KEYS, p)
    t = {**TRAIN_DEFAULTS, **{k: v for k, v in tr.items() if k in TRAIN_KEYS}}
    q = f"{at}."
    ok = _check(p, q + "epochs", t["epochs"], _is_int(t["epochs"]) and t["epochs"] >= 1, "a positive integer")
    ok &= _check(p, q + "batch_size", t["batch_size"], t["batch_size"] is None or
                 (_is_int(t["batch_size"]) and t["batch_size"] >= 1), "a positive integer or null")
    ok &= _check(p, q + "optimizer", t["optimizer"], t["optimizer"] in OPTIMIZERS, f"one of: {', '.join(OPTIMIZERS)}")
    ok &= _check(p, q + "lr", t["lr"], _is_num(t["lr"]) and t["lr"] > 0, "a number > 0")
    for key, lo, hi, text in (("momentum", 0, 1, "a number in [0, 1)"), ("weight_decay", 0, math.inf, "a number >= 0")):
        if key in t:
            ok &= _check(p, q + key, t[key], _is_num(t[key]) and lo <= t[key] < hi, text)
    if "restart_epochs" in t:
        ok &= _check(p, q + "restart_epochs", t["restart_epochs"],
                     _is_int(t["restart_epochs"]) and t["restart_epochs"] >= 1, "a positive integer")
    return TrainConfig(**t) if ok else None


def read_config(path) -> CoTrainConfig:
    """Read and check a YAML co-training config (``parse_config``); an unreadable file raises OSError."""
    import yaml

    with open(path) as f:
        text = f.read()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"cotrain config {path}: not valid YAML\n  {str(exc).splitlines()[0]}") from None
    return parse_config(raw, str(path))


def worker_rows(cfg: CoTrainConfig) -> list[tuple[Rows, str, bool]]:
    """Each worker's data set, the config key naming it, and whether it is the config's ``data`` (cut into one
    part per worker that uses it) rather than the worker's own.  Each file is read once; a problem is a
    ``DataError`` naming the key."""
    cache: dict = {}

    def rows_of(d, at: str) -> Rows:
        if d not in cache:
            cache[d] = DATA[d]() if isinstance(d, str) else read_rows(d, at)
        return cache[d]

    return [(rows_of(w.data, f"workers[{i}].data"), f"workers[{i}].data", False) if w.data is not None
            else (rows_of(cfg.data, "data"), "data", True) for i, w in enumerate(cfg.workers)]


def worker_split(cfg: CoTrainConfig, plan: list[tuple[Rows, str, bool]], rank: int, seed: int):
    """((x, y) worker ``rank`` trains on, (x_test, y_test) it is scored on) for ``seed``: a stratified test
    split, and of the config's ``data`` one disjoint stratified part per worker that uses it."""
    rows, at, common = plan[rank]
    train, test = split_test(rows.y, cfg.test_size, seed, at)
    if common:
        users = [r for r, (_, _, c) in enumerate(plan) if c]
        train = split_parts(rows.y, train, len(users), seed, at)[users.index(rank)]
    return rows.take(train), rows.take(test)


def steps_per_run(cfg: CoTrainConfig, world: int, plan=None) -> dict[int, list[int]]:
    """{seed: [each worker's number of optimizer steps]} (epochs x ceil(rows of its part / batch))."""
    plan = worker_rows(cfg) if plan is None else plan
    out = {}
    for seed in cfg.seeds:
        steps = []
        for rank, w in enumerate(cfg.workers[:world]):
            (x, _), _ = worker_split(cfg, plan, rank, seed)
            tc = w.train
            batch = len(x) if tc.batch_size is None or tc.optimizer == "gd" else min(tc.batch_size, len(x))
            steps.append(tc.epochs * -(-len(x) // batch))
        out[seed] = steps
    return out


def check(cfg: CoTrainConfig, world: int, models: bool = True) -> None:
    """What can be known before any process starts: the number of workers, their data, each worker's
    model and shared subset, the shapes across workers, the same number of steps everywhere.  Every
    problem in one ``ValueError``.  ``models=False`` builds no model (a worker process, whose
    ``CoTrainer`` checks the subsets across workers anyway, after the launcher checked them here)."""
    p = []
    if world != len(cfg.workers):
        p.append(f"the config has {len(cfg.workers)} workers for {world} processes "
                 f"(expected: --nproc_per_node x nodes = {len(cfg.workers)})")
    try:
        plan = worker_rows(cfg)
        per_seed = steps_per_run(cfg, len(cfg.workers), plan)
    except DataError as exc:  # the models need the data (their classes, text or not): nothing more to check
        raise ValueError(f"cotrain config: {exc}") from None
    held: dict[str, list] = {}
    for i, w in enumerate(cfg.workers if models else []):
        try:
            model = build_model(w, plan[i][0], f"workers[{i}]")
        except ValueError as exc:
            p.append(str(exc).replace("\n  ", "; "))
            continue
        try:
            names = shared_names(model, w.shared)
        except ValueError as exc:
            p.append(f"workers[{i}].shared: " + str(exc).replace("\n  ", "; "))
            continue
        params = dict(model.named_parameters())
        for n, s in names.items():
            held.setdefault(s, []).append((i, w.model, n, tuple(params[n].shape)))
    for s, entries in sorted(held.items()):
        first = entries[0]
        missing = [i for i in range(len(cfg.workers)) if i not in {e[0] for e in entries}]
        if missing:
            p.append(f"shared name {s!r} is held by workers {[e[0] for e in entries]} but not by workers {missing}")
        for e in entries[1:]:
            if e[3] != first[3]:
                p.append(f"shared name {s!r}: shapes differ: workers[{first[0]}] {first[1]} {first[2]!r} "
                         f"{first[3]} vs workers[{e[0]}] {e[1]} {e[2]!r} {e[3]}")
    if world == len(cfg.workers) and not p:
        for seed, steps in per_seed.items():
            if len(set(steps)) > 1:
                p.append(f"seed {seed}: the workers take {steps} steps: a sync is made by all workers together, so "
                         "every worker needs the same number (epochs x ceil(rows of its part / batch_size))")
    if p:
        raise ValueError(f"cotrain config: {len(p)} problem{'s' if len(p) > 1 else ''}\n  " + "\n  ".join(p))
