"""Loss weighting methods against their defining properties."""

import pytest
import torch

from weightshare.multitask import METHODS, aggregate
from weightshare.multitask.weighting.dwa import dwa
from weightshare.multitask.weighting.gradnorm import gradnorm
from weightshare.multitask.weighting.rlw import rlw
from weightshare.multitask.weighting.uw import uw


def test_the_registry_holds_eleven_methods_of_two_kinds():
    kinds = {name: m.kind for name, m in METHODS.items()}
    assert len(kinds) >= 11 and set(kinds.values()) == {"gradient", "loss"}
    assert all(m.source for m in METHODS.values())


def test_ew_with_equal_losses_is_the_plain_sum():
    # two tasks' gradients of equal losses, summed: the gradient of L_1 + L_2
    w = torch.randn(5, requires_grad=True)
    x = torch.randn(5)
    losses = [(w * x).sum() ** 2, (w * x).sum() ** 2]
    G = torch.stack([torch.autograd.grad(loss, w, retain_graph=True)[0] for loss in losses])
    (total,) = torch.autograd.grad(sum(losses), w)
    assert torch.allclose(aggregate("ew", G), total)


def test_uw_learns_each_task_weight_as_its_inverse_loss():
    losses = torch.tensor([0.5, 2.0, 8.0])
    s = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([s], lr=0.2)
    for _ in range(500):
        opt.zero_grad()
        uw(losses, s).backward()
        opt.step()
    assert torch.allclose(s.detach(), losses.log(), atol=1e-3)  # exp(-s_t) = 1 / L_t at the optimum


def test_dwa_weighs_a_slowly_falling_loss_more():
    assert torch.equal(dwa([torch.tensor([1.0, 1.0])]), torch.ones(2))
    same = dwa([torch.tensor([2.0, 4.0]), torch.tensor([1.0, 2.0])])
    assert torch.allclose(same, torch.ones(2))  # equal ratios: equal weights
    w = dwa([torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.8])])
    assert w[1] > w[0] and float(w.sum()) == pytest.approx(2.0)


def test_rlw_weights_are_random_positive_and_sum_to_the_task_count():
    g = torch.Generator().manual_seed(0)
    a, b = rlw(4, g), rlw(4, g)
    assert not torch.equal(a, b) and (a > 0).all() and float(a.sum()) == pytest.approx(4.0)
    assert torch.equal(rlw(4, torch.Generator().manual_seed(0)), a)  # deterministic with a seed


def test_gradnorm_moves_weight_from_the_task_with_the_larger_gradient():
    w = torch.ones(2)
    new = gradnorm(w, grad_norms=torch.tensor([10.0, 1.0]), loss_ratios=torch.tensor([1.0, 1.0]))
    assert new[0] < 1 < new[1] and float(new.sum()) == pytest.approx(2.0)
    balanced = gradnorm(w, grad_norms=torch.tensor([3.0, 3.0]), loss_ratios=torch.tensor([1.0, 1.0]))
    assert torch.allclose(balanced, w)  # already balanced: no change
    # a task that trains more slowly (higher loss ratio) is given a larger gradient-norm target
    slow = gradnorm(w, grad_norms=torch.tensor([2.0, 2.0]), loss_ratios=torch.tensor([0.5, 1.0]))
    assert slow[1] > slow[0]
