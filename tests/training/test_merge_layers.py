"""Seed 003's merge step on a mix basis (ws.training.merge_layers_): which layers merge, what they become, and
that they train as one afterwards."""

import itertools

import pytest
import torch
from torch import nn

import weightshare as ws
from weightshare.multitask import TrainConfig, train
from weightshare.training import merge_layers_


def stack(seed: int = 0, alike=(0, 2)) -> nn.Sequential:
    """Four 8x8 layers (with tanh between); layers ``alike`` start nearly equal."""
    torch.manual_seed(seed)
    layers = [nn.Linear(8, 8) for _ in range(4)]
    if alike:
        a, b = alike
        with torch.no_grad():
            layers[b].weight.copy_(layers[a].weight + 1e-3 * torch.randn(8, 8))
    model = nn.Sequential(*itertools.chain.from_iterable((layer, nn.Tanh()) for layer in layers))
    ws.share_(model, ws.BasisConfig(layers=["*.weight"], num_bases=4, form="mix"))
    return model


def weights(model):
    return [model[i].weight.detach().clone() for i in (0, 2, 4, 6)]


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_a_threshold_merges_only_the_alike_layers_into_their_mean_weight():
    model = stack()
    before = weights(model)
    assert cosine(before[0], before[2]) > 0.99 > max(cosine(before[i], before[j]) for i, j in [(0, 1), (1, 3), (2, 3)])
    assert merge_layers_(model, threshold=0.99) == [["0.weight", "4.weight"]]
    after = weights(model)
    assert torch.equal(after[0], after[2])
    assert torch.allclose(after[0], (before[0] + before[2]) / 2, atol=1e-6)  # w_i = sum_j a_ij w_j, a_ij = 1/2
    assert torch.equal(after[1], before[1]) and torch.equal(after[3], before[3])
    assert model[0].parametrizations.weight.original is model[4].parametrizations.weight.original


def test_a_target_merges_the_most_alike_pairs_first_down_to_that_many_weights():
    model = stack(seed=3, alike=None)
    before = weights(model)
    pairs = {(i, j): cosine(before[i], before[j]) for i, j in itertools.combinations(range(4), 2)}
    first = max(pairs, key=pairs.get)  # brute force over the whole weights
    merged = merge_layers_(model, target=3)
    assert merged == [[f"{2 * first[0]}.weight", f"{2 * first[1]}.weight"]]
    assert len({tuple(w.flatten().tolist()) for w in weights(model)}) == 3
    merge_layers_(model, target=1)  # the tied pair counts as one unit, and so on to a single weight
    assert len({tuple(w.flatten().tolist()) for w in weights(model)}) == 1


def test_merged_layers_train_as_one_and_survive_save_and_load(tmp_path):
    model = stack()
    merge_layers_(model, threshold=0.99)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    ws.set_progress(False)
    train(model, x, x[:, :3].argmax(1), TrainConfig(epochs=3, batch_size=16, lr=0.01))
    after = weights(model)
    assert torch.equal(after[0], after[2]) and not torch.equal(after[0], after[1])
    ws.save(model, tmp_path / "m")
    back = ws.load(tmp_path / "m", model=nn.Sequential(*itertools.chain.from_iterable(
        (nn.Linear(8, 8), nn.Tanh()) for _ in range(4))), trainable=True)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


@pytest.mark.parametrize("kw, message", [
    ({}, "merge_layers_: say when to stop"),
    ({"threshold": 1.5}, "threshold\n  expected: a cosine similarity in [-1, 1]"),
    ({"target": 0}, "target\n  expected: a number of distinct weights >= 1"),
])
def test_bad_merge_settings_are_refused(kw, message):
    with pytest.raises(ValueError) as e:
        merge_layers_(stack(), **kw)
    assert message in str(e.value)


def test_a_model_without_a_mix_basis_is_refused():
    with pytest.raises(ValueError, match="no mix-basis group"):
        merge_layers_(nn.Sequential(nn.Linear(4, 4)), threshold=0.9)
