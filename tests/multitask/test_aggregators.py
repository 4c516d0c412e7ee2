"""Gradient aggregators, each against its defining property."""

import numpy as np
import pytest
import torch

from weightshare.multitask import METHODS, aggregate
from weightshare.multitask.weighting.nash_mtl import nash_weights
from weightshare.multitask.weighting.solvers import min_norm_projected, min_norm_weights


def random_G(m, n=7, seed=0, conflict=True):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    if conflict:  # make the first two gradients point against each other
        G[1] = -0.7 * G[0] + 0.3 * G[1]
    return G


def test_ew_is_the_gradient_of_the_summed_losses():
    G = random_G(3)
    assert torch.equal(aggregate("ew", G), G.sum(0))


def _grid_min_norm(G, steps):
    """The slow obvious version: the smallest ||λ^T G||² over a grid of the simplex."""
    gram = (G @ G.t()).numpy()
    m = G.shape[0]
    best = np.inf
    if m == 2:
        for a in np.linspace(0, 1, steps + 1):
            lam = np.array([a, 1 - a])
            best = min(best, lam @ gram @ lam)
    else:
        for i in range(steps + 1):
            for j in range(steps + 1 - i):
                lam = np.array([i, j, steps - i - j]) / steps
                best = min(best, lam @ gram @ lam)
    return best


@pytest.mark.parametrize("m,seed", [(2, 0), (2, 1), (3, 0), (3, 2), (3, 5)])
def test_mgda_is_the_min_norm_point_of_the_convex_hull(m, seed):
    G = random_G(m, seed=seed, conflict=seed % 2 == 0)
    d = aggregate("mgda", G)
    got = float(d @ d)
    brute = _grid_min_norm(G, 2000 if m == 2 else 300)
    assert got <= brute + 1e-12  # nothing on the grid is shorter
    assert got >= brute - 0.05 * abs(brute) - 1e-6  # and the grid comes close to it
    lam = min_norm_weights((G @ G.t()).numpy())
    assert (lam >= 0).all() and abs(lam.sum() - 1) < 1e-9


def test_mgda_for_many_tasks_agrees_with_the_exact_solver():
    G = random_G(5, n=9, seed=3)
    gram = (G @ G.t()).numpy()
    exact, fw = min_norm_weights(gram), min_norm_projected(gram)
    assert abs(exact @ gram @ exact - fw @ gram @ fw) < 1e-9 * max(1.0, exact @ gram @ exact)


@pytest.mark.parametrize("seed", range(8))
def test_pcgrad_with_two_tasks_conflicts_with_neither(seed):
    G = random_G(2, seed=seed, conflict=True)
    assert float(G[0] @ G[1]) < 0
    d = aggregate("pcgrad", G)
    assert float(G[0] @ d) >= -1e-10 and float(G[1] @ d) >= -1e-10


