"""Exact weighted 1-D k-means, the performance core of codebook sharing.

``kmeans1d`` finds the globally optimal clustering (minimum weighted sum of
squared errors) by dynamic programming over the sorted distinct values; it is
not Lloyd's algorithm and has no random start.  Three things keep it fast:

* 16-bit floats have at most 65,536 distinct bit patterns, so fp16/bf16 input
  is reduced to a histogram first: cost and memory barely grow with size.
* many small problems (one table per row or per group) are solved in one call
  into the C core (``_kmeans.c``), split over threads that run without the GIL.
* a row of up to 16,384 values (unit weights) is solved by a price per cluster
  (Lagrangian relaxation: one pass over the row per price, about two prices a
  row) instead of one dynamic-programming layer per cluster.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["kmeans1d", "kmeans1d_rows", "soft_kmeans_pass"]

_MAX_TABLE_BYTES = 4 << 30  # dynamic-programming memory a single call may use
_CHUNK = 1 << 22  # elements per pass in histogram/gather loops: bounds temporaries to ~32 MB


def _load_core() -> ctypes.CDLL:
    from weightshare import _kmeans_core  # built by setup.py from _kmeans.c

    lib = ctypes.CDLL(_kmeans_core.__file__)
    f64 = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")
    i64 = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
    i32 = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
    c64 = ctypes.c_int64
    lib.ws_kmeans1d_batch.restype = ctypes.c_int
    lib.ws_kmeans1d_batch.argtypes = [f64, ctypes.c_void_p, i64, c64, c64, c64, c64, f64, i64, f64, i64, c64]
    lib.ws_kmeans1d_paths.restype = ctypes.c_int
    lib.ws_kmeans1d_paths.argtypes = []
    lib.ws_assign_batch.restype = ctypes.c_int
    lib.ws_assign_batch.argtypes = [f64, c64, f64, i64, c64, c64, c64, i32]
    ptr = ctypes.c_void_p
    lib.ws_dkm_pass.restype = ctypes.c_int
    lib.ws_dkm_pass.argtypes = [ctypes.c_int, ptr, ptr, c64, c64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, c64, c64,
                                ctypes.c_int]
    return lib


_core = _load_core()

PATH_ENV = "WEIGHTSHARE_KMEANS"
PATHS = {"portable": 1, "avx2": 2}  # the C core's codes; avx2 scans four end points per step in price passes


def simd_paths() -> list[str]:
    """The solver's code paths this CPU can run, slowest first."""
    have = _core.ws_kmeans1d_paths()
    return [name for name, code in PATHS.items() if have & code]


def simd_path() -> str:
    """The path the solver takes: ``WEIGHTSHARE_KMEANS`` if set (``portable`` or ``avx2``; checked), else the
    fastest this CPU has.  Every path finds the optimum; forcing one is for tests and comparisons."""
    have = simd_paths()
    forced = os.environ.get(PATH_ENV, "").strip().lower()
    if forced in ("", "auto"):
        return have[-1]
    if forced not in PATHS:
        raise ValueError(f"{PATH_ENV}={forced!r}\n  expected one of: auto, {', '.join(PATHS)}\n"
                         "  unset it to let weightshare choose")
    if forced not in have:
        raise RuntimeError(f"{PATH_ENV}={forced!r}: this CPU cannot run that path (it has: {', '.join(have)})\n"
                           "  unset it or choose one it has")
    return forced


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or inf: its min and max in one pass (both propagate NaN), about 20 times
    faster than ``torch.isfinite(t).all()``, which writes a mask of the whole tensor first."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _n_threads() -> int:
    return max(1, min(os.cpu_count() or 1, torch.get_num_threads()))


