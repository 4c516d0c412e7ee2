"""Compression over several processes (compress/distributed.py): the output equals a single process's byte for
byte, the work is dealt out by size, and a process that dies or hangs stops the run with an error naming it."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from transformers import LlamaConfig

import weightshare as ws
from weightshare.compress import compress, distributed, stream
from weightshare.compress.cluster import is_compressible
from weightshare.hub import write_random_pretrained

TINY = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _llama(path, tie=True):
    write_random_pretrained(LlamaConfig(**TINY, tie_word_embeddings=tie), path, seed=1, max_shard_size="60KB")
    return path


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "weightshare.cli", "--quiet", "compress", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def test_two_processes_write_the_single_process_file(tmp_path):
    src = _llama(tmp_path / "src")
    one = _cli(src, "--data-free", "--bits", "3", "--out", tmp_path / "one")
    two = _cli(src, "--data-free", "--bits", "3", "--nproc", "2", "--out", tmp_path / "two")
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert (tmp_path / "one" / "weightshare.safetensors").read_bytes() == \
        (tmp_path / "two" / "weightshare.safetensors").read_bytes()
    assert "packed model written to" in two.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left beside the output


def test_nproc_refuses_calibrated_work_before_any_process_starts(tmp_path):
    src = _llama(tmp_path / "src")
    texts = tmp_path / "t.txt"
    texts.write_text("a text\n")
    out = _cli(src, "--calibration", texts, "--nproc", "2", "--out", tmp_path / "o")
    assert out.returncode == 2 and "--nproc shares data-free work only" in out.stderr
    assert "torch.distributed" not in out.stderr and not (tmp_path / "o").exists()


def test_deal_balances_by_size_and_covers_every_tensor(tmp_path):
    """Largest first to the least-loaded process: every clustered tensor exactly once, loads within the largest
    tensor of each other (the LPT bound), the same answer every time."""
    ss, _ = stream.open_source(_llama(tmp_path / "src", tie=False))
    work = stream.plan(ss, ws.CodebookConfig(bits=3), is_compressible)
    for world in (1, 2, 3, 5):
        shares = distributed.deal(work, world)
        assert sorted(i for s in shares for i in s) == work.clustered
        assert all(s == sorted(s) for s in shares)
        loads = [sum(work.numel(i) for i in s) for s in shares]
        assert max(loads) - min(loads) <= max(work.numel(i) for i in work.clustered)
        assert shares == distributed.deal(work, world)


def _rank(rank, world, port, src, out, fault, timeout, queue):
    import tempfile

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    tempfile.tempdir = os.path.join(os.path.dirname(out), "scratch")  # a killed process's scratch stays in the test's
    os.makedirs(tempfile.tempdir, exist_ok=True)
    ws.set_progress(False)
    if rank == 1 and fault == "dead":
        stream.cluster_weight = lambda *a: os._exit(3)
    if rank == 1 and fault == "hung":
        stream.cluster_weight = lambda *a: time.sleep(600)
    t0 = time.monotonic()
    try:
        compress(src, out, ws.CodebookConfig(bits=3), calibration=None, distributed=True, timeout=timeout)
        queue.put((rank, "ok", time.monotonic() - t0))
    except Exception as exc:  # noqa: BLE001 (the message is the test's subject)
        queue.put((rank, f"{type(exc).__name__}: {exc}", time.monotonic() - t0))


@pytest.mark.parametrize("fault", ["dead", "hung"])
def test_a_process_that_dies_or_hangs_is_named_and_nothing_is_written(tmp_path, fault):
    import torch.multiprocessing as mp

    src = _llama(tmp_path / "src", tie=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    timeout = 8.0
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(src), str(tmp_path / "o"), fault, timeout, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        rank, message, seconds = queue.get(timeout=120)
        assert rank == 0, message
        assert message.startswith("RankError: compress: rank 1 of 2 stopped"), message
        assert seconds < 60 + (timeout if fault == "hung" else 0)
    finally:
        for p in procs:
            p.kill()
            p.join(10)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("flags,message", [(["--nproc", "0"], "--nproc 0: expected 1 or more"),
                                           (["--timeout", "0"], "--timeout 0.0: expected seconds above 0"),
                                           (["--max-shard-size", "lots"], "--max-shard-size"),
                                           (["--nproc", "2", "--avg-bits", "3"], "--nproc shares data-free work")])
def test_bad_flags_are_refused_before_anything_starts(tmp_path, capsys, flags, message):
    from weightshare.cli import main

    assert main(["compress", str(tmp_path / "nowhere"), "--data-free", *flags, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_failing_process_gives_its_message_and_no_traceback(tmp_path):
    """A NaN in one tensor: the process that clusters it says so, the other that it stopped; the command exits 2
    with no Python traceback (the launcher runs in-process and catches torch's ChildFailedError)."""
    from safetensors.torch import load_file, save_file

    src = _llama(tmp_path / "src", tie=False)
    index = src / "model.safetensors.index.json"
    shard = src / json.loads(index.read_text())["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    state = load_file(shard)
    state["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")
    save_file(state, shard, metadata={"format": "pt"})
    out = _cli(src, "--data-free", "--bits", "3", "--nproc", "2", "--out", tmp_path / "o")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "model.layers.1.mlp.up_proj.weight: weight contains NaN" in out.stderr
    assert "Traceback" not in out.stderr and "a process of the 2 failed (exit 2)" in out.stderr
    assert not (tmp_path / "o").exists()
