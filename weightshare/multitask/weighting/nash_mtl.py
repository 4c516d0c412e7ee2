"""Nash-MTL (Navon et al. 2022): the Nash bargaining solution between the tasks, d = α^T G with G G^T α = 1/α."""

from __future__ import annotations

import numpy as np
import torch

from weightshare.multitask.weighting.base import register_method
from weightshare.multitask.weighting.solvers import combine, gram_matrix


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
    return combine(nash_weights(gram_matrix(G)), G)
