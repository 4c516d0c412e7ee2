"""merge.transfer: tensors move by name patterns, and the report says exactly what moved and what did not."""

import pytest
import torch
from torch import nn

from weightshare.merge.transfer import Left, Moved, TransferReport, transfer


def mlp(*widths):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_within_an_architecture_small_mlp_into_a_bigger_one():
    torch.manual_seed(0)
    small, big = mlp(8, 16, 16, 4), mlp(8, 16, 16, 32, 4)  # small: 0, 2, 4; big: 0, 2, 4, 6
    before = snapshot(big)
    report = transfer(small, big, {"*": "*"})
    assert report.moved == [Moved("0.weight", "0.weight", (16, 8)), Moved("0.bias", "0.bias", (16,)),
                            Moved("2.weight", "2.weight", (16, 16)), Moved("2.bias", "2.bias", (16,))]
    assert report.left == [Left("4.weight", "4.weight", "shape (4, 16) vs (32, 16)"),
                           Left("4.bias", "4.bias", "shape (4,) vs (32,)")]
    assert report.untouched == ["4.weight", "4.bias", "6.weight", "6.bias"]
    assert report.unmapped == [] and report.missing == [] and len(report.mismatched) == 2
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert torch.equal(big.state_dict()[name], small.state_dict()[name])
    for name in report.untouched:
        assert torch.equal(big.state_dict()[name], before[name])
    x = torch.randn(5, 8)
    assert torch.allclose(big[:4](x), small[:4](x))  # the transferred trunk computes the same features
    text = str(report)
    assert text.splitlines()[0] == "transfer: 4 moved, 2 left (2 shape), 4 destination tensors untouched"
    assert "shape (4, 16) vs (32, 16)" in text and "16x8" in text


class Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1))
        self.head = nn.Linear(8 * 8 * 8, 10)


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(1, 4, 3, padding=1)
        self.conv_out = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.classifier = nn.Linear(8, 3)


def test_across_architectures_conv_trunk_into_differently_named_module():
    torch.manual_seed(0)
    cnn, other = Trunk(), Backbone()
    before = snapshot(other)
    report = transfer(cnn.state_dict(), other, {"features.0.*": "conv_in.*", "features.2.*": "conv_out.*",
                                                "features.4.*": "conv_x.*"})
    assert [(m.src, m.dst, m.shape) for m in report.moved] == [
        ("features.0.weight", "conv_in.weight", (4, 1, 3, 3)), ("features.0.bias", "conv_in.bias", (4,)),
        ("features.2.weight", "conv_out.weight", (8, 4, 3, 3)), ("features.2.bias", "conv_out.bias", (8,))]
    assert report.left == [Left("head.weight", None, "unmapped"), Left("head.bias", None, "unmapped")]
    assert report.unmapped == ["head.weight", "head.bias"]
    assert report.unused_patterns == ["features.4.*"]
    assert report.untouched == [k for k in before if not k.startswith("conv_")]
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(other.conv_out(torch.relu(other.conv_in(x))), cnn.features(x))
    assert all(torch.equal(other.state_dict()[k], before[k]) for k in report.untouched)


