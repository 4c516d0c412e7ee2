"""Adding a merge method is adding one file: a toy method written as one new file in a temporary
directory, imported, and run through the streaming merge like the built-in ones."""

import importlib
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightshare as ws
from weightshare.merge import MERGE_METHODS, MergeError

TOY_METHOD = '''
"""Element-wise maximum of the models, times a scale: a toy merge method in one file."""

import torch

from weightshare.merge.registry import Param, interval, register_merge


@register_merge("elementwise_max", source="a test's toy method", elementwise=True,
                parameters=(Param("scale", 1.0, rule=interval("(0, 1]")),))
def elementwise_max(tensors, base, *, name, scale=1.0):
    return scale * torch.stack(tensors).amax(dim=0)
'''


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    (tmp_path / "elementwise_max.py").write_text(TOY_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("elementwise_max")
    yield module
    MERGE_METHODS.pop("elementwise_max", None)
    sys.modules.pop("elementwise_max", None)


@pytest.fixture
def checkpoints(tmp_path):
    g = torch.Generator().manual_seed(0)
    states = [{"layer.weight": torch.randn(40, 30, generator=g), "layer.bias": torch.randn(40, generator=g),
               "steps": torch.tensor([3 + i])} for i in range(2)]  # an integer buffer: copied, never merged
    paths = [tmp_path / f"model_{i}.safetensors" for i in range(2)]
    for state, path in zip(states, paths):
        save_file(state, str(path))
    return states, paths


def test_a_method_in_one_new_file_merges_two_checkpoints(toy_method, checkpoints, tmp_path, monkeypatch):
    from weightshare.merge import streaming

    states, paths = checkpoints
    assert MERGE_METHODS["elementwise_max"].params == {"scale": 1.0}
    merged = ws.merge([str(p) for p in paths], method="elementwise_max")
    for name in ("layer.weight", "layer.bias"):
        assert torch.equal(merged[name], torch.maximum(states[0][name], states[1][name])), name
    assert torch.equal(merged["steps"], states[0]["steps"])
    # streamed to a folder, a large tensor in element-wise pieces
    monkeypatch.setattr(streaming, "CHUNK", 64)
    out = ws.merge([str(p) for p in paths], method="elementwise_max", out=tmp_path / "merged")
    written = load_file(str(out / "model.safetensors"))
    assert torch.equal(written["layer.weight"], torch.maximum(states[0]["layer.weight"], states[1]["layer.weight"]))


def test_a_new_methods_declared_range_is_enforced_with_its_message(toy_method, checkpoints, tmp_path):
    _, paths = checkpoints
    with pytest.raises(MergeError, match=r"scale must be in \(0, 1\]; got 2\.0"):
        ws.merge([str(p) for p in paths], method="elementwise_max", scale=2.0)
    with pytest.raises(MergeError, match="elementwise_max has no parameter 'density'"):
        ws.merge([str(p) for p in paths], method="elementwise_max", density=0.5)
    halved = ws.merge([str(p) for p in paths], method="elementwise_max", scale=0.5)
    assert torch.allclose(halved["layer.bias"],
                          0.5 * ws.merge([str(p) for p in paths], "elementwise_max")["layer.bias"])
