"""The tensorwise merge methods against slow, obvious references (element-by-element loops in
float64 on small tensors), their identities, DARE's determinism, and the registry entries."""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np
import pytest
import torch

from weightshare.merge import MERGE_METHODS
from weightshare.merge.registry import check_params

SEEDS = [0, 1, 2, 3]


def method(name):
    return MERGE_METHODS[name].fn


def rand_models(seed, n=3, shape=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + torch.randn(shape, generator=g) for _ in range(n)]
    return models, base


def rand_weights(seed, n, negative=True):
    rng = np.random.default_rng(seed + 100)
    w = rng.uniform(0.2, 2.0, n)
    if negative and seed % 2:
        w[0] = -w[0]  # a negative weight exercises the sign handling
    return [float(x) for x in w]


def flat(t):
    return [float(x) for x in t.reshape(-1)]


def close(got, want, tol=1e-5):
    want = torch.tensor(want, dtype=torch.float64).reshape(got.shape)
    assert torch.allclose(got.double(), want, atol=tol, rtol=tol), (got, want)


# ----------------------------------------------------------------------------- references


def ref_combine(deltas, weights, base, normalize, scale, consensus):
    """deltas: list (models) of lists (entries); the GTA combination one entry at a time."""
    out = []
    for k in range(len(base)):
        wd = [w * d[k] for w, d in zip(weights, deltas)]
        if consensus:
            elected = 1 if sum(wd) >= 0 else -1
            agree = [i for i, x in enumerate(wd) if x != 0 and (x > 0) == (elected > 0)]
            mixed = sum(wd[i] for i in agree)
            divisor = sum(weights[i] for i in agree)
            divisor = 1 if divisor == 0 else divisor
        else:
            mixed = sum(wd)
            divisor = sum(weights)
            divisor = 1 if abs(divisor) < 1e-8 else divisor
        if normalize:
            mixed /= divisor
        out.append(base[k] + scale * mixed)
    return out


def ref_l1(delta, kept):
    before, after = sum(abs(x) for x in delta), sum(abs(x) for x in kept)
    if before < 1e-7 or after < 1e-7:
        return kept
    return [x * before / after for x in kept]


def ref_trim(delta, density, rescale):
    if density >= 1:
        return list(delta)
    k = int(density * len(delta))
    order = sorted(range(len(delta)), key=lambda i: -abs(delta[i]))[:k]
    kept = [delta[i] if i in order else 0.0 for i in range(len(delta))]
    return ref_l1(delta, kept) if rescale else kept


def ref_dare_mask(seed, name, model, shape):
    # the documented seeding: SHA-256 of "seed\0name\0model", first 4 bytes little-endian
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{model}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))
    return flat(torch.rand(shape, generator=g))


def ref_dare(delta, density, u, rescale):
    if density >= 1:
        return list(delta)
    kept = [d if ui < density else 0.0 for d, ui in zip(delta, u)]
    return ref_l1(delta, kept) if rescale else kept


def ref_slerp(t, v0, v1):
    a, b = np.array(v0, dtype=np.float64), np.array(v1, dtype=np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua = a / na if na > 1e-8 else a
    ub = b / nb if nb > 1e-8 else b
    dot = float(np.sum(ua * ub))
    if abs(dot) > 0.9995:
        return list((1 - t) * a + t * b)
    th = math.acos(dot)
    return list(math.sin((1 - t) * th) / math.sin(th) * a + math.sin(t * th) / math.sin(th) * b)


def ref_model_stock_rows(rows0, rows):
    """rows0: list of base rows; rows: per model, list of rows.  One t per row."""
    n = len(rows)
    out = []
    for r, w0 in enumerate(rows0):
        offs = [[x - y for x, y in zip(m[r], w0)] for m in rows]
        cs = []
        for a, b in itertools.combinations(offs, 2):
            dot = sum(x * y for x, y in zip(a, b))
            norm = max(math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)), 1e-6)
            cs.append(min(1.0, max(-1.0, dot / norm)))
        c = sum(cs) / len(cs)
        t = n * c / (1 + (n - 1) * c)
        out.append([t * sum(m[r][k] for m in rows) / n + (1 - t) * w0[k] for k in range(len(w0))])
    return out


