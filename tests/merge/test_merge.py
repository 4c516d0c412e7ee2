"""ws.merge: inputs of every kind, checked all at once before any tensor is read; streamed,
atomic output that the source's library loads; the mergekit YAML."""

import json
import struct
from unittest.mock import patch

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import weightshare as ws
from weightshare.io import write_safetensors
from weightshare.merge import MERGE_METHODS, MergeError
from weightshare.merge.config import read_config
from weightshare.merge.registry import row_length


def tiny_bert(seed: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    return BertModel(config)


@pytest.fixture(scope="module")
def berts(tmp_path_factory):
    root = tmp_path_factory.mktemp("berts")
    paths = {}
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        tiny_bert(seed).save_pretrained(root / name)
        paths[name] = root / name
    tiny_bert(2).save_pretrained(root / "b-sharded", max_shard_size="20KB")
    paths["b-sharded"] = root / "b-sharded"
    return paths


def test_linear_merge_of_directories_loads_back_with_the_exact_average(berts, tmp_path):
    from transformers import AutoModel

    out = ws.merge([berts["a"], berts["b"]], "linear", out=tmp_path / "merged")
    merged = AutoModel.from_pretrained(out)
    a, b = load_file(berts["a"] / "model.safetensors"), load_file(berts["b"] / "model.safetensors")
    state = merged.state_dict()
    for k, v in a.items():
        if v.is_floating_point():
            torch.testing.assert_close(state[k], (v + b[k]) / 2, rtol=0, atol=1e-7)
        else:
            assert torch.equal(state[k], v)  # position ids: copied, never averaged
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".merged.*"))


def test_sharded_and_in_memory_inputs_give_the_same_merge(berts):
    plain = ws.merge([berts["a"], berts["b"]], "task_arithmetic", base=berts["base"], scale=0.7)
    assert (berts["b-sharded"] / "model.safetensors.index.json").is_file()
    sharded = ws.merge([berts["a"], berts["b-sharded"]], "task_arithmetic", base=berts["base"], scale=0.7)
    modules = ws.merge([tiny_bert(1), tiny_bert(2)], "task_arithmetic", base=tiny_bert(0).state_dict(), scale=0.7)
    assert plain.keys() == sharded.keys()
    for k in plain:
        assert torch.equal(plain[k], sharded[k])
        torch.testing.assert_close(plain[k], modules[k], rtol=0, atol=0)


def test_a_packed_input_is_decoded_a_tensor_at_a_time_and_merges_as_its_export(berts, tmp_path, monkeypatch):
    from transformers import AutoModel

    from weightshare.load import export
    from weightshare.merge import streaming
    from weightshare.pack import PackedFile

    model = AutoModel.from_pretrained(berts["a"])
    ws.share_(model, ws.CodebookConfig(bits=3, granularity="per_channel"))
    packed = ws.save(model, tmp_path / "a-packed")
    dense = export(packed, tmp_path / "a-dense")
    kwargs = dict(base=berts["base"], density=0.4)
    want = ws.merge([dense, berts["b"]], "ties", **kwargs)
    decoded = []
    decode = PackedFile.decode
    monkeypatch.setattr(PackedFile, "decode", lambda self, name: decoded.append(name) or decode(self, name))
    monkeypatch.setattr(streaming, "CHUNK", 53)  # large tensors are read in many pieces, and twice (TIES thresholds)
    got = ws.merge([packed, berts["b"]], "ties", out=tmp_path / "m", **kwargs)
    written = load_file(got / "model.safetensors")
    assert set(written) == set(want)
    for k in want:
        assert torch.equal(written[k], want[k]), k
    # one decode per tensor: the pieces of a tensor come from the one decoded copy
    assert sorted(decoded) == sorted(k for k in want if want[k].is_floating_point())


