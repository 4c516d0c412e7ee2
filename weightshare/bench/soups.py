"""bench soups: model soups (Wortsman et al. 2022) of fine-tuned MLPs on scikit-learn's digits,
with a negative control that must collapse.

Data: 1,797 8x8 digits, one fixed stratified split (scikit-learn's
``train_test_split``, random_state 0): 60 % train, 20 % validation, 20 % test.
Every model is an MLP 64-256-256-10 (digits-arch's dense reference) trained by the one training loop
(``weightshare.multitask.trainer.train``, batch 128, Adam).

* Pre-trained model: trained on a related task, the training images under heavy
  Gaussian pixel noise (sd 0.5, clipped to [0, 1]).
* Ingredients: 8 fine-tunes of it on the clean training images, learning rates
  5e-4, 1e-3, 2e-3, 4e-3, each with two data-order seeds.
* Best single: the ingredient with the best validation accuracy, reported on test.
  Uniform soup: the average of all 8.  Greedy soup (``weightshare.merge.soup``): its
  decisions are made on validation accuracy, and it is reported on test.
* Negative control: 8 MLPs trained from 8 different random initialisations (clean
  images, as many epochs as pre-training plus fine-tuning, lr 1e-3).  Their hidden
  units are permuted relative to each other, so their average is not a model: the
  benchmark calls the control collapsed when the uniform soup's test accuracy is
  more than 20 points below the ingredients' mean, and the greedy soup on them should
  keep one ingredient.
* Midpoint barrier: validation loss of the average of the two best ingredients minus
  the mean of their losses (about 0 within one basin, large across basins).

A full run repeats this for 5 pre-training seeds (a new pre-trained model, new
fine-tunes, new controls; the split stays fixed) and reports means; ``--quick``
runs one repeat, pre-trained 10 and fine-tuned 15 epochs (controls 25), and says so.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from weightshare.bench import table

HIDDEN = 256  # digits-arch's dense reference MLP, 64-256-256-10
LRS = (5e-4, 1e-3, 2e-3, 4e-3)  # an octave grid around Adam's default
FT_SEEDS = (1, 2)
NOISE = 0.5
COLLAPSE_POINTS = 0.20  # a uniform soup this far below its ingredients' mean accuracy has collapsed
EPOCHS, QUICK_EPOCHS = (20, 30), (10, 15)  # (pre-training, fine-tuning); a control trains for their sum


def data(seed: int = 0):
    """(x_train, y_train, x_val, y_val, x_test, y_test): a stratified 60/20/20 split, pixels in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=0.2, stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=0.25, stratify=y[rest], random_state=seed)
    xs, ys = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    return tuple(t for part in (train, val, test) for t in (xs[part], ys[part]))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


class Scorer:
    """Accuracy (and loss) of a state dict on one data set, through one template model."""

    def __init__(self, x, y):
        self.x, self.y, self.model = x, y, mlp()

    @torch.no_grad()
    def logits(self, state: dict) -> torch.Tensor:
        self.model.load_state_dict(state)
        self.model.eval()
        return self.model(self.x)

    def __call__(self, state: dict) -> float:
        return float((self.logits(state).argmax(-1) == self.y).float().mean())

    def loss(self, state: dict) -> float:
        return float(nn.functional.cross_entropy(self.logits(state), self.y))


def family(states: list[dict], val: Scorer, test: Scorer) -> dict:
    """Every figure of one set of ingredients: each one's accuracies, best single, soups, barrier."""
    from weightshare.merge.soup import greedy_soup_trace, uniform_soup

    val_acc = [val(s) for s in states]
    test_acc = [test(s) for s in states]
    best = max(range(len(states)), key=lambda i: val_acc[i])  # first of the best: the greedy soup's start
    soup, trace = greedy_soup_trace(states, evaluate=val, scores=val_acc)
    uniform = uniform_soup(states)
    a, b = trace.order[:2]
    mid = uniform_soup([states[a], states[b]])
    return {"val_acc": val_acc, "test_acc": test_acc, "best": best, "best_single": test_acc[best],
            "mean": float(np.mean(test_acc)), "uniform_soup": test(uniform), "uniform_soup_val": val(uniform),
            "greedy_soup": test(soup), "greedy_soup_val": trace.score, "greedy_kept": trace.kept,
            "barrier": val.loss(mid) - (val.loss(states[a]) + val.loss(states[b])) / 2, "trace": trace}