# ----------------------------------------------------------------------------- against references


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_matches_reference(seed):
    models, _ = rand_models(seed)
    w = rand_weights(seed, 3, negative=False)
    xs = [flat(m) for m in models]
    for normalize in (True, False):
        want = [sum(wi * x[k] for wi, x in zip(w, xs)) / (sum(w) if normalize else 1) for k in range(12)]
        close(method("linear")(models, None, name="a", weight=w, normalize=normalize), want)


@pytest.mark.parametrize("seed", SEEDS)
def test_task_arithmetic_matches_reference(seed):
    models, base = rand_models(seed)
    w = rand_weights(seed, 3)
    b, xs = flat(base), [flat(m) for m in models]
    deltas = [[x[k] - b[k] for k in range(12)] for x in xs]
    for normalize, scale in [(False, 1.0), (True, 0.7), (False, 2.5)]:
        want = ref_combine(deltas, w, b, normalize, scale, consensus=False)
        got = method("task_arithmetic")(models, base, name="a", weight=w, normalize=normalize, scale=scale)
        close(got, want)


@pytest.mark.parametrize("seed", SEEDS)
def test_ties_matches_reference(seed):
    models, base = rand_models(seed, n=3, shape=(4, 5))
    w = rand_weights(seed, 3)
    dens = [[0.3, 0.5, 0.9], [1.0, 0.2, 0.6], [0.55, 0.55, 0.55], [0.1, 1.0, 0.35]][seed]
    b, xs = flat(base), [flat(m) for m in models]
    for normalize, rescale, scale in [(True, False, 1.0), (False, False, 0.5), (True, True, 1.3)]:
        trimmed = [ref_trim([x[k] - b[k] for k in range(20)], d, rescale) for x, d in zip(xs, dens)]
        want = ref_combine(trimmed, w, b, normalize, scale, consensus=True)
        got = method("ties")(models, base, name="a", weight=w, density=dens, normalize=normalize, rescale=rescale,
                             scale=scale)
        close(got, want)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_matches_reference(seed, kind):
    models, base = rand_models(seed, n=3, shape=(4, 5))
    w = rand_weights(seed, 3)
    dens = [[0.3, 0.5, 0.9], [1.0, 0.2, 0.6], [0.55, 0.55, 0.55], [0.1, 1.0, 0.35]][seed]
    b, xs = flat(base), [flat(m) for m in models]
    for normalize, rescale, scale, rs in [(False, True, 1.0, 0), (True, True, 0.8, 5), (False, False, 1.0, 11)]:
        dropped = [ref_dare([x[k] - b[k] for k in range(20)], d, ref_dare_mask(rs, "layer.w", i, (4, 5)), rescale)
                   for i, (x, d) in enumerate(zip(xs, dens))]
        want = ref_combine(dropped, w, b, normalize, scale, consensus=kind == "dare_ties")
        got = method(kind)(models, base, name="layer.w", weight=w, density=dens, normalize=normalize,
                           rescale=rescale, scale=scale, seed=rs)
        close(got, want)


@pytest.mark.parametrize("seed", SEEDS)
def test_slerp_matches_reference(seed):
    (a, b), _ = rand_models(seed, n=2, shape=(3, 4))
    for t in (0.0, 0.25, 0.5, 0.9, 1.0, 1.2):
        close(method("slerp")([a, b], None, name="a", t=t), ref_slerp(t, flat(a), flat(b)))


@pytest.mark.parametrize("seed", SEEDS)
def test_model_stock_matches_reference(seed):
    models, base = rand_models(seed, n=2 + seed % 3, shape=(3, 4))
    # fine-tunes that share a direction, so t lands in (0, 1) as in practice
    shared = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed + 50))
    models = [m + 2 * shared for m in models]
    got = method("model_stock")(models, base, name="a")
    close(got, ref_model_stock_rows([flat(base)], [[flat(m)] for m in models])[0])
    got = method("model_stock")(models, base, name="a", filter_wise=True)
    rows = lambda t: [[float(x) for x in row] for row in t]  # noqa: E731
    close(got, ref_model_stock_rows(rows(base), [rows(m) for m in models]))


