"""The SharingMap contract: a map defined here, in the test, stacks with the codebook map through the
same code paths as hash + codebook (share_, ws.save, ws.load, ws.report, report_file, materialize_),
with nothing in pack.py, load.py, report.py or codebook.py naming it."""

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import weightshare as ws
from weightshare.report import report_file
from weightshare.space import (
    Parametrization,
    SharingMap,
    config_from_dict,
    dtype_name,
    get_map,
    map_of,
    map_state,
    packable_maps,
    register_map,
    unmeta_,
    unregister_map,
)


@dataclass
class ScaleConfig:
    """W = alpha · θ: θ, of the weight's shape, is the state another map may take over."""

    alpha: float = 2.0
    version: int = 1


class _Scale(Parametrization):
    def __init__(self, alpha: float, theta: torch.Tensor | None = None):
        super().__init__(theta)
        self.alpha = alpha

    def forward(self, theta):
        return self.alpha * theta

    def initial(self, weight):
        return weight.detach() / self.alpha


class ScaleMap(SharingMap):
    name = "scale"
    config = ScaleConfig
    parametrizations = (_Scale,)
    state_name = "theta"

    def apply(self, model, config, filter_fn):
        for fqn, module in model.named_modules():
            if type(module) is nn.Linear and (filter_fn is None or filter_fn(module, fqn)):
                parametrize.register_parametrization(module, "weight", _Scale(config.alpha), unsafe=True)

    def pack(self, name, plist, put):
        theta = plist.original.detach()
        put(self.state_key(name), theta)
        return {"shape": list(theta.shape), "dtype": dtype_name(theta.dtype), "alpha": plist[0].alpha}

    def check(self, name, entry, shape, dtype):
        if set(entry) != {"map", "shape", "dtype", "alpha"} or not isinstance(entry["alpha"], float):
            raise ValueError(f"scale entry\n  expected: a float alpha\n  got: {sorted(entry)}")
        return {self.state_key(name): ({dtype}, shape)}

    def install(self, module, attr, name, entry, fetch):
        unmeta_(module, attr)
        param = _Scale(entry["alpha"], fetch(self.state_key(name)))
        parametrize.register_parametrization(module, attr, param, unsafe=True)

    def decode(self, name, entry, fetch):
        return entry["alpha"] * fetch(self.state_key(name))

    def describe(self, plist, seen):
        theta = plist.original
        nbytes = theta.numel() * theta.element_size()
        return {"detail": f"alpha={plist[0].alpha}", "shape": tuple(theta.shape), "params_stored": theta.numel(),
                "bytes_dense": nbytes, "bytes_packed": nbytes}


@pytest.fixture
def scale_map():
    """The toy map, registered for one test only: no other test sees it."""
    register_map(ScaleMap())
    yield
    if get_map("scale") is not None:  # a test may have unregistered it itself
        unregister_map("scale")


def _make():
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 6))


def _stacked(bits=3):
    torch.manual_seed(0)
    net = ws.share_(_make(), ScaleConfig(alpha=2.0))
    return ws.share_(net, ws.CodebookConfig(bits=bits, granularity="per_tensor"))


def test_a_map_declared_in_a_test_stacks_with_the_codebook(scale_map):
    net = _stacked()
    plist = net[0].parametrizations.weight
    state = map_state("0.weight", plist)
    assert state.key == "0.weight.__theta" and state.stacked is plist.parametrizations.original
    assert plist.original.unique().numel() <= 8  # θ went through an 8-entry table
    assert torch.equal(net[0].weight, 2.0 * plist.original)
    tables = "parametrizations.weight.parametrizations.original.original"
    assert [n for n, _ in net.named_parameters()] == ["0.bias", f"0.{tables}", "2.bias", f"2.{tables}"]
    x = torch.randn(5, 32)
    net(x).sum().backward()  # gradients reach the tables through both maps
    assert plist.parametrizations.original.original.grad.abs().sum() > 0