def _split(n_rows: int, n_parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n_rows, n_parts + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _solve(xs: np.ndarray, ws: np.ndarray | None, offsets: np.ndarray, k: int, threads: int | None = None,
           passes: np.ndarray | None = None):
    """Run the C solver on rows given by ``offsets`` (values sorted within each row).  ``passes`` (int64, one
    per row) receives the price passes that solved each row, 0 where the layered DP did."""
    n_rows = offsets.size - 1
    threads = threads or _n_threads()
    longest = int(np.diff(offsets).max()) if n_rows else 0
    # the split table is k x n int32 per thread; refuse rather than let the OS kill us
    need = (4 * k + 56) * (longest + 1) * min(threads, n_rows)
    if need > _MAX_TABLE_BYTES:
        raise ValueError(
            f"kmeans1d: {longest:,} distinct values with k={k} needs {need / 2**30:.1f} GiB of tables\n"
            f"  expected: at most {_MAX_TABLE_BYTES / 2**30:.0f} GiB\n"
            "  cast the values to float16/bfloat16 (a histogram of at most 65,536 values), "
            "use fewer clusters, or cluster per channel"
        )
    centroids = np.full((n_rows, k), np.nan)
    nclusters = np.zeros(n_rows, dtype=np.int64)
    sse = np.zeros(n_rows)
    passes = np.zeros(n_rows, dtype=np.int64) if passes is None else passes
    wptr = ws.ctypes.data if ws is not None else None

    # one row: its layers are split over threads inside C; many rows: the rows are
    inner = threads if n_rows == 1 else 1
    path = PATHS[simd_path()]

    def run(span):
        if _core.ws_kmeans1d_batch(xs, wptr, offsets, span[0], span[1], k, inner, centroids, nclusters, sse, passes,
                                   path):
            raise MemoryError("kmeans1d: could not allocate the dynamic-programming table")

    # several spans per thread: rows differ in cost, so finer spans balance load
    spans = _split(n_rows, 4 * threads) if n_rows > 1 and threads > 1 else [(0, n_rows)]
    if len(spans) == 1:
        run(spans[0])
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, spans))
    return centroids, nclusters, sse


def price_passes(x, k: int) -> np.ndarray:
    """How each row of ``x`` (2-D, unit weights) was solved: the number of price passes (the Lagrangian
    search of ``_kmeans.c``), or 0 where no price gives exactly k clusters and the layered DP ran instead.
    Both reach the optimum; this says which ran, for benchmarks and tests."""
    k = _check_k(k)
    xs = np.sort(np.ascontiguousarray(x, dtype=np.float64), axis=1)
    offsets = np.arange(xs.shape[0] + 1, dtype=np.int64) * xs.shape[1]
    passes = np.zeros(xs.shape[0], dtype=np.int64)
    _solve(np.ascontiguousarray(xs), None, offsets, k, passes=passes)
    return passes


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"kmeans1d: k must be an integer >= 1\n  expected: k >= 1\n  got: {k!r}")
    return int(k)


def _label_dtype(k: int):
    return np.int16 if k <= np.iinfo(np.int16).max else np.int32


def _as_weights(weights, size: int) -> np.ndarray | None:
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().to(torch.float64).numpy()
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != size:
        raise ValueError(
            f"kmeans1d: weights must have one entry per value\n  expected: {size} weights\n  got: {w.size}"
        )
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(
            "kmeans1d: weights must be finite and non-negative\n"
            "  got: negative, NaN or inf weights; clip or drop them first"
        )
    if size and not (w > 0).any():
        raise ValueError("kmeans1d: weights sum to zero; at least one value needs a positive weight")
    return w


def _half_codes(x) -> tuple[np.ndarray, str] | None:
    """The raw 16-bit patterns of fp16/bf16 input, or None for other dtypes."""
    if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
        kind = "float16" if x.dtype == torch.float16 else "bfloat16"
        codes = x.detach().cpu().contiguous().reshape(-1).view(torch.int16).numpy().view(np.uint16)
        return codes, kind
    if isinstance(x, np.ndarray) and x.dtype == np.float16:
        return np.ascontiguousarray(x).reshape(-1).view(np.uint16), "float16"
    return None


def _code_values(kind: str) -> np.ndarray:
    """float64 value of each of the 65,536 bit patterns of a 16-bit float type."""
    codes = np.arange(1 << 16, dtype=np.uint32)
    with np.errstate(invalid="ignore"):  # the NaN bit patterns are meant to be there
        if kind == "float16":
            return codes.astype(np.uint16).view(np.float16).astype(np.float64)
        return (codes << 16).view(np.float32).astype(np.float64)  # bf16 is the top half of fp32