# ----------------------------------------------------------------------------- identities


def test_linear_identities():
    (a,), _ = rand_models(0, n=1)
    close(method("linear")([a, a, a], None, name="x", weight=[0.2, 3.0, 1.0]), flat(a))
    with pytest.raises(ValueError, match="sum to 0"):
        method("linear")([a, a], None, name="x", weight=[1.0, -1.0])
    close(method("linear")([a, a], None, name="x", weight=[1.0, -1.0], normalize=False), [0.0] * 12)


def test_task_arithmetic_scale_zero_is_base_and_normalize_guard():
    models, base = rand_models(1)
    assert torch.equal(method("task_arithmetic")(models, base, name="x", weight=[1, 2, 3], scale=0.0), base)
    # mergekit: a weight sum below 1e-8 divides by 1 instead
    got = method("task_arithmetic")(models[:2], base, name="x", weight=[1.0, -1.0], normalize=True)
    close(got, flat(models[0] - models[1] + base))


def test_ties_density_one_still_elects_signs():
    base = torch.zeros(3)
    a, b, c = torch.tensor([1.0, -1.0, 2.0]), torch.tensor([-3.0, 2.0, 2.0]), torch.tensor([0.5, 0.5, -1.0])
    got = method("ties")([a, b, c], base, name="x", weight=[1.0, 2.0, 1.0])
    # weighted: [1, -6, .5] -> '-': only b (w 2) -> -6/2; [-1, 4, .5] -> '+': b, c -> 4.5/3; [2, 4, -1] -> '+': a, b
    close(got, [-3.0, 4.5 / 3, 6.0 / 3])
    plain = method("task_arithmetic")([a, b, c], base, name="x", weight=[1.0, 2.0, 1.0], normalize=True)
    assert not torch.allclose(got, plain)
    got = method("ties")([a, b, c], base, name="x", weight=[1.0, 2.0, 1.0], normalize=False, scale=0.5)
    close(got, [-3.0, 2.25, 3.0])


def test_ties_trim_keeps_top_fraction_and_at_least_one_entry():
    base = torch.zeros(10)
    x = torch.arange(1.0, 11.0) * torch.tensor([1.0, -1] * 5)
    got = method("ties")([x], base, name="x", weight=[1.0], density=[0.35])  # int(3.5) = 3 kept
    close(got, [0.0] * 7 + [-8.0, 9.0, -10.0])
    # int(0.5) = 0 would keep nothing (mergekit asserts): the largest entry is kept
    close(method("ties")([x], base, name="tiny.bias", weight=[1.0], density=[0.05]), [0.0] * 9 + [-10.0])


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_dare_density_one_is_task_arithmetic_and_ties(seed):
    models, base = rand_models(seed)
    w = rand_weights(seed, 3)
    ta = method("task_arithmetic")(models, base, name="x", weight=w, scale=0.6)
    assert torch.equal(method("dare_linear")(models, base, name="x", weight=w, density=[1.0] * 3, scale=0.6), ta)
    ties = method("ties")(models, base, name="x", weight=w, normalize=False, scale=0.6)
    assert torch.equal(method("dare_ties")(models, base, name="x", weight=w, scale=0.6), ties)


def test_dare_deterministic_and_independent_of_merge_order():
    g = torch.Generator().manual_seed(7)
    names = ["a.weight", "b.weight", "c.bias"]
    base = {n: torch.randn(6, 7, generator=g) for n in names}
    fts = {n: [base[n] + torch.randn(6, 7, generator=g) for _ in range(2)] for n in names}
    kw = dict(weight=[1.0, 0.5], density=[0.4, 0.6])

    def run(order, **extra):
        return {n: method("dare_ties")(fts[n], base[n], name=n, **kw, **extra) for n in order}

    first, again, backwards = run(names), run(names), run(names[::-1])
    torch.manual_seed(123)  # the global RNG plays no part
    for n in names:
        assert torch.equal(first[n], again[n]) and torch.equal(first[n], backwards[n])
    assert torch.equal(run(names)["a.weight"], first["a.weight"])
    # same values under another name, or another seed: another mask
    renamed = method("dare_ties")(fts["a.weight"], base["a.weight"], name="z.weight", **kw)
    assert not torch.equal(renamed, first["a.weight"])
    assert not torch.equal(run(names, seed=1)["a.weight"], first["a.weight"])


