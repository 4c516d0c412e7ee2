"""bench digits-mtl: one trunk, four tasks on scikit-learn's digits, every weighting method and architecture.

Tasks on the same 8x8 images: the digit (10 classes), its parity, digit >= 5,
and a deliberately conflicting task: every image gets a random label (10
classes, fixed by a seed), which shares nothing learnable with the others.
(A permutation of the digit classes would not conflict: it is the digit task
renamed.)  The harm comes from memorising the random labels, which takes a
trunk with room to memorise and long training: at 30 epochs, or with a narrow
trunk, the random task costs nothing measurable, so the trunk is 64-128-128-128
and training runs 100 epochs (``--quick``: 5 epochs and 2 of the 5 seeds, a smoke
test that does not show the effect).  Single-task baselines are one such MLP per task; the
multi-task model is one trunk with four heads (hard sharing), trained with every
method in ``weightshare.multitask.METHODS`` through ``multitask.fit`` (Adam
3e-3, batch 128, stratified 80/20 holdout per seed).  Cross-stitch and MMoE run
with EW, and "ew, 3 tasks" trains without the random task.  Δp is the mean
relative accuracy change of the three real tasks over their single-task models
(percent; the random task's accuracy is chance for every model).  Negative
transfer is Δp of EW with the random task minus without it, paired by seed;
a method reduces it when its paired gain over EW is above two standard errors.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from weightshare.bench import table

HIDDEN = 128
EPOCHS, QUICK_EPOCHS = 100, 5


def tasks(y: torch.Tensor) -> dict[str, torch.Tensor]:
    noise = torch.randint(0, 10, y.shape, generator=torch.Generator().manual_seed(1234))  # fixed: the same every run
    return {"digit": y, "parity": y % 2, "large": (y >= 5).long(), "random": noise}


REAL = ("digit", "parity", "large")


CLASSES = {"digit": 10, "parity": 2, "large": 2, "random": 10}


def trunk() -> nn.Module:
    return nn.Sequential(*layers())


def layers() -> list[nn.Module]:
    return [nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN), nn.ReLU()]


def hard(task_names=tuple(CLASSES)):
    from weightshare.multitask import MultiTaskModel

    return MultiTaskModel(trunk(), {t: nn.Linear(HIDDEN, CLASSES[t]) for t in task_names})


def hard_real():
    return hard(REAL)


def cross_stitch():
    from weightshare.multitask import CrossStitch

    return CrossStitch(layers(),
                       {t: nn.Linear(HIDDEN, c) for t, c in CLASSES.items()})


def mmoe():
    from weightshare.multitask import MMoE

    return MMoE([trunk() for _ in range(3)], 64, {t: nn.Linear(HIDDEN, c) for t, c in CLASSES.items()})


def single(task: str):
    from weightshare.multitask import MultiTaskModel

    return lambda: MultiTaskModel(trunk(), {task: nn.Linear(HIDDEN, CLASSES[task])})


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


ORDER = 70  # its place in `weightshare bench --help` (the README's order)


def main(quick: bool = False) -> dict:
    from sklearn.datasets import load_digits

    from weightshare.multitask import METHODS, TrainConfig, delta_p, fit

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    targets = tasks(torch.tensor(y))
    seeds = [0, 1] if quick else [0, 1, 2, 3, 4]
    epochs = QUICK_EPOCHS if quick else EPOCHS
    if quick:
        print(f"--quick: {len(seeds)} seeds, {epochs} epochs (full: 5 seeds, {EPOCHS} epochs): a smoke test, too short "
              "for the random task to cost anything", flush=True)
    cfg = lambda seed: TrainConfig(epochs=epochs, batch_size=128, lr=3e-3, seed=seed)  # noqa: E731
    singles = {t: [] for t in CLASSES}
    for seed in seeds:
        for t in CLASSES:
            singles[t].append(fit(single(t), x, {t: targets[t]}, "ew", cfg(seed)).metrics[t])
    base = {t: float(np.mean(v)) for t, v in singles.items()}
    everything = tuple(CLASSES)
    runs = [(m, "hard", hard, everything) for m in sorted(METHODS)] + [
        ("ew", "cross-stitch", cross_stitch, everything), ("ew", "mmoe", mmoe, everything),
        ("ew", "hard, 3 tasks", hard_real, REAL)]
    rows, out_dp, out_sec, per_seed = [], {}, {}, {}
    for method, arch, factory, task_names in runs:
        accs = {t: [] for t in CLASSES}
        secs = []
        for seed in seeds:
            r = fit(factory, x, {t: targets[t] for t in task_names}, method, cfg(seed))
            for t in CLASSES:
                accs[t].append(r.metrics.get(t, float("nan")))
            secs.append(r.seconds_per_epoch)
        mean = {t: float(np.mean(v)) for t, v in accs.items()}
        dp = delta_p({t: mean[t] for t in REAL}, {t: base[t] for t in REAL})
        key = method if arch == "hard" else f"{method}+{arch}"
        per_seed[key] = np.array([delta_p({t: accs[t][i] for t in REAL}, {t: base[t] for t in REAL})
                                  for i in range(len(seeds))])
        out_dp[key] = dp
        out_sec[key] = float(np.median(secs))
        rows.append({"method": method, "arch": arch, **{f"acc_{t}": mean[t] for t in CLASSES}, "delta_p": dp,
                     "s_per_epoch": out_sec[key]})
        print(f"  {key}: Δp {dp:+.2f} %", flush=True)
    se = lambda v: float(np.std(v, ddof=1) / np.sqrt(len(v)))  # noqa: E731
    nt = per_seed["ew"] - per_seed["ew+hard, 3 tasks"]
    print(f"negative transfer (EW with − without random), per-seed paired: {nt.mean():+.2f} ± {se(nt):.2f} pts")
    paired = {}
    for k, v in per_seed.items():
        d = v - per_seed["ew"]
        paired[k] = {"delta_p": float(v.mean()), "se": se(v), "minus_ew": float(d.mean()), "minus_ew_se": se(d),
                     "wins": int((d > 0).sum())}
        print(f"  {k:24s} Δp {v.mean():+.2f} ± {se(v):.2f}; − EW {d.mean():+.2f} ± {se(d):.2f}; "
              f"wins {(d > 0).sum()}/{len(d)}")
    ew_sec = out_sec["ew"]
    for r in rows:
        r["time_vs_ew"] = r["s_per_epoch"] / ew_sec
    rows.insert(0, {"method": "single-task", "arch": "4 MLPs", **{f"acc_{t}": base[t] for t in CLASSES}, "delta_p": 0.0,
                    "s_per_epoch": None, "time_vs_ew": None})
    params_multi = params(hard())
    params_single = sum(params(single(t)()) for t in CLASSES)
    print(table(rows, f"digits, 4 tasks, {len(seeds)} seeds, {epochs} epochs, stratified 80/20: held-out accuracy, "
                      f"Δp (%) against single-task MLPs"))
    best = max((k for k in out_dp if "+" not in k), key=out_dp.get)
    gradient = [m for m in METHODS if METHODS[m].kind == "gradient" and m != "ew"]
    # reduces the negative transfer: a paired gain over EW above two standard errors (one seed's luck is not enough)
    reduce = {m: paired[m]["minus_ew"] > 2 * paired[m]["minus_ew_se"] for m in gradient}
    print(f"parameters: multi-task {params_multi:,} vs single-task total {params_single:,} "
          f"({params_multi / params_single:.0%}); best method {best}: Δp {out_dp[best]:+.2f} %")
    print(f"negative transfer of the random task (EW with it minus without, paired): "
          f"{nt.mean():+.2f} ± {se(nt):.2f} pts; "
          f"gradient methods that reduce it (gain over EW > 2 s.e.): {sorted(m for m, v in reduce.items() if v)}")
    return {"delta_p": out_dp, "seconds_per_epoch": out_sec, "methods": sorted(METHODS),
            "params_multitask": params_multi,
            "params_single_total": params_single, "single_task_accuracy": base, "best_method": best,
            "negative_transfer_ew": float(nt.mean()), "negative_transfer_se": se(nt), "paired": paired,
            "gradient_methods_reducing_negative_transfer": reduce, "seeds": len(seeds), "epochs": epochs,
            "quick": quick}
