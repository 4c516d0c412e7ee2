"""Gradient aggregators, each against its defining property."""

import numpy as np
import pytest
import torch

from weightshare.multitask import aggregators as ag
from weightshare.multitask.aggregators import aggregate


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
    lam = ag.min_norm_weights((G @ G.t()).numpy())
    assert (lam >= 0).all() and abs(lam.sum() - 1) < 1e-9


def test_mgda_for_many_tasks_agrees_with_the_exact_solver():
    G = random_G(5, n=9, seed=3)
    gram = (G @ G.t()).numpy()
    exact, fw = ag.min_norm_weights(gram), ag._min_norm_projected(gram)
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
    for name, method in ag.METHODS.items():
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
    # torchjd (in the [bench] extra) implements five of these; where both are exact they agree
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
