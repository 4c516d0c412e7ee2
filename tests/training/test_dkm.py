"""Differentiable k-means (CodebookConfig(train="dkm")): its gradient against finite differences, the hard
assignment it becomes as the temperature goes to 0, its annealing, freeze_ / save / load, and DDP."""

import os
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import weightshare as ws
from weightshare import kmeans
from weightshare.multitask import TrainConfig, train
from weightshare.training import dkm, training_sharing
from weightshare.training.dkm import DKMParametrization, SoftKMeans, soft_kmeans


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
    scale = x.detach().var(1, unbiased=False, keepdim=True) * 0.3  # a constant of the step (not differentiated)
    assert torch.autograd.gradcheck(lambda x: SoftKMeans.apply(x, c, scale, 3)[0], (x,))


def _reference(x, c, scale, iters):
    """The slow obvious soft k-means, by autograd: every step's attention kept."""
    for _ in range(iters):
        a = torch.softmax(-((x[..., None] - c[:, None, :]) ** 2) / scale[..., None], -1)
        c = (a * x[..., None]).sum(1) / a.sum(1)
    return (a * c[:, None, :]).sum(-1), c


@pytest.mark.parametrize("chunk", [1 << 21, 5])  # one slice, and slices of a few weights
def test_the_hand_written_backward_equals_autograd_through_every_step(monkeypatch, chunk):
    monkeypatch.setattr(dkm, "CHUNK", chunk)
    g = torch.Generator().manual_seed(1)
    for iters in (1, 2, 4):
        x = torch.randn(4, 13, generator=g, dtype=torch.float64, requires_grad=True)
        c = torch.sort(torch.randn(4, 3, generator=g, dtype=torch.float64), 1).values
        scale = x.detach().var(1, unbiased=False, keepdim=True) * 0.4
        out, last = SoftKMeans.apply(x, c, scale, iters)
        ref, ref_last = _reference(x, c, scale, iters)
        w = torch.randn(4, 13, generator=g, dtype=torch.float64)
        assert torch.allclose(out, ref, rtol=0, atol=1e-12) and torch.allclose(last, ref_last, rtol=0, atol=1e-12)
        got, = torch.autograd.grad((out * w).sum(), x)
        want, = torch.autograd.grad((ref * w).sum(), x)
        assert torch.allclose(got, want, rtol=0, atol=1e-11)


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 9), n=st.integers(8, 70), bits=st.integers(1, 4), iters=st.integers(1, 3),
       temperature=st.floats(0.02, 2.0), seed=st.integers(0, 2**16))
def test_every_native_path_equals_the_torch_code(groups, n, bits, iters, temperature, seed):
    """The C core's passes (scalar, and AVX2 eight weights at a time with a scalar tail) against the float64 torch
    code, forward and backward, over group counts, lengths that are and are not multiples of 8, and 2 to 16
    centroids (at least 4 weights a centroid: no centroid starved to a float32 underflow)."""
    k = 1 << bits
    if n < 4 * k:
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, n, generator=g) * torch.rand(groups, 1, generator=g).add(0.1)
    c = torch.sort(torch.quantile(x, torch.linspace(0.05, 0.95, k), dim=1).t().contiguous(), 1).values
    w = torch.randn(groups, n, generator=g)
    want_x = x.double().requires_grad_(True)
    with mock.patch.dict(os.environ, {dkm.PATH_ENV: "torch"}):
        want, want_c = soft_kmeans(want_x, c.double(), temperature, iters)
    want_g, = torch.autograd.grad((want * w.double()).sum(), want_x)
    for path in kmeans.simd_paths():
        with mock.patch.dict(os.environ, {kmeans.PATH_ENV: path, dkm.PATH_ENV: ""}):
            xx = x.clone().requires_grad_(True)
            out, last = soft_kmeans(xx, c, temperature, iters)
            grad, = torch.autograd.grad((out * w).sum(), xx)
        span = float(x.abs().max())
        assert torch.allclose(out.double(), want, rtol=0, atol=2e-5 * span), path
        assert torch.allclose(last.double(), want_c, rtol=0, atol=2e-5 * span), path
        assert torch.allclose(grad.double(), want_g, rtol=1e-3, atol=1e-3 * float(want_g.abs().max())), path


def test_a_centroid_no_weight_attends_to_keeps_its_place_on_every_path():
    x = torch.tensor([[0.0, 0.1, 0.2, 0.3, 1.0, 1.1, 1.2, 1.3]])
    c = torch.tensor([[0.1, 1.2, 50.0, 60.0]])  # the last two: attention e^-(huge), 0 in float32
    for env in [{dkm.PATH_ENV: "torch"}] + [{kmeans.PATH_ENV: p, dkm.PATH_ENV: ""} for p in kmeans.simd_paths()]:
        with mock.patch.dict(os.environ, env):
            xx = x.clone().requires_grad_(True)
            out, last = soft_kmeans(xx, c, 0.05, 2)
            out.sum().backward()
        assert last[0, 2:].tolist() == [50.0, 60.0], env
        assert torch.isfinite(xx.grad).all(), env


def test_an_embedding_trains_only_the_rows_its_batch_looks_up_with_nn_embeddings_gradient():
    torch.manual_seed(0)
    emb = nn.Embedding(30, 16, padding_idx=0)
    shared(emb, granularity="per_channel", dkm_temperature=0.3)
    p = emb.parametrizations.weight[0]
    assert p.trains_rows
    before = p.centroids.clone()
    idx = torch.tensor([[3, 0, 7], [7, 12, 0]])
    with torch.no_grad():  # every row, as the whole table gives it (no grad: the centroids stay)
        whole = p.forward(emb.parametrizations.weight.original)
    out = emb(idx)
    assert torch.allclose(out, whole[idx], rtol=0, atol=1e-6)
    (out * torch.arange(16.0)).sum().backward()
    grad = emb.parametrizations.weight.original.grad
    looked_up = {3, 7, 12}
    assert all(bool(grad[r].abs().sum() > 0) == (r in looked_up) for r in range(30))  # padding row 0 gets none
    moved = (p.centroids != before).any(1)
    assert set(torch.nonzero(moved).flatten().tolist()) <= looked_up | {0}


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
    refusal = r"still assigns softly \(DKM\) while training \(train='dkm'\)\n  call ws\.freeze_"
    with pytest.raises(ValueError, match=refusal):
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
