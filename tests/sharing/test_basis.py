"""Basis sharing: SVD init against Eckart-Young, gradients against autograd, packing keeps one basis."""

import pytest
import torch

import weightshare as ws
from weightshare.sharing.basis import basis_model_, basis_params


def stack(n=4, out=12, inp=10, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(inp, out) for _ in range(n)])


def _weights(m):
    return [layer.weight.detach().clone().double() for layer in m]


@pytest.mark.parametrize("form,full", [("lowrank", 12), ("mix", 4)])
def test_full_rank_reproduces_the_weights(form, full):
    m = stack()
    before = _weights(m)
    ws.share_(m, ws.BasisConfig(layers="*.weight", num_bases=full, form=form))
    for w, layer in zip(before, m):
        assert torch.allclose(layer.weight.detach().double(), w, atol=1e-5)


def test_lowrank_svd_init_is_the_optimal_shared_basis():
    m = stack()
    before = _weights(m)
    r = 5
    ws.share_(m, ws.BasisConfig(layers="*.weight", num_bases=r))
    sigma = torch.linalg.svdvals(torch.cat(before, dim=1))
    err = sum(float(((layer.weight.detach().double() - w) ** 2).sum()) for w, layer in zip(before, m))
    assert err == pytest.approx(float((sigma[r:] ** 2).sum()), rel=1e-5)  # Eckart-Young: nothing does better
    basis = m[0].parametrizations.weight[0].basis
    assert all(layer.parametrizations.weight[0].basis is basis for layer in m) and basis.shape == (12, r)


def test_whitened_init_minimises_the_output_error_on_the_calibration_statistics():
    m = stack()
    before = _weights(m)
    torch.manual_seed(1)
    grams = {}
    for i in range(4):
        x = torch.randn(200, 10).double() * torch.linspace(0.1, 3, 10).double()  # features of unequal scale
        grams[f"{i}.weight"] = x.t() @ x / 200
    r = 5
    basis_model_(m, ws.BasisConfig(layers="*.weight", num_bases=r), grams=grams)
    chol = [torch.linalg.cholesky(grams[f"{i}.weight"]) for i in range(4)]
    sigma = torch.linalg.svdvals(torch.cat([w @ s for w, s in zip(before, chol)], dim=1))
    err = sum(float((((layer.weight.detach().double() - w) @ s) ** 2).sum()) for w, layer, s in zip(before, m, chol))
    assert err == pytest.approx(float((sigma[r:] ** 2).sum()), rel=1e-3)
    plain = stack()
    ws.share_(plain, ws.BasisConfig(layers="*.weight", num_bases=r))
    err_plain = sum(float((((layer.weight.detach().double() - w) @ s) ** 2).sum())
                    for w, layer, s in zip(before, plain, chol))
    assert err < err_plain  # whitening is what makes the output error smaller


def test_mix_svd_init_is_the_pca_of_the_layers():
    m = stack()
    before = _weights(m)
    ws.share_(m, ws.BasisConfig(layers="*.weight", num_bases=2, form="mix"))
    sigma = torch.linalg.svdvals(torch.stack([w.reshape(-1) for w in before]))
    err = sum(float(((layer.weight.detach().double() - w) ** 2).sum()) for w, layer in zip(before, m))
    assert err == pytest.approx(float((sigma[2:] ** 2).sum()), rel=1e-5)
    assert m[0].parametrizations.weight[0].bank.shape == (2, 12, 10)


@pytest.mark.parametrize("form", ["lowrank", "mix"])
def test_gradients_of_the_shared_basis_add_up_over_layers(form):
    m = stack()
    ws.share_(m, ws.BasisConfig(layers="*.weight", num_bases=3, form=form, init="random"))
    x = torch.randn(5, 10)
    sum(layer(x).square().sum() for layer in m).backward()
    p0 = m[0].parametrizations.weight[0]
    shared = p0.basis if form == "lowrank" else p0.bank
    # reference: the same products from detached copies, differentiated by autograd
    ref = shared.detach().clone().requires_grad_()
    total = 0
    for layer in m:
        coef = layer.parametrizations.weight.original.detach()
        w = ref @ coef if form == "lowrank" else torch.tensordot(coef, ref, dims=1)
        total = total + torch.nn.functional.linear(x, w, layer.bias.detach()).square().sum()
    total.backward()
    assert torch.allclose(shared.grad, ref.grad, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in m.parameters()) == ws.report(m).params_stored  # the basis once


def test_random_init_keeps_the_weight_scale():
    m = stack(n=6, out=64, inp=64)
    std = float(torch.stack([layer.weight.detach().std() for layer in m]).mean())
    ws.share_(m, ws.BasisConfig(layers="*.weight", num_bases=16, init="random"))
    got = float(torch.stack([layer.weight.detach().std() for layer in m]).mean())
    assert 0.7 < got / std < 1.4


@pytest.mark.parametrize("form", ["lowrank", "mix"])
def test_save_load_keeps_one_basis(tmp_path, form):
    m = stack()
    ws.share_(m, ws.BasisConfig(layers=["0.weight", "2.weight", "3.weight"], num_bases=2, form=form))
    r = ws.report(m)
    assert r.params_stored == basis_params(form, 3, 12, 10, 2) + 10 * 12 + 4 * 12  # layer 1 stays dense
    path = ws.save(m, tmp_path / "b")
    loaded = ws.load(path, model=stack(seed=5))
    x = torch.randn(3, 10)
    for a, b in zip(m, loaded):
        assert torch.equal(a(x), b(x))
    ps = [loaded[i].parametrizations.weight[0] for i in (0, 2, 3)]
    shared = [p.basis if form == "lowrank" else p.bank for p in ps]
    assert shared[0] is shared[1] is shared[2]
    assert ws.report(loaded).params_stored == r.params_stored
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == r.params_stored


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers="nothing.*"), "no parameter matches"),
    (dict(layers=["0.weight", "1.bias"]), r"one shape\n  got: 0.weight \(12, 10\) and 1.bias \(12,\)"),
    (dict(layers="*.weight", num_bases=5, form="mix"), "at most 4"),
    (dict(layers="*.weight", num_bases=13), "at most 12"),
    (dict(layers="*.bias"), "2-D"),
])
def test_bad_groups_are_refused_before_any_change(kwargs, match):
    m = stack()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        ws.share_(m, ws.BasisConfig(**kwargs))
    assert not any(hasattr(layer, "parametrizations") for layer in m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_a_wide_input_shares_its_input_side(tmp_path):
    m = stack(out=8, inp=20)  # out < in: auto shares the input side, W_l = C_l B
    before = _weights(m)
    r = 6
    ws.share_(m, ws.BasisConfig(layers="*.weight", num_bases=r))
    p = m[0].parametrizations.weight[0]
    assert type(p).__name__ == "_LowRankRight" and p.basis.shape == (r, 20)
    sigma = torch.linalg.svdvals(torch.cat(before, dim=0))  # the layers stacked vertically share a row space
    err = sum(float(((layer.weight.detach().double() - w) ** 2).sum()) for w, layer in zip(before, m))
    assert err == pytest.approx(float((sigma[r:] ** 2).sum()), rel=1e-5)
    assert ws.report(m).params_stored == basis_params("lowrank", 4, 8, 20, r, side="right") + 4 * 8
    loaded = ws.load(ws.save(m, tmp_path / "r"), model=stack(out=8, inp=20, seed=3))
    x = torch.randn(2, 20)
    assert all(torch.equal(a(x), b(x)) for a, b in zip(m, loaded))
    assert loaded[3].parametrizations.weight[0].basis is loaded[0].parametrizations.weight[0].basis
