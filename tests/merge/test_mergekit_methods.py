"""mergekit's remaining methods (sce, nuslerp, multislerp, karcher, nearswap, arcee_fusion, ram, ramplus_tl)
against references written from their formulas in float64 (numpy, no code shared with the methods), their
identities, and mergekit configs that name them, base_model included, run end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import weightshare as ws
from tests.merge.test_merge import berts  # noqa: F401  (the tiny BERT checkpoints fixture)
from weightshare.merge import MERGE_METHODS, MergeError
from weightshare.merge.config import read_config

SEEDS = [0, 1, 2]


def fn(name):
    return MERGE_METHODS[name].fn


def models(seed, n=3, shape=(4, 6), spread=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base + spread * torch.randn(shape, generator=g) for _ in range(n)], base


def f64(t):
    return t.double().numpy()


def close(got, want, tol=1e-5):
    np.testing.assert_allclose(got.double().numpy(), np.asarray(want, dtype=np.float64), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- references (float64)


def ref_nearswap(x, base, t):
    out = np.empty_like(x)
    for k, (a, b) in enumerate(zip(base.ravel(), x.ravel())):
        w = min(1.0, max(0.0, t / max(abs(a - b), 1e-6)))
        out.ravel()[k] = w * b + (1 - w) * a
    return out


def ref_slerp_vectors(t, a, b):
    """One slerp of two vectors that keeps their norms; the lerp when they are (anti)parallel."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = float(np.dot(a / max(na, 1e-7), b / max(nb, 1e-7)))
    th = math.acos(min(1.0, max(-1.0, cos)))
    if abs(math.sin(th)) < 1e-8:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def ref_nuslerp(xs, base, w, flatten, row_wise):
    t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
    a, b = (x - base for x in xs) if base is not None else xs
    if flatten:
        out = ref_slerp_vectors(t, a.ravel(), b.ravel()).reshape(a.shape)
    elif row_wise:  # mergekit's code: columns (slices along the first dimension)
        out = np.stack([ref_slerp_vectors(t, a[:, j], b[:, j]) for j in range(a.shape[1])], axis=1)
    else:  # rows
        out = np.stack([ref_slerp_vectors(t, a[i], b[i]) for i in range(a.shape[0])])
    return out if base is None else base + out


def ref_multislerp(xs, base, w, normalize, eps=1e-8):
    """The closed form the exp-map steps reduce to: normalize(Σ w_i x_i / (‖x_i‖ + eps)) · Σ w_i ‖x_i‖."""
    if len(xs) == 1:
        return xs[0]
    vs = [x - base for x in xs] if base is not None else xs
    w = np.array(w, dtype=np.float64)
    w = w / w.sum() if normalize else w
    norms = [np.linalg.norm(v) for v in vs]
    m = sum(wi * v / (n + eps) for wi, v, n in zip(w, vs, norms))
    out = m / np.linalg.norm(m) * sum(wi * n for wi, n in zip(w, norms))
    return out if base is None else out + base


def ref_karcher_direction(units, iters=200):
    """The Karcher mean of unit vectors by Riemannian gradient descent run to convergence."""
    u = sum(units)
    u = u / np.linalg.norm(u)
    for _ in range(iters):
        step = np.zeros_like(u)
        for v in units:
            d = min(1.0, max(-1.0, float(np.dot(u.ravel(), v.ravel()))))
            th = math.acos(d)
            if th > 1e-12:
                step += (th / math.sin(th)) * (v - d * u) / len(units)
        ns = np.linalg.norm(step)
        if ns < 1e-14:
            break
        u = math.cos(ns) * u + math.sin(ns) * step / ns
        u = u / np.linalg.norm(u)
    return u


def ref_sce(xs, base, topk):
    tv = np.stack([x - base for x in xs]).reshape(len(xs), -1)
    n, p = tv.shape
    if topk < 1:
        var = tv.var(axis=0)
        k = int(np.count_nonzero(var) * topk)
        if topk <= 0 or k == 0:
            return base
        keep = set(np.argsort(-np.abs(var), kind="stable")[:k].tolist())
        tv = np.array([[tv[i, j] if j in keep else 0.0 for j in range(p)] for i in range(n)])
    w = np.array([np.mean(tv[i] ** 2) for i in range(n)])
    w = np.ones(n) / n if abs(w.sum()) < 1e-6 else w / w.sum()
    out = np.empty(p)
    for j in range(p):
        elected = 1 if tv[:, j].sum() >= 0 else -1
        agree = [i for i in range(n) if np.sign(tv[i, j]) == elected]
        num = sum(tv[i, j] * w[i] for i in agree)
        den = max(sum(w[i] for i in agree), 1e-6)
        out[j] = num / den
    return base + out.reshape(base.shape)


