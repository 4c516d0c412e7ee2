"""bench train-sharing: codebooks that keep training (issue 22) against post-training clustering, on digits.

A CNN (``digits-arch``'s: two 3x3 convolutions, max-pool, a linear head; stratified 80/20 split per seed)
is trained dense by the one training loop (Adam 1e-3, batch 128), then compressed to per-channel
codebooks of 1, 2 and 3 bits five ways, each given the same further epochs:

* one-shot: exact k-means of the trained weights, nothing more;
* tables: the same, then the tables fine-tuned (``table_parameters``);
* recluster: ``CodebookConfig(train="recluster", recluster_every=10)``, then ``ws.freeze_``;
* dkm: ``train="dkm"`` (temperature 0.05 of each group's variance, x0.99 a step), then ``ws.freeze_``;
* soft: ``train="soft"`` (soft weight-sharing, prior weight 0.1), then ``ws.freeze_``.

Test error (mean over seeds) and seconds per epoch of the further training against the same epochs of
plain dense training, run in turn.  ``dense`` is the network the codebooks start from; ``dense_longer``
is it trained the same further epochs, the fair reference of the targets (issue 22): the best 2-bit
model within 0.5 points of it, the best 1-bit within 2 points.

``--quick``: 1 seed, 10 + 3 epochs, bits 1 and 2 (full: 3 seeds, 30 + 15 epochs, bits 1-3); it says so.
"""

from __future__ import annotations

import copy
import statistics
import time

import numpy as np

from weightshare.bench import table

ORDER = 55  # its place in `weightshare bench --help` (the README's order)
WAYS = ("one-shot", "tables", "recluster", "dkm", "soft")


def _compressed(dense, way: str, bits: int):
    import weightshare as ws

    settings = {"one-shot": {}, "tables": {}, "recluster": {"train": "recluster", "recluster_every": 10},
                "dkm": {"train": "dkm", "dkm_temperature": 0.05, "dkm_anneal": 0.99},
                "soft": {"train": "soft", "soft_weight": 0.1}}[way]
    return ws.share_(copy.deepcopy(dense), ws.CodebookConfig(bits=bits, granularity="per_channel", **settings))


def main(quick: bool = False) -> dict:
    import torch

    import weightshare as ws
    from weightshare.bench.digits_arch import cnn, data
    from weightshare.multitask import TrainConfig, error_rate, train
    from weightshare.sharing.codebook import table_parameters

    seeds, first, more, bit_list = ([0], 10, 3, (1, 2)) if quick else ([0, 1, 2], 30, 15, (1, 2, 3))
    if quick:
        print(f"--quick: {len(seeds)} seed, {first} + {more} epochs, bits {bit_list} (full: 3 seeds, 30 + 15 epochs, "
              "bits 1-3)", flush=True)
    ws.set_progress(False)
    errors = {(b, w): [] for b in bit_list for w in WAYS}
    dense_err, longer_err, seconds = [], [], {w: [] for w in ("dense", *WAYS)}
    for seed in seeds:
        xtr, ytr, xte, yte = data(seed)
        torch.manual_seed(seed)
        dense = cnn()
        train(dense, xtr, ytr, TrainConfig(epochs=first, batch_size=128, lr=1e-3, seed=seed))
        dense_err.append(error_rate(dense, xte, yte))
        cfg = TrainConfig(epochs=more, batch_size=128, lr=1e-3, seed=seed)
        for bits in bit_list:
            plain = copy.deepcopy(dense)  # the reference for seconds per epoch: the same epochs, dense, in turn
            t0 = time.perf_counter()
            train(plain, xtr, ytr, cfg)
            seconds["dense"].append((time.perf_counter() - t0) / more)
            longer_err.append(error_rate(plain, xte, yte))
            for way in WAYS:
                model = _compressed(dense, way, bits)
                t0 = time.perf_counter()
                if way == "tables":
                    train(model, xtr, ytr, cfg, params=table_parameters(model))
                elif way != "one-shot":
                    train(model, xtr, ytr, cfg)
                    ws.freeze_(model)
                if way != "one-shot":
                    seconds[way].append((time.perf_counter() - t0) / more)
                errors[bits, way].append(error_rate(model, xte, yte))
            print(f"  seed {seed}, {bits} bit(s): " + ", ".join(f"{w} {100 * errors[bits, w][-1]:.2f} %" for w in WAYS),
                  flush=True)
    # the targets' reference: the dense network given the same further epochs (the fair one; "dense" stopped first)
    base, longer = float(np.mean(dense_err)), float(np.mean(longer_err))
    rows = [{"bits": b, **{w: 100 * float(np.mean(errors[b, w])) for w in WAYS}, "dense": 100 * base,
             "dense_longer": 100 * longer, "best": min(WAYS, key=lambda w: np.mean(errors[b, w]))} for b in bit_list]
    per_epoch = {w: statistics.median(v) for w, v in seconds.items() if v}
    print(table(rows, f"digits CNN, per-channel codebooks: test error in %, mean over {len(seeds)} seed(s); "
                      f"{first} dense epochs, then {more} more for each way"))
    print("seconds per epoch of the further training, against plain dense training: "
          + ", ".join(f"{w} {per_epoch[w] / per_epoch['dense']:.2f}x" for w in WAYS if w in per_epoch), flush=True)
    out = {"dense_error": base, "dense_longer_error": longer, "rows": rows, "seconds_per_epoch": per_epoch,
           "seeds": len(seeds), "quick": quick}
    for bits, allowed in ((2, 0.5), (1, 2.0)):
        if bits in bit_list:
            row = next(r for r in rows if r["bits"] == bits)
            gap = row[row["best"]] - 100 * longer
            out[f"target_{bits}bit"] = gap <= allowed
            print(f"{bits} bit(s): best {row['best']} at {row[row['best']]:.2f} % against dense {100 * longer:.2f} % "
                  f"(trained as long): "
                  f"{gap:+.2f} points (target <= {allowed}): {'met' if gap <= allowed else 'not met'}", flush=True)
    return out
