"""Differentiable k-means (CodebookConfig(train="dkm")): its gradient against finite differences, the hard
assignment it becomes as the temperature goes to 0, its annealing, freeze_ / save / load, and DDP."""

import numpy as np
import pytest
import torch
from torch import nn

import weightshare as ws
from weightshare.multitask import TrainConfig, train
from weightshare.training import training_sharing
from weightshare.training.dkm import DKMParametrization, soft_kmeans


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))


def shared(model, **kw):
    ws.set_progress(False)
    return ws.share_(model, ws.CodebookConfig(**{"bits": 2, "train": "dkm", **kw}))


def test_the_gradient_through_the_soft_k_means_steps_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.sort(torch.randn(3, 4, generator=g, dtype=torch.float64), 1).values
    assert torch.autograd.gradcheck(lambda x: soft_kmeans(x, c, 0.3, 3)[0], (x,))


def test_at_a_temperature_near_zero_the_forward_is_the_hard_assignment_and_freeze_keeps_it():
    model = shared(mlp(), granularity="per_channel", table_dtype="float32", dkm_temperature=1e-9)
    layer = model[0]
    p, latent = layer.parametrizations.weight[0], layer.parametrizations.weight.original
    assert isinstance(p, DKMParametrization)
    with torch.no_grad():
        soft = layer.weight.clone()
        c = p.centroids
        nearest = torch.gather(c, 1, (latent[..., None] - c[:, None, :]).abs().argmin(-1))
        assert torch.allclose(soft, nearest, rtol=0, atol=1e-7)
        x = torch.randn(5, 12)
        out = model(x)
        ws.freeze_(model)
        assert not training_sharing(model)
        assert torch.allclose(model(x), out, rtol=0, atol=1e-6)
        assert torch.unique(model[0].weight[3]).numel() <= 4


def test_the_temperature_anneals_every_step_and_the_centroids_carry_over():
    model = shared(mlp(), dkm_temperature=0.5, dkm_anneal=0.5)
    p = model[0].parametrizations.weight[0]
    start = p.centroids.clone()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=g)
    train(model, x, x[:, :3].argmax(1), TrainConfig(epochs=2, batch_size=16, lr=0.01))  # 8 steps
    assert p.steps == 8 and p.temperature == pytest.approx(0.5 * 0.5 ** 8)
    assert not torch.equal(p.centroids, start)


def test_freeze_save_and_load_reproduce_the_frozen_model(tmp_path):
    model = shared(mlp(), dkm_temperature=0.2, dkm_anneal=0.8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=g)
    train(model, x, x[:, :3].argmax(1), TrainConfig(epochs=3, batch_size=16, lr=0.01))
    with pytest.raises(ValueError, match="still re-clusters while training|freeze_"):
        ws.save(model, tmp_path / "early")
    ws.freeze_(model)
    model.eval()
    with torch.no_grad():
        out = model(x)
    ws.save(model, tmp_path / "m")
    back = ws.load(tmp_path / "m", model=mlp(1), trainable=True).eval()
    with torch.no_grad():
        assert torch.equal(back(x), out)


@pytest.mark.parametrize("kw, message", [
    ({"dkm_temperature": 0}, "dkm_temperature\n  expected: a number > 0"),
    ({"dkm_anneal": 1.5}, "dkm_anneal\n  expected: a factor in (0, 1]"),
    ({"dkm_iters": 0}, "dkm_iters\n  expected: an integer in 1..100"),
])
def test_bad_dkm_settings_are_refused_by_name(kw, message):
    with pytest.raises(ValueError) as e:
        ws.CodebookConfig(train="dkm", **kw)
    assert message in str(e.value)


def _ddp_dkm(rank: int) -> dict:
    model = shared(mlp(), dkm_anneal=0.9)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=g)
    half = slice(rank * 32, (rank + 1) * 32)
    train(ddp, x[half], x[half, :3].argmax(1), TrainConfig(epochs=3, batch_size=16, lr=0.03))
    return {name: (plist.original.detach().numpy().copy(), plist[0].centroids.numpy().copy(), plist[0].temperature)
            for name, _, plist in training_sharing(model)}


def test_under_ddp_every_rank_holds_the_same_weights_centroids_and_temperature():
    from tests.gloo import run_gloo

    results = run_gloo(_ddp_dkm)
    for name, (w, c, t) in results[0].items():
        w1, c1, t1 = results[1][name]
        assert np.array_equal(w, w1) and np.array_equal(c, c1) and t == t1, name
