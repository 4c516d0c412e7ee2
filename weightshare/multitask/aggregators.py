"""Gradient aggregation over the per-task gradients of shared parameters, one small pure function each.

Every aggregator takes ``G``, a (tasks, params) tensor whose row i is task i's
gradient of the shared parameters, and returns one (params,) update direction
``d`` (a descent step is ``θ -= lr · d``).  They are registered in ``METHODS``
(kind ``"gradient"``) and called as ``aggregate(name, G, **params)``.  The
computations are in float64 on the (tasks x tasks) Gram matrix where they can
be: with a handful of tasks that is where all the work is.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

__all__ = ["METHODS", "Method", "aggregate", "register_method"]


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "gradient": aggregates per-task gradients | "loss": weights the task losses
    fn: Callable
    source: str  # the paper it follows


METHODS: dict[str, Method] = {}


def register_method(name: str, kind: str, source: str):
    def wrap(fn):
        METHODS[name] = Method(name, kind, fn, source)
        return fn

    return wrap


def aggregate(name: str, G: torch.Tensor, **params) -> torch.Tensor:
    """The update direction of gradient aggregator ``name`` for per-task gradients ``G`` (tasks, params)."""
    gradient = sorted(n for n, m in METHODS.items() if m.kind == "gradient")
    if name not in METHODS or METHODS[name].kind != "gradient":
        raise ValueError(f"unknown gradient aggregator\n  expected one of: {', '.join(gradient)}\n  got: {name!r}")
    if not isinstance(G, torch.Tensor) or G.dim() != 2 or G.shape[0] < 1:
        raise ValueError(f"aggregate: G\n  expected: a (tasks, params) tensor with at least one task\n"
                         f"  got: {tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__}")
    if not torch.isfinite(G).all():
        bad = sorted({int(i) for i in torch.nonzero(~torch.isfinite(G))[:, 0]})
        raise ValueError(f"aggregate: task gradients {bad} contain NaN or inf\n  expected: finite gradients")
    return METHODS[name].fn(G, **params)


def _gram(G: torch.Tensor) -> np.ndarray:
    g = G.double()
    return (g @ g.t()).cpu().numpy()


def _combine(weights, G: torch.Tensor) -> torch.Tensor:
    return (torch.as_tensor(np.asarray(weights), dtype=torch.float64) @ G.double().cpu()).to(G.dtype).to(G.device)


# ---------------------------------------------------------------------------------------- EW
@register_method("ew", "gradient", "equal weighting: the gradient of the summed losses")
def ew(G: torch.Tensor) -> torch.Tensor:
    return G.sum(0)


# ---------------------------------------------------------------------------------------- MGDA
def min_norm_weights(gram: np.ndarray) -> np.ndarray:
    """λ on the simplex minimising ||λ^T G||^2 = λ^T gram λ, exactly, by enumerating supports.

    On a support S the optimum solves the KKT system [M_SS 1; 1^T 0][λ; ν] = [0; 1];
    the best candidate with λ >= 0 over all supports is the global optimum (a convex
    QP attains it on the relative interior of some face).  2^m - 1 small solves: exact
    and fast for the handful of tasks multi-task learning has (m <= 12).
    """
    m = gram.shape[0]
    if m > 12:
        return _min_norm_projected(gram)
    best, best_val = None, math.inf
    for size in range(1, m + 1):
        for support in itertools.combinations(range(m), size):
            s = list(support)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = gram[np.ix_(s, s)]
            kkt[:size, size] = kkt[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if (sol < -1e-12).any() or abs(sol.sum() - 1) > 1e-9:
                continue
            lam = np.zeros(m)
            lam[s] = np.clip(sol, 0, None)
            lam /= lam.sum()
            val = lam @ gram @ lam
            if val < best_val - 1e-15:
                best, best_val = lam, val
    return best


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """The Euclidean projection onto the probability simplex (sort-based, Held et al.)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - css[k] / (k + 1), 0.0)


def _min_norm_projected(gram: np.ndarray, iterations: int = 5000) -> np.ndarray:
    """Many tasks: accelerated projected gradient (FISTA) on the simplex, step 1 / largest eigenvalue."""
    m = gram.shape[0]
    step = 1.0 / max(float(np.linalg.eigvalsh(gram)[-1]), 1e-30)
    lam = y = np.full(m, 1.0 / m)
    t = 1.0
    for _ in range(iterations):
        nxt = _project_simplex(y - step * (gram @ y))
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = nxt + (t - 1) / t_next * (nxt - lam)
        lam, t = nxt, t_next
    return lam


@register_method("mgda", "gradient", "Sener & Koltun 2018, the min-norm point of the convex hull of the gradients")
def mgda(G: torch.Tensor) -> torch.Tensor:
    return _combine(min_norm_weights(_gram(G)), G)