def ref_arcee_fusion(x, base):
    def softmax(r):
        e = np.exp(r - r.max())
        return e / e.sum()

    rows_x, rows_b = x.reshape(-1, x.shape[-1]), base.reshape(-1, base.shape[-1])
    kl = [float(np.sum((softmax(a) + 1e-8) * np.log((softmax(a) + 1e-8) / (softmax(b) + 1e-8))))
          for a, b in zip(rows_x, rows_b)]
    score = np.abs(rows_x - rows_b) * np.array(kl)[:, None]
    s = sorted(score.ravel())
    q = [s[int(qq * (len(s) - 1))] for qq in (0.25, 0.5, 0.75)]
    thr = q[1] + 1.5 * (q[2] - q[0])
    return (rows_b + (rows_x - rows_b) * (score >= thr)).reshape(base.shape)


def ref_ram(xs, base, eps, plus=None):
    tv = np.stack([x - base for x in xs]).reshape(len(xs), -1)
    n, p = tv.shape
    active = np.abs(tv) > eps
    count = active.sum(axis=0)
    lam = np.ones(n)
    if plus is not None:
        r, alpha = plus
        for i in range(n):
            shared = sum(1 for j in range(p) if active[i, j] and count[j] > 1)
            unique = sum(1 for j in range(p) if active[i, j] and count[j] == 1)
            lam[i] = 1 + r * min(alpha, max(0.0, shared / max(unique, eps)))
    out = np.zeros(p)
    for j in range(p):
        for i in range(n):
            if active[i, j]:
                out[j] += tv[i, j] * lam[i] if count[j] == 1 else tv[i, j] / count[j]
    return base + out.reshape(base.shape)


# ----------------------------------------------------------------------------- against the references


@pytest.mark.parametrize("seed", SEEDS)
def test_nearswap_matches_reference(seed):
    (x,), base = models(seed, n=1, spread=0.5)
    for t in (0.0, 0.1, 0.4, 5.0, -1.0):
        close(fn("nearswap")([x], base, name="w", t=t), ref_nearswap(f64(x), f64(base), t))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("flatten, row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_matches_reference(seed, flatten, row_wise, with_base):
    xs, base = models(seed, n=2, shape=(5, 7))
    w = [0.3 + seed, 1.1]
    got = fn("nuslerp")(xs, base if with_base else None, name="w", weight=w, nuslerp_flatten=flatten,
                        nuslerp_row_wise=row_wise)
    close(got, ref_nuslerp([f64(x) for x in xs], f64(base) if with_base else None, w, flatten, row_wise))


def test_nuslerp_row_wise_false_slerps_rows_and_true_columns():
    # row 0 of the two models: orthogonal unit vectors, so its slerp is the midpoint of the quarter circle
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    rows = fn("nuslerp")([a, b], None, name="w", weight=[1, 1], nuslerp_flatten=False, nuslerp_row_wise=False)
    close(rows[0], [math.sqrt(0.5), math.sqrt(0.5)])
    cols = fn("nuslerp")([a, b], None, name="w", weight=[1, 1], nuslerp_flatten=False, nuslerp_row_wise=True)
    close(cols[:, 0], ref_slerp_vectors(0.5, np.array([1.0, 0.0]), np.array([0.0, 2.0])))
    assert not torch.allclose(rows, cols)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("with_base, normalize", [(False, True), (True, True), (True, False)])
def test_multislerp_matches_its_closed_form(seed, n, with_base, normalize):
    xs, base = models(seed, n=n)
    w = [0.5 + 0.3 * i for i in range(n)]
    got = fn("multislerp")(xs, base if with_base else None, name="w", weight=w, normalize_weights=normalize)
    close(got, ref_multislerp([f64(x) for x in xs], f64(base) if with_base else None, w, normalize))


def test_multislerp_of_one_model_is_the_model_and_cancelling_models_are_named():
    xs, base = models(0, n=1)
    assert torch.equal(fn("multislerp")(xs, base, name="w", weight=[2.0]), xs[0])
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="'w'.*cancel"):
        fn("multislerp")([x, -x, 2 * x * 0 + x * 0.0 + 1e-12 * x], None, name="w", weight=[1, 1, 0])
    two = fn("multislerp")([x, -x], None, name="w", weight=[1, 1])  # two that cancel: mergekit's lerp
    close(two, np.zeros((3, 4)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_karcher_converges_to_the_riemannian_mean_times_the_mean_norm(seed, n):
    xs, _ = models(seed, n=n, spread=0.6)
    got = fn("karcher")(xs, None, name="w", max_iter=200, tol=1e-9)
    norms = [np.linalg.norm(f64(x)) for x in xs]
    want = ref_karcher_direction([f64(x) / nx for x, nx in zip(xs, norms)]) * np.mean(norms)
    close(got, want, tol=1e-4)


def test_karcher_of_two_is_the_geodesic_midpoint_and_respects_max_iter():
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    got = fn("karcher")([a, b], None, name="w", max_iter=10, tol=1e-5)
    close(got, [2 * math.sqrt(0.5), 2 * math.sqrt(0.5), 0.0])  # mean norm 2, direction halfway
    # mergekit's start is the normalised mean of the unit vectors; zero steps return it as is
    assert torch.allclose(fn("karcher")([a, b, -a + 0 * b], None, name="w", max_iter=0, tol=1e-5),
                          torch.tensor([0.0, 1.0, 0.0]) * (3 + 1 + 3) / 3)
    zero = torch.zeros(3)
    assert torch.equal(fn("karcher")([zero, zero], None, name="w"), zero)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("spread", [1.0, 1e-4])  # 1e-4: the summed mean squares fall under 1e-6 (equal weights)
def test_sce_matches_reference(seed, topk, spread):
    xs, base = models(seed, n=3, shape=(6, 8), spread=spread)
    got = fn("sce")(xs, base, name="w", select_topk=topk)
    close(got, ref_sce([f64(x) for x in xs], f64(base), topk), tol=1e-5 * spread + 1e-6)  # float32 base ~1


def test_sce_with_nothing_selected_is_the_base_in_its_own_shape():
    xs, base = models(0, n=1)
    for topk in (0.5, 0.0):  # one model: no variance across models, nothing selected
        got = fn("sce")(xs, base, name="w", select_topk=topk)
        assert got.shape == base.shape and torch.equal(got, base)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(6, 10), (37,), (2, 3, 5)])
