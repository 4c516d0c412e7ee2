"""materialize_ turns every map, alone and composed, into a plain model with the same outputs."""

import pytest
import torch

import weightshare as ws

CONFIGS = {
    "codebook": [ws.CodebookConfig(bits=3)],
    "tie": [ws.TieConfig(params=["*.weight"])],
    "relaxed tie": [ws.TieConfig(params=["*.weight"], groups=2, delta_rank=3)],
    "hash": [ws.HashConfig(compression=1 / 4)],
    "basis": [ws.BasisConfig(layers="*.weight", num_bases=6)],
    "mix": [ws.BasisConfig(layers="*.weight", num_bases=2, form="mix")],
    "tie + codebook": [ws.TieConfig(params=["*.weight"]), ws.CodebookConfig(bits=2, granularity="per_tensor")],
    "hash + codebook": [ws.HashConfig(compression=1 / 4), ws.CodebookConfig(bits=2, granularity="per_tensor")],
}


@pytest.mark.parametrize("name", CONFIGS)
def test_materialize_gives_plain_tensors_with_identical_outputs(name):
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(12, 12) for _ in range(4)])
    for config in CONFIGS[name]:
        ws.share_(net, config)
    x = torch.randn(5, 12)
    with torch.no_grad():
        before = net(x)
    ws.materialize_(net)
    assert not any(hasattr(m, "parametrizations") for m in net.modules())
    assert len({id(m.weight) for m in net}) == 4 and all(type(m.weight) is torch.nn.Parameter for m in net)
    with torch.no_grad():
        assert torch.equal(net(x), before)
    assert ws.report(net).params_stored == 4 * (144 + 12)
