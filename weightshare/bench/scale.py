"""bench scale: a large Llama compressed, loaded, run and merged on this machine.

The model is built from a transformers config with seeded random weights and written shard by shard
as bf16 safetensors (``hub.write_random_pretrained``: the model never exists whole in memory).  Each
step runs in a fresh process, which reports its own wall time and peak RSS (VmHWM), and its peak over
the RSS it had after its imports:

  write      the random checkpoint (bf16 shards + index)
  compress   4-bit per-channel tables, data-free, streamed (``weightshare compress``): 1 process with its
             default threads, then 1 process x 1 thread and 2 processes x 1 thread (torchrun, as
             ``--nproc 2``; its file compared with the 1-process one, byte for byte) and the speed of the
             2 processes over the 1 x 1 run (at 1 B only: the target is there)
  load       ``ws.load`` of the packed model (peak RSS against the packed size), then one decode step
             (one token after 16, KV cache) against the bandwidth limit: the bytes of every packed
             weight a step reads over the streaming read bandwidth measured in the same process
  merge      three 1 B checkpoints (seeds 0, 1, 2): linear, and TIES on the two task vectors
  calibrate  GPTQ codebooks (4-bit per-channel) fit to 64 texts, block by block from the checkpoint and with
             the model loaded whole, their files compared byte for byte; on the 44 M model at every size
             (GPTQ takes about 450 s per block of the 1 B model on 2 cores) and skipped with --quick.  The
             texts are random words of a word-level tokenizer written beside the weights (no hub)

Sizes: ``1b`` (TinyLlama-1.1B's shape), ``7b`` (Llama-2-7B's; the merges stay at 1 B), ``--quick``:
a 44 M model of the same architecture (merges of three of them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from weightshare.bench import table
from weightshare.bench.load import dir_bytes

FILE = "weightshare.safetensors"
ORDER = 120  # its place in `weightshare bench --help` (the README's order)

LLAMA = dict(vocab_size=32000, num_attention_heads=32, rms_norm_eps=1e-5, max_position_embeddings=2048)
CONFIGS = {
    "quick": dict(LLAMA, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2),
    "1b": dict(LLAMA, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_key_value_heads=4),
    "7b": dict(LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_key_value_heads=32),
}
TARGETS = {  # issue 20's, on 2 cores
    "1b": {"compress_peak_mb": "<= 1536", "speed_vs_1x1 (2 processes)": ">= 1.7"},
    "7b": {"compress_seconds": "<= 480", "compress_peak_mb": "<= 4096"},
}

_CHILD = r"""
import json, sys, time
step, args = sys.argv[1], json.loads(sys.argv[2])
import torch, transformers  # noqa: F401  (imports before the baseline, the model's code and kernels too)
if step != "merge":  # 3.5 s of import that a merge, which builds no model, does not need
    import transformers.models.llama.modeling_llama  # noqa: F401
import weightshare as ws
import weightshare.kernels, weightshare.modules  # noqa: F401
from weightshare.bench.load import memory_kb, reset_peak_rss
from weightshare.compress import compress
from weightshare.hub import write_random_pretrained

def status(key):  # MB
    return memory_kb()[key] / 1024

base = status("VmRSS")
reset_peak_rss()  # the peak counter restarts here
t0 = time.perf_counter()
out = {}
if step == "write":  # the first model is the one measured; the others are the merge's inputs
    for i, (config, seed, path) in enumerate(args["models"]):
        write_random_pretrained(transformers.LlamaConfig(**config), path, seed=seed, max_shard_size="2GB")
        if i == 0:
            out = {"first_seconds": time.perf_counter() - t0, "first_peak_over_imports_mb": status("VmHWM") - base}
elif step == "compress":  # under torchrun: this rank's share; rank 0 writes and reports
    from weightshare.compress.distributed import in_torchrun
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    ranks = in_torchrun()
    _, rep, seconds = compress(args["src"], args["out"], ws.CodebookConfig(bits=4, granularity="per_channel"),
                               distributed=ranks)
    out = {"clustering_seconds": seconds, "weights": rep.params_virtual if rep else None,
           "threads": torch.get_num_threads(), "rank": int(__import__("os").environ.get("RANK", "0"))}
