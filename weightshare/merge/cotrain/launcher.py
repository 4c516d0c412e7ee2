"""Launching a co-training run on this machine: ``launch(config, nproc)``, behind ``weightshare cotrain``.

It checks the config before any process starts, then runs ``python -m torch.distributed.run
--standalone --nproc_per_node N -m weightshare.cotrain CONFIG`` (``worker.main`` in every process)
and waits for it, within an optional time limit.  Across machines, run torchrun yourself on each
(``torchrun --nnodes M --node_rank ... --rdzv_endpoint HOST:PORT -m weightshare.cotrain CONFIG``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from weightshare.merge.cotrain.config import check, read_config

__all__ = ["launch"]


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
