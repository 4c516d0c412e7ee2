"""Shared weights under DistributedDataParallel: 2 gloo processes give one process's gradients.

Each rank gets half of the batch; DDP averages the ranks' gradients, which for
equal halves and a mean loss is the full batch's gradient.  The models are
built in each process from the same seed, as a user's launch script would.
"""

import torch

KINDS = ("tied", "hashed", "relaxed", "basis")


def build(kind: str) -> torch.nn.Module:
    import weightshare as ws

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                            torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    if kind == "tied":
        ws.share_(m, ws.TieConfig(params=["2.weight", "4.weight"]))
    elif kind == "hashed":
        ws.share_(m, ws.HashConfig(compression=1 / 8))
    elif kind == "relaxed":
        ws.share_(m, ws.TieConfig(params=["2.weight", "4.weight"], delta_rank=2))
    else:
        ws.share_(m, ws.BasisConfig(layers=["2.weight", "4.weight"], num_bases=4))
    return m


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g)


def gradients(model, x, y) -> dict[str, torch.Tensor]:
    torch.nn.functional.mse_loss(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _ddp_gradients(rank: int) -> dict:
    x, y = batch()
    out = {}
    for kind in KINDS:
        model = build(kind)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        half = slice(rank * 32, (rank + 1) * 32)
        torch.nn.functional.mse_loss(ddp(x[half]), y[half]).backward()
        out[kind] = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    return out


def test_ddp_on_two_gloo_processes_gives_the_single_process_gradients():
    from tests.gloo import run_gloo

    results = run_gloo(_ddp_gradients)
    x, y = batch()
    for kind in KINDS:
        single = gradients(build(kind), x, y)
        for rank in (0, 1):
            got = results[rank][kind]
            assert got.keys() == single.keys()
            for name in single:
                assert torch.allclose(torch.from_numpy(got[name]), single[name], atol=1e-6, rtol=0), (kind, name)
        if kind == "tied":  # the tied weight is one parameter: DDP reduced it once
            assert sum(1 for n in single if n.endswith("weight")) == 3
