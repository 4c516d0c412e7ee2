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
