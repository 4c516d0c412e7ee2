"""The training loop: determinism, full-batch steps, schedules, early stopping, bad configs."""

import pytest
import torch

from weightshare.multitask.trainer import TrainConfig, error_rate, train


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 5, generator=g)
    return x, (x[:, 0] > 0).long()


def test_training_is_deterministic_and_learns():
    x, y = _data()
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        result = train(model, x, y, TrainConfig(epochs=30, batch_size=16, lr=1e-2, seed=1))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert result.epoch_losses[-1] < result.epoch_losses[0] / 3 and error_rate(model, x, y) < 0.1
    assert len(result.step_seconds) == 30 * 7 and result.median_step_seconds > 0


def test_full_batch_gd_is_one_plain_gradient_step_per_epoch():
    x, y = _data()
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    ref = torch.nn.Linear(5, 2)
    ref.load_state_dict(model.state_dict())
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    train(model, x, y, TrainConfig(epochs=1, optimizer="gd", lr=0.5))
    assert (torch.allclose(model.weight, w0 - 0.5 * ref.weight.grad)
            and torch.allclose(model.bias, b0 - 0.5 * ref.bias.grad))


def test_sgdr_restarts_the_learning_rate():
    from weightshare.multitask.trainer import make_optimizer

    opt, sched = make_optimizer([torch.nn.Parameter(torch.zeros(1))],
                                TrainConfig(optimizer="sgdr", lr=1.0, restart_epochs=2), 5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 1.0 and lrs[9] < 0.05 and lrs[10] == 1.0  # a cycle of 2 epochs x 5 steps, then back to the top


def test_warmup_then_cosine_decay_follows_the_formula():
    import math

    from weightshare.multitask.trainer import make_optimizer

    cfg = TrainConfig(epochs=2, lr=0.1, schedule="cosine", warmup_steps=4)
    opt, sched = make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg, 10)  # 20 steps in all
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expect = [0.1 * (s + 1) / 4 if s < 4 else 0.1 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 16)) for s in range(20)]
    assert lrs == pytest.approx(expect)


def test_on_epoch_stops_training_and_params_limits_what_moves():
    x, y = _data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    first = model[0].weight.detach().clone()
    seen = []
    result = train(model, x, y, TrainConfig(epochs=10, batch_size=50, lr=1e-2), params=model[2].parameters(),
                   on_epoch=lambda e: seen.append(e) or e == 3)
    assert seen == [1, 2, 3] and len(result.epoch_losses) == 3 and len(result.step_seconds) == 6
    assert torch.equal(model[0].weight, first)


@pytest.mark.parametrize("kwargs,match", [(dict(optimizer="rmsprop"), "optimizer"), (dict(epochs=0), "epochs"),
                                          (dict(batch_size=0), "batch_size"), (dict(lr=0), "lr"),
                                          (dict(schedule="linear"), "schedule"), (dict(warmup_steps=-1), "warmup")])
def test_bad_train_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)
