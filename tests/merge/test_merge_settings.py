"""Parameters that vary by tensor (mergekit's gradients and filters): resolved by name and depth,
checked before any tensor is read, and merged as the same merge with one number per tensor."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import weightshare as ws
from tests.merge.test_merge import berts  # noqa: F401  (the tiny BERT checkpoints fixture)
from weightshare.merge import MergeError
from weightshare.merge import settings as setting
from weightshare.merge.config import merge_from_config, read_config
from weightshare.merge.registry import MERGE_METHODS, check_params


def test_a_gradient_interpolates_its_anchors_over_depth():
    grad = [0, 0.5, 0.3, 0.7, 1]  # mergekit's usual SLERP anchors
    for k, anchor in enumerate(grad):
        assert setting.resolve(grad, "x", k / 4) == pytest.approx(anchor)
    assert setting.resolve(grad, "x", 0.6) == pytest.approx(0.3 * 0.6 + 0.7 * 0.4)  # 2.4 anchors in
    assert setting.resolve([0.25], "x", 0.9) == 0.25
    assert setting.resolve(0.5, "anything", 0.3) == 0.5


def test_the_first_matching_condition_gives_the_value():
    t = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.9}, {"value": 0.5}]
    assert setting.resolve(t, "model.layers.3.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert setting.resolve(t, "model.layers.3.self_attn.q_proj.weight", 1.0) == pytest.approx(1.0)
    assert setting.resolve(t, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.9
    assert setting.resolve(t, "model.norm.weight", 0.0) == 0.5
    assert setting.resolve([{"filter": "mlp", "value": 1}], "model.norm.weight", 0.0) is None
    assert setting.resolve([{"filter": "*", "value": 2}], "model.norm.weight", 0.0) == 2
    nested = [{"filter": "layers", "value": [{"filter": "mlp", "value": 3}, {"value": 4}]}]
    assert setting.resolve(nested, "model.layers.0.mlp.w", 0) == 3
    assert setting.resolve(nested, "model.layers.0.attn.w", 0) == 4


@pytest.mark.parametrize("names, want", [
    (["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
      "encoder.layer.1.output.dense.bias", "encoder.layer.2.output.dense.bias", "pooler.dense.weight"],
     [0.0, 0.0, 0.5, 1.0, 0.0]),
    (["model.embed_tokens.weight", "model.layers.0.mlp.experts.7.w1", "model.layers.3.self_attn.q_proj.weight",
      "model.norm.weight", "lm_head.weight"], [0.0, 0.0, 1.0, 0.0, 0.0]),
    (["0.weight", "2.weight", "4.weight", "4.bias"], [0.0, 0.5, 1.0, 1.0]),  # an nn.Sequential
    (["conv.weight", "fc.weight"], [0.0, 0.0]),  # no stack: every tensor at 0
    (["blocks.0.w", "heads.0.w", "heads.1.w", "heads.2.w"], [0.0, 0.0, 0.5, 1.0]),  # the longest numbered run
    (["layers.0.w", "out.w"], [1.0, 0.0]),  # a single layer lies at 1, as mergekit's one-layer slice
])
def test_a_tensor_depth_comes_from_its_layer_in_the_stack(names, want):
    got = setting.layer_positions(names)
    assert [got[n] for n in names] == want


def test_malformed_settings_are_named():
    ties = MERGE_METHODS["ties"]
    cases = {
        "scale: [] is not a number": ([], "scale"),
        "a list must hold only numbers": ([0.5, {"value": 1}], "scale"),
        "scale[0]: unknown keys ['filt']": ([{"filt": "a", "value": 1}], "scale"),
        "scale[0]: a condition needs a value": ([{"filter": "a"}], "scale"),
        "scale[0].filter: 3 is not text": ([{"filter": 3, "value": 1}], "scale"),
        "a gradient [0, 1] for a parameter that is true/false": ([0, 1], "normalize"),
        "nested deeper than": (json.loads('[{"value": ' * 9 + "1" + "}]" * 9), "scale"),
    }
    for want, (value, key) in cases.items():
        problems = check_params(ties, 2, True, {}, {key: value})
        assert any(want in p for p in problems), (want, problems)
    # every value a setting can take is range-checked, its anchors and its conditions' values
    problems = check_params(ties, 2, True, {"density": [[0.2, 1.5], [{"filter": "a", "value": 0.0}]]}, {})
    assert sorted(problems) == ["density must be in (0, 1]; got 0.0 (in density[1])",
                                "density must be in (0, 1]; got 1.5 (in density[0])"]


def test_a_per_layer_gradient_merges_as_one_number_per_tensor():
    torch.manual_seed(0)
    a = {f"{i}.weight": torch.randn(3, 3) for i in range(5)} | {"norm.weight": torch.randn(3)}
    b = {k: torch.randn_like(v) for k, v in a.items()}
    got = ws.merge([a, b], "linear", weights=[1.0, [0, 2]])
    for i in range(5):  # layer i lies at t = i / 4: model b weighs 2 t
        w = 2 * i / 4
        torch.testing.assert_close(got[f"{i}.weight"], (a[f"{i}.weight"] + w * b[f"{i}.weight"]) / (1 + w))
    torch.testing.assert_close(got["norm.weight"], a["norm.weight"])  # outside the stack: t = 0, weight 0


def test_mergekit_slerp_with_filters_and_gradients_equals_scalar_merges(berts, tmp_path):  # noqa: F811
    t = [{"filter": "attention", "value": [0, 1]}, {"filter": "intermediate", "value": [1, 0]}, {"value": 0.5}]
    config = tmp_path / "slerp.yaml"
    config.write_text(json.dumps({"merge_method": "slerp", "base_model": str(berts["a"]),
                                  "models": [{"model": str(berts["a"])}, {"model": str(berts["b"])}],
                                  "parameters": {"t": t}}))
    out = merge_from_config(config, tmp_path / "out")
    got = load_file(out / "model.safetensors")
    a, b = load_file(berts["a"] / "model.safetensors"), load_file(berts["b"] / "model.safetensors")

    def expected_t(name):  # two layers: layer 0 at t = 0, layer 1 at t = 1, everything else at 0
        depth = 1.0 if ".layer.1." in name else 0.0
        if "attention" in name:
            return depth
        return 1 - depth if "intermediate" in name else 0.5

    for k in a:
        if a[k].is_floating_point():
            want = ws.merge([{k: a[k]}, {k: b[k]}], "slerp", t=expected_t(k))[k]
            assert torch.equal(got[k], want), k


def test_slerp_config_names_one_of_its_two_models_as_base_model(tmp_path):
    """slerp declares its base_endpoint: the config's base_model is its t = 0 end, one of the two models."""
    config = tmp_path / "slerp.yaml"
    config.write_text(json.dumps({"merge_method": "slerp", "base_model": "./c", "parameters": {"t": 0.5},
                                  "models": [{"model": "./a"}, {"model": "./b"}]}))
    with pytest.raises(MergeError, match=r"slerp: expected two models, one of them named as base_model "
                                         r"\(the t = 0 end\)"):
        read_config(config)
    config.write_text(json.dumps({"merge_method": "slerp", "base_model": "./b", "parameters": {"t": 0.5},
                                  "models": [{"model": "./a"}, {"model": "./b"}]}))
    got = read_config(config)
    assert (got["models"], got["base"]) == (["./b", "./a"], None)


