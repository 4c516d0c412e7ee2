"""kmeans1d against a brute-force O(k n^2) dynamic program on the distinct values."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weightshare as ws
from weightshare.kmeans import kmeans1d_rows


def brute_force_sse(x, k, w=None):
    """Optimal weighted SSE by the plain O(k n^2) DP over sorted distinct values."""
    x = np.asarray(x, np.float64).ravel()
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64).ravel()
    keep = w > 0
    u, inv = np.unique(x[keep], return_inverse=True)
    uw = np.bincount(inv, weights=w[keep])
    n = u.size
    k = min(k, n)

    def cost(j, i):  # SSE of u[j:i], computed directly (no prefix-sum cancellation)
        seg, sw = u[j:i], uw[j:i]
        mu = (seg * sw).sum() / sw.sum()
        return float((sw * (seg - mu) ** 2).sum())

    D = np.array([cost(0, i) if i else 0.0 for i in range(n + 1)])
    for m in range(2, k + 1):
        E = np.full(n + 1, np.inf)
        for i in range(m, n + 1):
            E[i] = min(D[j] + cost(j, i) for j in range(m - 1, i))
        D = E
    return D[n], k


def sse_of(x, w, centroids, labels):
    x = np.asarray(x, np.float64).ravel()
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64).ravel()
    return float((w * (x - centroids[labels]) ** 2).sum())


def random_case(rng):
    n = int(rng.integers(1, 60))
    kind = rng.integers(0, 4)
    if kind == 0:
        x = rng.normal(size=n)
    elif kind == 1:  # many duplicates
        x = rng.integers(-5, 6, size=n).astype(np.float64)
    elif kind == 2:  # clumps at very different scales
        x = np.concatenate([rng.normal(0, 1e-3, n // 2 + 1), rng.normal(50, 5, n // 2)])
    else:
        x = np.full(n, rng.normal())  # a single value
    w = None if rng.random() < 0.4 else rng.random(x.size) * (rng.random(x.size) > 0.2)
    if w is not None and not (w > 0).any():
        w[0] = 1.0
    k = int(rng.integers(1, 12))
    return x, w, k


@pytest.mark.parametrize("seed", range(300))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    x, w, k = random_case(rng)
    centroids, labels = ws.kmeans1d(x, k, weights=w)
    best, k_eff = brute_force_sse(x, k, w)
    assert centroids.dtype == np.float64 and labels.size == x.size
    assert centroids.size == k_eff
    assert np.all(np.diff(centroids) > 0)
    assert sse_of(x, w, centroids, labels) == pytest.approx(best, rel=1e-9, abs=1e-12)
    # every label is the nearest centroid
    dist = np.abs(x[:, None] - centroids[None, :])
    assert np.allclose(dist[np.arange(x.size), labels], dist.min(axis=1))


def test_k_at_least_distinct_is_lossless():
    x = np.array([3.0, 1.0, 3.0, 2.0, 1.0])
    centroids, labels = ws.kmeans1d(x, 10)
    assert centroids.tolist() == [1.0, 2.0, 3.0]
    assert np.array_equal(centroids[labels], x)


def test_k1_is_weighted_mean():
    x = np.array([0.0, 1.0, 4.0])
    w = np.array([1.0, 2.0, 1.0])
    centroids, labels = ws.kmeans1d(x, 1, weights=w)
    assert centroids.tolist() == [1.5] and labels.tolist() == [0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_histogram_matches_float_path(dtype):
    t = (torch.randn(20_000, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    c_half, l_half = ws.kmeans1d(t, 16)
    c_full, l_full = ws.kmeans1d(t.to(torch.float64).numpy(), 16)
    assert np.allclose(c_half, c_full, rtol=1e-12, atol=0)
    x = t.to(torch.float64).numpy()
    assert sse_of(x, None, c_half, l_half) == pytest.approx(sse_of(x, None, c_full, l_full), rel=1e-12)


def test_half_histogram_weighted_against_brute_force():
    rng = np.random.default_rng(7)
    x = rng.normal(size=50).astype(np.float16)
    w = rng.random(50)
    centroids, labels = ws.kmeans1d(x, 5, weights=w)
    best, _ = brute_force_sse(x.astype(np.float64), 5, w)
    assert sse_of(x.astype(np.float64), w, centroids, labels) == pytest.approx(best, rel=1e-9)


def test_shape_and_determinism():
    x = torch.randn(7, 11, 3, generator=torch.Generator().manual_seed(1))
    a = ws.kmeans1d(x, 4)
    b = ws.kmeans1d(x, 4)
    assert a[1].shape == (231,)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rejects_non_finite_values(bad):
    for x in (np.array([1.0, bad]), torch.tensor([1.0, bad], dtype=torch.float16)):
        with pytest.raises(ValueError, match="NaN or inf"):
            ws.kmeans1d(x, 2)


@pytest.mark.parametrize("w", [[1.0, -1.0], [1.0, np.nan], [0.0, 0.0], [1.0]])
def test_rejects_bad_weights(w):
    with pytest.raises(ValueError, match="weights"):
        ws.kmeans1d(np.array([1.0, 2.0]), 2, weights=np.array(w))


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        ws.kmeans1d(np.array([1.0, 2.0]), k)


@pytest.mark.parametrize("seed", range(20))
def test_rows_match_single_problems(seed):
    rng = np.random.default_rng(100 + seed)
    x = rng.normal(size=(13, 40))
    x[3] = 1.0  # one row with a single value
    x[5, :20] = x[5, 20:]  # a row with duplicates
    w = rng.random(x.shape) if seed % 2 else None
    k = int(rng.integers(1, 9))
    centroids, labels = kmeans1d_rows(x, k, weights=w)
    assert centroids.shape == (13, k) and labels.shape == x.shape
    assert np.all(np.diff(centroids, axis=1) >= 0)
    for r in range(13):
        wr = None if w is None else w[r]
        best, _ = brute_force_sse(x[r], k, wr)
        assert sse_of(x[r], wr, centroids[r], labels[r]) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_refuses_a_problem_whose_tables_do_not_fit(monkeypatch):
    import weightshare.kmeans as km

    monkeypatch.setattr(km, "_MAX_TABLE_BYTES", 50_000)
    with pytest.raises(ValueError, match="GiB of tables"):
        ws.kmeans1d(np.arange(1000.0), 16)
    assert ws.kmeans1d(np.arange(100.0), 16)[0].size == 16  # fewer distinct values fit


def dense_dp_sse(x, k, w=None):
    """Optimal weighted SSE by the full O(k n^2) DP, vectorised over the split point.

    Slow in theory but every (layer, i, j) cell is evaluated, so no bound or
    search order of the fast solver can hide a mistake from it.
    """
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64)
    order = np.argsort(x, kind="stable")
    x, w = x[order], w[order]
    d = x - np.average(x, weights=w)  # centred, as in the solver, to keep cancellation small
    P0 = np.concatenate([[0.0], np.cumsum(w)])
    P1 = np.concatenate([[0.0], np.cumsum(w * d)])
    P2 = np.concatenate([[0.0], np.cumsum(w * d * d)])
    n = x.size
    j = np.arange(n + 1)[:, None]
    i = np.arange(n + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        seg = (P2[i] - P2[j]) - (P1[i] - P1[j]) ** 2 / (P0[i] - P0[j])  # seg[j, i] = SSE of points j..i-1
    seg = np.where(j < i, np.maximum(seg, 0.0), np.inf)
    D = seg[0].copy()
    for _ in range(2, min(k, np.unique(x).size) + 1):
        D = (D[:, None] + seg).min(axis=0)
    return D[n]


@pytest.mark.parametrize("n", [384, 1536])
@pytest.mark.parametrize("kind", ["normal", "duplicates", "weighted"])
def test_rows_of_model_width_match_full_dp(n, kind):
    # 384 and 1536 are MiniLM's row lengths: both the divide-and-conquer layers and
    # the Knuth sweep of the later layers run, as they do on real weights
    rng = np.random.default_rng(n)
    x = rng.standard_t(4, size=(3, n)) * 0.02  # heavy tails, like trained weights
    if kind == "duplicates":
        x = np.round(x, 3)  # whole counts per distinct value
    w = rng.random(x.shape) + 0.01 if kind == "weighted" else None
    centroids, labels = kmeans1d_rows(x, 16, weights=w)
    for r in range(3):
        wr = None if w is None else w[r]
        best = dense_dp_sse(x[r], 16, wr)
        assert sse_of(x[r], wr, centroids[r], labels[r]) == pytest.approx(best, rel=1e-9)
        dist = np.abs(x[r][:, None] - centroids[r][None, :])
        assert np.allclose(dist[np.arange(n), labels[r]], dist.min(axis=1), rtol=0, atol=1e-15)
        assert labels[r].max() < np.unique(x[r]).size


@pytest.mark.parametrize("weighted", [False, True])
def test_one_large_problem_split_over_threads_is_bit_identical(weighted):
    """One row's layers run on 2^depth threads (halves of >= 8192 points each); the split points are the
    single thread's, so centroids and SSE must be equal bit for bit for any thread count."""
    from weightshare.kmeans import _solve

    rng = np.random.default_rng(5)
    x = np.unique(np.concatenate([rng.standard_normal(40_000), 6 * rng.standard_t(3, 2_000)]))
    w = rng.random(x.size) + 0.01 if weighted else None
    offsets = np.array([0, x.size], dtype=np.int64)
    c1, n1, s1 = _solve(x, w, offsets, 16, threads=1)
    for threads in (2, 3, 4):
        c, n, s = _solve(x, w, offsets, 16, threads=threads)
        assert n[0] == n1[0] == 16
        assert np.array_equal(c, c1) and s[0] == s1[0], threads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rows_of_a_half_tensor_converted_a_span_at_a_time_match_the_float64_rows(dtype):
    """Rows go to float64 a span (about 1 M values) at a time: a 2400 x 512 tensor is several spans, and the
    result is the one of the whole float64 array; uint8 labels equal the int32 ones."""
    torch.manual_seed(3)
    x = (torch.randn(2400, 512) * 0.02).to(dtype)
    c64, l64 = kmeans1d_rows(x.double().numpy(), 16)
    c, lab = kmeans1d_rows(x, 16, label_dtype=np.uint8)
    assert lab.dtype == np.uint8 and np.array_equal(lab, l64) and np.array_equal(c, c64)
    w = torch.rand(2400, 512)
    cw, lw = kmeans1d_rows(x, 16, weights=w)
    cw64, lw64 = kmeans1d_rows(x.double().numpy(), 16, weights=w.numpy())
    assert lw.dtype == np.int32 and np.array_equal(lw, lw64) and np.array_equal(cw, cw64)