def repeat(seed: int, pre_epochs: int, ft_epochs: int, split) -> tuple[dict, dict, list[str]]:
    """One pre-trained model, its 8 fine-tunes and 8 independent controls: (soups, control, labels)."""
    from weightshare.multitask.trainer import TrainConfig, train

    xtr, ytr, xva, yva, xte, yte = split
    val, test = Scorer(xva, yva), Scorer(xte, yte)
    torch.manual_seed(seed)
    pretrained = mlp()
    noisy = (xtr + NOISE * torch.randn(xtr.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
    train(pretrained, noisy, ytr, TrainConfig(epochs=pre_epochs, lr=1e-3, seed=seed), desc="pre-train")
    fine_tunes, labels = [], []
    for lr in LRS:
        for s in FT_SEEDS:
            model = copy.deepcopy(pretrained)
            train(model, xtr, ytr, TrainConfig(epochs=ft_epochs, lr=lr, seed=100 * seed + s),
                  desc=f"fine-tune lr {lr:g}")
            fine_tunes.append(model.state_dict())
            labels.append(f"lr {lr:g}, seed {s}")
    controls = []
    for i in range(len(fine_tunes)):
        torch.manual_seed(1000 + 100 * seed + i)  # a different initialisation each
        model = mlp()
        train(model, xtr, ytr, TrainConfig(epochs=pre_epochs + ft_epochs, lr=1e-3, seed=100 * seed + i), desc="control")
        controls.append(model.state_dict())
    return family(fine_tunes, val, test), family(controls, val, test), labels


ORDER = 100  # its place in `weightshare bench --help` (the README's order)


def main(quick: bool = False) -> dict:
    from weightshare._progress import progress

    seeds = [0] if quick else [0, 1, 2, 3, 4]
    pre_epochs, ft_epochs = QUICK_EPOCHS if quick else EPOCHS
    if quick:
        print(f"--quick: {len(seeds)} repeat, pre-training {pre_epochs} + fine-tuning {ft_epochs} epochs "
              f"(full: 5 repeats, {EPOCHS[0]} + {EPOCHS[1]})", flush=True)
    t0 = time.perf_counter()
    split = data(0)
    runs = []
    for seed in progress(seeds, desc="soups", unit="repeat"):
        runs.append(repeat(seed, pre_epochs, ft_epochs, split))
    seconds = time.perf_counter() - t0

    soups, control, labels = runs[0]
    rows = [{"ingredient": i, "recipe": labels[i], "val_acc": soups["val_acc"][i], "test_acc": soups["test_acc"][i],
             "in_greedy_soup": i in soups["greedy_kept"], "control_val_acc": control["val_acc"][i],
             "control_test_acc": control["test_acc"][i]} for i in range(len(labels))]
    n_train, n_val, n_test = len(split[1]), len(split[3]), len(split[5])
    print(table(rows, f"digits, stratified split {n_train}/{n_val}/{n_test} (train/val/test), "
                      f"MLP 64-{HIDDEN}-{HIDDEN}-10, Adam, batch 128: pre-trained {pre_epochs} epochs on noisy images, "
                      f"fine-tuned {ft_epochs} epochs; "
                      f"controls: {pre_epochs + ft_epochs} epochs from different initialisations (repeat 0)"))
    print(runs[0][0]["trace"])

    def summary(name, fam):
        return {"system": name, "best_single": fam["best_single"], "uniform_soup": fam["uniform_soup"],
                "greedy_soup": fam["greedy_soup"], "greedy_kept": len(fam["greedy_kept"]),
                "mean_ingredient": fam["mean"], "oracle_ingredient": max(fam["test_acc"]),
                "midpoint_barrier": fam["barrier"]}

    rows = []
    for seed, (s, c, _) in zip(seeds, runs):
        rows += [{"repeat": seed, **summary("fine-tunes", s)}, {"repeat": seed, **summary("control", c)}]
    for name, k in (("fine-tunes", 0), ("control", 1)):
        means = {key: float(np.mean([summary(name, r[k])[key] for r in runs]))
                 for key in ("best_single", "uniform_soup", "greedy_soup", "greedy_kept", "mean_ingredient",
                             "oracle_ingredient", "midpoint_barrier")}
        if len(runs) > 1:
            rows.append({"repeat": "mean", "system": name, **means})
    print(table(rows, "test accuracy (best single: chosen on validation; greedy soup: decided on validation); "
                      "greedy_kept: ingredients in the greedy soup; midpoint_barrier: validation loss of the "
                      "average of the two best ingredients minus their mean loss"))

    mean = lambda k, key: float(np.mean([r[k][key] for r in runs]))  # noqa: E731
    out = {"best_single": mean(0, "best_single"), "uniform_soup": mean(0, "uniform_soup"),
           "greedy_soup": mean(0, "greedy_soup"), "greedy_kept": [r[0]["greedy_kept"] for r in runs],
           "greedy_kept_count": float(np.mean([len(r[0]["greedy_kept"]) for r in runs])),
           "mean_ingredient": mean(0, "mean"), "ingredient_test_acc": runs[0][0]["test_acc"],
           "barrier": mean(0, "barrier"),
           "control_uniform": mean(1, "uniform_soup"), "control_best_single": mean(1, "best_single"),
           "control_greedy_soup": mean(1, "greedy_soup"), "control_mean_ingredient": mean(1, "mean"),
           "control_greedy_kept": [r[1]["greedy_kept"] for r in runs], "control_barrier": mean(1, "barrier")}
    collapsed = [r[1]["uniform_soup"] < r[1]["mean"] - COLLAPSE_POINTS for r in runs]
    out["control_collapsed"] = all(collapsed)
    out["control_greedy_keeps_one"] = all(len(r[1]["greedy_kept"]) == 1 for r in runs)
    met = [r[0]["greedy_soup"] >= r[0]["best_single"] for r in runs]
    out["greedy_ge_best_single"] = out["greedy_soup"] >= out["best_single"]
    out["greedy_ge_best_single_repeats"] = f"{sum(met)}/{len(met)}"
    out["targets"] = {"greedy_soup": ">= best_single (test accuracy, mean over repeats)",
                      "control_collapsed": f"control uniform soup < control mean ingredient - {COLLAPSE_POINTS:.2f}"}
    out.update(repeats=len(seeds), pre_epochs=pre_epochs, ft_epochs=ft_epochs, ingredients=len(LRS) * len(FT_SEEDS),
               split={"train": n_train, "val": n_val, "test": n_test}, seconds=round(seconds, 1), quick=quick)

    verdict = "met" if out["greedy_ge_best_single"] else "NOT met"
    print(f"target greedy soup >= best single: {verdict} (greedy {out['greedy_soup']:.4f} vs best single "
          f"{out['best_single']:.4f}; met in {out['greedy_ge_best_single_repeats']} repeats; "
          f"one test sample is {1 / n_test:.4f})")
    if out["control_collapsed"]:
        print(f"negative control COLLAPSED, as it must: the uniform average of 8 independently initialised MLPs scores "
              f"{out['control_uniform']:.4f} against {out['control_mean_ingredient']:.4f} for its ingredients "
              f"(midpoint barrier {out['control_barrier']:.3g} vs {out['barrier']:.3g} for the fine-tunes); "
              f"the greedy soup kept one ingredient: {out['control_greedy_keeps_one']}")
    else:
        print(f"WARNING: the negative control did NOT collapse (uniform {out['control_uniform']:.4f} vs mean "
              f"ingredient {out['control_mean_ingredient']:.4f}): the soup measurement cannot tell basins apart")
    print(f"{len(seeds)} repeat(s) in {seconds:.0f} s")
    return out