def test_several_stars_substitute_in_order_shortest_first_and_missing_names_are_reported():
    src = {"blocks.0.attn.weight": torch.ones(2), "blocks.1.mlp.bias": torch.full((3,), 2.0)}

    class Dst(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("layers.0.sub.attn.weight".replace(".", "_"), torch.zeros(2))

    # the destination name built is layers.<0>.sub.<attn.weight>: the first star takes "0", not "0.attn"
    report = transfer(src, Dst(), {"blocks.*.*": "layers.*.sub.*"})
    assert report.missing == [("blocks.0.attn.weight", "layers.0.sub.attn.weight"),
                              ("blocks.1.mlp.bias", "layers.1.sub.mlp.bias")]
    assert report.moved == [] and report.untouched == ["layers_0_sub_attn_weight"]
    dst = Dst()
    report = transfer(src, dst, {"blocks.*.attn.*": "layers_*_sub_attn_*", "blocks.*": "x.*"})
    assert report.moved == [Moved("blocks.0.attn.weight", "layers_0_sub_attn_weight", (2,))]
    assert report.missing == [("blocks.1.mlp.bias", "x.1.mlp.bias")]
    assert torch.equal(dst.layers_0_sub_attn_weight, torch.ones(2))


def test_first_matching_pattern_wins():
    src = {"enc.head.weight": torch.ones(2, 2), "enc.body.weight": torch.full((2, 2), 3.0)}
    dst = nn.ModuleDict({"head": nn.Linear(2, 2, bias=False), "body": nn.Linear(2, 2, bias=False)})
    report = transfer(src, dst, {"enc.head.*": "head.*", "enc.*": "*"})
    assert report.moved == [Moved("enc.head.weight", "head.weight", (2, 2)),
                            Moved("enc.body.weight", "body.weight", (2, 2))]
    assert (report.ok and torch.equal(dst.head.weight, torch.ones(2, 2))
            and torch.equal(dst.body.weight, src["enc.body.weight"]))


class Tied(nn.Module):
    def __init__(self, tie: bool):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.out = nn.Linear(4, 6, bias=False)
        if tie:
            self.out.weight = self.emb.weight


def test_tying_in_the_destination_one_name_writes_both_two_different_sources_conflict():
    torch.manual_seed(0)
    src, dst = Tied(tie=False), Tied(tie=True)
    report = transfer(src, dst, {"emb.weight": "emb.weight"})
    assert report.moved == [Moved("emb.weight", "emb.weight", (6, 4))]
    assert report.tied == {"emb.weight": ["out.weight"]}
    assert report.untouched == [] and report.unmapped == ["out.weight"]
    assert dst.out.weight is dst.emb.weight and torch.equal(dst.out.weight, src.emb.weight)
    assert "changed through tying" in str(report)

    before = snapshot(dst)
    with pytest.raises(ValueError, match=r"conflict(?s:.*)emb\.weight -> emb\.weight, out\.weight -> out\.weight"):
        transfer(src, dst, {"*": "*"})  # two different source tensors into one tied tensor
    assert same(snapshot(dst), before)


def test_tying_in_the_source_moves_under_every_name_without_conflict():
    torch.manual_seed(0)
    src = Tied(tie=True)
    for tied_dst in (True, False):
        dst = Tied(tie=tied_dst)
        report = transfer(src, dst, {"*": "*"}, strict=True)
        assert [m.dst for m in report.moved] == ["emb.weight", "out.weight"] and report.tied == {}
        assert torch.equal(dst.emb.weight, src.emb.weight) and torch.equal(dst.out.weight, src.emb.weight)
        assert (dst.out.weight is dst.emb.weight) == tied_dst  # the destination keeps its own tying


def test_two_sources_into_one_name_is_a_conflict_and_nothing_is_copied():
    src = {"a.weight": torch.ones(3), "b.weight": torch.zeros(3), "c.weight": torch.full((3,), 5.0)}
    dst = nn.Module()
    dst.register_buffer("x_weight", torch.full((3,), 7.0))
    dst.register_buffer("c_weight", torch.full((3,), 7.0))
    with pytest.raises(ValueError) as e:
        transfer(src, dst, {"c.weight": "c_weight", "a.*": "x_*", "b.*": "x_*"})
    assert ("1 conflict(s), nothing was copied" in str(e.value)
            and "a.weight -> x_weight, b.weight -> x_weight" in str(e.value))
    assert torch.equal(dst.c_weight, torch.full((3,), 7.0))  # the valid pair was not copied either


def test_strict_refuses_anything_left_and_copies_nothing():
    torch.manual_seed(0)
    small, big = mlp(8, 16, 16, 4), mlp(8, 16, 16, 32, 4)
    before = snapshot(big)
    with pytest.raises(ValueError, match=r"strict(?s:.*)4\.weight -> 4\.weight: shape \(4, 16\) vs \(32, 16\)"):
        transfer(small, big, {"*": "*"}, strict=True)
    assert same(snapshot(big), before)
    with pytest.raises(ValueError, match="pattern 'nope.*' matched no source name"):
        transfer(small, big, {"0.*": "0.*", "nope.*": "x.*"}, strict=True)
    assert same(snapshot(big), before)
    report = transfer(small, big, {"0.*": "0.*", "2.*": "2.*"}, strict=True)  # unmapped names are not failures
    assert report.ok and report.unmapped == ["4.weight", "4.bias"] and len(report.moved) == 4
    assert torch.equal(big[0].weight, small[0].weight)


def test_dtypes_float_casts_to_the_destination_other_kinds_are_left():
    dst = nn.BatchNorm1d(3)
    src = {"weight": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16), "num_batches_tracked": torch.tensor(4.0),
           "running_mean": torch.tensor([1, 2, 3])}
    report = transfer(src, dst, {"*": "*"})
    assert report.moved == [Moved("weight", "weight", (3,), "float16 -> float32")]
    assert report.left == [Left("num_batches_tracked", "num_batches_tracked", "dtype float32 vs int64"),
                           Left("running_mean", "running_mean", "dtype int64 vs float32")]
    assert dst.weight.dtype == torch.float32 and torch.equal(dst.weight, torch.tensor([1.0, 2.0, 3.0]))
    assert int(dst.num_batches_tracked) == 0 and torch.equal(dst.running_mean, torch.zeros(3))