def test_rows_label_dtype_must_hold_every_label():
    with pytest.raises(ValueError, match="cannot hold labels up to 255"):
        kmeans1d_rows(np.random.default_rng(0).standard_normal((4, 300)), 256, label_dtype=np.int8)
    with pytest.raises(ValueError, match="x contains NaN"):
        kmeans1d_rows(torch.tensor([[0.0, float("nan")]], dtype=torch.bfloat16), 2)


# --- every code path of the solver (WEIGHTSHARE_KMEANS), against the full DP and against each other ---
from weightshare.kmeans import PATH_ENV, price_passes, simd_path, simd_paths  # noqa: E402


@pytest.fixture(params=simd_paths())
def kmeans_path(request, monkeypatch):
    """Run the test on one forced path; the paths this CPU lacks are not parametrised (CI's CPU has AVX2)."""
    monkeypatch.setenv(PATH_ENV, request.param)
    assert simd_path() == request.param
    return request.param


@pytest.mark.parametrize("n", [384, 1536])
def test_rows_of_distinct_values_match_full_dp_on_every_path(kmeans_path, n):
    # rows of distinct values with unit weights are solved by price passes; AVX2 scans four end points a step
    rng = np.random.default_rng(n + 7)
    x = rng.standard_t(4, size=(4, n)) * 0.02
    centroids, labels = kmeans1d_rows(x, 16)
    for r in range(4):
        assert sse_of(x[r], None, centroids[r], labels[r]) == pytest.approx(dense_dp_sse(x[r], 16), rel=1e-9)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 90), k=st.integers(1, 24), rows=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-3, 1.0, 1e4]), tails=st.booleans())