# ---------------------------------------------------------------------------------------- PCGrad
@register_method("pcgrad", "gradient", "Yu et al. 2020, gradient surgery: project away conflicting components")
def pcgrad(G: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = G.double()
    gen = torch.Generator().manual_seed(seed)
    out = g.clone()
    m = g.shape[0]
    for i in range(m):
        for j in torch.randperm(m, generator=gen).tolist():
            if j == i:
                continue
            dot = out[i] @ g[j]
            if dot < 0:
                out[i] -= dot / (g[j] @ g[j]).clamp(min=1e-30) * g[j]
    return out.sum(0).to(G.dtype)


# ---------------------------------------------------------------------------------------- UPGrad
def _project_onto_dual_cone(gram: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Weights v with v^T G the projection of u^T G onto the cone {x : G x >= 0}.

    The projection is (u + w)^T G with w >= 0 minimising ||(u + w)^T G||^2 subject to
    G G^T (u + w) >= 0 at w's support (the dual of the cone projection): the
    non-negative least squares min_w ||L^T (u + w)||, L L^T = gram.
    """
    from scipy.optimize import nnls

    m = gram.shape[0]
    ridge = 1e-12 * max(np.trace(gram) / m, 1e-300)
    chol = np.linalg.cholesky(gram + ridge * np.eye(m))
    w, _ = nnls(chol.T, -(chol.T @ u))
    return u + w


@register_method("upgrad", "gradient", "Quinton & Rey 2024 (torchjd), unconflicting projection of gradients")
def upgrad(G: torch.Tensor) -> torch.Tensor:
    gram = _gram(G)
    m = gram.shape[0]
    weights = sum(_project_onto_dual_cone(gram, np.eye(m)[i]) for i in range(m)) / m
    return _combine(weights, G)


# ---------------------------------------------------------------------------------------- IMTL-G
@register_method("imtl", "gradient", "Liu et al. 2021 (IMTL-G): equal projections onto every task's unit gradient")
def imtl(G: torch.Tensor) -> torch.Tensor:
    g = G.double()
    m = g.shape[0]
    if m == 1:
        return G[0].clone()
    u = g / g.norm(dim=1, keepdim=True).clamp(min=1e-30)
    D = g[:1] - g[1:]  # (m-1, n): g_1 - g_i
    U = u[:1] - u[1:]
    # α_{2..m} = g_1 U^T (D U^T)^{-1}; α_1 = 1 - Σ α_{2..m}
    rest = torch.linalg.lstsq((D @ U.t()).t(), (g[0] @ U.t()).unsqueeze(1)).solution.squeeze(1)
    alpha = torch.cat([1 - rest.sum().unsqueeze(0), rest])
    return (alpha @ g).to(G.dtype)


# ---------------------------------------------------------------------------------------- CAGrad
@register_method("cagrad", "gradient", "Liu et al. 2021, conflict-averse gradient descent (c = 0.5)")
def cagrad(G: torch.Tensor, c: float = 0.5) -> torch.Tensor:
    """d = g0 + sqrt(φ) g_w / ||g_w||, g0 the mean gradient, φ = c² ||g0||², w on the simplex minimising
    g_w·g0 + sqrt(φ) ||g_w|| (the dual of max_d min_i g_i·d within a ball of radius c||g0|| around g0)."""
    from scipy.optimize import minimize

    if not c >= 0:
        raise ValueError(f"cagrad: c\n  expected: >= 0\n  got: {c!r}")
    gram = _gram(G)
    m = gram.shape[0]
    g0_gram = gram.mean(1)  # G g0, with g0 = mean of the rows
    g0_norm2 = float(gram.mean())
    sqrt_phi = c * math.sqrt(max(g0_norm2, 0.0))

    def objective(z):
        w = np.exp(z - z.max())
        w /= w.sum()
        return float(w @ g0_gram + sqrt_phi * math.sqrt(max(w @ gram @ w, 1e-30)))

    res = minimize(objective, np.zeros(m), method="Nelder-Mead" if m <= 2 else "BFGS",
                   options={"maxiter": 2000, "xatol": 1e-10, "fatol": 1e-14} if m <= 2 else {"maxiter": 2000})
    w = np.exp(res.x - res.x.max())
    w /= w.sum()
    gw_norm = math.sqrt(max(w @ gram @ w, 1e-30))
    weights = np.full(m, 1.0 / m) + (sqrt_phi / gw_norm) * w
    return _combine(weights, G)


# ---------------------------------------------------------------------------------------- Aligned-MTL
@register_method("aligned_mtl", "gradient", "Senushkin et al. 2023, Aligned-MTL: a condition number of one")
def aligned_mtl(G: torch.Tensor) -> torch.Tensor:
    """The mean row of B·G, B = σ_min (G G^T)^{-1/2}: the task gradients' polar factor scaled by the
    smallest singular value, so that no task's gradient dominates the system (all singular values equal)."""
    gram = _gram(G)
    lam, vec = np.linalg.eigh(gram)
    keep = lam > 1e-12 * max(float(lam[-1]), 1e-300)
    if not keep.any():
        return torch.zeros(G.shape[1], dtype=G.dtype, device=G.device)
    lam, vec = lam[keep], vec[:, keep]
    b = math.sqrt(float(lam.min())) * (vec / np.sqrt(lam)) @ vec.T  # σ_min · V Λ^{-1/2} V^T
    return _combine(b.mean(0), G)


# ---------------------------------------------------------------------------------------- Nash-MTL
def nash_weights(gram: np.ndarray, ridge: float = 1e-10, max_iter: int = 200) -> np.ndarray:
    """α > 0 with ``gram @ α = 1 / α`` (element-wise): the Nash bargaining weights of Nash-MTL.

    ``gram`` is M = G G^T.  Mα = 1/α is the stationarity condition of the strictly convex
    f(α) = ½ α^T M α − Σ log α_i on α > 0, minimised by damped Newton with a backtracking line
    search (f is self-concordant, so this converges from any α > 0; Newton on the equations
    themselves does not).  The official implementation reaches the same fixed point by a
    sequence of convex (cvxpy) problems; only the solver differs.

    The solution is exactly scale-free: if M solves with α, D M D solves with D^{-1} α
    (D > 0 diagonal).  So it is solved on the correlation matrix C = D^{-1} M D^{-1},
    D = sqrt(diag M), from α_C = 1, and α = D^{-1} α_C: scaling task i's gradient by c
    divides α_i by c and leaves α_i g_i, and so d = α^T G, unchanged.

    Degenerate cases, by choice:
      * a task with a zero gradient gets α_i = 0: no direction can serve it, it is left out
        (all tasks zero: α = 0, hence d = 0);
      * a solution exists iff some d has ⟨g_i, d⟩ > 0 for every task, i.e. no non-negative
        combination of the gradients vanishes (Gordan).  When one does (a gradient a negative
        multiple of another, say) f is unbounded below.  ``ridge`` · I is added to C (whose
        diagonal is 1) so that f always has a minimiser; there the blocked tasks get large,
        cancelling weights (~ ridge^-1/2) and d makes almost no progress on them.  In a
        well-posed problem the ridge changes α by a relative ~ ridge · α_C².
      Linearly dependent gradients without such a combination (two equal rows) are well-posed.
    """
    m = gram.shape[0]
    alpha = np.zeros(m)
    live = np.diag(gram) > 0
    if not live.any():
        return alpha
    scale = np.sqrt(np.diag(gram)[live])
    C = gram[np.ix_(live, live)] / np.outer(scale, scale) + ridge * np.eye(int(live.sum()))

    def f(a):
        return 0.5 * a @ C @ a - np.log(a).sum()

    a = np.ones(len(scale))
    for _ in range(max_iter):
        grad = C @ a - 1.0 / a
        step = np.linalg.solve(C + np.diag(1.0 / a**2), -grad)
        decrement2 = float(-grad @ step)  # λ², affine-invariant: λ²/2 ≈ f(a) − min f near the optimum
        t = 1.0
        # λ < 0.1: the full step is safe — the Hessian ≥ diag(1/a²) gives |step_i| ≤ λ a_i < a_i —
        # and converges quadratically; skipping the f test there avoids rejecting it on round-off.
        if decrement2 >= 1e-2:
            f0 = f(a)
            while not ((a + t * step > 0).all() and f(a + t * step) <= f0 - 0.25 * t * decrement2) and t > 1e-12:
                t /= 2
        a = a + t * step
        if decrement2 < 1e-20:
            break
    alpha[live] = a / scale
    return alpha


@register_method("nash_mtl", "gradient",
                 "Navon et al. 2022, Nash-MTL: the Nash bargaining solution, d = α^T G with G G^T α = 1/α")
def nash_mtl(G: torch.Tensor) -> torch.Tensor:
    """d = α^T G, α the Nash bargaining weights (``nash_weights``): every task gains ⟨g_i, d⟩ = 1/α_i > 0,
    and ||d||² = α^T M α = m whatever the gradients' scale.  (The official code normalises M by ||M||_F inside
    its solver, warm-starts from the previous step's α and clips ||d|| to max_norm = 1; here d is the exact,
    stateless solution and the optimiser's learning rate sets the step.)"""
    return _combine(nash_weights(_gram(G)), G)