def test_a_stacked_toy_map_saves_loads_and_reports(scale_map, tmp_path):
    net = _stacked()
    x = torch.randn(5, 32)
    path = ws.save(net, tmp_path / "scaled")
    from weightshare.pack import dense_state_dict, read_spec

    spec, stored = read_spec(path)
    assert spec["tensors"]["0.weight"] == {"map": "scale", "shape": [48, 32], "dtype": "float32", "alpha": 2.0}
    assert spec["tensors"]["0.weight.__theta"]["map"] == "codebook" and "0.weight.__theta" not in stored
    assert torch.equal(dense_state_dict(spec, stored)["0.weight"], net[0].weight)

    for trainable in (True, False):  # a stacked map keeps its parametrized form either way
        loaded = ws.load(path, model=_make(), trainable=trainable)
        assert torch.equal(loaded(x), net(x))
        inner = loaded[0].parametrizations.weight.parametrizations.original
        assert get_map("codebook").parametrizations[0] is type(inner[0])
        assert inner[0].labels.shape == net[0].parametrizations.weight.original.shape

    r = ws.report(net)
    tables = 8  # one per_tensor table of 2**3 centroids per layer
    assert r.params_stored == 2 * tables + 48 + 6
    layer = next(layer for layer in r.layers if layer.name == "0.weight")
    assert layer.map == "scale" and layer.detail == "alpha=2.0 + codebook 3-bit per_tensor"
    assert layer.params_stored == tables and layer.bytes_packed == math.ceil(48 * 32 * 3 / 8) + tables * 2
    from_file = report_file(path)
    assert from_file.params_stored == r.params_stored
    assert [(x.name, x.params_stored, x.bytes_packed) for x in from_file.layers if x.map == "scale"] == [
        ("0.weight", tables, math.ceil(48 * 32 * 3 / 8) + tables * 2),
        ("2.weight", tables, math.ceil(6 * 48 * 3 / 8) + tables * 2)]

    ws.materialize_(net)
    assert not parametrize.is_parametrized(net[0]) and torch.equal(net(x), loaded(x))


def test_unregister_map_forgets_the_map_its_config_and_parametrization(scale_map):
    net = ws.share_(_make(), ScaleConfig())
    assert map_of(net[0].parametrizations.weight).name == "scale" and "scale" in packable_maps()
    unregister_map("scale")
    assert get_map("scale") is None and "scale" not in packable_maps()
    assert map_of(net[0].parametrizations.weight) is None
    with pytest.raises(ValueError, match="no sharing map registered"):
        ws.share_(_make(), ScaleConfig())
    with pytest.raises(ValueError, match="unknown sharing config"):
        config_from_dict({"type": "ScaleConfig", "alpha": 2.0, "version": 1})
    with pytest.raises(ValueError, match="no sharing map named 'scale'"):
        unregister_map("scale")


def test_a_state_name_must_name_a_tensor():
    class Bad(ScaleMap):
        name = "bad"
        state_name = "the.theta"

    with pytest.raises(ValueError, match="state_name"):
        register_map(Bad())
    assert get_map("bad") is None


def test_a_map_that_stores_its_state_elsewhere_than_its_state_key_is_refused_at_save(tmp_path):
    class Misplaced(ScaleMap):
        def pack(self, name, plist, put):
            theta = plist.original.detach()
            put(f"{name}.__elsewhere", theta)
            return {"shape": list(theta.shape), "dtype": dtype_name(theta.dtype), "alpha": plist[0].alpha}

    register_map(Misplaced())
    try:
        net = ws.share_(ws.share_(_make(), ScaleConfig()), ws.CodebookConfig(bits=2, granularity="per_tensor"))
        with pytest.raises(ValueError, match="did not store 0.weight's state under '0.weight.__theta'"):
            ws.save(net, tmp_path / "misplaced")
    finally:
        unregister_map("scale")
    assert not (tmp_path / "misplaced").exists()