def _histogram(codes: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    total = np.zeros(1 << 16)
    for s in range(0, codes.size, _CHUNK):
        part = w[s : s + _CHUNK] if w is not None else None
        total += np.bincount(codes[s : s + _CHUNK], weights=part, minlength=1 << 16)
    return total


def _gather(lut: np.ndarray, index: np.ndarray) -> np.ndarray:
    out = np.empty(index.size, dtype=lut.dtype)
    for s in range(0, index.size, _CHUNK):
        out[s : s + _CHUNK] = lut[index[s : s + _CHUNK]]
    return out


def _nearest(values: np.ndarray, centroids: np.ndarray, dtype) -> np.ndarray:
    # the optimal partition is the nearest-centroid one; ties go to the lower centroid
    mid = 0.5 * (centroids[:-1] + centroids[1:])
    return np.searchsorted(mid, values, side="left").astype(dtype)


def kmeans1d(x, k: int, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Globally optimal weighted 1-D k-means.

    Args:
        x: numpy array or torch tensor of any float dtype and shape (flattened).
        k: number of clusters, >= 1.
        weights: optional non-negative weight per value (same size as ``x``).

    Returns:
        ``(centroids, labels)``: ``centroids`` is a sorted float64 array of
        ``min(k, number of distinct values with positive weight)`` entries, the
        weighted means of an optimal partition; ``labels`` (int16, or int32 for
        k > 32767) has one entry per value: the index of its nearest centroid.

    Raises:
        ValueError: NaN/inf in ``x``, negative or non-finite weights, ``k < 1``.
    """
    k = _check_k(k)
    half = _half_codes(x)
    if half is not None:
        codes, kind = half
        w = _as_weights(weights, codes.size)
        if codes.size == 0:
            return np.zeros(0), np.zeros(0, dtype=_label_dtype(k))
        values = _code_values(kind)
        mass = _histogram(codes, w)
        present = _histogram(codes, None) > 0 if w is not None else mass > 0
        if not np.isfinite(values[present]).all():
            raise ValueError("kmeans1d: x contains NaN or inf\n  expected: finite values\n  got: non-finite entries")
        order = np.flatnonzero(present)[np.argsort(values[present], kind="stable")]
        u, uw = values[order], mass[order]
        index_of = None
    else:
        xa = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if not np.issubdtype(xa.dtype, np.floating):
            raise ValueError(f"kmeans1d: x must be a float array\n  expected: a float dtype\n  got: {xa.dtype}")
        xa = xa.reshape(-1).astype(np.float64, copy=False)
        if not np.isfinite(xa).all():
            raise ValueError("kmeans1d: x contains NaN or inf\n  expected: finite values\n  got: non-finite entries")
        w = _as_weights(weights, xa.size)
        if xa.size == 0:
            return np.zeros(0), np.zeros(0, dtype=_label_dtype(k))
        u, index_of = np.unique(xa, return_inverse=True)
        uw = (np.bincount(index_of, weights=w, minlength=u.size) if w is not None
              else np.bincount(index_of).astype(np.float64))
    u = np.ascontiguousarray(u)
    centroids, nclusters, _ = _solve(u, np.ascontiguousarray(uw), np.array([0, u.size], dtype=np.int64), k)
    centroids = centroids[0, : nclusters[0]]
    dtype = _label_dtype(k)
    if index_of is None:  # histogram path: a label per bit pattern, then gather
        lut = _nearest(_code_values(kind), centroids, dtype)
        labels = _gather(lut, codes)
    else:
        labels = _gather(_nearest(u, centroids, dtype), index_of)
    return centroids, labels


def kmeans1d_rows(x, k: int, weights=None, *, label_dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Exact weighted 1-D k-means on every row of a 2-D array, in one batched call.

    Args:
        x: (R, n) float array or tensor; each row is its own problem.
        k: clusters per row.
        weights: optional (R, n) non-negative weights.
        label_dtype: the labels' integer dtype (``np.uint8`` for k <= 256 keeps them a quarter the size).

    Returns:
        ``(centroids, labels)``: centroids (R, k) float64, each row sorted; a row
        with fewer than k distinct values repeats its largest centroid in the
        unused slots.  labels (R, n) of ``label_dtype``, index of the nearest centroid.

    Rows are converted to float64 a span at a time, so the working memory is a few spans, not a float64 copy
    of ``x`` (a 32000 x 2048 bf16 embedding is 131 MB; as float64, 524 MB).
    """
    k = _check_k(k)
    label_dtype = np.dtype(label_dtype)
    if label_dtype.kind not in "iu" or np.iinfo(label_dtype).max < k - 1:
        raise ValueError(f"kmeans1d_rows: label_dtype {label_dtype} cannot hold labels up to {k - 1}")
    if isinstance(x, torch.Tensor):
        xt = x.detach().cpu()
        if xt.ndim != 2:
            raise ValueError(f"kmeans1d_rows: x must be 2-D (rows, values)\n  got shape: {tuple(xt.shape)}")
        finite = all_finite(xt)
        n_rows, n = xt.shape

        def rows_f64(a: int, b: int) -> np.ndarray:
            return np.ascontiguousarray(xt[a:b].to(torch.float64).numpy())
    else:
        xn = np.asarray(x)
        if xn.ndim != 2:
            raise ValueError(f"kmeans1d_rows: x must be 2-D (rows, values)\n  got shape: {xn.shape}")
        xn = xn if xn.dtype.kind == "f" else xn.astype(np.float64)
        finite = bool(np.isfinite(xn).all())
        n_rows, n = xn.shape

        def rows_f64(a: int, b: int) -> np.ndarray:
            return np.ascontiguousarray(xn[a:b], dtype=np.float64)
    if not finite:
        raise ValueError("kmeans1d_rows: x contains NaN or inf\n  expected: finite values")
    w = _as_weights(weights, n_rows * n) if weights is not None else None
    w = None if w is None else w.reshape(n_rows, n)
    centroids = np.empty((n_rows, k))
    nclusters = np.zeros(n_rows, dtype=np.int64)
    labels = np.empty((n_rows, n), dtype=label_dtype)
    offsets = np.arange(n_rows + 1, dtype=np.int64) * n

    def work(span):
        # convert, sort, solve and assign one span of rows; torch's and numpy's copies, numpy's sort
        # and the C core release the GIL, so spans run in parallel
        a, b = span
        xa = rows_f64(a, b)
        if w is not None:
            order = np.argsort(xa, axis=1, kind="stable")
            xs = np.ascontiguousarray(np.take_along_axis(xa, order, axis=1))
            ws = np.ascontiguousarray(np.take_along_axis(w[a:b], order, axis=1))
        else:
            xs, ws = np.sort(xa, axis=1), None
        c, nc, _ = _solve(xs, ws, offsets[: b - a + 1], k, threads=1)
        if (nc == 0).any():
            raise ValueError("kmeans1d_rows: a row has all weights zero; each row needs a positive weight")
        # fill the unused slots with the largest centroid so every table stays sorted
        last = c[np.arange(b - a), nc - 1]
        c = np.where(np.arange(k)[None, :] >= nc[:, None], last[:, None], c)
        centroids[a:b], nclusters[a:b] = c, nc
        direct = label_dtype == np.int32  # the C core writes int32 labels
        lab = labels[a:b] if direct else np.empty((b - a, n), dtype=np.int32)
        if _core.ws_assign_batch(xa, n, np.ascontiguousarray(c), nc, k, 0, b - a, lab):
            raise MemoryError("kmeans1d_rows: could not allocate the assignment table")
        if not direct:
            labels[a:b] = lab

    # spans of at most 1 M values: a few MB of float64 per thread, however large the tensor
    n_spans = max(4 * _n_threads(), -(-n_rows * n // (1 << 20)))
    spans = _split(n_rows, n_spans)
    with ThreadPoolExecutor(_n_threads()) as pool:
        list(pool.map(work, spans))
    return centroids, labels


SOFT_PASSES = {"step": 0, "out": 1, "dlast": 2, "back": 3}  # the C core's soft k-means passes (_kmeans.c)
SOFT_MAX_K = 256


def soft_kmeans_pass(mode: str, x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, *, g=None, cn=None, u=None,
                     out=None, acc1=None, acc2=None) -> None:
    """One pass of the C core over groups ``x`` (G, n) with centroids ``c`` (G, k) and scales ``s`` (G, 1), all
    contiguous float32 on the CPU, writing into ``out`` / ``acc1`` / ``acc2`` (``training/dkm.py``'s
    ``SoftKMeans`` says what each ``mode`` computes; ``_kmeans.c`` writes it out).  The attention is recomputed,
    never stored; the groups are shared among threads, and ``WEIGHTSHARE_KMEANS`` picks the vector path."""
    G, n = x.shape
    k = c.shape[1]
    tensors = [t for t in (x, c, s, g, cn, u, out, acc1, acc2) if t is not None]
    if not 1 <= k <= SOFT_MAX_K or any(t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu"
                                       for t in tensors):
        raise ValueError(f"soft_kmeans_pass: expected contiguous float32 CPU tensors and 1..{SOFT_MAX_K} centroids")
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    args = (SOFT_PASSES[mode], ptr(x), ptr(g), n, k, ptr(c), ptr(cn), ptr(u), ptr(s), ptr(out), ptr(acc1), ptr(acc2))
    path = PATHS[simd_path()]
    parts = _split(G, min(_n_threads(), G) if G * n * k >= 1 << 16 else 1)
    if len(parts) == 1:
        _core.ws_dkm_pass(*args, 0, G, path)
        return
    with ThreadPoolExecutor(len(parts)) as pool:  # ctypes lets go of the GIL: the threads run at once
        list(pool.map(lambda p: _core.ws_dkm_pass(*args, p[0], p[1], path), parts))