def test_arcee_fusion_matches_reference(seed, shape):
    (x,), base = models(seed, n=1, shape=shape)
    got = fn("arcee_fusion")([x], base, name="w")
    want = ref_arcee_fusion(f64(x), f64(base))
    close(got, want)
    assert (got != base).double().mean() < 0.5  # the fence lies above the median score


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("plus", [None, (0.1, 0.2), (0.5, 1.0)])
def test_ram_matches_reference(seed, plus):
    xs, base = models(seed, n=3, shape=(5, 6))
    g = torch.Generator().manual_seed(seed + 7)
    for i, x in enumerate(xs):  # sparse task vectors, so positions are unique, shared or untouched
        keep = torch.rand(x.shape, generator=g) < 0.4 + 0.1 * i
        xs[i] = torch.where(keep, x, base)
    if plus is None:
        got = fn("ram")(xs, base, name="w", epsilon=1e-5)
    else:
        got = fn("ramplus_tl")(xs, base, name="w", epsilon=1e-5, r=plus[0], alpha=plus[1])
    close(got, ref_ram([f64(x) for x in xs], f64(base), 1e-5, plus))


# ----------------------------------------------------------------------------- registry and configs

EXPECTED = {  # needs / takes a base, per-model parameters, global parameters, model counts: mergekit's
    "sce": (True, False, {}, {"select_topk": 1.0}, (1, None)),
    "nuslerp": (False, True, {"weight": None}, {"nuslerp_flatten": True, "nuslerp_row_wise": False}, (2, 2)),
    "multislerp": (False, True, {"weight": None}, {"normalize_weights": True, "eps": 1e-8}, (1, None)),
    "karcher": (False, False, {}, {"max_iter": 10, "tol": 1e-5}, (1, None)),
    "nearswap": (True, False, {}, {"t": None}, (1, 1)),
    "arcee_fusion": (True, False, {}, {}, (1, 1)),
    "ram": (True, False, {}, {"epsilon": 1e-5}, (1, None)),
    "ramplus_tl": (True, False, {}, {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2}, (1, None)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registered_with_mergekit_parameters(name):
    m = MERGE_METHODS[name]
    assert m.tensorwise and m.source
    assert (m.needs_base, m.takes_base, m.model_params, m.params, m.models) == EXPECTED[name]


CONFIGS = {  # a mergekit config per method, as its users write them (paths filled in below)
    "sce": ({"parameters": {"select_topk": 0.5, "int8_mask": True}}, True),
    "nuslerp": ({"models_parameters": [{"weight": 0.4}, {"weight": 0.6}]}, True),
    "multislerp": ({"models_parameters": [{"weight": 1.0}, {"weight": 2.0}], "parameters": {"eps": 1e-8}}, True),
    "karcher": ({"parameters": {"max_iter": 5}}, True),
    "nearswap": ({"parameters": {"t": 0.001}, "one": True}, True),
    "arcee_fusion": ({"one": True}, True),
    "ram": ({}, True),
    "ramplus_tl": ({"parameters": {"r": 0.2, "alpha": 0.5}}, True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_mergekit_config_of_every_method_runs_unchanged_and_uses_its_base(berts, tmp_path, name):  # noqa: F811
    spec, with_base = CONFIGS[name]
    picks = ["a"] if spec.get("one") else ["a", "b"]
    entries = [{"model": str(berts[m])} for m in picks]
    for entry, params in zip(entries, spec.get("models_parameters", [])):
        entry["parameters"] = params
    raw = {"merge_method": name, "base_model": str(berts["base"]), "models": entries, "dtype": "float32",
           **({"parameters": spec["parameters"]} if "parameters" in spec else {})}
    config = tmp_path / "merge.yaml"
    config.write_text(json.dumps(raw))
    kwargs = read_config(config)
    method = MERGE_METHODS[name]
    if method.base_as_model:  # mergekit appends the base to the models of a method that takes none
        assert kwargs["base"] is None and kwargs["models"][-1] == str(berts["base"])
    else:
        assert kwargs["base"] == str(berts["base"])
    out = ws.merge(**kwargs, out=tmp_path / "out")
    got = load_file(out / "model.safetensors")
    tensors = {m: load_file(berts[m] / "model.safetensors") for m in ("base", "a", "b")}
    params = {k: v for k, v in {**method.params, **(spec.get("parameters") or {})}.items() if k != "int8_mask"}
    per = {k: [e["parameters"][k] for e in entries] for k in method.model_params}
    for k, v in got.items():
        if not v.is_floating_point():
            continue
        inputs = [tensors[m][k].float() for m in picks] + ([tensors["base"][k].float()] if method.base_as_model else [])
        base = tensors["base"][k].float() if method.uses_base else None
        want = method.fn(inputs, base, name=k, **per, **params)
        assert torch.allclose(v, want, atol=1e-6, rtol=1e-6), k


def test_base_model_is_never_dropped_silently(tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(json.dumps({"merge_method": "linear", "base_model": "./base",
                                  "models": [{"model": "./a", "parameters": {"weight": 1}},
                                             {"model": "./b", "parameters": {"weight": 1}}]}))
    with pytest.raises(MergeError, match=r"base_model: linear takes no base model, so \./base would not be merged; "
                                         r"list it under models"):
        read_config(config)
    config.write_text(json.dumps({"merge_method": "linear", "base_model": "./a",
                                  "models": [{"model": "./a", "parameters": {"weight": 1}},
                                             {"model": "./b", "parameters": {"weight": 1}}]}))
    assert read_config(config)["models"] == ["./a", "./b"]  # listed: one of the averaged models
    with pytest.raises(MergeError, match=r"linear takes no base model \(base=\.\.\.\)"):
        ws.merge([{"w": torch.ones(2)}, {"w": torch.zeros(2)}], "linear", base={"w": torch.ones(2)})


def test_yaml_numbers_without_a_dot_are_numbers_as_mergekit_reads_them(tmp_path):
    config = tmp_path / "merge.yaml"  # YAML 1.1 (PyYAML) would read 1e-8 as the string '1e-8'
    config.write_text("merge_method: multislerp\nmodels:\n  - model: ./a\n    parameters: {weight: 1}\n"
                      "  - model: ./b\n    parameters: {weight: 2}\nparameters:\n  eps: 1e-8\n")
    got = read_config(config)
    assert got["eps"] == 1e-8 and isinstance(got["eps"], float)


def test_the_readme_lists_every_method_with_its_defaults():
    from pathlib import Path

    readme = Path(__file__).resolve().parents[2].joinpath("README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(" `"): line for line in readme.splitlines() if line.startswith("| `")}
    for name, m in MERGE_METHODS.items():
        if not m.tensorwise:
            continue
        assert name in rows, name
        for p in m.parameters:
            if p.name != "int8_mask":
                default = str(p.default).lower() if isinstance(p.default, bool) else p.default
                shown = "(required)" if p.required else f"[{default}]"
                assert f"`{p.name}` {shown}" in rows[name], (name, p.name)
