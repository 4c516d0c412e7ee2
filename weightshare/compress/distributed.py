"""Compression over many processes and machines (torch.distributed, gloo), launched by torchrun.

``weightshare compress SRC --data-free --nproc N --out DIR`` runs N processes on this machine
(``launch``: torch.distributed's elastic launcher, as ``torchrun --standalone`` runs it).  Across machines, run on each
``torchrun --nnodes M --nproc_per_node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m weightshare.compress
SRC --data-free --out DIR`` with the source at the same path on every machine.

Every process opens the checkpoint and plans the same work (``stream.plan``); the tensors to
cluster are dealt out by size (largest first, each to the least-loaded process: ``deal``), so that
the processes finish together.  Each clusters its share one tensor at a time into a scratch file of
its own.  The results are then gathered to rank 0 over gloo, rank by rank, and rank 0 alone writes
the packed folder, in the one order a single process writes it (``stream.compress_streamed`` with
the results installed instead of clustered): the output is byte-identical to a single-process run,
and only rank 0 needs to reach ``--out`` (no shared file system is assumed for it).  Gathering
costs one pass over the packed bytes.

A process that dies makes rank 0 stop with an error naming it, at once when its connection drops,
and a hung one after ``timeout`` seconds; the others stop when rank 0 does.  Only rank 0 writes,
in a staged folder renamed into place at the end: a failed run leaves no output.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from weightshare import io
from weightshare._progress import progress
from weightshare.compress import stream
from weightshare.errors import clip

__all__ = ["RankError", "deal", "compress_distributed", "in_torchrun", "init", "launch", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 1800.0  # seconds a process waits for another (the shares end close together: see deal)
_DTYPES = list(io.DTYPES.values())


class RankError(RuntimeError):
    """Another process of a distributed compression stopped, or did not answer within the timeout."""


def in_torchrun() -> bool:
    """Whether this process is one of several that torchrun started (its environment says so)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init(timeout: float = DEFAULT_TIMEOUT) -> None:
    """Join the gloo group torchrun's environment describes, waiting at most ``timeout`` s for any other process."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    # torchrun stops the other processes with SIGTERM when one fails: exit through Python, so that the scratch
    # files and the staged output folder are removed on the way out
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_term)


def _exit_on_term(signum, frame) -> None:
    raise SystemExit(128 + signum)


def deal(work: stream.Work, world: int) -> list[list[int]]:
    """The tensors each process clusters: largest first, each to the least-loaded process (lowest rank on a tie);
    each share in the order of the model.  The same on every process."""
    loads, shares = [0] * world, [[] for _ in range(world)]
    for i in sorted(work.clustered, key=lambda i: (-work.numel(i), i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += work.numel(i)
    return [sorted(s) for s in shares]


class _Results:
    """Clustered weights, ``(tables, codes)`` by module index, in a scratch file: none held in memory."""

    def __init__(self, folder: Path):
        self.path = folder / "results"
        self._file = open(self.path, "wb+")  # noqa: SIM115 (closed by close)
        self.index: dict[int, tuple[int, tuple[int, ...], torch.dtype, int]] = {}

    def add(self, i: int, tables: torch.Tensor, codes: torch.Tensor) -> None:
        self._file.seek(0, os.SEEK_END)
        offset = self._file.tell()
        for t in (tables, codes):
            self._file.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.index[i] = (offset, tuple(tables.shape), tables.dtype, codes.numel())

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        offset, shape, dtype, n_codes = self.index[i]
        self._file.flush()
        size = torch.Size(shape).numel() * dtype.itemsize
        tables = io.read_bytes(self.path, offset, size).view(dtype).reshape(shape)
        return tables, io.read_bytes(self.path, offset + size, n_codes)

    def close(self) -> None:
        self._file.close()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return clip(lines[0]) if lines else type(exc).__name__


def _talk(peer: int, world: int, timeout: float, what: str, fn) -> None:
    try:
        fn()
    except (RuntimeError, ConnectionError, TimeoutError) as exc:
        raise RankError(f"compress: rank {peer} of {world} stopped, or did not answer within {timeout:g} s, {what} "
                        f"(its own message, if it had one, is above)\n  cause: {_first_line(exc)}\n"
                        "  nothing was written") from None


def _send(results: _Results, share: list[int], world: int, timeout: float) -> None:
    """This process's results to rank 0: a header per tensor (index, dtype, shape, codes), then its bytes."""
    for i in share:
        tables, codes = results.get(i)
        header = torch.tensor([i, _DTYPES.index(tables.dtype), *tables.shape, codes.numel()], dtype=torch.int64)
        for t in (header, tables.reshape(-1).view(torch.uint8), codes):
            _talk(0, world, timeout, "while this process sent its results", lambda t=t: dist.send(t, dst=0))