@pytest.mark.parametrize("m,seed", [(2, 0), (3, 1), (4, 2), (5, 3), (6, 4)])
def test_upgrad_conflicts_with_no_task(m, seed):
    G = random_G(m, n=10, seed=seed)
    d = aggregate("upgrad", G)
    assert (G @ d >= -1e-9).all()
    # where no gradients conflict, the projections are the gradients themselves: their mean
    H = torch.rand(m, 10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.allclose(aggregate("upgrad", H), H.mean(0), atol=1e-10)


@pytest.mark.parametrize("m,seed", [(2, 0), (3, 1), (4, 2)])
def test_imtl_projects_equally_onto_every_task(m, seed):
    G = random_G(m, n=10, seed=seed)
    d = aggregate("imtl", G)
    proj = (G / G.norm(dim=1, keepdim=True)) @ d
    assert torch.allclose(proj, proj[0].expand_as(proj), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_cagrad_improves_the_worst_task_within_its_ball(seed):
    G = random_G(3, n=10, seed=seed)
    g0 = G.mean(0)
    assert torch.allclose(aggregate("cagrad", G, c=0.0), g0)
    d = aggregate("cagrad", G, c=0.5)
    assert float((d - g0).norm()) == pytest.approx(0.5 * float(g0.norm()), rel=1e-6)
    assert float((G @ d).min()) >= float((G @ g0).min()) - 1e-9


def test_bad_input_is_named():
    G = random_G(2)
    with pytest.raises(ValueError, match="expected one of: .*mgda.*upgrad"):
        aggregate("magic", G)
    bad = G.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"task gradients \[1\] contain NaN"):
        aggregate("mgda", bad)
    with pytest.raises(ValueError, match="tasks, params"):
        aggregate("ew", torch.ones(3))


def test_every_aggregator_returns_one_direction_in_the_input_dtype():
    G = random_G(3).float()
    for name, method in METHODS.items():
        if method.kind == "gradient":
            d = aggregate(name, G)
            assert d.shape == (7,) and d.dtype == torch.float32 and torch.isfinite(d).all(), name


def test_aligned_mtl_rows_have_one_condition_number():
    G = random_G(3, n=10, seed=4)
    gram = (G @ G.t()).numpy()
    lam, vec = np.linalg.eigh(gram)
    b = np.sqrt(lam.min()) * (vec / np.sqrt(lam)) @ vec.T
    aligned = torch.from_numpy(b) @ G
    s = torch.linalg.svdvals(aligned)
    assert torch.allclose(s, s[0].expand_as(s), rtol=1e-8)  # every direction weighs the same
    assert torch.allclose(aggregate("aligned_mtl", G), aligned.mean(0))


def test_aligned_mtl_direction_ignores_one_task_gradient_scale_when_tasks_are_orthogonal():
    q, _ = torch.linalg.qr(torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    G = q.t() * torch.tensor([[1.0], [3.0], [0.5]], dtype=torch.float64)  # orthogonal gradients of unequal size
    d = aggregate("aligned_mtl", G)
    scaled = G.clone()
    scaled[1] *= 100.0  # one loss 100x larger
    d2 = aggregate("aligned_mtl", scaled)
    assert torch.allclose(d / d.norm(), d2 / d2.norm(), atol=1e-10)
    ew = G.sum(0), scaled.sum(0)
    assert float(torch.nn.functional.cosine_similarity(ew[0], ew[1], dim=0)) < 0.99  # the plain sum turns


@pytest.mark.parametrize("seed", range(3))
def test_the_same_methods_as_torchjd(seed):
    # torchjd (in the [test] extra) implements five of these; where both are exact they agree
    aggregation = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("quadprog")
    G = random_G(3, n=8, seed=seed)
    for name, theirs in [("imtl", aggregation.IMTLG()), ("aligned_mtl", aggregation.AlignedMTL())]:
        assert torch.allclose(aggregate(name, G), theirs(G), atol=1e-9), name
    # torchjd's quadprog projection carries a small regulariser: agreement to 1e-3
    assert torch.allclose(aggregate("upgrad", G), aggregation.UPGrad()(G), rtol=1e-3, atol=1e-3)
    two = G[:2]  # with two tasks PCGrad does not depend on the order of the projections
    assert torch.allclose(aggregate("pcgrad", two), aggregation.PCGrad()(two), atol=1e-9)
    # torchjd's MGDA runs a bounded number of Frank-Wolfe steps; ours is exact: never longer
    assert float(aggregate("mgda", G).norm()) <= float(aggregation.MGDA()(G).norm()) + 1e-9


NASH_CASES = [(m, seed) for m in range(2, 7) for seed in range(3)]


@pytest.mark.parametrize("m,seed", NASH_CASES)
def test_nash_mtl_weights_solve_the_bargaining_equations(m, seed):
    G = random_G(m, n=300, seed=seed, conflict=seed % 2 == 0)
    gram = (G @ G.t()).numpy()
    alpha = nash_weights(gram)
    assert (alpha > 0).all()
    assert np.allclose(alpha * (gram @ alpha), 1.0, rtol=0, atol=1e-8)  # Mα = 1/α, relative to 1/α
    assert torch.allclose(aggregate("nash_mtl", G), torch.from_numpy(alpha) @ G, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m,seed", NASH_CASES[::2])
def test_nash_mtl_weights_minimise_the_bargaining_objective(m, seed):
    # the slow obvious version: L-BFGS-B on f(α) = ½ α^T M α − Σ log α_i, α >= 1e-12, from α = 1
    from scipy.optimize import minimize

    G = random_G(m, n=300, seed=seed, conflict=seed % 2 == 0)
    gram = (G @ G.t()).numpy()
    res = minimize(lambda a: (0.5 * a @ gram @ a - np.log(a).sum(), gram @ a - 1 / a), np.ones(m), jac=True,
                   method="L-BFGS-B", bounds=[(1e-12, None)] * m, options={"ftol": 1e-15, "gtol": 1e-12})
    assert np.allclose(nash_weights(gram), res.x, rtol=1e-5, atol=0)


@pytest.mark.parametrize("m,seed", NASH_CASES)
def test_nash_mtl_gains_one_over_alpha_on_every_task(m, seed):
    G = random_G(m, n=300, seed=seed, conflict=True)
    assert float(G[0] @ G[1]) < 0
    alpha = nash_weights((G @ G.t()).numpy())
    d = aggregate("nash_mtl", G)
    assert torch.allclose(G @ d, torch.from_numpy(1 / alpha), rtol=1e-8)  # ⟨g_i, d⟩ = 1/α_i > 0: no conflict
    assert float(d @ d) == pytest.approx(m, rel=1e-8)  # hence ||d||² = Σ α_i ⟨g_i, d⟩ = m


@pytest.mark.parametrize("c", [1e-3, 0.2, 7.0, 1e4])
def test_nash_mtl_direction_ignores_one_task_gradient_scale(c):
    G = random_G(4, n=300, seed=1)
    scaled = G.clone()
    scaled[2] *= c
    assert torch.allclose(aggregate("nash_mtl", scaled), aggregate("nash_mtl", G), rtol=1e-9, atol=1e-12)
    alpha, alpha_c = (nash_weights((H @ H.t()).numpy()) for H in (G, scaled))
    assert alpha_c[2] == pytest.approx(alpha[2] / c, rel=1e-9)  # α_i g_i is what is invariant


def test_nash_mtl_degenerate_gradients():
    G = random_G(3, n=50, seed=2, conflict=False)
    g = G[0]
    # two equal rows: dependent but well-posed; they share the weight a single copy would get
    equal = torch.stack([g, g, G[1]])
    alpha = nash_weights((equal @ equal.t()).numpy())
    assert alpha[0] == pytest.approx(alpha[1], rel=1e-10)
    assert torch.allclose(equal @ aggregate("nash_mtl", equal), torch.from_numpy(1 / alpha), rtol=1e-8)
    # a zero row gets α = 0 and the rest is solved without it
    zero = torch.stack([g, torch.zeros_like(g), G[1]])
    alpha = nash_weights((zero @ zero.t()).numpy())
    assert alpha[1] == 0 and (alpha[[0, 2]] > 0).all()
    assert torch.allclose(aggregate("nash_mtl", zero), aggregate("nash_mtl", G[:2]), atol=1e-10)
    assert torch.equal(aggregate("nash_mtl", torch.zeros(2, 50)), torch.zeros(50))
    # one task: its unit gradient
    assert torch.allclose(aggregate("nash_mtl", g[None]), g / g.norm(), atol=1e-10)
    # opposite gradients: no direction helps both, the solution does not exist; d is finite and
    # makes (almost) no progress on the blocked pair while the third task still gets its 1/α
    opposite = torch.stack([g, -3 * g, G[1]])
    d = aggregate("nash_mtl", opposite)
    assert torch.isfinite(d).all()
    gains = opposite @ d
    assert gains[:2].abs().max() < 1e-8 * float(gains[2])