def test_paths_agree_and_reach_the_full_dp_optimum(monkeypatch, n, k, rows, seed, scale, tails):
    """Short rows put every count of clusters and every scan length (under and past one vector step, and past
    the scan into the binary search) through the price passes of each path; the optimum must be the DP's."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(2, size=(rows, n)) if tails else rng.normal(size=(rows, n))) * scale
    results = {}
    for path in simd_paths():
        monkeypatch.setenv(PATH_ENV, path)
        results[path] = kmeans1d_rows(x, k)
    for r in range(rows):
        best = dense_dp_sse(x[r], k)
        floor = 1e-14 * float((x[r] ** 2).sum())  # rounding of centroids at the data's scale (k >= n: SSE 0)
        for path, (c, lab) in results.items():
            got = sse_of(x[r], None, c[r], lab[r])
            assert got == pytest.approx(best, rel=1e-9, abs=floor), (path, r)
    c0 = results["portable"][0]
    for c, _ in results.values():
        assert np.allclose(c, c0, rtol=1e-12, atol=0)


def test_the_longest_row_solved_by_price_passes_and_the_first_past_it_agree_across_paths(monkeypatch):
    # 16,384 distinct values is the longest row the price passes take; one more goes to the layered DP
    rng = np.random.default_rng(11)
    for n in (16_384, 16_385):
        x = np.unique(rng.standard_t(3, size=n + 50))[:n]
        assert x.size == n
        got = {}
        for path in simd_paths():
            monkeypatch.setenv(PATH_ENV, path)
            c, _ = ws.kmeans1d(x, 16)
            got[path] = c
            assert (price_passes(x[None], 16)[0] > 0) == (n == 16_384)
        for c in got.values():
            assert np.allclose(c, got["portable"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("k", [2, 16, 64])
def test_rows_of_trained_weights_are_solved_by_price_passes(kmeans_path, k):
    """The fast path is the one that runs: heavy-tailed rows (as trained weights are) find a price giving
    exactly k clusters in a few passes, none falls back to the layered DP, and the optimum is the DP's."""
    rng = np.random.default_rng(k)
    x = rng.standard_t(4, size=(40, 384)) * 0.02
    passes = price_passes(x, k)
    assert (passes > 0).all() and passes.mean() < 6
    centroids, labels = kmeans1d_rows(x, k)
    for r in range(0, 40, 13):
        assert sse_of(x[r], None, centroids[r], labels[r]) == pytest.approx(dense_dp_sse(x[r], k), rel=1e-9)


