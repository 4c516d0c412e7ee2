"""Co-training from a YAML config, one worker per process: ``torchrun --nproc_per_node N -m weightshare.cotrain CONFIG``.

Worker r (torchrun's RANK) builds ``workers[r].model``, trains it on the r-th of N disjoint
stratified parts of the data's training split with the one training loop
(``weightshare.multitask.trainer.train``), and averages its shared subset with the other
workers every ``sync_every`` steps (``weightshare.merge.distributed.CoTrainer``).  All
workers are scored on the same held-out test split.  The config is checked field by field
before anything runs: unknown keys are refused by name, every problem is reported at once,
and the workers' shared subsets are resolved against their models and compared (shapes)
before a process group exists.  Models are built-in names, never code from the config.

``timeout`` bounds every wait for the other workers: the start of each run (with
``compare_alone`` the workers arrive there as far apart as their alone runs took), each sync
and the end.  A worker that crashes is noticed at the next sync at once (its connection
drops); one that hangs, after ``timeout`` seconds; either way the others stop with an error.

The same code runs across machines (``torchrun --nnodes M --node_rank ... --rdzv_endpoint
HOST:PORT ...``); progress output is on rank 0 only.  ``launch(config, nproc)`` runs
``python -m torch.distributed.run --standalone --nproc_per_node N -m weightshare.cotrain
CONFIG`` on this machine (``weightshare cotrain CONFIG --nproc N``).

Example::

    sync_every: 4              # H: average the shared subset every 4 local steps
    outer: {lr: 0.7, momentum: 0.9, nesterov: true}   # optional: DiLoCo; omit for plain averaging
    seeds: [0, 1, 2]           # one co-training run per seed (default [0])
    timeout: 120               # seconds a worker waits for the others at any meeting point (see below)
    compare_alone: true        # also train each model alone on its part, from the same start
    results: cotrain.json      # optional: rank 0 writes every figure there
    workers:                   # one per process, in rank order
      - model: cnn             # built-in: cnn | gru (weightshare.bench.cotrain)
        width: 32
        shared: {"proj.*": "proj.*", "head.*": "head.*"}    # parameter pattern -> shared name
        train: {epochs: 20, batch_size: 64, optimizer: adam, lr: 0.003}
      - model: gru
        shared: {"proj.*": "proj.*", "head.*": "head.*"}
        train: {epochs: 20, batch_size: 64, optimizer: adam, lr: 0.003}
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta

__all__ = ["CoTrainConfig", "WorkerSpec", "parse_config", "read_config", "check", "run", "main", "launch"]

DATA = ("digits",)
TOP_KEYS = ("workers", "sync_every", "outer", "seeds", "timeout", "data", "test_size", "compare_alone", "results")
WORKER_KEYS = ("model", "width", "shared", "train")
TRAIN_KEYS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "restart_epochs")
OUTER_KEYS = ("lr", "momentum", "nesterov")
TRAIN_DEFAULTS = {"epochs": 20, "batch_size": 64, "optimizer": "adam", "lr": 0.003}


@dataclass
class WorkerSpec:
    model: str
    shared: dict[str, str]
    width: int = 32
    train: object = None  # a TrainConfig (its seed is set per run from ``seeds``)


@dataclass
class CoTrainConfig:
    workers: list[WorkerSpec]
    sync_every: int
    outer: object = None  # OuterSGD or None
    seeds: list[int] = field(default_factory=lambda: [0])
    timeout: float = 120.0
    data: str = "digits"
    test_size: float = 0.25
    compare_alone: bool = False
    results: str | None = None


# ------------------------------------------------------------------------------------ validation


def _models() -> dict:
    from weightshare.bench.cotrain import MODELS

    return MODELS


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
    from weightshare.merge.distributed import OuterSGD
    from weightshare.multitask.trainer import OPTIMIZERS, TrainConfig

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
    data = raw.get("data", "digits")
    _check(p, "data", data, data in DATA, f"one of: {', '.join(DATA)}")
    test_size = raw.get("test_size", 0.25)
    _check(p, "test_size", test_size, _is_num(test_size) and 0.05 <= test_size <= 0.5, "a fraction in [0.05, 0.5]")
    compare = raw.get("compare_alone", False)
    _check(p, "compare_alone", compare, isinstance(compare, bool), "true or false")
    results = raw.get("results")
    _check(p, "results", results, results is None or (isinstance(results, str) and results != ""),
           "a file path or null")
    outer = raw.get("outer")
    outer_ok = None
    if outer is not None and _check(p, "outer", outer, isinstance(outer, dict), "a mapping (lr, momentum, nesterov) or null"):
        _unknown("outer.", outer, OUTER_KEYS, p)
        lr, mom, nest = outer.get("lr", 0.7), outer.get("momentum", 0.9), outer.get("nesterov", True)
        good = _check(p, "outer.lr", lr, _is_num(lr) and lr > 0, "a number > 0")
        good &= _check(p, "outer.momentum", mom, _is_num(mom) and 0 <= mom < 1, "a number in [0, 1)")
        good &= _check(p, "outer.nesterov", nest, isinstance(nest, bool), "true or false")
        if good:
            outer_ok = OuterSGD(lr=float(lr), momentum=float(mom), nesterov=nest)
    workers = []
    models = _models()
    raw_workers = raw.get("workers")
    if "workers" in raw and _check(p, "workers", raw_workers, isinstance(raw_workers, list) and len(raw_workers) >= 1,
                                   "a non-empty list, one entry per process"):
        for i, w in enumerate(raw_workers):
            at = f"workers[{i}]"
            if not _check(p, at, w, isinstance(w, dict), "a mapping (model, width, shared, train)"):
                continue
            _unknown(at + ".", w, WORKER_KEYS, p)
            for key in ("model", "shared"):
                if key not in w:
                    p.append(f"{at}.{key}: missing (required)")
            model = w.get("model")
            good = "model" in w and _check(p, f"{at}.model", model, isinstance(model, str) and model in models,
                                           f"a built-in model: {', '.join(models)}")
            width = w.get("width", 32)
            good &= _check(p, f"{at}.width", width, _is_int(width) and 1 <= width <= 4096, "an integer in 1..4096")
            shared = w.get("shared")
            good &= "shared" in w and _check(
                p, f"{at}.shared", shared, isinstance(shared, dict) and len(shared) >= 1
                and all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in shared.items()),
                "a non-empty mapping of strings {parameter pattern: shared name pattern}")
            tr = w.get("train", {})
            tc = None
            if _check(p, f"{at}.train", tr, isinstance(tr, dict), f"a mapping ({', '.join(TRAIN_KEYS)})"):
                _unknown(f"{at}.train.", tr, TRAIN_KEYS, p)
                t = {**TRAIN_DEFAULTS, **{k: v for k, v in tr.items() if k in TRAIN_KEYS}}
                q = f"{at}.train."
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
                if ok:
                    tc = TrainConfig(**t)
            if good and tc is not None:
                workers.append(WorkerSpec(model=model, shared=dict(shared), width=width, train=tc))
    if p:
        raise ValueError(f"cotrain config {source}: {len(p)} problem{'s' if len(p) > 1 else ''}\n  " + "\n  ".join(p))
    return CoTrainConfig(workers=workers, sync_every=raw["sync_every"], outer=outer_ok, seeds=list(seeds),
                         timeout=float(timeout), data=data, test_size=float(test_size), compare_alone=compare,
                         results=results)


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


def steps_per_run(cfg: CoTrainConfig, world: int) -> dict[int, list[int]]:
    """{seed: [each worker's number of optimizer steps]} (epochs x ceil(rows of its part / batch))."""
    from weightshare.bench.cotrain import digits_parts

    out = {}
    for seed in cfg.seeds:
        parts, _ = digits_parts(world, seed, cfg.test_size)
        steps = []
        for w, (x, _) in zip(cfg.workers, parts):
            tc = w.train
            batch = len(x) if tc.batch_size is None or tc.optimizer == "gd" else min(tc.batch_size, len(x))
            steps.append(tc.epochs * -(-len(x) // batch))
        out[seed] = steps
    return out


def check(cfg: CoTrainConfig, world: int) -> None:
    """What can be known before any process starts: the number of workers, each worker's shared
    subset against its model, the shapes across workers, the same number of steps everywhere.
    Every problem in one ``ValueError``."""
    from weightshare.merge.distributed import shared_names

    p = []
    if world != len(cfg.workers):
        p.append(f"the config has {len(cfg.workers)} workers for {world} processes "
                 f"(expected: --nproc_per_node x nodes = {len(cfg.workers)})")
    models = _models()
    held: dict[str, list] = {}
    for i, w in enumerate(cfg.workers):
        model = models[w.model](w.width)
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
        for seed, steps in steps_per_run(cfg, world).items():
            if len(set(steps)) > 1:
                p.append(f"seed {seed}: the workers take {steps} steps: a sync is made by all workers together, so "
                         "every worker needs the same number (epochs x ceil(rows of its part / batch_size))")
    if p:
        raise ValueError(f"cotrain config: {len(p)} problem{'s' if len(p) > 1 else ''}\n  " + "\n  ".join(p))


# ------------------------------------------------------------------------------------ the worker


def run(cfg: CoTrainConfig, rank: int, world: int, log=None) -> dict | None:
    """Worker ``rank``'s runs, one per seed, in an initialised process group; rank 0 returns every
    worker's figures (gathered), the others None.  ``log``: rank 0's progress printer."""
    import torch
    import torch.distributed as dist

    from weightshare.bench.cotrain import digits_parts
    from weightshare.merge.distributed import CoTrainer, CoTrainError
    from weightshare.multitask.trainer import error_rate, train

    spec = cfg.workers[rank]
    model_cls = _models()[spec.model]
    steps = steps_per_run(cfg, world)
    records = []
    _warm_up(model_cls(spec.width), *digits_parts(world, cfg.seeds[0], cfg.test_size)[0][rank])
    for seed in cfg.seeds:
        parts, (xte, yte) = digits_parts(world, seed, cfg.test_size)
        x, y = parts[rank]
        tc = replace(spec.train, seed=seed)
        torch.manual_seed(seed)
        model = model_cls(spec.width)
        rec = {"seed": seed, "rows": len(x)}
        if cfg.compare_alone:
            alone = copy.deepcopy(model)
            t0 = time.perf_counter()
            train(alone, x, y, tc, desc=f"seed {seed} alone")
            rec["seconds_alone"] = time.perf_counter() - t0
            rec["acc_alone"] = 1.0 - error_rate(alone, xte, yte)
        trainer = CoTrainer(model, spec.shared, every=cfg.sync_every, outer=cfg.outer, steps=steps[seed][rank],
                            timeout=cfg.timeout)
        t0 = time.perf_counter()
        train(model, x, y, tc, desc=f"seed {seed} co-trained", on_step=trainer.step)
        trainer.finish()
        rec["seconds"] = time.perf_counter() - t0
        rec["acc"] = 1.0 - error_rate(model, xte, yte)
        rec.update(trainer.stats())
        records.append(rec)
        if log is not None:
            alone_text = f", alone {rec['acc_alone']:.4f}" if cfg.compare_alone else ""
            log(f"seed {seed}: rank 0 ({spec.model}) accuracy {rec['acc']:.4f}{alone_text}; "
                f"{rec['syncs']} syncs, {rec['bytes_sent']} bytes sent")
    mine = {"rank": rank, "model": spec.model, "params": sum(p.numel() for p in model.parameters()), "seeds": records}
    everyone = [None] * world
    try:
        dist.all_gather_object(everyone, mine)
    except RuntimeError as exc:
        raise CoTrainError(f"co-training: rank {rank} could not gather the results: a worker stopped\n  cause: {exc}") from exc
    return {"world": world, "sync_every": cfg.sync_every, "outer": None if cfg.outer is None else vars(cfg.outer),
            "workers": everyone} if rank == 0 else None


def _warm_up(model, x, y) -> None:
    """A few steps on a throw-away model, so that the timed runs do not pay the process's first-call costs."""
    from weightshare.multitask.trainer import TrainConfig, train

    train(model, x[:128], y[:128], TrainConfig(epochs=2, batch_size=64), desc="warm-up")


def summary_rows(result: dict) -> list[dict]:
    rows = []
    for w in result["workers"]:
        s = w["seeds"]
        mean = lambda k: sum(r[k] for r in s) / len(s) if all(k in r for r in s) else None  # noqa: E731
        rows.append({"rank": w["rank"], "model": w["model"], "params": w["params"],
                     "shared_params": s[-1]["shared_params"], "acc_cotrained": mean("acc"), "acc_alone": mean("acc_alone"),
                     "syncs": s[-1]["syncs"], "bytes_sent": s[-1]["bytes_sent"], "ring_bytes_sent": s[-1]["ring_bytes_sent"],
                     "seconds": mean("seconds"), "sync_seconds": mean("sync_seconds")})
    return rows


def main(argv: list[str] | None = None) -> int:
    """The torchrun entry point; returns the exit code (2: bad config, 1: a failed run)."""
    ap = argparse.ArgumentParser(prog="python -m weightshare.cotrain",
                                 description="Co-train one model per process (run under torchrun).")
    ap.add_argument("config", help="YAML co-training config")
    ap.add_argument("--quiet", action="store_true", help="no progress output (errors still go to stderr)")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("weightshare cotrain: error: run under torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):\n"
              "  torchrun --nproc_per_node N -m weightshare.cotrain CONFIG   (or: weightshare cotrain CONFIG --nproc N)",
              file=sys.stderr)
        return 2
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    import weightshare as ws

    ws.set_progress(rank == 0 and not args.quiet)
    try:
        cfg = read_config(args.config)
        check(cfg, world)
    except ValueError as exc:  # every rank finds the same problems: one of them says so
        if rank == 0:
            print(f"weightshare cotrain: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if rank == 0:
            print(f"weightshare cotrain: error: {exc.strerror or exc}: {exc.filename or args.config}", file=sys.stderr)
        return 1
    import torch.distributed as dist

    from weightshare.report import table
    from weightshare.merge.distributed import CoTrainError

    log = (lambda m: print(m, flush=True)) if rank == 0 and not args.quiet else None
    dist.init_process_group("gloo", timeout=timedelta(seconds=cfg.timeout))
    try:
        result = run(cfg, rank, world, log=log)
    except (CoTrainError, ValueError) as exc:
        sys.stdout.flush()
        print(f"weightshare cotrain: rank {rank}: error: {exc}", file=sys.stderr, flush=True)
        os._exit(1)  # the group is broken: tearing it down could wait on the missing worker
    dist.destroy_process_group()
    if rank == 0:
        if log is not None:
            print(table(summary_rows(result), f"co-training, {world} workers, sync every {cfg.sync_every} steps"
                        + (f", outer SGD lr {cfg.outer.lr} momentum {cfg.outer.momentum}" if cfg.outer else "")
                        + f", mean over {len(cfg.seeds)} seed(s); bytes per rank per run"), flush=True)
        if cfg.results:
            with open(cfg.results, "w") as f:
                json.dump(result, f, indent=1)
    return 0


def launch(config_path, nproc: int | None = None, timeout: float | None = None, quiet: bool = False) -> int:
    """Check the config, then run it on ``nproc`` local processes (default: one per worker) with
    ``python -m torch.distributed.run --standalone``; returns torchrun's exit code.  Past
    ``timeout`` seconds the whole run is stopped (SIGTERM, then SIGKILL) and 124 returned."""
    cfg = read_config(config_path)
    nproc = len(cfg.workers) if nproc is None else nproc
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"cotrain: nproc\n  expected: a positive integer\n  got: {nproc!r}")
    check(cfg, nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "weightshare.cotrain", str(config_path)] + (["--quiet"] if quiet else [])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # its own group: stopped as a whole
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        print(f"weightshare cotrain: error: the run took longer than {timeout:g} s and was stopped", file=sys.stderr)
        return 124
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


if __name__ == "__main__":
    sys.exit(main())
