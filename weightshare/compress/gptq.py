"""Error-compensating codebook assignment: GPTQ's column sweep on per-row tables.

A Linear layer's output error on calibration inputs X is ``tr(ΔW H ΔWᵀ)`` with
``H = XᵀX / n`` (its Hessian, up to a constant).  Assigning each weight to its
nearest table entry ignores H; GPTQ (Frantar et al. 2022, after Optimal Brain
Surgeon) assigns one column at a time and pushes that column's error onto the
columns not yet assigned, through the Cholesky factor of the damped ``H⁻¹``,
so that later columns correct what earlier ones lost.  Here "quantize" is "the
row's (or group's) nearest table entry"; after a sweep each row's table is
refit by exact least squares in the H metric for the labels it got, and the two
alternate.  Every state is scored by the layer objective and the best is kept,
so the result is never worse than plain nearest-entry assignment with the
starting tables (importance-weighted k-means on diag(H)).

Rows are independent given H: every step is vectorised over rows; the column
loop is sequential by nature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from weightshare.kmeans import kmeans1d_rows

__all__ = ["CodebookFit", "damped", "fit_codebook", "gptq_assign", "layer_objective", "nearest_assign", "refit_tables",
           "select_outliers"]

DAMPING = 0.01  # of the mean diagonal, as GPTQ: keeps the Cholesky factor of a (near-)singular XᵀX finite
BLOCK = 128  # columns per lazy batch: the updates inside a block are vectors, the block's push one GEMM


@dataclass
class CodebookFit:
    """Tables (rows, groups, entries), labels (rows, K) uint8, and the layer objective of each stage."""

    tables: torch.Tensor
    labels: torch.Tensor
    objective: float
    history: list[tuple[str, float]]


def damped(H: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """``H`` (float64) with columns no input ever drove made harmless and ``damping x mean(diag)`` added."""
    H = H.detach().to(torch.float64).clone()
    diag = torch.diagonal(H)
    if not torch.isfinite(H).all():
        raise ValueError("calibration statistics contain NaN or inf\n  expected: finite inputs to every layer")
    dead = diag <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    diag[dead] = mean  # a dead column costs like an average one: its weight is kept near its own value
    diag += damping * mean
    return H


def layer_objective(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - Ŵ) H (W - Ŵ)ᵀ)``: the layer's summed squared output error on the calibration inputs."""
    d = (W - W_hat).to(torch.float64)
    return float(((d @ H.to(torch.float64)) * d).sum())


def _decode(tables: torch.Tensor, labels: torch.Tensor, col_group: torch.Tensor,
            W: torch.Tensor | None = None, outliers: torch.Tensor | None = None) -> torch.Tensor:
    """Ŵ (rows, K) from tables (rows, groups, E), labels (rows, K) and each column's group;
    where the ``outliers`` mask is set, W's own value (kept exact in the sparse side tensor)."""
    rows = tables.shape[0]
    flat = tables.reshape(rows, -1)
    index = col_group[None, :] * tables.shape[2] + labels.long()
    out = torch.gather(flat, 1, index)
    return out if outliers is None else torch.where(outliers, W, out)


def select_outliers(W: torch.Tensor, importance: torch.Tensor | None, fraction: float) -> torch.Tensor | None:
    """Mask of the ``fraction`` of ``W``'s weights with the largest ``|w| · sqrt(importance)``.

    ``importance`` broadcasts against W (a layer's diag(H) per column, an embedding's
    token counts per row, None for |w| alone).  These are the weights a table serves
    worst (far from the bulk) where the output feels them most; they are kept exact in a
    sparse side tensor (dense-and-sparse, as SqueezeLLM).  None when no weight is chosen.
    """
    count = int(fraction * W.numel())
    if count <= 0:
        return None
    score = W.detach().abs().float()
    if importance is not None:
        score = score * importance.float().clamp_min(0).sqrt()
    top = torch.topk(score.reshape(-1), count).indices
    mask = torch.zeros(W.numel(), dtype=torch.bool)
    mask[top] = True
    return mask.view(W.shape)


