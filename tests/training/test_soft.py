"""Soft weight-sharing (CodebookConfig(train="soft")): its prior against a brute-force mixture density, the
prior in the one training loop, its pull on the weights, and freeze_ to the most probable components."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import weightshare as ws
from weightshare.multitask import TrainConfig, train
from weightshare.training import penalty, training_sharing
from weightshare.training.soft import SoftSharingParametrization


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))


def shared(model, **kw):
    ws.set_progress(False)
    return ws.share_(model, ws.CodebookConfig(**{"bits": 2, "train": "soft", "granularity": "per_channel", **kw}))


def test_the_penalty_is_the_weights_mean_negative_log_mixture_density():
    model = shared(mlp(), soft_weight=0.5)
    total = 0.0
    count = 0
    for _, _, plist in training_sharing(model):
        p, w = plist[0], plist.original.detach().double().numpy()
        mu, var = p.means.detach().double().numpy(), np.maximum(p.log_var.detach().exp().double().numpy(),
                                                                 p.floor.double().numpy())
        pi = torch.softmax(p.logits.detach().double(), -1).numpy()
        for r in range(w.shape[0]):  # brute force, weight by weight
            for v in w[r]:
                dens = sum(pi[r, j] * math.exp(-(v - mu[r, j]) ** 2 / (2 * var[r, j]))
                           / math.sqrt(2 * math.pi * var[r, j]) for j in range(4))
                total += -math.log(dens) / w.size
        count += 1
    assert float(penalty(model).detach()) == pytest.approx(0.5 * total, rel=1e-5)
    assert count == 2


def test_the_mixture_starts_from_exact_k_means_and_the_forward_is_the_weight_itself():
    model = shared(mlp(), table_dtype="float32")
    p, w = model[0].parametrizations.weight[0], model[0].parametrizations.weight.original
    assert isinstance(p, SoftSharingParametrization) and torch.equal(model[0].weight, w)
    from weightshare.kmeans import kmeans1d_rows

    c, _ = kmeans1d_rows(w.detach().numpy(), 4)
    assert np.allclose(p.means.detach().numpy(), c, atol=1e-6)


def test_training_with_the_prior_pulls_the_weights_onto_the_components_and_freeze_snaps_them():
    model = shared(mlp(), soft_weight=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=g)
    y = x[:, :3].argmax(1)
    start = float(penalty(model).detach())
    train(model, x, y, TrainConfig(epochs=30, batch_size=16, lr=0.01))  # the one loop adds the prior to the loss
    assert float(penalty(model).detach()) < start - 0.5  # the weights now sit close to their components
    p, w = model[0].parametrizations.weight[0], model[0].parametrizations.weight.original.detach()
    tables, labels = p.frozen(w)
    ws.freeze_(model)
    assert torch.equal(model[0].weight, torch.gather(tables, 1, labels.long()))
    assert (torch.diff(tables, dim=1) >= 0).all()
    with torch.no_grad():
        snapped = (model[0].weight - w).abs().max()
    assert snapped < 0.05 * float(w.abs().max())  # the prior had pulled them close: freezing moves them little


def test_a_bad_prior_weight_is_refused_by_name():
    with pytest.raises(ValueError, match="CodebookConfig.soft_weight\n  expected: a number > 0"):
        ws.CodebookConfig(train="soft", soft_weight=0)


@pytest.mark.parametrize("method", ["ew", "pcgrad"])
def test_multi_task_fit_adds_the_prior_too(method, monkeypatch):
    """fit (loss weighting and gradient aggregation alike) backpropagates the prior after the tasks' gradients:
    with the prior's weight raised, the trunk's weights end far closer to their components."""
    from weightshare.multitask import MultiTaskModel, fit
    from weightshare.training import penalty as prior

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 12, generator=g)
    targets = {"a": x[:, :3].argmax(1), "b": (x[:, 3] > 0).long()}
    ends = {}
    for weight in (1e-6, 1.0):
        def build(weight=weight):
            torch.manual_seed(0)
            trunk = shared(nn.Sequential(nn.Linear(12, 16), nn.ReLU()), soft_weight=weight)
            return MultiTaskModel(trunk, {"a": nn.Linear(16, 3), "b": nn.Linear(16, 2)})

        r = fit(build, x, targets, method, TrainConfig(epochs=20, batch_size=16, lr=0.01), keep_models=True)
        trunk = r.models[0].trunk
        ends[weight] = float(prior(trunk).detach()) / trunk[0].parametrizations.weight[0].config.soft_weight
    assert ends[1.0] < ends[1e-6] - 0.5  # mean negative log prior, per weight
