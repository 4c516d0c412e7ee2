"""Codebooks that re-cluster while the model trains (CodebookConfig(train="recluster")): their forward, gradient,
schedule and objective against brute force and one-shot k-means; freeze_, save and load; bad input."""

import numpy as np
import pytest
import torch
from torch import nn

import weightshare as ws
from weightshare.kmeans import kmeans1d_rows
from weightshare.multitask import TrainConfig, train
from weightshare.training import training_sharing
from weightshare.training.recluster import ReclusterParametrization


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))


def digits_like(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, :3].argmax(1))  # a learnable labelling


def shared(model, **kw):
    ws.set_progress(False)
    return ws.share_(model, ws.CodebookConfig(**{"bits": 2, "train": "recluster", **kw}))


def test_the_forward_is_each_weights_cluster_mean_and_the_gradient_reaches_the_latent_weight():
    model = shared(mlp(), granularity="per_channel", table_dtype="float32")
    layer = model[0]
    p, latent = layer.parametrizations.weight[0], layer.parametrizations.weight.original
    assert isinstance(p, ReclusterParametrization) and latent.shape == (24, 12)
    w, labels = latent.detach().double().numpy(), p.labels.long().numpy()
    want = np.array([[w[r][labels[r] == labels[r, c]].mean() for c in range(12)] for r in range(24)])  # brute force
    assert np.allclose(layer.weight.detach().double().numpy(), want, rtol=0, atol=1e-7)
    # straight-through: d loss / d latent is d loss / d (the merged weight the forward used)
    x = torch.randn(5, 12)
    (layer(x) ** 2).sum().backward()
    merged = layer.weight.detach().clone().requires_grad_(True)
    (torch.nn.functional.linear(x, merged, layer.bias.detach()) ** 2).sum().backward()
    assert torch.allclose(latent.grad, merged.grad)


def test_re_clustering_reaches_one_shot_k_means_on_the_same_weights_and_never_a_worse_objective():
    model = shared(mlp(), granularity="per_channel", table_dtype="float32", recluster_every=1000)
    x, y = digits_like()
    train(model, x, y, TrainConfig(epochs=3, batch_size=16, lr=0.05))  # 18 steps: none re-clusters (every 1000)
    layer = model[0]
    p, latent = layer.parametrizations.weight[0], layer.parametrizations.weight.original
    w = latent.detach().double()

    def sse():
        return float(((layer.weight.detach().double() - w) ** 2).sum())

    stale = sse()
    p.recluster(latent)
    c, lab = kmeans1d_rows(w.numpy(), 4)
    one_shot = float(((np.take_along_axis(c, lab, 1) - w.numpy()) ** 2).sum())
    assert sse() == pytest.approx(one_shot, rel=1e-9) and sse() <= stale
    assert stale > one_shot * (1 + 1e-6)  # the weights had moved: the old clusters were no longer optimal


def test_the_schedule_re_clusters_every_n_steps_up_to_the_last_step(monkeypatch):
    calls = []
    monkeypatch.setattr(ReclusterParametrization, "recluster", lambda self, w: calls.append(self.steps))
    model = shared(mlp(), recluster_every=4, recluster_until=8)
    x, y = digits_like(64)
    train(model, x, y, TrainConfig(epochs=4, batch_size=16, lr=0.01))  # 16 steps
    assert calls == [4, 4, 8, 8]  # two layers, at steps 4 and 8 (the last one re-clusters; 12 and 16 are past it)
    assert all(p[0].steps == 16 for _, _, p in training_sharing(model))


def test_assignments_move_while_the_model_trains():
    model = shared(mlp(), recluster_every=2)
    before = model[0].parametrizations.weight[0].labels.clone()
    x, y = digits_like()
    train(model, x, y, TrainConfig(epochs=10, batch_size=16, lr=0.03))
    assert (model[0].parametrizations.weight[0].labels != before).any()


def test_freeze_keeps_the_outputs_and_save_and_load_reproduce_them(tmp_path):
    model = shared(mlp(), recluster_every=3)
    x, y = digits_like()
    train(model, x, y, TrainConfig(epochs=5, batch_size=16, lr=0.03))
    model.eval()
    with torch.no_grad():
        out = model(x)
    with pytest.raises(ValueError, match=r"0\.weight still re-clusters while training.*\n  call ws\.freeze_"):
        ws.save(model, tmp_path / "early")
    assert not (tmp_path / "early").exists()
    ws.freeze_(model)
    assert not training_sharing(model)
    with torch.no_grad():
        assert torch.equal(model(x), out)
    ws.save(model, tmp_path / "m")
    back = ws.load(tmp_path / "m", model=mlp(1), trainable=True).eval()
    with torch.no_grad():
        assert torch.equal(back(x), out)
    with pytest.raises(ValueError, match="freeze_: this model has no training-time sharing"):
        ws.freeze_(model)