def test_a_packed_input_with_a_symlink_out_of_it_writes_nothing(berts, tmp_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(berts["a"])
    ws.share_(model, ws.CodebookConfig(bits=3))
    packed = ws.save(model, tmp_path / "a-packed")
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any model")
    (packed / "notes.txt").symlink_to(secret)  # as export does, a merge must not copy a file from elsewhere
    with pytest.raises(ValueError, match="symlink that leads out"):
        ws.merge([packed, berts["b"]], "linear", out=tmp_path / "m")
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m*"))


def test_every_problem_is_reported_at_once_before_any_tensor_is_read(berts, tmp_path, monkeypatch):
    from weightshare.merge import streaming

    reads = []
    monkeypatch.setattr(streaming._Model, "read", lambda self, name, start=None, stop=None: reads.append(name))
    short = load_file(berts["a"] / "model.safetensors")
    short.pop("pooler.dense.bias")
    short["embeddings.word_embeddings.weight"] = torch.zeros(65, 16)
    save_file(short, tmp_path / "short.safetensors")
    with pytest.raises(MergeError) as info:
        ws.merge([berts["a"], tmp_path / "short.safetensors", tmp_path / "nothing-here"], "ties", base=berts["base"],
                 weights=[1.0, 1.0], density=1.5, scale=1.0, colour="blue", out=tmp_path / "out")
    message = str(info.value)
    for part in ("lacks 1 tensors", "pooler.dense.bias", "embeddings.word_embeddings.weight: shape [65, 16]",
                 "nothing-here", "density must be in (0, 1]", "weight: 2 values for 3 models", "'colour'"):
        assert part in message, part
    assert reads == [] and not (tmp_path / "out").exists()


def test_a_failure_while_streaming_leaves_no_output(berts, tmp_path, monkeypatch):
    from weightshare.merge import streaming

    calls = []

    def failing(self, name, start=None, stop=None):
        calls.append(name)
        if len(calls) > 5:
            raise OSError("disk went away")
        shape = self.meta[name][0] if start is None else (stop - start,)
        return torch.zeros(shape, dtype=self.meta[name][1])

    monkeypatch.setattr(streaming._Model, "read", failing)
    with pytest.raises(OSError):
        ws.merge([berts["a"], berts["b"]], "linear", out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)


def test_buffers_policy_float_statistics_merge_integer_counters_copy():
    a, b = WithNorm(), WithNorm()
    with torch.no_grad():
        a.bn.running_mean.fill_(1.0)
        b.bn.running_mean.fill_(3.0)
    a.bn.num_batches_tracked.fill_(7)
    b.bn.num_batches_tracked.fill_(9)
    merged = ws.merge([a, b], "linear")
    assert torch.equal(merged["bn.running_mean"], torch.full((4,), 2.0))
    assert int(merged["bn.num_batches_tracked"]) == 7  # from the first model (no base)
    merged = ws.merge([a, b], "task_arithmetic", base=b)
    assert int(merged["bn.num_batches_tracked"]) == 9  # from the base


def test_output_dtype_is_applied_to_float_tensors_only(berts):
    merged = ws.merge([berts["a"], berts["b"]], "linear", dtype="bfloat16")
    assert merged["pooler.dense.weight"].dtype == torch.bfloat16
    merged = ws.merge([WithNorm(), WithNorm()], "linear", dtype="float16")
    assert merged["bn.running_var"].dtype == torch.float16 and merged["bn.num_batches_tracked"].dtype == torch.int64


def test_an_integer_buffer_only_some_inputs_store_is_no_problem(berts):
    # transformers 4 stored embeddings.position_ids, 5 does not: the output follows the reference (the base)
    base = load_file(berts["base"] / "model.safetensors")
    base["embeddings.position_ids"] = torch.arange(32)[None]
    merged = ws.merge([berts["a"], berts["b"]], "task_arithmetic", base=base)
    assert torch.equal(merged["embeddings.position_ids"], torch.arange(32)[None])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]),
                          st.lists(st.integers(0, 5), max_size=3)), min_size=1, max_size=6))