def test_a_model_condition_falls_back_to_the_global_value(berts, tmp_path):  # noqa: F811
    config = tmp_path / "ties.yaml"
    config.write_text(json.dumps({
        "merge_method": "ties", "base_model": str(berts["base"]),
        "models": [{"model": str(berts["a"]), "parameters": {"density": [{"filter": "attention", "value": 0.3}]}},
                   {"model": str(berts["b"])}],
        "parameters": {"density": 0.7, "lambda": [1.0, 0.5]}}))
    got = ws.merge(**read_config(config))
    base, a, b = (load_file(berts[m] / "model.safetensors") for m in ("base", "a", "b"))
    for k in base:
        if base[k].is_floating_point():
            depth = 1.0 if ".layer.1." in k else 0.0
            want = ws.merge([{k: a[k]}, {k: b[k]}], "ties", base={k: base[k]},
                            density=[0.3 if "attention" in k else 0.7, 0.7], scale=1.0 - 0.5 * depth)[k]
            assert torch.equal(got[k], want), k


def test_a_required_value_no_condition_gives_is_named_before_anything_is_written(berts, tmp_path):  # noqa: F811
    with pytest.raises(MergeError, match="t: no value for tensor 'embeddings.word_embeddings.weight'") as info:
        ws.merge([berts["a"], berts["b"]], "slerp", t=[{"filter": "attention", "value": 0.5}], out=tmp_path / "m")
    assert "nothing was read or written" in str(info.value)
    assert not (tmp_path / "m").exists()


_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(-2, 2, allow_nan=False), st.text(max_size=3),
              st.sampled_from(["attention", "layer.1", "*", "intermediate"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(["filter", "value", "x"]), inner, max_size=3)),
    max_leaves=12)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(t=_values, density=_values)
def test_any_setting_in_a_real_config_is_refused_clearly_or_merged(berts, tmp_path, t, density):  # noqa: F811
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"merge_method": "ties", "base_model": str(berts["base"]),
                                  "models": [{"model": str(berts["a"]), "parameters": {"density": density}},
                                             {"model": str(berts["b"])}],
                                  "parameters": {"lambda": t}}))
    try:
        merged = ws.merge(**read_config(config))
    except MergeError:
        return
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())


def test_dry_run_prints_what_each_tensor_merges_with(berts, tmp_path, capsys):  # noqa: F811
    from weightshare.cli import main

    config = tmp_path / "slerp.yaml"
    config.write_text(json.dumps({"merge_method": "slerp", "base_model": str(berts["a"]),
                                  "models": [{"model": str(berts["a"])}, {"model": str(berts["b"])}],
                                  "parameters": {"t": [{"filter": "attention", "value": [0.2, 0.8]}, {"value": 0.5}]}}))
    assert main(["merge", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    header, rows = out.split("\ntensor ", 1)[1].split("\n", 1)
    assert header.split() == ["t"]  # the one parameter that varies
    table = dict(line.split() for line in rows.splitlines())  # name -> t
    assert table["encoder.layer.0.attention.self.query.weight"] == "0.2"
    assert table["encoder.layer.1.attention.output.dense.bias"] == "0.8"
    assert table["encoder.layer.1.intermediate.dense.weight"] == "0.5" and table["pooler.dense.weight"] == "0.5"
    assert len(table) == sum(v.is_floating_point() for v in load_file(berts["a"] / "model.safetensors").values())
    assert not list(tmp_path.glob("*/model.safetensors"))  # nothing written
    plan = ws.merge([berts["a"], berts["b"]], "linear", plan=True)
    assert {tuple(p["weight"]) for p in plan.values()} == {(1.0, 1.0)}
