"""Run a function on N local gloo processes, as torchrun would on one machine, and collect its results."""

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(fn, rank, world, port, queue):
    import weightshare as ws

    ws.set_progress(False)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, fn(rank)))  # results by value (numpy arrays): the process exits after this
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world: int = 2, timeout: float = 300) -> dict:
    """{rank: fn(rank)} from ``world`` spawned processes in one gloo group; each must exit cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results