def test_streamed_safetensors_are_what_the_library_reads(tmp_path, specs):
    g = torch.Generator().manual_seed(len(specs))
    tensors = {f"t{i}": (torch.randn(shape, generator=g) * 10).to(dt) for i, (dt, shape) in enumerate(specs)}
    entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    path = tmp_path / "x.safetensors"
    write_safetensors(path, entries, iter(tensors.values()), metadata={"format": "pt"})
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_mutated_input_file_is_refused_or_read_exactly(berts, tmp_path_factory, data):
    # untrusted input: whatever bytes a file holds, merge reads what safetensors reads, or refuses with one error
    raw = bytearray((berts["a"] / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.one_of(st.integers(0, 8 + n - 1), st.integers(0, len(raw) - 1)))
        raw[where] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    path = tmp_path_factory.mktemp("mutated") / "m.safetensors"
    path.write_bytes(bytes(raw))
    try:
        expected = load_file(path)
    except Exception:  # noqa: BLE001
        expected = None
    try:
        merged = ws.merge([path], "linear")
    except ValueError as exc:
        assert "\n" in str(exc) or str(path) in str(exc)
        return
    assert expected is not None
    assert merged.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(merged[k].to(v.dtype), v) or (v.is_floating_point() and torch.isnan(v).any())


def test_mergekit_yaml_runs_and_equals_the_python_call(berts, tmp_path):
    config = tmp_path / "ties.yaml"
    config.write_text(f"""
merge_method: ties
base_model: {berts['base']}
models:
  - model: {berts['base']}
  - model: {berts['a']}
    parameters: {{weight: 0.7, density: 0.3}}
  - model: {berts['b']}
    parameters: {{weight: 0.3}}
parameters:
  density: 0.5
  lambda: 0.9
  normalize: true
  int8_mask: true
dtype: float32
""")
    kwargs = read_config(config)
    assert kwargs["models"] == [str(berts["a"]), str(berts["b"])] and kwargs["base"] == str(berts["base"])
    assert kwargs["weights"] == [0.7, 0.3] and kwargs["density"] == [0.3, 0.5] and kwargs["scale"] == 0.9
    from weightshare.merge.config import merge_from_config

    out = merge_from_config(config, tmp_path / "out")
    direct = ws.merge([berts["a"], berts["b"]], "ties", base=berts["base"], weights=[0.7, 0.3], density=[0.3, 0.5],
                      scale=0.9, normalize=True)
    written = load_file(out / "model.safetensors")
    for k in direct:
        assert torch.equal(written[k], direct[k])


def test_mergekit_yaml_problems_are_named_all_at_once(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("""
merge_method: ties
slices: []
chat_template: auto
models:
  - model: a
    parameters: {weight: [0.1, x], colour: 1}
parameters: {lambda: 1.0, t: 0.5}
dtype: float8
""")
    with pytest.raises(MergeError) as info:
        read_config(config)
    message = str(info.value)
    for part in ("models and slices: a config has one or the other", "'chat_template'",
                 "models[0].parameters.weight", "models[0].parameters.colour",
                 "parameters.t", "float8"):
        assert part in message, part
    config.write_text("merge_method: frankenmerge\nmodels: [a]\n")
    with pytest.raises(MergeError, match="expected one of: .*linear"):
        read_config(config)


def test_slerp_yaml_takes_the_base_as_the_t0_end(berts, tmp_path):
    config = tmp_path / "slerp.yaml"
    config.write_text(json.dumps({"merge_method": "slerp", "base_model": str(berts["b"]),
                                  "models": [{"model": str(berts["a"])}, {"model": str(berts["b"])}],
                                  "parameters": {"t": 0.0}}))
    kwargs = read_config(config)
    assert kwargs["models"] == [str(berts["b"]), str(berts["a"])] and kwargs["base"] is None
    merged = ws.merge(**kwargs)
    b = load_file(berts["b"] / "model.safetensors")
    for k, v in b.items():
        torch.testing.assert_close(merged[k], v)


def test_cli_merge_checks_the_config_then_writes_a_model(berts, tmp_path):
    from weightshare.cli import main

    config = tmp_path / "linear.yaml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {berts['a']}\n  - model: {berts['b']}\n")
    assert main(["merge", str(config), "--dry-run"]) == 0
    assert main(["merge", str(config), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert main(["merge", str(config), "--out", str(tmp_path / "m")]) == 2  # never over a folder with files in it
    assert main(["merge", str(config)]) == 2


def test_a_required_parameter_is_named_before_anything_is_read(berts):
    with pytest.raises(MergeError, match="slerp needs the parameter 't'"):
        ws.merge([berts["a"], berts["b"]], "slerp")


def test_mergekit_linear_with_a_listed_base_averages_it_too(berts, tmp_path):
    config = tmp_path / "linear.yaml"
    config.write_text(f"merge_method: linear\nbase_model: {berts['base']}\nmodels:\n"
                      f"  - model: {berts['base']}\n  - model: {berts['a']}\n  - model: {berts['b']}\n")
    kwargs = read_config(config)
    assert kwargs["models"] == [str(berts[k]) for k in ("base", "a", "b")] and kwargs["base"] is None


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_elementwise_methods_merge_in_pieces_with_the_same_result(berts, tmp_path, monkeypatch, method):
    from weightshare.merge import streaming

    kwargs = dict(base=berts["base"]) if method == "task_arithmetic" else {}
    whole = ws.merge([berts["a"], berts["b"]], method, weights=[0.3, 0.9], **kwargs)
    reads = []
    read = streaming._Model.read
    monkeypatch.setattr(streaming._Model, "read", lambda self, name, start=None, stop=None:
                        reads.append((start, stop)) or read(self, name, start, stop))
    monkeypatch.setattr(streaming, "CHUNK", 37)  # pieces that do not divide the tensors
    pieces = ws.merge([berts["a"], berts["b"]], method, weights=[0.3, 0.9], **kwargs)
    out = ws.merge([berts["a"], berts["b"]], method, weights=[0.3, 0.9], out=tmp_path / "m", **kwargs)
    written = load_file(out / "model.safetensors")
    assert max(b - a for a, b in reads if a is not None) == 37  # no read is larger than a piece
    for k in whole:
        assert torch.equal(whole[k], pieces[k]) and torch.equal(whole[k], written[k])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.integers(1, 50), st.integers(0, 3), st.data())
def test_kth_largest_by_radix_select_is_the_sorted_value(n, piece, distinct, data):
    from weightshare.merge.sparsify import kth_largest

    g = torch.Generator().manual_seed(n * 7 + piece)
    # few distinct values (ties, zeros) or continuous ones; any piece size
    x = (torch.randint(0, distinct + 1, (n,), generator=g).float() if distinct else torch.rand(n, generator=g) * 10)
    k = data.draw(st.integers(1, n))
    with patch("weightshare.merge.sparsify.SORT_BELOW", data.draw(st.sampled_from([0, 1 << 14]))):  # radix, or sort
        got = kth_largest(lambda: iter(x.split(piece)), n, k)
    assert got == float(x.sort(descending=True).values[k - 1])


PREPARED = [  # every method that streams a large tensor through its prepare hook: (method, parameters, exact)
    pytest.param("ties", dict(weights=[0.7, 0.4], density=[0.3, 0.6]), True, id="ties"),
    pytest.param("ties", dict(weights=[0.7, 0.4], density=[0.3, 0.6], rescale=True), False, id="ties-rescale"),
    pytest.param("dare_linear", dict(weights=[0.7, 0.4], density=[0.3, 0.6], seed=5), False, id="dare_linear"),
    pytest.param("dare_linear", dict(weights=[0.7, 0.4], density=[0.3, 0.6], seed=5, rescale=False), True,
                 id="dare_linear-no-rescale"),
    pytest.param("dare_ties", dict(weights=[0.7, 0.4], density=[0.3, 1.0], seed=5), False, id="dare_ties"),
    pytest.param("breadcrumbs", dict(weights=[0.7, 0.4], density=[0.3, 0.6], gamma=[0.05, 0.0]), True,
                 id="breadcrumbs"),
    pytest.param("breadcrumbs_ties", dict(weights=[0.7, 0.4], density=[0.3, 0.6], gamma=0.02, rescale=True), False,
                 id="breadcrumbs_ties-rescale"),
    pytest.param("della", dict(weights=[0.7, 0.4], density=[0.3, 0.6], epsilon=0.1, seed=2), False, id="della"),
    pytest.param("della_linear", dict(weights=[0.7, 0.4], density=[0.3, 0.6], rescale=False), True,
                 id="della_linear-no-rescale"),
    pytest.param("slerp", dict(t=0.3), False, id="slerp"),
    pytest.param("model_stock", dict(filter_wise=False), False, id="model_stock"),
    pytest.param("model_stock", dict(filter_wise=True), False, id="model_stock-filter_wise"),
    pytest.param("nuslerp", dict(weights=[0.4, 0.6]), False, id="nuslerp"),
    pytest.param("multislerp", dict(weights=[1.0, 2.0]), False, id="multislerp"),
    pytest.param("karcher", dict(max_iter=20), False, id="karcher"),
    pytest.param("ramplus_tl", dict(r=0.3, alpha=0.5), True, id="ramplus_tl"),
    pytest.param("ram", dict(), True, id="ram"),
    pytest.param("nearswap", dict(t=0.01), True, id="nearswap"),
]


@pytest.mark.parametrize("method, params, exact", PREPARED)
def test_prepared_methods_merge_large_tensors_piece_by_piece_with_the_same_result(berts, tmp_path, monkeypatch,
                                                                                 method, params, exact):
    from weightshare.merge import streaming

    spec = MERGE_METHODS[method]
    models = [berts["a"]] if spec.models[1] == 1 else [berts["a"], berts["b"]]
    kwargs = dict(params, base=berts["base"]) if spec.uses_base else dict(params)
    whole = ws.merge(models, method, **kwargs)
    reads = []
    read = streaming._Model.read
    monkeypatch.setattr(streaming._Model, "read", lambda self, name, start=None, stop=None:
                        reads.append((name, start, stop)) or read(self, name, start, stop))
    monkeypatch.setattr(streaming, "CHUNK", 53)  # pieces that cut the rows (16 or 32 entries) model stock needs
    pieces = ws.merge(models, method, **kwargs)
    written = load_file(ws.merge(models, method, out=tmp_path / "m", **kwargs) / "model.safetensors")
    large = {k for k, v in whole.items() if v.numel() > 53}
    assert large and any(start is None for _, start, _ in reads)  # small tensors are still read whole
    assert all(start is not None and stop - start <= 53 for name, start, stop in reads if name in large)
    if MERGE_METHODS[method].rows:  # DELLA ranks within rows: every piece holds whole rows
        assert all(start % row_length(whole[name].shape) == 0 == stop % row_length(whole[name].shape)
                   for name, start, stop in reads if name in large)
    for k in whole:
        assert torch.equal(pieces[k], written[k]), k
        if exact:
            assert torch.equal(whole[k], pieces[k]), k
        else:  # float statistics (norms, dots) summed in another order over pieces: equal up to rounding
            assert torch.allclose(whole[k], pieces[k], rtol=1e-5, atol=1e-7), k


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 3000), st.data())
def test_dare_mask_stream_draws_any_span_as_the_whole_draw_does(numel, data):
    from unittest import mock

    from weightshare.merge import sparsify

    seed = data.draw(st.integers(0, 2**31 - 1))
    whole = torch.rand(numel, generator=sparsify.mask_generator(seed, "layer.weight", 1))
    cuts = sorted(data.draw(st.lists(st.integers(0, numel), max_size=6)))
    spans = list(zip([0, *cuts], [*cuts, numel]))
    # every span in any order, then some asked again
    asked = data.draw(st.permutations(spans)) + data.draw(st.lists(st.sampled_from(spans), max_size=3))
    stream = sparsify.MaskStream(seed, "layer.weight", 1)
    with mock.patch.object(sparsify, "_SKIP", data.draw(st.integers(1, 64))):  # skipping ahead in several draws
        for start, stop in asked:
            assert torch.equal(stream.uniform(start, stop), whole[start:stop]), (start, stop)