elif step == "load":
    model = ws.load(args["src"])
    out["load_seconds"] = time.perf_counter() - t0
    out["peak_rss_load_mb"], out["peak_over_imports_load_mb"] = status("VmHWM"), status("VmHWM") - base
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        past = model(ids, use_cache=True).past_key_values
        for _ in range(args["steps"]):
            t1 = time.perf_counter()
            model(ids[:, -1:], past_key_values=past, use_cache=True)
            times.append(time.perf_counter() - t1)
    del model, past
    out["decode_seconds"] = sorted(times)[len(times) // 2]
    buf = torch.ones(1 << 27)  # 512 MB, far larger than the caches: a streaming read
    reads = []
    for _ in range(5):
        t1 = time.perf_counter()
        buf.sum()
        reads.append(time.perf_counter() - t1)
    out["read_gb_per_s"] = buf.numel() * 4 / sorted(reads)[2] / 1e9
elif step == "merge":  # each method from a restarted peak counter
    m = args["models"]
    for method in ("linear", "ties"):
        before = status("VmRSS")
        reset_peak_rss()
        t1 = time.perf_counter()
        if method == "linear":
            ws.merge(m, "linear", weights=[0.5, 0.3, 0.2], out=args["out"] + "-linear", dtype="bfloat16")
        else:
            ws.merge(m[1:], "ties", base=m[0], weights=[0.5, 0.5], out=args["out"] + "-ties", dtype="bfloat16",
                     density=0.5)
        out[method] = {"seconds": time.perf_counter() - t1, "peak_rss_mb": status("VmHWM"),
                       "peak_over_imports_mb": status("VmHWM") - base, "peak_over_start_mb": status("VmHWM") - before}
elif step == "calibrate":
    _, rep, seconds = compress(args["src"], args["out"], ws.CodebookConfig(bits=4, granularity="per_channel"),
                               calibration=args["texts"], stream=args["stream"])
    out = {"clustering_seconds": seconds}
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss_mb": status("VmHWM"), "rss_after_imports_mb": base,
                  "peak_over_imports_mb": status("VmHWM") - base, **out}))
"""


def _step(step: str, **args) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, step, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench scale: the {step} step failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ranks(step: str, nproc: int, tmp: Path, **args) -> list[dict]:
    """``step`` on ``nproc`` processes under torchrun (one thread each): every rank's figures, by rank."""
    script = tmp / "scale_child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(script), step, json.dumps(args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench scale: the {step} step on {nproc} processes failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return sorted(lines, key=lambda d: d["rank"])


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _bytes_per_decode_step(packed: Path) -> int:
    """Bytes of the packed weights one decode step reads: all but the token embedding, of which it reads a row."""
    from weightshare import io

    header = io.read_header(packed / "weightshare.safetensors")
    return sum(info.nbytes for name, info in header.tensors.items() if not name.startswith("model.embed_tokens"))


def _calibrate(tmp: Path, rows: list) -> dict:
    """The ``calibrate`` step on the 44 M model: block by block, then whole; rows for both."""
    import random

    from weightshare.hub import write_random_pretrained, write_word_tokenizer

    src = write_random_pretrained(__import__("transformers").LlamaConfig(**CONFIGS["quick"]), tmp / "cal-src", seed=0)
    words = write_word_tokenizer(src, CONFIGS["quick"]["vocab_size"] - 3)
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(48)) for _ in range(64)]
    runs = {}
    for stream, label in ((None, "block by block"), (False, "model loaded whole")):
        runs[label] = _step("calibrate", src=str(src), out=str(tmp / f"cal-{stream}"), texts=texts, stream=stream)
    same = _sha256(tmp / "cal-None" / FILE) == _sha256(tmp / "cal-False" / FILE)
    for label, r in runs.items():
        rows.append({"step": f"calibrated compress 44 M, {label}" + (" (same bytes)" if same else " (DIFFERENT)"),
                     "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"],
                     "peak_over_imports_mb": r["peak_over_imports_mb"]})
    return {**runs, "same_bytes": same}


