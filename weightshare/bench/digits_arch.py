"""bench digits-arch: networks designed small, trained from scratch on scikit-learn's digits.

1,797 handwritten 8x8 digits, a stratified 80/20 split per seed, every network
trained by the one training loop (``weightshare.multitask.trainer``: Adam,
batch 128) for the same number of epochs; test error as a fraction, mean ± sd
over the seeds.  The dense reference is an MLP 64-256-256-10.

* hashed_8 / hashed_64 / modular_8: the same MLP with every weight hashed into
  1/8 or 1/64 as many buckets (HashedNets; "modular" is the index (w0 + i·j) mod N);
* dense_equal_stored_64: a dense MLP 64-h-h-10 with as many stored parameters as
  the 1/64 hashed net (HashedNets' "equivalent size" baseline);
* deep / tied / basis: an MLP with three 256x256 hidden layers, untied; the three
  tied into one (ALBERT-style); written over one shared rank-64 basis;
* conv_shared / conv_unshared: a CNN (3x3 convolutions: one kernel shared by all
  positions) against the same shape with a kernel per position (locally connected);
  conv_hashed shares kernels across channel pairs: each (output, input) pair draws
  its 3x3 kernel from a bank of 1/4 as many through the hash map (``unit="kernel"``);
  conv_deep has a third convolution, and conv_tied ties its two 16->16 convolutions
  (sharing across layers).

Step times: each network's training step against its dense reference (the MLP,
or the untied deep MLP for tied and basis), alternating blocks of steps, medians.

``--quick``: 1 seed, 6 epochs, 3 blocks of 10 steps for the step times (full: 5 seeds,
60 epochs, 15 blocks of 20 steps); it says so when it starts.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import torch
from torch import nn

from weightshare.bench import table

BATCH = 128


def data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.2, stratify=y, random_state=seed)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


def mlp(h1: int = 256, h2: int = 256) -> nn.Module:
    return nn.Sequential(nn.Linear(64, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10))


def deep() -> nn.Module:
    """64-256 then three 256x256 hidden layers (indices 2, 4, 6) then 10."""
    layers = [nn.Linear(64, 256), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10))


HIDDEN = ["2.weight", "4.weight", "6.weight"]


class Image(nn.Module):
    def forward(self, x):
        return x.view(-1, 1, 8, 8)


def cnn(unshared: bool = False, depth: int = 2) -> nn.Module:
    from weightshare.layers import LocallyConnected2d

    def conv(cin, cout):
        return LocallyConnected2d(cin, cout, (8, 8), 3, padding=1) if unshared else nn.Conv2d(cin, cout, 3, padding=1)

    layers = [Image(), conv(1, 16), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [conv(16, 16), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16, 10))


def stored(model: nn.Module) -> int:
    import weightshare as ws

    return ws.report(model).params_stored


def equal_stored_hidden(target: int) -> int:
    """h of the dense MLP 64-h-h-10 whose parameter count (h^2 + 76h + 10) is nearest ``target``."""
    return max(1, round((-76 + math.sqrt(76 * 76 - 4 * (10 - target))) / 2))


def systems():
    """name -> (builder, reference name for the step-time ratio)."""
    import weightshare as ws

    def hashed(c, kind="xxhash"):
        return lambda: ws.share_(mlp(), ws.HashConfig(compression=c, hash=kind))

    h64 = stored(hashed(1 / 64)())
    eq = equal_stored_hidden(h64)
    return {
        "dense": (mlp, None),
        "hashed_8": (hashed(1 / 8), "dense"),
        "hashed_64": (hashed(1 / 64), "dense"),
        "modular_8": (hashed(1 / 8, "modular"), "dense"),
        "dense_equal_stored_64": (lambda: mlp(eq, eq), "dense"),
        "deep": (deep, None),
        "tied": (lambda: ws.share_(deep(), ws.TieConfig(params=HIDDEN)), "deep"),
        "basis": (lambda: ws.share_(deep(), ws.BasisConfig(layers=HIDDEN, num_bases=64, init="random")), "deep"),
        "conv_shared": (cnn, None),
        "conv_unshared": (lambda: cnn(unshared=True), "conv_shared"),
        "conv_hashed": (lambda: ws.share_(cnn(), ws.HashConfig(compression=1 / 4, unit="kernel"),
                                          filter_fn=lambda m, n: isinstance(m, nn.Conv2d)), "conv_shared"),
        "conv_deep": (lambda: cnn(depth=3), None),
        "conv_tied": (lambda: ws.share_(cnn(depth=3), ws.TieConfig(params=["3.weight", "5.weight"])), "conv_deep"),
    }


def step_time_ratios(builders: dict, pairs: dict[str, str], x, y, repetitions: int, steps: int) -> dict[str, float]:
    """Median step time of each system over its reference's, alternating blocks of ``steps`` steps."""
    from weightshare.multitask.trainer import TrainConfig, make_optimizer

    models, opts = {}, {}
    for name in {*pairs, *pairs.values()}:
        torch.manual_seed(0)
        models[name] = builders[name]()
        opts[name] = make_optimizer(models[name].parameters(), TrainConfig(), 1)[0]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(x), (BATCH,), generator=g)
    xb, yb = x[idx], y[idx]
    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(repetitions):
        for name, model in models.items():  # every system once per repetition, in turn
            opt = opts[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
            times[name].append((time.perf_counter() - t0) / steps)
    med = {n: statistics.median(t) for n, t in times.items()}
    return {n: med[n] / med[ref] for n, ref in pairs.items()}, med


ORDER = 50  # its place in `weightshare bench --help` (the README's order)


def main(quick: bool = False) -> dict:
    from weightshare._progress import progress
    from weightshare.multitask.trainer import TrainConfig, error_rate, train

    seeds = [0] if quick else [0, 1, 2, 3, 4]
    epochs = 6 if quick else 60
    repetitions, steps = (3, 10) if quick else (15, 20)
    if quick:
        print(f"--quick: {len(seeds)} seed, {epochs} epochs, step times from {repetitions} blocks of {steps} steps "
              "(full: 5 seeds, 60 epochs, 15 blocks of 20 steps)", flush=True)
    builders = {n: b for n, (b, _) in systems().items()}
    refs = {n: r for n, (_, r) in systems().items() if r is not None}
    errors: dict[str, list[float]] = {n: [] for n in builders}
    params: dict[str, int] = {}
    bar = progress(total=len(seeds) * len(builders), desc="digits-arch", unit="net")
    for seed in seeds:
        xtr, ytr, xte, yte = data(seed)
        for name, build in builders.items():
            torch.manual_seed(seed)
            model = build()
            params[name] = stored(model)
            train(model, xtr, ytr, TrainConfig(epochs=epochs, batch_size=BATCH, lr=1e-3 if "hash" not in name and
                                               "modular" not in name else 3e-3, seed=seed), desc=name)
            errors[name].append(error_rate(model, xte, yte))
            bar.update()
    bar.close()
    xtr, ytr, _, _ = data(0)
    ratios, med = step_time_ratios(builders, refs, xtr, ytr, repetitions=repetitions, steps=steps)
    rows = []
    for name in builders:
        e = np.array(errors[name])
        rows.append({"network": name, "stored_params": params[name], "error_mean": float(e.mean()),
                     "error_sd": float(e.std(ddof=1)) if len(e) > 1 else 0.0,
                     "step_ms": med[name] * 1e3 if name in med else None,
                     "step_ratio": ratios.get(name), "vs": refs.get(name)})
    print(table(rows, f"digits, stratified 80/20, {len(seeds)} seeds, {epochs} epochs, Adam, batch {BATCH}: "
                      "test error (fraction), stored parameters, training step time vs its reference (same run)"))
    out = {f"{n}_error": float(np.mean(errors[n])) for n in builders}
    out.update({f"{n}_error_sd": rows[i]["error_sd"] for i, n in enumerate(builders)})
    out.update({f"{n}_params": params[n] for n in builders})
    out["step_time_ratio_hashed"] = ratios["hashed_8"]
    out["step_time_ratio_tied"] = ratios["tied"]
    out["step_time_ratios"] = ratios
    out["targets"] = {"hashed_8_error": "<= dense_error + 0.01", "hashed_64_error": "< dense_equal_stored_64_error",
                      "step_time_ratio_tied": 1.15, "step_time_ratio_hashed": 1.5}
    out["hashed_8_within_1pt"] = out["hashed_8_error"] <= out["dense_error"] + 0.01
    out["hashed_64_beats_equal_size"] = out["hashed_64_error"] < out["dense_equal_stored_64_error"]
    out.update(seeds=len(seeds), epochs=epochs, batch_size=BATCH, quick=quick)
    print(f"hashed 1/8 within 1 point of dense: {out['hashed_8_within_1pt']}; "
          f"hashed 1/64 beats the dense net of equal stored size: {out['hashed_64_beats_equal_size']}")
    return out