@pytest.mark.parametrize("method", ["tsv_merge", "iso_c"])
def test_svd_methods_stream_what_no_svd_needs_and_merge_changed_matrices_whole(monkeypatch, method):
    from weightshare.merge import streaming

    g = torch.Generator().manual_seed(0)
    base = {"frozen.weight": torch.randn(30, 8, generator=g), "tuned.weight": torch.randn(30, 8, generator=g),
            "norm.weight": torch.randn(100, generator=g)}
    models = [{**base, "tuned.weight": base["tuned.weight"] + torch.randn(30, 8, generator=g),
               "norm.weight": base["norm.weight"] + torch.randn(100, generator=g)} for _ in range(2)]
    whole = ws.merge(models, method, base=base, scale=1.2)
    reads = []
    read = streaming._Model.read
    monkeypatch.setattr(streaming._Model, "read", lambda self, name, start=None, stop=None:
                        reads.append((name, start)) or read(self, name, start, stop))
    monkeypatch.setattr(streaming, "CHUNK", 53)
    pieces = ws.merge(models, method, base=base, scale=1.2)
    assert {name for name, start in reads if start is None} == {"tuned.weight"}  # an SVD needs it whole
    assert torch.equal(pieces["frozen.weight"], base["frozen.weight"])  # changed by no model: the base's
    for k in whole:
        torch.testing.assert_close(pieces[k], whole[k], rtol=0, atol=0)