def test_dare_zero_task_vector_stays_finite():
    # mergekit skips the rescale when either L1 norm is < 1e-7 instead of dividing 0 by 0
    models, base = rand_models(2)
    for kind in ("dare_linear", "dare_ties"):
        got = method(kind)([base.clone(), models[0]], base, name="x", weight=[1.0, 1.0], density=[0.3, 1.0])
        assert torch.isfinite(got).all()
        assert torch.equal(got, models[0])


def test_dare_keeps_density_fraction_and_rescales_l1():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(400, 250, generator=g)
    delta[delta == 0] = 1.0
    base = torch.zeros_like(delta)
    for density in (0.1, 0.5, 0.9):
        kept = method("dare_linear")([delta], base, name=f"w{density}", weight=[1.0], density=[density],
                                     rescale=False)
        frac = (kept != 0).float().mean().item()
        assert abs(frac - density) < 0.01, (density, frac)
        assert torch.equal(kept[kept != 0], delta[kept != 0])  # not rescaled
        res = method("dare_linear")([delta], base, name=f"w{density}", weight=[1.0], density=[density])
        # mergekit's rescale: the kept entries scaled back to the task vector's L1 norm (≈ 1/density)
        ratio = (res[kept != 0] / delta[kept != 0])
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)
        assert torch.isclose(res.abs().sum(), delta.abs().sum(), rtol=1e-4)
        assert abs(ratio[0].item() * density - 1) < 0.03


def test_slerp_endpoints_norm_colinear_and_zero():
    (a, b), _ = rand_models(4, n=2, shape=(5, 6))
    assert torch.allclose(method("slerp")([a, b], None, name="x", t=0.0), a, atol=1e-6)
    assert torch.allclose(method("slerp")([a, b], None, name="x", t=1.0), b, atol=1e-6)
    u, v = torch.zeros(8), torch.zeros(8)
    u[:4], v[4:] = 3.0, torch.tensor([3.0, -3.0, 3.0, -3.0])  # orthogonal, equal norms
    for t in (0.2, 0.5, 0.77):
        r = method("slerp")([u, v], None, name="x", t=t)
        assert math.isclose(r.norm().item(), u.norm().item(), rel_tol=1e-6)
        close(r, [math.cos(t * math.pi / 2) * 3] * 4 + [math.sin(t * math.pi / 2) * x for x in (3, -3, 3, -3)])
    # (nearly) colinear: mergekit lerps
    close(method("slerp")([a, 2 * a], None, name="x", t=0.3), flat(1.3 * a))
    close(method("slerp")([a, -a], None, name="x", t=0.25), flat(0.5 * a))
    # mergekit's DOT_THRESHOLD is 0.9995: cos 0.9997 still lerps, cos 0.999 slerps
    for cos, lerps in ((0.9997, True), (0.999, False)):
        p, q = torch.tensor([100.0, 0.0]), torch.tensor([100.0 * cos, 100.0 * math.sqrt(1 - cos * cos)])
        got = method("slerp")([p, q], None, name="x", t=0.5)
        assert torch.allclose(got, 0.5 * (p + q), atol=1e-4) == lerps
        assert torch.allclose(got.norm(), torch.tensor(100.0), atol=1e-4) != lerps
    # an all-zero tensor is normalised to nothing, cos 0: mergekit's sin(tπ/2) θ_1, not t θ_1
    close(method("slerp")([torch.zeros(5, 6), b], None, name="x", t=0.5), flat(math.sin(math.pi / 4) * b))
    with pytest.raises(ValueError, match="'t'"):
        method("slerp")([a, b], None, name="x", t=None)


