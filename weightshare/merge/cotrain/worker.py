"""One co-training worker: its runs, one per seed, in a torch.distributed process group.

``main`` is what torchrun starts in every process (``torchrun --nproc_per_node N -m weightshare.cotrain
CONFIG``): it reads and checks the config (``config.py``), joins the gloo group, and calls ``run``,
which trains ``workers[RANK].model`` on its part of the data, syncing its shared subset through a
``CoTrainer`` (``sync.py``).  The same code runs across machines (``torchrun --nnodes M --node_rank ...
--rdzv_endpoint HOST:PORT ...``); progress output and the results file are rank 0's only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from weightshare.merge.cotrain.config import CoTrainConfig, check, read_config, steps_per_run, worker_rows, worker_split
from weightshare.merge.cotrain.sync import CoTrainer, CoTrainError
from weightshare.merge.cotrain.zoo import build_model, encode

__all__ = ["main", "run", "summary_rows"]


def run(cfg: CoTrainConfig, rank: int, world: int, log=None) -> dict | None:
    """Worker ``rank``'s runs, one per seed, in an initialised process group; rank 0 returns every
    worker's figures (gathered), the others None.  ``log``: rank 0's progress printer."""
    from weightshare.multitask.trainer import error_rate, train

    spec, at = cfg.workers[rank], f"workers[{rank}]"
    plan = worker_rows(cfg)
    steps = steps_per_run(cfg, world, plan)
    records = []
    (x, y), _ = worker_split(cfg, plan, rank, cfg.seeds[0])
    warm = build_model(spec, plan[rank][0], at)
    _warm_up(warm, encode(warm, x[:64]), y[:64])
    for seed in cfg.seeds:
        (x, y), (xte, yte) = worker_split(cfg, plan, rank, seed)
        tc = replace(spec.train, seed=seed)
        torch.manual_seed(seed)
        model = build_model(spec, plan[rank][0], at)  # a model directory's new head is drawn under the seed
        x, xte = encode(model, x), encode(model, xte)
        rec = {"seed": seed, "rows": len(y)}
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
            log(f"seed {seed}: rank 0 ({_short(spec.model)}) accuracy {rec['acc']:.4f}{alone_text}; "
                f"{rec['syncs']} syncs, {rec['bytes_sent']} bytes sent")
    mine = {"rank": rank, "model": _short(spec.model), "params": sum(p.numel() for p in model.parameters()),
            "seeds": records}
    everyone = [None] * world
    try:
        dist.all_gather_object(everyone, mine)
    except RuntimeError as exc:
        raise CoTrainError(f"co-training: rank {rank} could not gather the results: a worker stopped\n"
                           f"  cause: {exc}") from exc
    return {"world": world, "sync_every": cfg.sync_every, "outer": None if cfg.outer is None else vars(cfg.outer),
            "workers": everyone} if rank == 0 else None


def _short(model: str) -> str:
    """A model's name for the table: a built-in name, or a directory's last two path parts."""
    parts = Path(model).parts
    return model if len(parts) <= 2 else str(Path(*parts[-2:]))


def _warm_up(model, x, y) -> None:
    """A few steps on a throw-away model, so that the timed runs do not pay the process's first-call costs."""
    from weightshare.multitask.trainer import TrainConfig, train

    train(model, x, y, TrainConfig(epochs=2, batch_size=32), desc="warm-up")


def summary_rows(result: dict) -> list[dict]:
    rows = []
    for w in result["workers"]:
        s = w["seeds"]
        mean = lambda k: sum(r[k] for r in s) / len(s) if all(k in r for r in s) else None  # noqa: E731
        rows.append({"rank": w["rank"], "model": w["model"], "params": w["params"],
                     "shared_params": s[-1]["shared_params"], "acc_cotrained": mean("acc"),
                     "acc_alone": mean("acc_alone"), "syncs": s[-1]["syncs"], "bytes_sent": s[-1]["bytes_sent"],
                     "ring_bytes_sent": s[-1]["ring_bytes_sent"], "seconds": mean("seconds"),
                     "sync_seconds": mean("sync_seconds")})
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
              "  torchrun --nproc_per_node N -m weightshare.cotrain CONFIG"
              "   (or: weightshare cotrain CONFIG --nproc N)",
              file=sys.stderr)
        return 2
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    import weightshare as ws

    ws.set_progress(rank == 0 and not args.quiet)
    try:
        cfg = read_config(args.config)
        check(cfg, world, models=False)  # each rank builds its own model; CoTrainer compares the subsets
    except ValueError as exc:  # every rank finds the same problems: one of them says so
        if rank == 0:
            print(f"weightshare cotrain: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if rank == 0:
            print(f"weightshare cotrain: error: {exc.strerror or exc}: {exc.filename or args.config}", file=sys.stderr)
        return 1
    from weightshare.report import table

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