@pytest.mark.parametrize("method, per_model, glob", [
    ("breadcrumbs_ties", {"gamma": 0.05, "density": 0.6}, {"lambda": 1.2}),
    ("della_linear", {"epsilon": 0.1, "density": 0.5}, {"lambda": 0.8, "seed": 4}),
])
def test_mergekit_configs_of_breadcrumbs_and_della_equal_the_python_call(berts, tmp_path, method, per_model, glob):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"merge_method": method, "base_model": str(berts["base"]),
                                  "models": [{"model": str(berts["a"]), "parameters": {"weight": 0.6, **per_model}},
                                             {"model": str(berts["b"]), "parameters": {"weight": 0.4}}],
                                  "parameters": glob}))
    got = ws.merge(**read_config(config))
    other = {k: [v, MERGE_METHODS[method].model_params[k]] for k, v in per_model.items()}
    want = ws.merge([berts["a"], berts["b"]], method, base=berts["base"], weights=[0.6, 0.4], **other,
                    **{"scale" if k == "lambda" else k: v for k, v in glob.items()})
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_merge_records_itself_and_its_dtype(berts, tmp_path):
    """The output's config.json names the merged dtype (transformers loads bf16 as bf16); mergekit_config.yml holds
    the merge with every parameter resolved and makes the same model again; the model card says how it was made."""
    from transformers import AutoModel

    from weightshare.merge.config import merge_from_config

    out = ws.merge([berts["a"], berts["b"]], "ties", base=berts["base"], weights=[0.7, 0.3], density=[0.3, 0.5],
                   scale=0.9, dtype="bfloat16", out=tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert next(AutoModel.from_pretrained(out).parameters()).dtype == torch.bfloat16
    recorded = read_config(out / "mergekit_config.yml")
    assert recorded["method"] == "ties" and recorded["weights"] == [0.7, 0.3] and recorded["density"] == [0.3, 0.5]
    assert recorded["scale"] == 0.9 and recorded["normalize"] is True  # ties' default, resolved
    again = merge_from_config(out / "mergekit_config.yml", tmp_path / "again")
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    card = (out / "README.md").read_text()
    assert "ties" in card and str(berts["a"]) in card and "weightshare" in card


def test_a_filter_that_matches_no_tensor_warns_or_with_strict_is_refused(berts, tmp_path, caplog):
    """mergekit's SLERP example filters on self_attn / mlp, which a BERT has not: said, never silently ignored."""
    from weightshare.cli import main

    t = [{"filter": "self_attn", "value": 0.2}, {"filter": "attention", "value": 0.3}, {"value": 0.5}]
    with caplog.at_level("WARNING", logger="weightshare.merge.streaming"):
        plan = ws.merge([berts["a"], berts["b"]], "slerp", t=t, plan=True)
    assert plan["encoder.layer.0.attention.self.query.weight"]["t"] == 0.3
    assert "t[0].filter 'self_attn' matches no tensor name" in caplog.text and "attention'" not in caplog.text
    with pytest.raises(MergeError, match="t\\[0\\].filter 'self_attn'"):
        ws.merge([berts["a"], berts["b"]], "slerp", t=t, plan=True, strict=True)
    config = tmp_path / "slerp.yaml"
    config.write_text(json.dumps({"merge_method": "slerp", "base_model": str(berts["a"]),
                                  "models": [{"model": str(berts["a"])}, {"model": str(berts["b"])}],
                                  "parameters": {"t": t}}))
    assert main(["merge", str(config), "--dry-run", "--strict"]) == 2
    assert main(["merge", str(config), "--out", str(tmp_path / "m"), "--strict"]) == 2
    assert not (tmp_path / "m").exists()
    assert main(["--quiet", "merge", str(config), "--out", str(tmp_path / "m")]) == 0