@pytest.mark.parametrize("n, k", [(4, 3), (10, 6), (10, 7), (30, 9)])
def test_evenly_spaced_rows_with_no_price_for_k_fall_back_to_the_layered_dp(kmeans_path, n, k):
    """On evenly spaced values two neighbouring gains can be equal, so no price gives exactly k clusters (0..3
    with k = 3: gains 0.5 and 0.5); the row must then take the layered DP and still reach the optimum."""
    x = np.arange(float(n))[None] * 0.1
    assert price_passes(x, k)[0] == 0
    centroids, labels = kmeans1d_rows(x, k)
    assert sse_of(x[0], None, centroids[0], labels[0]) == pytest.approx(dense_dp_sse(x[0], k), rel=1e-9, abs=1e-15)


def test_a_path_this_cpu_cannot_run_or_a_misspelt_one_is_refused(monkeypatch):
    monkeypatch.setenv(PATH_ENV, "avx3")
    with pytest.raises(ValueError, match="expected one of: auto, portable, avx2"):
        kmeans1d_rows(np.arange(8.0).reshape(2, 4), 2)
    if "avx2" not in simd_paths():
        monkeypatch.setenv(PATH_ENV, "avx2")
        with pytest.raises(RuntimeError, match="cannot run that path"):
            kmeans1d_rows(np.arange(8.0).reshape(2, 4), 2)