def main(quick: bool = False, size: str = "1b") -> dict:
    if size not in ("1b", "7b"):
        raise ValueError(f"bench scale: --size\n  expected: 1b or 7b\n  got: {size!r}")
    name = "quick" if quick else size
    merge_name = "quick" if quick else "1b"
    if quick:
        print(f"--quick: a {name} Llama of 44 M parameters (full: --size 1b or 7b), merges of three of them",
              flush=True)
    rows, figures = [], {"size": name}
    with tempfile.TemporaryDirectory(prefix="ws-scale-") as tmp:
        tmp = Path(tmp)
        src = tmp / f"{name}-0"
        merged = [tmp / f"{merge_name}-{seed}" for seed in (0, 1, 2)]  # the source itself, at 1 B or quick
        models = [(CONFIGS[name], 0, str(src))] + [(CONFIGS[merge_name], seed, str(p))
                                                    for seed, p in enumerate(merged) if p != src]
        w = _step("write", models=models)
        source_bytes = dir_bytes(src)
        rows.append({"step": f"write {name} (bf16 shards)", "seconds": w["first_seconds"],
                     "peak_over_imports_mb": w["first_peak_over_imports_mb"], "bytes": source_bytes})
        c = _step("compress", src=str(src), out=str(tmp / "packed"))
        packed_bytes = dir_bytes(tmp / "packed")
        rows.append({"step": "compress 4-bit per-channel, 1 process", "seconds": c["seconds"],
                     "peak_rss_mb": c["peak_rss_mb"], "peak_over_imports_mb": c["peak_over_imports_mb"],
                     "bytes": packed_bytes, "Mweights_per_s": c["weights"] / c["clustering_seconds"] / 1e6})
        weights = c["weights"]
        one = None
        if name == "1b":  # the reference of the 2-process speed (issue 20's target is at 1 B): one thread
            one = _step("compress", src=str(src), out=str(tmp / "packed1"), threads=1)
            rows.append({"step": "compress, 1 process x 1 thread", "seconds": one["seconds"],
                         "peak_rss_mb": one["peak_rss_mb"], "peak_over_imports_mb": one["peak_over_imports_mb"],
                         "Mweights_per_s": weights / one["clustering_seconds"] / 1e6})
            shutil.rmtree(tmp / "packed1")
        if quick:  # torchrun and two more processes' imports cost 9 s: --quick stays under 45 s
            rows.append({"step": "compress, 2 processes x 1 thread: run without --quick"})
        else:
            two = _ranks("compress", 2, tmp, src=str(src), out=str(tmp / "packed2"))
            same = _sha256(tmp / "packed2" / FILE) == _sha256(tmp / "packed" / FILE)
            rows.append({"step": f"compress, 2 processes x 1 thread ({'same bytes' if same else 'DIFFERENT BYTES'})",
                         "seconds": max(r["seconds"] for r in two), "peak_rss_mb": max(r["peak_rss_mb"] for r in two),
                         "peak_over_imports_mb": max(r["peak_over_imports_mb"] for r in two),
                         "Mweights_per_s": weights / two[0]["clustering_seconds"] / 1e6,
                         **({"speed_vs_1x1": one["clustering_seconds"] / two[0]["clustering_seconds"]} if one else {})})
            shutil.rmtree(tmp / "packed2")
            figures.update(compress_1x1=one, compress_2x1=two, two_process_same_bytes=same)
        ld = _step("load", src=str(tmp / "packed"), steps=3 if quick else 5)
        step_bytes = _bytes_per_decode_step(tmp / "packed")
        bound = step_bytes / (ld["read_gb_per_s"] * 1e9)
        rows.append({"step": "ws.load", "seconds": ld["load_seconds"], "peak_rss_mb": ld["peak_rss_load_mb"],
                     "peak_over_imports_mb": ld["peak_over_imports_load_mb"],
                     "peak_over_packed": ld["peak_over_imports_load_mb"] * 2**20 / packed_bytes})
        rows.append({"step": f"decode step ({step_bytes / 1e6:.0f} MB of weights, read at "
                             f"{ld['read_gb_per_s']:.1f} GB/s: bound {bound * 1e3:.1f} ms)",
                     "seconds": ld["decode_seconds"], "x_bandwidth_bound": ld["decode_seconds"] / bound})
        m = _step("merge", models=[str(p) for p in merged], out=str(tmp / "merged"))
        for method in ("linear", "ties"):
            rows.append({"step": f"merge three {merge_name} ({method})", **m[method]})
        figures.update(write=w, merge=m, compress=c, load=ld, source_bytes=source_bytes,
                       packed_bytes=packed_bytes, decode_bound_seconds=bound)
        if quick:
            rows.append({"step": "calibrated compress (44 M model, block by block and whole): run without --quick"})
        else:
            figures["calibrate"] = _calibrate(tmp, rows)
    columns = list(dict.fromkeys(k for row in rows for k in row))  # every row shows every column
    rows = [{k: row.get(k) for k in columns} for row in rows]
    print(table(rows, f"Llama {name}: one process per step; peaks are VmHWM (MB), 'over imports' from the RSS "
                      "after torch, transformers, its Llama code and weightshare's kernels loaded"), flush=True)
    if name in TARGETS:
        print("targets (issue 20): " + ", ".join(f"{k} {v}" for k, v in TARGETS[name].items()), flush=True)
    figures["rows"] = rows
    return figures
