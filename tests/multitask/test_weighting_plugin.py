"""Adding a weighting method is adding one file: a toy method in a new file trains through fit by name."""

import importlib.util

import pytest
import torch
from torch import nn

from weightshare.multitask import METHODS, MultiTaskModel, TrainConfig, fit, register_method

TOY_METHOD = '''
import torch

from weightshare.multitask import LossWeighting, register_method


@register_method("first_task_only", "loss", "a test: all the weight on the first task")
class FirstTaskOnly(LossWeighting):
    def weights(self, step):
        return torch.eye(self.num_tasks)[0]
'''


@pytest.fixture
def first_task_only(tmp_path):
    path = tmp_path / "first_task_only.py"
    path.write_text(TOY_METHOD)
    spec = importlib.util.spec_from_file_location("first_task_only", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # importing the file registers it
    yield "first_task_only"
    METHODS.pop("first_task_only", None)


def test_a_method_in_one_new_file_trains_by_name(first_task_only):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    targets = {"a": (x[:, 0] > 0).long(), "b": (x[:, 1] > 0).long()}
    initial = []

    def make():
        model = MultiTaskModel(nn.Sequential(nn.Linear(6, 16), nn.Tanh()),
                               {"a": nn.Linear(16, 2), "b": nn.Linear(16, 2)})
        initial.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    result = fit(make, x, targets, first_task_only, TrainConfig(epochs=20, batch_size=32, lr=1e-2), keep_models=True)
    assert METHODS[first_task_only].kind == "loss"
    trained = result.models[0].state_dict()
    for name in ("heads.b.weight", "heads.b.bias"):  # task b's loss weighed 0: its head never moved
        assert torch.equal(trained[name], initial[0][name]), name
    assert not torch.equal(trained["heads.a.weight"], initial[0]["heads.a.weight"])
    assert result.metrics["a"] > 0.9, result.metrics


def test_a_loss_method_that_is_not_a_loss_weighting_is_named():
    with pytest.raises(TypeError, match="expected: a LossWeighting subclass"):
        register_method("not_a_class", "loss", "a test")(lambda losses: losses.sum())
    with pytest.raises(ValueError, match="kind"):
        register_method("odd", "loss-ish", "a test")
    assert "not_a_class" not in METHODS and "odd" not in METHODS