def _nearest(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of each row's table: w (rows,), t (rows, E)."""
    return (w[:, None] - t).abs().argmin(1)


def nearest_assign(W: torch.Tensor, tables: torch.Tensor, col_group: torch.Tensor) -> torch.Tensor:
    """Plain assignment: every weight to its nearest table entry (rows, K) uint8.  The distances are taken a
    few rows at a time: all at once they are rows x K x entries floats (2 GB for a 32000 x 512 LM head at 4 bits)."""
    out = torch.empty(W.shape, dtype=torch.uint8)
    for g in range(tables.shape[1]):
        cols = (col_group == g).nonzero().flatten()
        if cols.numel():
            t = tables[:, g, :]
            step = max(1, (1 << 22) // (cols.numel() * t.shape[1]))
            for r0 in range(0, W.shape[0], step):
                r1 = min(W.shape[0], r0 + step)
                tr = t[r0:r1] if t.shape[0] > 1 else t  # one table for all rows broadcasts
                d = (W[r0:r1, cols, None] - tr[:, None, :]).abs()
                out[r0:r1, cols] = d.argmin(2).to(torch.uint8)
    return out


def gptq_assign(W: torch.Tensor, Hd: torch.Tensor, tables: torch.Tensor, col_group: torch.Tensor,
                block: int = BLOCK, outliers: torch.Tensor | None = None) -> torch.Tensor:
    """Labels (rows, K) uint8 by GPTQ's sweep over columns in order of decreasing ``diag(Hd)``.

    ``Hd`` is the damped Hessian (``damped``); ``tables`` (rows, groups, E) are fixed during the sweep.
    Weights in the ``outliers`` mask are kept exact: they make no error to push on.
    """
    K = W.shape[1]
    order = torch.argsort(torch.diagonal(Hd), descending=True)  # act-order: the most driven columns first
    Hp = Hd[order][:, order]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True).to(W.dtype)
    Wp = W[:, order].clone()
    keep = None if outliers is None else outliers[:, order]
    groups = col_group[order]
    labels = torch.empty(W.shape, dtype=torch.uint8)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = Wp[:, i1:i2].clone()
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            t = tables[:, int(groups[i1 + i]), :].to(W.dtype)
            w = W1[:, i]
            idx = _nearest(w, t)
            labels[:, order[i1 + i]] = idx.to(torch.uint8)
            q = t.gather(1, idx[:, None]).squeeze(1)
            if keep is not None:
                q = torch.where(keep[:, i1 + i], w, q)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        Wp[:, i2:] -= E1 @ U[i1:i2, i2:]
    return labels


def refit_tables(W: torch.Tensor, Hd: torch.Tensor, labels: torch.Tensor, tables: torch.Tensor,
                 col_group: torch.Tensor, ridge: float = 1e-8, outliers: torch.Tensor | None = None) -> torch.Tensor:
    """Each table by exact least squares in the ``Hd`` metric, for fixed labels.

    Per row: minimise ``(w - A t)ᵀ Hd (w - A t)`` over the table ``t``, ``A`` the one-hot
    matrix of the labels: ``(Aᵀ Hd A) t = Aᵀ Hd w``; one table for every row (per-tensor)
    sums the rows' systems.  One table per row (per-channel) or per tensor is exact;
    per-group tables are refit group by group within the group's block of ``Hd`` (the
    cross-group terms are left out: a refit step, the caller keeps the better state).
    Entries no weight uses keep their value (a small ridge pulls them to it).
    Weights in the ``outliers`` mask are exact and use no entry: their rows of ``A`` are
    zero and they leave no residual.
    """
    n_tab, n_groups, E = tables.shape
    rows = W.shape[0]
    Hd = Hd.to(W.dtype)
    out = tables.clone()
    for g in range(n_groups):
        cols = (col_group == g).nonzero().flatten()
        H = Hd[cols][:, cols]
        step = max(1, (1 << 23) // max(1, cols.numel() * E))  # rows at a time: bounded one-hot pieces
        Gs, rhss = [], []
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            Wg, lab = W[r0:r1, cols], labels[r0:r1, cols].long()
            free = None if outliers is None else (~outliers[r0:r1, cols]).to(W.dtype)
            if free is not None:
                Wg = Wg * free
            HW = Wg @ H  # (n, k): H w for each row (H is symmetric)
            A = torch.nn.functional.one_hot(lab, E).to(W.dtype)  # (n, k, E)
            if free is not None:
                A = A * free[:, :, None]
            G = A.transpose(1, 2) @ (H @ A)  # (n, E, E)
            rhs = (A.transpose(1, 2) @ HW[:, :, None]).squeeze(2)  # (n, E)
            if n_tab == 1:
                Gs.append(G.sum(0, keepdim=True).to(torch.float64))
                rhss.append(rhs.sum(0, keepdim=True).to(torch.float64))
            else:  # a table per row: its rows' systems are solved now, not kept for all rows (GBs for an LM head)
                out[r0:r1, g, :] = _solve_tables(G.to(torch.float64), rhs.to(torch.float64), tables[r0:r1, g, :],
                                                 ridge, out.dtype)
        if n_tab == 1:
            out[:, g, :] = _solve_tables(torch.stack(Gs).sum(0), torch.stack(rhss).sum(0), tables[:, g, :], ridge,
                                         out.dtype)
    return out


def _solve_tables(G: torch.Tensor, rhs: torch.Tensor, t_old: torch.Tensor, ridge: float, dtype) -> torch.Tensor:
    """``(G + λI) t = rhs + λ t_old`` for each table, λ a ``ridge`` fraction of the mean of ``G``'s diagonal."""
    E = G.shape[-1]
    lam = ridge * torch.diagonal(G, dim1=1, dim2=2).mean(1).clamp_min(1e-30)[:, None]
    sol = torch.linalg.solve(G + torch.diag_embed(lam.expand(-1, E)), rhs + lam * t_old.to(torch.float64))
    return sol.to(dtype)


def _sorted(tables: torch.Tensor, labels: torch.Tensor, col_group: torch.Tensor):
    """Tables sorted along entries (as k-means leaves them) with the labels renamed to match."""
    order = torch.argsort(tables, dim=2)
    rank = torch.argsort(order, dim=2)  # old entry -> its new position
    rows, E = labels.shape[0], tables.shape[2]
    rank = rank.reshape(rank.shape[0], -1).expand(rows, -1)
    new = torch.gather(rank, 1, col_group[None, :] * E + labels.long())
    return torch.gather(tables, 2, order), new.to(torch.uint8)


def fit_codebook(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None = None,
                 per_tensor: bool = False, table_dtype: torch.dtype = torch.float16, alternations: int = 2,
                 damping: float = DAMPING, outliers: torch.Tensor | None = None) -> CodebookFit:
    """Tables and labels for the (rows, K) weight ``W`` given its input second moment ``H`` (K, K).

    Start: importance-weighted exact k-means (importance diag(H)) and nearest labels.
    Then GPTQ sweeps alternating with least-squares table refits; tables are rounded to
    ``table_dtype`` before every scoring, as the packed file stores them.  Returns the
    state with the lowest layer objective.  ``outliers`` (a (rows, K) bool mask,
    ``select_outliers``) marks weights kept exact beside the codebook: they weigh
    nothing in k-means and the refits and make no error in the sweeps.
    """
    W = W.detach().to(torch.float32)
    rows, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"calibration statistics: expected a ({K}, {K}) matrix for a weight of {K} columns\n"
                         f"  got: {tuple(H.shape)}")
    E = 1 << bits
    Hd = damped(H, damping)
    diag = torch.diagonal(Hd).to(torch.float32)
    if per_tensor or group_size is None:
        n_groups, gs = 1, K
    else:
        if K % group_size:
            raise ValueError(f"group_size must divide the row length\n  expected: a divisor of {K}\n"
                             f"  got: {group_size}")
        n_groups, gs = K // group_size, group_size
    col_group = torch.arange(K) // gs
    imp = diag[None, :].expand(rows, K)
    if outliers is not None:
        if outliers.shape != W.shape:
            raise ValueError(f"outliers: expected a {tuple(W.shape)} mask\n  got: {tuple(outliers.shape)}")
        imp = imp * (~outliers)
    if per_tensor:
        centroids, _ = kmeans1d_rows(W.reshape(1, -1), E, weights=imp.reshape(1, -1))
        tables = torch.from_numpy(centroids).reshape(1, 1, E)
    else:
        centroids, _ = kmeans1d_rows(W.reshape(rows * n_groups, gs), E, weights=imp.reshape(rows * n_groups, gs))
        tables = torch.from_numpy(centroids).reshape(rows, n_groups, E)
    tables = tables.to(table_dtype).to(torch.float32)

    def expand(t):
        return t.expand(rows, -1, -1) if per_tensor else t

    step = max(1, (1 << 20) // K)  # rows per piece of the objective: a few MB of float64, however large W is

    def score(t, lab):
        tt, total = expand(t), 0.0
        for r0 in range(0, rows, step):
            r = slice(r0, min(rows, r0 + step))
            mask = None if outliers is None else outliers[r]
            total += layer_objective(W[r], _decode(tt[r], lab[r], col_group, W[r], mask), Hd)
        return total

    labels = nearest_assign(W, expand(tables), col_group)
    best = (score(tables, labels), tables, labels)
    history = [("nearest", best[0])]
    for a in range(alternations):  # sweep with these tables, then the best tables for its labels
        labels = gptq_assign(W, Hd, expand(tables), col_group, outliers=outliers)
        history.append((f"gptq{a}", score(tables, labels)))
        if history[-1][1] < best[0]:
            best = (history[-1][1], tables, labels)
        tables = refit_tables(W, Hd, labels, tables, col_group, outliers=outliers).to(table_dtype).to(torch.float32)
        history.append((f"refit{a}", score(tables, labels)))
        if history[-1][1] < best[0]:
            best = (history[-1][1], tables, labels)
    objective, tables, labels = best
    if not math.isfinite(objective) or not torch.isfinite(tables).all():
        raise ValueError("codebook fit produced non-finite tables\n  expected: finite weights and calibration inputs")
    tables, labels = _sorted(tables, labels, col_group)
    return CodebookFit(tables=tables, labels=labels, objective=objective, history=history)