def test_a_model_into_itself_reads_the_values_from_before_the_transfer():
    torch.manual_seed(0)
    net = mlp(4, 4, 4, 4)
    before = snapshot(net)
    report = transfer(net, net, {"0.*": "2.*", "2.*": "0.*"})  # swap two layers of one shape
    assert len(report.moved) == 4
    assert torch.equal(net[0].weight, before["2.weight"]) and torch.equal(net[2].weight, before["0.weight"])
    assert torch.equal(net[0].bias, before["2.bias"]) and torch.equal(net[2].bias, before["0.bias"])


@pytest.mark.parametrize("src, dst, mapping, match", [
    ({}, nn.Linear(1, 1), ["*"], r"mapping\n  expected: a non-empty dict(?s:.*)got: list"),
    ({}, nn.Linear(1, 1), {}, r"mapping\n  expected: a non-empty dict(?s:.*)got: \{\}"),
    ({}, nn.Linear(1, 1), {"a": 1}, r"mapping\n  expected: non-empty strings(?s:.*)got: 'a': 1"),
    ({}, nn.Linear(1, 1), {"a.*.*": "b.*"},
     r"pattern 'a\.\*\.\*' -> 'b\.\*'\n  expected: as many '\*' .*\(2\)\n  got: 1"),
    ([1], nn.Linear(1, 1), {"*": "*"}, r"src\n  expected: an nn.Module or a state dict\n  got: list"),
    ({"w": 1.0}, nn.Linear(1, 1), {"*": "*"}, r"src\n  expected: a state dict of str -> tensor"),
    ({}, {"w": torch.zeros(1)}, {"*": "*"}, r"dst\n  expected: an nn.Module \(copied into in place\)\n  got: dict"),
])
def test_bad_input_is_one_clear_value_error(src, dst, mapping, match):
    with pytest.raises(ValueError, match=match):
        transfer(src, dst, mapping)


def test_report_str_summarises_long_moved_lists_but_lists_every_left_name():
    torch.manual_seed(0)
    src, dst = mlp(*[4] * 30), mlp(*[4] * 30)
    src_state = src.state_dict()
    src_state["extra"] = torch.zeros(1)
    report = transfer(src_state, dst, {"*": "*"})
    assert isinstance(report, TransferReport) and len(report.moved) == 58
    text = str(report)
    assert "... 39 more" in text and "extra" in text and "missing in destination" in text
    assert len(text.splitlines()) == 2 + 19 + 1 + 1  # summary, header, moved, '... more', left


class WithExtraState(nn.Linear):
    def get_extra_state(self):
        return {"version": 2}

    def set_extra_state(self, state):
        pass


def test_non_tensor_extra_state_is_not_a_weight():
    torch.manual_seed(0)
    src, dst = WithExtraState(3, 2), WithExtraState(3, 2)
    assert "_extra_state" in src.state_dict()
    report = transfer(src, dst, {"*": "*"}, strict=True)
    assert [m.src for m in report.moved] == ["weight", "bias"] and report.left == []
    assert torch.equal(dst.weight, src.weight)