def test_a_tied_embedding_and_head_stay_one_codebook_through_training_and_freeze():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(20, 8), nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, t):
            return self.head(torch.tanh(self.emb(t)))

    torch.manual_seed(0)
    model = shared(LM(), granularity="per_tensor", recluster_every=2)
    assert len(training_sharing(model)) == 1
    t = torch.randint(0, 20, (64,))
    train(model, t, (t + 1) % 20, TrainConfig(epochs=3, batch_size=16, lr=0.05))
    model.eval()
    with torch.no_grad():
        out = model(t)
        ws.freeze_(model)
        assert model.emb.parametrizations.weight is model.head.parametrizations.weight  # still one codebook
        assert torch.equal(model(t), out)


def test_a_transposed_weight_clusters_its_output_channels():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 5))  # weight (in 5, out 6), as GPT-2 stores it
    shared(model, granularity="per_channel", table_dtype="float32")
    w = model[0].weight.detach()
    for col in range(6):  # one table per output channel: each column holds at most 4 values
        assert torch.unique(w[:, col]).numel() <= 4
    x = torch.randn(3, 5)
    with torch.no_grad():
        assert torch.allclose(model(x), x @ w + model[0].bias)


@pytest.mark.parametrize("kw, message", [
    ({"train": "hard"}, "CodebookConfig.train\n  expected one of: (None, 'recluster', 'dkm', 'soft')\n  got: 'hard'"),
    ({"train": "fast"}, "got: 'fast'"),
    ({"train": "recluster", "recluster_every": 0}, "recluster_every\n  expected: a positive number"),
    ({"train": "recluster", "recluster_until": -1}, "recluster_until\n  expected: a step number >= 0"),
])
def test_bad_training_settings_are_refused_by_name(kw, message):
    with pytest.raises(ValueError) as e:
        ws.CodebookConfig(**kw)
    assert message in str(e.value)


def test_a_weight_that_becomes_nan_stops_training_naming_the_step_and_the_tensor():
    model = shared(mlp(), recluster_every=1)
    with torch.no_grad():
        model[2].parametrizations.weight.original[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 1: 2\.weight holds NaN or inf values"):
        ws.step_(model)


def test_training_settings_are_not_stored_in_packed_files():
    from weightshare.space import config_from_dict, config_to_dict

    d = config_to_dict(ws.CodebookConfig(train="recluster", recluster_every=7))
    assert not {"train", "recluster_every", "recluster_until"} & set(d)
    assert config_from_dict(d) == ws.CodebookConfig()  # files written before these fields read the same


def _ddp_recluster(rank: int) -> dict:
    model = shared(mlp(), recluster_every=2)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x, y = digits_like(64)
    half = slice(rank * 32, (rank + 1) * 32)  # each rank its own half of the data
    train(ddp, x[half], y[half], TrainConfig(epochs=4, batch_size=16, lr=0.03))  # 8 steps, 4 re-clusterings
    return {name: (plist.original.detach().numpy().copy(), plist[0].labels.numpy().copy(), plist[0].steps)
            for name, _, plist in training_sharing(model)}


def test_under_ddp_every_rank_holds_the_same_latent_weights_and_clusters():
    from tests.gloo import run_gloo

    results = run_gloo(_ddp_recluster)
    assert results[0].keys() == results[1].keys() == {"0.weight", "2.weight"}
    for name, (w, labels, steps) in results[0].items():
        w1, labels1, steps1 = results[1][name]
        assert steps == steps1 == 8 and np.array_equal(w, w1) and np.array_equal(labels, labels1), name


@pytest.mark.parametrize("mode", ["recluster", "dkm"])
def test_the_report_counts_training_time_codebooks_as_what_they_will_pack_to(mode):
    model = shared(mlp(), train=mode, granularity="per_channel")
    r = ws.report(model)
    rows = {row.name: row for row in r.layers}
    assert rows["0.weight"].map == "codebook" and f"(training: {mode})" in rows["0.weight"].detail
    assert rows["0.weight"].params_stored == 24 * 12  # the latent weights, while training
    ws.freeze_(model)
    assert ws.report(model).bytes_packed == r.bytes_packed