def _receive(results: _Results, rank: int, share: list[int], world: int, timeout: float) -> None:
    """Rank ``rank``'s results into rank 0's scratch file, checked against the share it was dealt."""
    for i in share:
        header = torch.empty(5, dtype=torch.int64)
        _talk(rank, world, timeout, "before it sent its results", lambda: dist.recv(header, src=rank))
        j, code, rows, cols, n_codes = header.tolist()
        if j != i or not 0 <= code < len(_DTYPES):
            raise RankError(f"compress: rank {rank} sent tensor {j} where {i} was expected: the processes "
                            "disagree on the model (same source and flags on every machine?)")
        dtype = _DTYPES[code]
        tables = torch.empty(rows * cols * dtype.itemsize, dtype=torch.uint8)
        codes = torch.empty(n_codes, dtype=torch.uint8)
        for t in (tables, codes):
            _talk(rank, world, timeout, "while it sent its results", lambda t=t: dist.recv(t, src=rank))
        results.add(i, tables.view(dtype).reshape(rows, cols), codes)


def compress_distributed(ss: stream.StreamSource, out, config, compressible, configs=None, dense=frozenset(),
                         records=None, timeout: float = DEFAULT_TIMEOUT, max_shard_size=None):
    """This process's part of a distributed streamed compression (``init`` first): rank 0 returns what
    ``stream.compress_streamed`` does, the others ``(None, seconds spent on their share)``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out)
    work = stream.plan(ss, config, compressible, configs, dense)
    shares = deal(work, world)
    if rank == 0:
        from weightshare import pack

        pack.check_dest(out, ss.source.path)
    where = out.parent if rank == 0 and out.parent.is_dir() else None  # rank 0's scratch beside the output
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".weightshare-rank{rank}-", dir=where) as scratch:
        results = _Results(Path(scratch))
        try:
            mine = shares[rank]  # one bar, rank 0's: the shares end together
            for i in progress(mine, desc=f"codebook {config.bits}-bit, rank 0 of {world}", unit="tensor") \
                    if rank == 0 else mine:
                results.add(i, *stream.cluster_weight(ss, work, i))
                io.trim_heap()
            if rank != 0:
                _send(results, shares[rank], world, timeout)
                return None, time.perf_counter() - t0
            for r in range(1, world):
                _receive(results, r, shares[r], world, timeout)
            shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            rep, _ = stream.compress_streamed(ss, out, config, compressible, configs, dense, records, work=work,
                                              results=results.get, **shards)
            return rep, time.perf_counter() - t0
        finally:
            results.close()


def launch(argv: list[str], nproc: int) -> int:
    """Run ``weightshare compress`` with ``argv`` (its flags, without --nproc) on ``nproc`` local processes, as
    ``torchrun --standalone`` does (torch.distributed's elastic launcher, in this process); returns 0, or the
    exit code of the first process that failed, whose own message is already on stderr.  One thread each unless
    OMP_NUM_THREADS says otherwise."""
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "weightshare.compress", *argv)
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        code = failure.exitcode
        return code if isinstance(code, int) and code > 0 else 1
    except SignalException:  # Ctrl-C or a kill: the launcher has stopped the processes; say it as Python does
        raise KeyboardInterrupt from None
    return 0
