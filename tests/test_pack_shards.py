"""Packed files in shards: ``weightshare-0000K-of-0000N.safetensors`` and ``weightshare.safetensors.index.json``.

A large packed file is split as save_pretrained splits a checkpoint; the shards hold the same tensors and
load into the same model as the one file.  The index is untrusted input like every other field: it is
fuzzed here (hypothesis mutations of its JSON), and every mutation is refused with a PackError or changes
nothing that is loaded.
"""

import copy
import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, LlamaConfig

import weightshare as ws
from tests import fuzz_helpers as fh
from weightshare import pack
from weightshare.compress import compress
from weightshare.hub import write_random_pretrained
from weightshare.report import report_file

TINY = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
IDS = torch.tensor([[1, 2, 3, 4, 5]])


def _shards(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("weightshare-"))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A tiny Llama packed whole and in shards (streamed and from the model held whole)."""
    root = tmp_path_factory.mktemp("shards")
    write_random_pretrained(LlamaConfig(**TINY, tie_word_embeddings=True), root / "src", seed=3)
    cfg = ws.CodebookConfig(bits=3)
    compress(root / "src", root / "one", cfg, calibration=None)
    compress(root / "src", root / "streamed", cfg, calibration=None, max_shard_size="30KB")
    compress(root / "src", root / "whole", cfg, calibration=None, stream=False, max_shard_size="30KB")
    return root


def test_shards_hold_what_the_one_file_holds(packed):
    shards = _shards(packed / "streamed")
    assert len(shards) >= 3 and shards == _shards(packed / "whole")
    assert not (packed / "streamed" / pack.FILENAME).exists()
    for name in shards + [pack.INDEX]:  # the streamed and the whole-model paths write the same files
        assert (packed / "streamed" / name).read_bytes() == (packed / "whole" / name).read_bytes()
    index = json.loads((packed / "streamed" / pack.INDEX).read_text())
    one = pack.PackedFile(packed / "one")
    assert sorted(index["weight_map"]) == sorted(one.infos)
    assert json.loads(index["metadata"]["spec"]) == one.spec
    config = json.loads((packed / "streamed" / "config.json").read_text())
    assert config["transformers_weights"] == pack.INDEX
    a, b = report_file(packed / "streamed"), report_file(packed / "one")
    assert (a.params_virtual, a.bytes_packed) == (b.params_virtual, b.bytes_packed)


def test_shards_load_export_and_run_like_the_one_file(packed, tmp_path):
    import weightshare.hf_quantizer  # noqa: F401  (registers the quantizer with transformers)

    with torch.no_grad():
        want = ws.load(packed / "one")(IDS).logits
        assert torch.equal(ws.load(packed / "streamed")(IDS).logits, want)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(packed / "streamed")(IDS).logits, want)
    ws.export(packed / "streamed", tmp_path / "a")
    ws.export(packed / "one", tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    merged = ws.merge([packed / "streamed", packed / "one"], "linear", weights=[0.5, 0.5])
    assert torch.equal(merged["model.norm.weight"], ws.merge([packed / "one"], "linear")["model.norm.weight"])


def test_a_packed_model_in_shards_is_replaced_whole(packed, tmp_path):
    """--out naming an earlier packed model in shards replaces it; its old shards do not linger."""
    out = tmp_path / "o"
    shutil.copytree(packed / "streamed", out)
    compress(packed / "src", out, ws.CodebookConfig(bits=2), calibration=None)
    assert (out / pack.FILENAME).is_file() and not _shards(out) and not (out / pack.INDEX).exists()


# ----------------------------------------------------------------------------- bad shards


def _copy(packed, tmp_path):
    dest = tmp_path / "p"
    shutil.copytree(packed / "streamed", dest)
    return dest


def _edit_index(folder, edit):
    index = json.loads((folder / pack.INDEX).read_text())
    edit(index)
    (folder / pack.INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("shard", ["../victim.safetensors", "/etc/passwd", "weightshare.safetensors",
                                   "weightshare-00001-of-00009.safetensors", "weightshare-00000-of-00004.safetensors",
                                   "sub/weightshare-00001-of-00004.safetensors", 7, None,
                                   "weightshare-\u0660\u0660\u0660\u0660\u0661-of-00004.safetensors"])
def test_index_naming_another_file_is_refused(packed, tmp_path, shard):
    folder = _copy(packed, tmp_path)
    (tmp_path / "victim.safetensors").write_bytes((folder / _shards(folder)[0]).read_bytes())
    _edit_index(folder, lambda ix: ix["weight_map"].__setitem__("model.norm.weight", shard))
    with pytest.raises(ws.PackError, match="shard of 'model.norm.weight'"):
        ws.load(folder)


def test_missing_symlinked_or_swapped_shards_are_refused(packed, tmp_path):
    folder = _copy(packed, tmp_path)
    first, second = _shards(folder)[:2]
    (folder / first).unlink()
    with pytest.raises(ws.PackError, match=f"the shard {first} is not a file"):
        ws.load(folder)
    os.symlink(folder / second, folder / first)
    with pytest.raises(ws.PackError, match=f"the shard {first} is not a file"):
        ws.load(folder)
    (folder / first).unlink()
    shutil.copy(folder / second, folder / first)  # two shards with the same tensors
    with pytest.raises(ws.PackError, match="holds other tensors than the index says"):
        ws.load(folder)


def test_truncated_shard_is_refused(packed, tmp_path):
    folder = _copy(packed, tmp_path)
    last = folder / _shards(folder)[-1]
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) - 3)
    with pytest.raises(ws.PackError, match=last.name):
        ws.load(folder)


# ----------------------------------------------------------------------------- fuzzing the index

SHARD_NAMES = ["weightshare-00001-of-00004.safetensors", "weightshare-00002-of-00004.safetensors",
               "weightshare-00004-of-00004.safetensors", "weightshare-00005-of-00004.safetensors",
               "weightshare-00001-of-00001.safetensors", "weightshare.safetensors", "../weightshare.safetensors",
               "/tmp/x.safetensors", "config.json", "", ".", "weightshare-1-of-4.safetensors"]


def _node(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@st.composite
def index_mutation(draw, index: dict):
    names = sorted(index["weight_map"])
    op = draw(st.sampled_from(["shard", "tensor", "generic", "generic"]))
    if op == "shard":  # a tensor moved to another (or an impossible) shard
        return fh.Replace(("weight_map", draw(st.sampled_from(names))), draw(st.sampled_from(SHARD_NAMES)
                                                                               | fh.json_values))
    if op == "tensor":  # a tensor the shards do not hold, or one dropped
        if draw(st.booleans()):
            return fh.AddKey(("weight_map",), draw(st.sampled_from(["x.weight", "model.norm.weight.__x", ""])),
                             draw(st.sampled_from(SHARD_NAMES)))
        return fh.Delete(("weight_map", draw(st.sampled_from(names))))
    paths = fh.all_paths(index)
    kind = draw(st.sampled_from(["replace", "delete", "add"]))
    if kind == "replace":  # any field, the spec string in the metadata included, to junk of any JSON type
        return fh.Replace(draw(st.sampled_from(paths)), draw(fh.json_values))
    if kind == "delete":
        return fh.Delete(draw(st.sampled_from(paths[1:])))
    dicts = [p for p in paths if isinstance(_node(index, p), dict)]
    return fh.AddKey(draw(st.sampled_from(dicts)), draw(fh.texts), draw(fh.json_values))


@pytest.fixture(scope="module")
def expected(packed):
    with torch.no_grad():
        return ws.load(packed / "one")(IDS).logits


@settings(max_examples=int(os.environ.get("WS_FUZZ_INDEX_EXAMPLES", "60")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], database=None)
@given(data=st.data())
def test_fuzz_index(packed, expected, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("fuzz") / "p"
    shutil.copytree(packed / "streamed", folder)
    index = json.loads((folder / pack.INDEX).read_text())
    mutations = data.draw(st.lists(index_mutation(index), min_size=1, max_size=3))
    mutated = fh.apply_spec_mutations(copy.deepcopy(index), mutations)
    (folder / pack.INDEX).write_text(json.dumps(mutated))
    before = {p.name: p.read_bytes() for p in folder.parent.rglob("*") if p.is_file()}
    try:
        with torch.no_grad():
            got = ws.load(folder)(IDS).logits
    except ws.PackError:
        got = None
    except Exception as exc:  # noqa: BLE001 (anything else escaping is the failure this test looks for)
        raise AssertionError(f"{type(exc).__name__}: {exc}\n  mutations: {mutations}") from None
    if got is not None:
        assert torch.equal(got, expected), mutations
    assert {p.name: p.read_bytes() for p in folder.parent.rglob("*") if p.is_file()} == before  # nothing written