def test_model_stock_identities_and_edges():
    models, base = rand_models(5, n=3, shape=(4, 3))
    same = [models[0].clone() for _ in range(3)]
    close(method("model_stock")(same, base, name="x"), flat(models[0]))  # cos 1 -> t 1
    close(method("model_stock")([base.clone(), base.clone()], base, name="x"), flat(base))  # zero task vectors
    # mergekit clamps the norm product to >= 1e-6: identical but tiny task vectors get cos ≈ 0.01, not 1,
    # and the merge stays near the base
    tiny = torch.full((4, 3), 1e-4)
    n2 = float((tiny * tiny).sum())  # 1.2e-7 < 1e-6
    t = 2 * (n2 / 1e-6) / (1 + n2 / 1e-6)
    close(method("model_stock")([base + tiny, base + tiny], base, name="x"), flat(base + t * tiny), tol=1e-6)
    # two orthogonal task vectors: cos 0 -> t 0 -> the base
    d1, d2 = torch.zeros(4, 3), torch.zeros(4, 3)
    d1[0, 0], d2[1, 1] = 1.0, 2.0
    close(method("model_stock")([base + d1, base + d2], base, name="x"), flat(base))
    with pytest.raises(ValueError, match="infinite"):
        method("model_stock")([base + d1, base - d1], base, name="x")
    # a 1-D tensor is one row: filter_wise changes nothing for it
    bias = [m[0] for m in models]
    assert torch.allclose(method("model_stock")(bias, base[0], name="b", filter_wise=True),
                          method("model_stock")(bias, base[0], name="b"))
    # filter_wise works on the last dimension of a 3-D tensor
    g = torch.Generator().manual_seed(9)
    b3 = torch.randn(2, 3, 4, generator=g)
    shared = torch.randn(2, 3, 4, generator=g)
    m3 = [b3 + shared + 0.5 * torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    got = method("model_stock")(m3, b3, name="x", filter_wise=True)
    rows = lambda t: [[float(x) for x in r] for r in t.reshape(-1, 4)]  # noqa: E731
    close(got, ref_model_stock_rows(rows(b3), [rows(m) for m in m3]))


# ----------------------------------------------------------------------------- registry


GTA = {"int8_mask": False, "scale": 1.0}
EXPECTED = {
    "linear": (False, {"weight": 1.0}, {"normalize": True}, (1, None)),
    "task_arithmetic": (True, {"weight": 1.0, "density": 1.0},
                        {**GTA, "normalize": False, "rescale": False}, (1, None)),
    "ties": (True, {"weight": 1.0, "density": 1.0}, {**GTA, "normalize": True, "rescale": False}, (1, None)),
    "dare_linear": (True, {"weight": 1.0, "density": 1.0},
                    {**GTA, "normalize": False, "rescale": True, "seed": 0}, (1, None)),
    "dare_ties": (True, {"weight": 1.0, "density": 1.0},
                  {**GTA, "normalize": False, "rescale": True, "seed": 0}, (1, None)),
    "breadcrumbs": (True, {"weight": 1.0, "density": 1.0, "gamma": 0.01},
                    {**GTA, "normalize": False, "rescale": False}, (1, None)),
    "breadcrumbs_ties": (True, {"weight": 1.0, "density": 1.0, "gamma": 0.01},
                         {**GTA, "normalize": False, "rescale": False}, (1, None)),
    "della": (True, {"weight": 1.0, "density": 1.0, "epsilon": 0.15},
              {**GTA, "normalize": True, "rescale": True, "seed": 0}, (1, None)),
    "della_linear": (True, {"weight": 1.0, "density": 1.0, "epsilon": 0.15},
                     {**GTA, "normalize": False, "rescale": True, "seed": 0}, (1, None)),
    "tsv_merge": (True, {"weight": 1.0}, {"scale": 1.0}, (1, None)),
    "iso_c": (True, {"weight": 1.0}, {"scale": 1.0}, (1, None)),
    "slerp": (False, {}, {"t": None}, (2, 2)),
    "model_stock": (True, {}, {"filter_wise": False}, (2, None)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registered_with_mergekit_defaults(name):
    m = MERGE_METHODS[name]
    needs_base, model_params, params, models = EXPECTED[name]
    assert m.tensorwise and m.source
    assert (m.needs_base, m.model_params, m.params, m.models) == (needs_base, model_params, params, models)


def test_check_params_reports_density_and_weight_length():
    ties = MERGE_METHODS["ties"]
    assert check_params(ties, 2, True, {"density": [1.0, 0.3], "weight": [1, 2]}, {"scale": 0.5}) == []
    for bad in (0, 0.0, 1.5, -0.2, [0.5, 1.5], [{"filter": "attn", "value": 0}]):
        problems = check_params(ties, 2, True, {"density": [0.5, bad]}, {})
        assert any("density must be in (0, 1]" in p for p in problems), (bad, problems)
    problems = check_params(ties, 2, True, {"density": [0.5, "0.5"]}, {})
    assert problems == ["density[1]: '0.5' is not a number, true/false, a gradient (list of numbers) or a list of "
                        "{filter, value} conditions"]
    problems = check_params(ties, 3, True, {"weight": [1.0, 2.0]}, {})
    assert problems == ["weight: 2 values for 3 models"]
    assert any("needs a base" in p for p in check_params(ties, 2, False, {}, {}))
    assert any("no parameter 'lambda'" in p for p in check_params(ties, 2, True, {}, {"lambda": 1.0}))
    assert any("merges 2 models" in p for p in check_params(MERGE_METHODS["slerp"], 3, False, {}, {"t": 0.5}))
    assert any("at least 2" in p for p in check_params(MERGE_METHODS["model_stock"], 1, True, {}, {}))


# ----------------------------------------------------------------------------- model breadcrumbs


def ref_breadcrumbs_mask(delta, density, gamma):
    """mergekit/sparsify.py magnitude_outliers, by sorting: rank the entries by |δ| (ascending), keep
    ranks [n_bot, n − n_top); kept at least 1 (as our TIES), and with no outlier dropped when
    int(gamma·n) = 0 (where mergekit's indices[n_bot:-0] keeps nothing)."""
    n = len(delta)
    kept = max(1, int(density * n))
    top = min(int(gamma * n), n - kept)
    bottom = n - kept - top
    order = sorted(range(n), key=lambda k: abs(delta[k]))
    keep = set(order[bottom:n - top])
    return [1.0 if k in keep else 0.0 for k in range(n)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("rescale", [False, True])
def test_breadcrumbs_match_the_sorting_reference(seed, name, rescale):
    models, base = rand_models(seed, n=3, shape=(20, 12))  # 240 entries: 2 outliers dropped at gamma 0.01
    weights = rand_weights(seed, 3)
    densities, gammas = [0.5, 0.9, 0.2], [0.01, 0.1, 0.0]
    got = method(name)(models, base, name="w", weight=weights, density=densities, gamma=gammas,
                       normalize=bool(seed % 2), scale=0.8, rescale=rescale)
    b = flat(base)
    deltas = []
    for m, p, g in zip(models, densities, gammas):
        d = [x - y for x, y in zip(flat(m), b)]
        mask = ref_breadcrumbs_mask(d, p, g)
        masked = [x * k for x, k in zip(d, mask)]
        if rescale:
            factor = sum(abs(x) for x in d) / sum(abs(x) for x in masked)
            masked = [x * factor for x in masked]
        deltas.append(masked)
    close(got, ref_combine(deltas, weights, b, bool(seed % 2), 0.8, consensus=name == "breadcrumbs_ties"), tol=1e-4)


def test_breadcrumbs_counts_on_small_tensors_and_defaults():
    from weightshare.merge.sparsify import counts

    assert counts(1000, 0.5, 0.01) == (500, 10)
    assert counts(50, 0.5, 0.01) == (25, 0)  # no outlier dropped: mergekit would zero this task vector
    assert counts(10, 0.95, 0.2) == (9, 1)  # both do not fit: fewer outliers
    assert counts(4, 0.1, 0.0) == (1, 0)  # at least one entry kept
    models, base = rand_models(0, n=2, shape=(4, 4))
    # density 1 (the default) drops nothing, outliers included: task arithmetic
    torch.testing.assert_close(method("breadcrumbs")(models, base, name="w", weight=[1, 1]),
                               method("task_arithmetic")(models, base, name="w", weight=[1, 1]))
    problems = check_params(MERGE_METHODS["breadcrumbs"], 2, True, {"gamma": [0.01, 1.0]}, {})
    assert problems == ["gamma must be in [0, 1); got 1.0 (in gamma[1])"]


# ----------------------------------------------------------------------------- DELLA


def ref_della_deltas(models, base, name, densities, epsilons, seed, rescale):
    """Per model, DELLA's sampled task vector: rank each row's entries by |δ| (ties by position),
    keep entry k with probability density − ε + 2ε·rank/(row − 1) where its DARE draw is below it."""
    from weightshare.merge.sparsify import mask_generator

    shape = base.shape
    row = shape[-1] if base.dim() == 2 else (base.numel() if base.dim() < 2 else base[0].numel())
    out = []
    for i, (m, p, e) in enumerate(zip(models, densities, epsilons)):
        d = [x - y for x, y in zip(flat(m), flat(base))]
        if p >= 1:
            out.append(d)
            continue
        u = flat(torch.rand(shape, generator=mask_generator(seed, name, i)))
        kept = []
        for r in range(0, len(d), row):
            entries = d[r:r + row]
            order = sorted(range(len(entries)), key=lambda k: (abs(entries[k]), k))
            rank = {k: j for j, k in enumerate(order)}
            for k, x in enumerate(entries):
                prob = p if row == 1 else p - e + 2 * e * rank[k] / (row - 1)
                kept.append(x if u[r + k] < prob else 0.0)
        if rescale and sum(abs(x) for x in kept) > 1e-7:
            factor = sum(abs(x) for x in d) / sum(abs(x) for x in kept)
            kept = [x * factor for x in kept]
        out.append(kept)
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(6, 40), (120,), (3, 4, 10)])
def test_della_matches_the_ranking_reference(seed, name, shape):
    models, base = rand_models(seed, n=3, shape=shape)
    weights = rand_weights(seed, 3)
    densities, epsilons, rescale = [0.5, 0.8, 1.0], [0.15, 0.1, 0.15], bool(seed % 2)
    got = method(name)(models, base, name="w", weight=weights, density=densities, epsilon=epsilons, seed=seed,
                       rescale=rescale, normalize=name == "della", scale=0.9)
    deltas = ref_della_deltas(models, base, "w", densities, epsilons, seed, rescale)
    close(got, ref_combine(deltas, weights, flat(base), name == "della", 0.9, consensus=name == "della"), tol=1e-4)


@pytest.mark.parametrize("seed", SEEDS)
def test_della_with_no_spread_is_dare_draw_for_draw(seed):
    models, base = rand_models(seed, n=2, shape=(8, 30))
    for della, dare in (("della_linear", "dare_linear"), ("della", "dare_ties")):
        kwargs = dict(name="w", weight=[1.0, 0.5], density=[0.4, 0.7], seed=seed, normalize=False)
        assert torch.equal(method(della)(models, base, epsilon=[0.0, 0.0], **kwargs),
                           method(dare)(models, base, **kwargs))


def test_della_checks_density_and_epsilon_together():
    della = MERGE_METHODS["della"]
    assert check_params(della, 2, True, {"density": [0.5, 0.8], "epsilon": [0.15, 0.1]}, {}) == []
    assert check_params(della, 2, True, {"density": [0.5, 0.9], "epsilon": [0.15, 0.15]}, {}) == [
        "density ± epsilon must lie in (0, 1); got density 0.9 with epsilon 0.15"]
    assert check_params(della, 1, True, {"epsilon": [1.5]}, {}) == [
        "epsilon must be in [0, 1); got 1.5 (in epsilon[0])"]


# ----------------------------------------------------------------------------- TSV-Merge


def ref_tsv(models, base, weights, scale):
    """The authors' layout in numpy float64: each task's top r/T triplets placed in zero-padded
    (m × r), (r,), (r × n) blocks, the padded stacks' polar factors, Δ = U_⊥ diag(S) V_⊥."""
    b = base.double().numpy()
    deltas = [w * (m.double().numpy() - b) for w, m in zip(weights, models)]
    if b.ndim != 2:
        return b + scale * np.mean(deltas, axis=0)
    r = min(b.shape)
    k = r // len(deltas)
    su, ss, sv = np.zeros((b.shape[0], r)), np.zeros(r), np.zeros((r, b.shape[1]))
    for i, d in enumerate(deltas):
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        su[:, i * k:(i + 1) * k], ss[i * k:(i + 1) * k], sv[i * k:(i + 1) * k] = u[:, :k], s[:k], vh[:k]
    polar = lambda a: (lambda p, _, q: p @ q)(*np.linalg.svd(a, full_matrices=False))  # noqa: E731
    return b + scale * polar(su) @ np.diag(ss) @ polar(sv)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape, n", [((12, 8), 2), ((8, 12), 3), ((10,), 2), ((5, 5), 5)])
def test_tsv_merge_matches_the_authors_layout(seed, shape, n):
    models, base = rand_models(seed, n=n, shape=shape)
    weights = rand_weights(seed, n)
    got = method("tsv_merge")(models, base, name="w", weight=weights, scale=1.3)
    want = ref_tsv(models, base, weights, 1.3)
    assert np.allclose(got.double().numpy(), want, atol=1e-4, rtol=1e-4)


def test_tsv_merge_of_non_interfering_task_vectors_is_their_sum():
    # task matrices on disjoint rows and columns share no singular direction: nothing to decorrelate
    g = torch.Generator().manual_seed(0)
    base = torch.randn(20, 12, generator=g)
    d1, d2 = torch.zeros(20, 12), torch.zeros(20, 12)
    d1[:10, :6] = torch.randn(10, 6, generator=g)
    d2[10:, 6:] = torch.randn(10, 6, generator=g)
    got = method("tsv_merge")([base + d1, base + d2], base, name="w", weight=[1.0, 1.0])
    torch.testing.assert_close(got, base + d1 + d2, atol=1e-5, rtol=1e-5)
    # a matrix no model changed is the base's, bit for bit
    assert torch.equal(method("tsv_merge")([base, base.clone()], base, name="w", weight=[1.0, 1.0]), base)


# ----------------------------------------------------------------------------- Iso-C


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape, n", [((12, 8), 2), ((8, 12), 3), ((10,), 2)])
def test_iso_c_flattens_the_spectrum_of_the_summed_task_matrix(seed, shape, n):
    models, base = rand_models(seed, n=n, shape=shape)
    weights = rand_weights(seed, n)
    got = method("iso_c")(models, base, name="w", weight=weights, scale=0.7).double().numpy()
    b = base.double().numpy()
    total = sum(w * (m.double().numpy() - b) for w, m in zip(weights, models))
    if b.ndim == 1:
        want = b + 0.7 * total / n
    else:
        u, s, vh = np.linalg.svd(total, full_matrices=False)
        want = b + 0.7 * s.mean() * u @ vh
    assert np.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_iso_c_of_a_low_rank_update_stays_in_its_subspace():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, 6, generator=g)
    u, v = torch.randn(10, 2, generator=g), torch.randn(2, 6, generator=g)
    got = method("iso_c")([base + u @ v], base, name="w", weight=[1.0]) - base
    s = torch.linalg.svdvals(got)
    assert torch.allclose(s[:2], s[:2].mean().expand(2), rtol=1e-4) and s[2:].abs().max() < 1e-5  # flat, rank 2
    q, _ = torch.linalg.qr(u)
    torch.testing.assert_close(q @ (q.T @ got), got, atol=1e-5, rtol=0)  # no direction the update lacks
