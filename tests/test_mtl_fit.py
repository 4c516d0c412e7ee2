"""Multi-task training: every method trains on digits; Δp; folds; bad input."""

import pytest
import torch
from torch import nn

from weightshare.multitask import METHODS, MultiTaskModel, TrainConfig, delta_p, fit


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    return x, {"digit": y, "parity": y % 2, "large": (y >= 5).long()}


def factory():
    trunk = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    return MultiTaskModel(trunk, {"digit": nn.Linear(64, 10), "parity": nn.Linear(64, 2), "large": nn.Linear(64, 2)})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_three_tasks_on_digits(digits, method):
    x, targets = digits
    result = fit(factory, x, targets, method=method, config=TrainConfig(epochs=8, batch_size=128, lr=3e-3))
    acc = result.metrics
    assert acc["digit"] > 0.8 and acc["parity"] > 0.8 and acc["large"] > 0.8, acc
    assert result.seconds_per_epoch > 0


def test_cross_validation_uses_stratified_folds(digits):
    x, targets = digits
    result = fit(factory, x, targets, method="ew", config=TrainConfig(epochs=3, lr=3e-3), cv=3)
    assert len(result.folds) == 3 and set(result.metrics) == {"digit", "parity", "large"}


def test_training_is_deterministic_with_a_seed(digits):
    x, targets = digits
    runs = [fit(factory, x, targets, method="pcgrad", config=TrainConfig(epochs=2, lr=3e-3, seed=4)).metrics
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_delta_p_is_the_mean_relative_improvement():
    assert delta_p({"a": 0.9, "b": 0.5}, {"a": 0.9, "b": 0.5}) == 0.0
    assert delta_p({"a": 0.99, "b": 0.5}, {"a": 0.9, "b": 0.5}) == pytest.approx(5.0)  # (+10 % + 0) / 2
    assert delta_p({"err": 0.1}, {"err": 0.2}, higher_is_better={"err": False}) == pytest.approx(50.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="magic"), "expected one of: .*aligned_mtl.*uw"),
    (dict(targets={"digit": torch.zeros(3, dtype=torch.long)}), "3 labels for 1797 inputs"),
])
def test_bad_input_is_named(digits, kwargs, match):
    x, targets = digits
    args = dict(method="ew", targets=targets)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fit(factory, x, args.pop("targets"), config=TrainConfig(epochs=1), **args)


def test_heads_that_do_not_fit_the_labels_or_the_tasks_are_named(digits):
    x, targets = digits
    wrong = lambda: MultiTaskModel(nn.Linear(64, 8), {"digit": nn.Linear(8, 3), "parity": nn.Linear(8, 2),  # noqa: E731
                                                      "large": nn.Linear(8, 2)})
    with pytest.raises(ValueError, match="head 'digit' does not match its labels"):
        fit(wrong, x, targets, config=TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="heads .* are not the tasks"):
        fit(factory, x, {"digit": targets["digit"]}, config=TrainConfig(epochs=1))
