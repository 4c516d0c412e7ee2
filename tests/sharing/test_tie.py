import pytest
import torch

import weightshare as ws


def make_stack():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])


def test_tie_stores_once_and_trains_once():
    m = make_stack()
    first = m[0].weight.detach().clone()
    ws.share_(m, ws.TieConfig(params=["*.weight"]))
    assert all(m[i].weight is m[0].weight for i in range(4))
    assert torch.equal(m[0].weight, first)
    assert len(list(m.parameters())) == 1 + 4  # one weight, four biases
    r = ws.report(m)
    assert r.params_virtual == 4 * 72 and r.params_stored == 64 + 4 * 8
    assert r.sharing_ratio == pytest.approx(288 / 96)
    # the gradient of the shared tensor is the sum over its uses
    x = torch.randn(2, 8)
    m(x).sum().backward()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.step()
    assert all(m[i].weight is m[0].weight for i in range(4))


def test_tie_mean_and_state_dict_round_trip():
    m = make_stack()
    mean = (m[0].weight.detach() + m[2].weight.detach()) / 2
    ws.share_(m, ws.TieConfig(params=["0.weight", "2.weight"], init="mean"))
    assert torch.allclose(m[0].weight, mean) and m[2].weight is m[0].weight and m[1].weight is not m[0].weight
    other = ws.share_(make_stack(), ws.TieConfig(params=["0.weight", "2.weight"]))
    other.load_state_dict(m.state_dict())
    assert other[2].weight is other[0].weight and torch.equal(other[0].weight, m[0].weight)


def test_materialize_unties():
    m = make_stack()
    ws.share_(m, ws.TieConfig(params=["*.weight"]))
    ws.materialize_(m)
    assert m[1].weight is not m[0].weight and torch.equal(m[1].weight, m[0].weight)
    assert len(list(m.parameters())) == 8


def test_tie_errors():
    m = make_stack()
    with pytest.raises(ValueError, match="fewer than two"):
        ws.share_(m, ws.TieConfig(params=["0.weight"]))
    m2 = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match="shape and dtype"):
        ws.share_(m2, ws.TieConfig(params=["*.weight"]))
    with pytest.raises(ValueError, match="init"):
        ws.share_(m, ws.TieConfig(params=["*.weight"], init="median"))


def test_unknown_config():
    with pytest.raises(ValueError, match="no sharing map registered"):
        ws.share_(make_stack(), object())


def test_groups_by_block_and_by_cycle():
    m = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    ws.share_(m, ws.TieConfig(params=["*.weight"], groups=2))  # ALBERT-style groups of consecutive layers
    assert m[0].weight is m[1].weight is m[2].weight and m[3].weight is m[4].weight is m[5].weight
    assert m[0].weight is not m[3].weight
    c = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    ws.share_(c, ws.TieConfig(params=["*.weight"], groups=2, strategy="cycle"))  # layer i joins group i mod 2
    assert c[0].weight is c[2].weight is c[4].weight and c[1].weight is c[3].weight is c[5].weight
    assert ws.report(c).params_stored == 2 * 64 + 6 * 8


def test_relaxed_tie_starts_at_the_best_rank_r_fit_and_trains_the_shared_weight_once():
    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(12, 10) for _ in range(4)])
    dense = [layer.weight.detach().clone().double() for layer in m]
    ws.share_(m, ws.TieConfig(params=["*.weight"], init="mean", delta_rank=3))
    mean = torch.stack(dense).mean(0)
    for w, layer in zip(dense, m):
        s = torch.linalg.svdvals(w - mean)
        err = float(((layer.weight.detach().double() - w) ** 2).sum())
        assert err == pytest.approx(float((s[3:] ** 2).sum()), rel=1e-4)  # Eckart-Young on the residual
    shared = m[0].parametrizations.weight[0].shared
    assert all(layer.parametrizations.weight[0].shared is shared for layer in m)
    n_stored = 120 + 4 * (22 * 3) + 4 * 10
    assert ws.report(m).params_stored == n_stored == sum(p.numel() for p in m.parameters())
    # gradient of the shared weight = sum of the layers' weight gradients (W_l = θ + U_l V_l^T)
    x = torch.randn(5, 12)
    sum(layer(x).square().sum() for layer in m).backward()
    expect = sum(2 * (layer(x).detach()).t() @ x for layer in m)
    assert torch.allclose(shared.grad, expect, rtol=1e-4, atol=1e-4)


def test_relaxed_tie_of_first_gives_the_first_layer_a_trainable_zero_delta():
    m = make_stack()
    w0 = m[0].weight.detach().clone()
    ws.share_(m, ws.TieConfig(params=["*.weight"], delta_rank=2))
    assert torch.allclose(m[0].weight, w0)  # its residual is zero
    delta = m[0].parametrizations.weight.original
    m[0](torch.randn(3, 8)).square().sum().backward()
    assert delta.grad[:8].abs().sum() > 0  # U gets a gradient: the delta can grow


def test_relaxed_tie_round_trip_keeps_one_shared_weight(tmp_path):
    m = make_stack()
    ws.share_(m, ws.TieConfig(params=["*.weight"], groups=2, strategy="cycle", delta_rank=2))
    path = ws.save(m, tmp_path / "t")
    loaded = ws.load(path, model=make_stack())
    x = torch.randn(3, 8)
    for a, b in zip(m, loaded):
        assert torch.equal(a(x), b(x))
    s = [layer.parametrizations.weight[0].shared for layer in loaded]
    assert s[0] is s[2] and s[1] is s[3] and s[0] is not s[1]
    assert ws.report(loaded).params_stored == ws.report(m).params_stored


def test_tie_then_codebook_round_trip(tmp_path):
    # composed maps: tied layers share one codebook (one table, one label set), kept through save/load
    m = make_stack()
    ws.share_(m, ws.TieConfig(params=["*.weight"]))
    ws.share_(m, ws.CodebookConfig(bits=2, granularity="per_tensor"))
    tables = m[0].parametrizations.weight.original
    assert all(layer.parametrizations.weight.original is tables for layer in m)
    path = ws.save(m, tmp_path / "tc")
    loaded = ws.load(path, model=make_stack(), trainable=True)
    assert all(layer.parametrizations.weight.original is loaded[0].parametrizations.weight.original for layer in loaded)
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), m(x))
    packed = ws.load(path, model=make_stack())  # packed modules: one set of indices for the four layers
    assert all(layer.indices is packed[0].indices for layer in packed)
    assert torch.allclose(packed(x), m(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(params=["*.weight"], groups=5), "5 groups for 4 matching tensors"),
    (dict(params=["*.weight"], delta_rank=9), "delta_rank 9 for weights of shape \\(8, 8\\)"),
    (dict(params=["*.bias"], delta_rank=1), "2-D weights"),
    (dict(params=["*.weight"], strategy="random"), "strategy"),
    (dict(params=["nothing"]), "fewer than two"),
])
def test_bad_tie_configs_leave_the_model_untouched(kwargs, match):
    m = make_stack()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        ws.share_(m, ws.TieConfig(**kwargs))
    assert len({id(layer.weight) for layer in m}) == 4 and not any(hasattr(layer, "parametrizations") for layer in m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_tie_error_names_both_shapes():
    m2 = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"0.weight \(8, 8\) torch.float32 and 1.weight \(4, 8\)"):
        ws.share_(m2, ws.TieConfig(params=["*.weight"]))
