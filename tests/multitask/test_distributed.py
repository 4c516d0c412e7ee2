"""Multi-task training on two gloo processes gives the one-process model, for gradient and loss methods."""

import torch
from torch import nn

METHODS = ("upgrad", "pcgrad", "mgda", "gradnorm", "dwa")


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=g)
    return x, {"a": (x[:, 0] > 0).long(), "b": (x[:, 1] + x[:, 2] > 0).long()}


def factory():
    from weightshare.multitask import MultiTaskModel

    return MultiTaskModel(nn.Sequential(nn.Linear(12, 16), nn.Tanh()), {"a": nn.Linear(16, 2), "b": nn.Linear(16, 2)})


def run(method):
    from weightshare.multitask import TrainConfig, fit

    x, y = data()
    models = []
    original = factory

    def keep():
        m = original()
        models.append(m)
        return m

    fit(keep, x, y, method=method, config=TrainConfig(epochs=3, batch_size=64, lr=0.05, optimizer="sgd"))
    return {k: v.detach().numpy().copy() for k, v in models[-1].state_dict().items()}


def _train_all(rank: int) -> dict:
    return {m: run(m) for m in METHODS}


def test_two_processes_train_the_single_process_model():
    from tests.gloo import run_gloo

    results = run_gloo(_train_all)
    for method in METHODS:
        single = run(method)
        for rank in (0, 1):
            for k, v in single.items():
                assert torch.allclose(torch.from_numpy(results[rank][method][k]), torch.from_numpy(v), atol=1e-5), \
                    (method, rank, k)
