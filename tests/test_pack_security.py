"""A packed model is untrusted input: hand-written attacks and the write discipline of save/export.

The property-based mutations live in test_fuzz_pack.py; here each known way in
gets its own readable case, plus what a user sees on disk (modes, sharding,
folders that appear whole or not at all).
"""

import json
import logging
import os
import shutil
import stat

import pytest
import torch

import weightshare as ws
from tests import fuzz_helpers as fh
from weightshare import io
from weightshare.cli import main
from weightshare.pack import FILENAME


@pytest.fixture(scope="module")
def bert_packed(tmp_path_factory):
    """A tiny BERT saved by transformers (in two shards) and compressed by the CLI."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=32))
    model.save_pretrained(root / "src", max_shard_size="40KB")  # a sharded source, as big checkpoints are
    assert (root / "src" / "model.safetensors.index.json").is_file()
    assert main(["--quiet", "compress", str(root / "src"), "--bits", "3", "--out", str(root / "packed")]) == 0
    return root / "packed"


def _snapshot(root):
    """Every file under ``root``: path -> (size, mtime_ns, mode, bytes of small files)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            p = os.path.join(folder, name)
            st = os.lstat(p)
            data = open(p, "rb").read() if stat.S_ISREG(st.st_mode) and st.st_size < 1 << 20 else None
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, st.st_mode, data)
    return out


@pytest.fixture
def sandbox(bert_packed, tmp_path):
    """A copy of the packed model beside a victim model folder, and the state of everything around it."""
    shutil.copytree(bert_packed, tmp_path / "packed")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "model.safetensors").write_bytes(b"the victim's weights")
    return tmp_path


def _edit_spec(path, fn):
    # an attacker rewrites the spec's checksum too: what is tested here is every defence behind it
    fh.rewrite_packed(path, lambda tensors, spec: fn(spec))


def _set_subdir(value):
    return lambda spec: spec["source"].update(weights_subdir=value)


ESCAPES = ["/etc", "../victim", "..", "a/../../victim", "victim/../..", "C:\\victim", "\\\\server\\share", "C:victim",
           "x" * 300, "a\0b"]


@pytest.mark.parametrize("subdir", ESCAPES)
def test_weights_subdir_that_escapes_is_refused_and_nothing_is_written(sandbox, subdir):
    packed = sandbox / "packed"
    _edit_spec(packed, _set_subdir(subdir))
    before = _snapshot(sandbox)
    with pytest.raises(ws.PackError, match="weights_subdir"):
        ws.load(packed)
    with pytest.raises(ws.PackError, match="weights_subdir"):
        ws.export(packed, sandbox / "out")
    assert _snapshot(sandbox) == before  # not a byte anywhere, the export destination included


def test_weights_subdir_through_a_symlink_out_is_refused(sandbox):
    packed = sandbox / "packed"
    shutil.copy(packed / "config.json", sandbox / "victim" / "config.json")
    os.symlink(sandbox / "victim", packed / "sub")
    _edit_spec(packed, _set_subdir("sub"))
    before = _snapshot(sandbox)
    with pytest.raises(ws.PackError, match="through a symlink"):
        ws.load(packed)
    with pytest.raises(ws.PackError, match="through a symlink"):
        ws.export(packed, sandbox / "out")
    assert _snapshot(sandbox) == before


def test_export_refuses_a_file_linked_from_outside(sandbox):
    packed = sandbox / "packed"
    (sandbox / "secret.txt").write_text("not for export")
    os.symlink(sandbox / "secret.txt", packed / "tokenizer.json")
    before = _snapshot(sandbox)
    with pytest.raises(ws.PackError, match="leads out of the packed model"):
        ws.export(packed, sandbox / "out")
    assert _snapshot(sandbox) == before and not (sandbox / "out").exists()


def test_load_writes_nothing_and_rebuilds_exactly(sandbox, bert_packed):
    from transformers import BertModel

    before = _snapshot(sandbox)
    model = ws.load(sandbox / "packed")
    assert _snapshot(sandbox) == before
    assert type(model) is BertModel
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    # the unsaved buffers come from the architecture's own constructor, as from_pretrained gives them
    assert torch.equal(model.embeddings.position_ids, torch.arange(32)[None])
    exported = ws.export(bert_packed, sandbox / "dense")
    dense = BertModel.from_pretrained(str(exported))
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():  # the packed kernel sums in another order than F.linear
        assert torch.allclose(model(ids).last_hidden_state, dense(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_a_claimed_huge_weight_is_refused_before_allocation(sandbox):
    packed = sandbox / "packed"
    name = "encoder.layer.0.output.dense.weight"
    _edit_spec(packed, lambda s: s["tensors"][name].update(shape=[10**9, 10**9]))
    with pytest.raises(ws.PackError, match=f"{name}.__tables'?: wrong shape"):
        ws.load(packed)
    _edit_spec(packed, lambda s: s["tensors"][name].update(shape=[2**63, 1]))
    with pytest.raises(ws.PackError, match="bad shape"):
        ws.load(packed)


@pytest.mark.parametrize("field,value,match", [
    ("num_hidden_layers", 10**6, "num_hidden_layers = 1000000"),  # would build a million layers
    ("max_position_embeddings", 10**9, "unsaved buffers"),  # would allocate position ids for 10^9 tokens
    ("model_type", "no-such-model", "unknown model_type"),
    ("hidden_size", 33, "does not match|cannot build"),
])
def test_a_hostile_config_is_one_pack_error(sandbox, field, value, match):
    packed = sandbox / "packed"
    config = json.loads((packed / "config.json").read_text())
    config[field] = value
    (packed / "config.json").write_text(json.dumps(config))
    with pytest.raises(ws.PackError, match=match):
        ws.load(packed)


@pytest.mark.parametrize("arch", [["os.system"], ["pipeline"], "BertModel", [3]])
def test_architectures_naming_no_transformers_model_class_falls_back_to_automodel(sandbox, arch):
    from transformers import BertModel

    packed = sandbox / "packed"
    config = json.loads((packed / "config.json").read_text())
    config["architectures"] = arch  # nothing but a transformers model class is ever looked up or called
    (packed / "config.json").write_text(json.dumps(config))
    assert type(ws.load(packed)) is BertModel


def test_sentence_transformers_module_types_outside_its_package_are_refused(minilm_path, tmp_path):
    out = tmp_path / "st"
    assert main(["--quiet", "compress", minilm_path, "--bits", "2", "--data-free", "--granularity", "per_tensor",
                 "--out", str(out)]) == 0
    from sentence_transformers.models import Transformer

    model = ws.load(out)
    assert type(model[0]) is Transformer  # a plain Transformer module, as SentenceTransformer(dir) gives
    modules = json.loads((out / "modules.json").read_text())
    modules[1]["type"] = "os.system"
    (out / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ws.PackError, match="sentence_transformers class"):
        ws.load(out)


def test_packed_folder_from_a_sharded_source_has_no_stale_index(bert_packed):
    names = sorted(p.name for p in bert_packed.iterdir())
    assert FILENAME in names and not any("index" in n or n.startswith("model") for n in names)


def test_export_shards_like_save_pretrained(bert_packed, tmp_path):
    from transformers import BertModel

    out = ws.export(bert_packed, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert all((out / s).stat().st_size <= 20_000 + 4096 for s in shards)  # a shard passes the size only by one tensor
    one = ws.export(bert_packed, tmp_path / "single")
    assert not (one / "model.safetensors.index.json").exists() and (one / "model.safetensors").is_file()
    a, b = BertModel.from_pretrained(str(out)), BertModel.from_pretrained(str(one))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert main(["--quiet", "export", str(bert_packed), "--out", str(tmp_path / "cli"),
                 "--max-shard-size", "20KB"]) == 0
    assert (tmp_path / "cli" / "model.safetensors.index.json").is_file()


def test_compress_refuses_an_index_naming_missing_shards(bert_packed, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    src = tmp_path / "src"
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(src, max_shard_size="40KB")
    next(src.glob("model-*.safetensors")).unlink()
    assert main(["--quiet", "compress", str(src), "--bits", "3", "--out", str(tmp_path / "o")]) == 2
    assert "names shard files that are not there" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_get_the_umask_mode(bert_packed, tmp_path, umask_022):
    out = ws.export(bert_packed, tmp_path / "dense")
    for p in [*bert_packed.rglob("*"), *out.rglob("*")]:
        want = 0o755 if p.is_dir() else 0o644
        assert stat.S_IMODE(p.stat().st_mode) == want, p
    assert stat.S_IMODE(bert_packed.stat().st_mode) == 0o755


def test_a_failed_save_leaves_the_old_model_or_none(tmp_path, monkeypatch):
    from tests.conftest import TinyNet

    net = ws.share_(TinyNet(), ws.CodebookConfig(bits=2))
    old = ws.save(net, tmp_path / "m")
    before = _snapshot(tmp_path)

    def crash(path, entries, tensors, metadata=None):  # the file is written in part, then the process dies
        with open(path, "wb") as f:
            f.write(b"half a header")
        raise OSError("killed mid-write")

    monkeypatch.setattr(io, "write_safetensors", crash)
    with pytest.raises(OSError):
        ws.save(net, old)  # replacing: the old folder stays as it was
    with pytest.raises(OSError):
        ws.save(net, tmp_path / "new")  # a new folder: none at all, not a half one
    assert _snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_replacing_a_packed_model_swaps_the_whole_folder(tmp_path):
    from tests.conftest import TinyNet

    ws.save(ws.share_(TinyNet(), ws.CodebookConfig(bits=2)), tmp_path / "m")
    (tmp_path / "m" / "stale.txt").write_text("from the old model")
    net = ws.share_(TinyNet(), ws.CodebookConfig(bits=3))
    ws.save(net, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [FILENAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary sibling left
    loaded = ws.load(tmp_path / "m", model=TinyNet())
    assert torch.equal(loaded.fc1.weight, net.fc1.weight)


def test_tables_that_cost_more_than_indices_warn_with_the_way_out(caplog):
    lin = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with caplog.at_level(logging.WARNING, logger="weightshare"):
        ws.share_(lin, ws.CodebookConfig(bits=4, granularity="per_group", group_size=32))
    assert "the tables cost 8.00 bits per weight on top of the 4-bit indices (12.00 bits per weight in all); " \
           "use --group-size 64 or larger" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="weightshare"):
        ws.share_(torch.nn.Sequential(torch.nn.Linear(64, 64)), ws.CodebookConfig(bits=4, granularity="per_group",
                                                                                  group_size=64))
    assert "tables cost" not in caplog.text


def test_an_alias_of_a_maps_internal_state_is_refused(tmp_path):
    # hash + codebook writes the codebook under "0.weight.__buckets"; an alias may not point inside it
    net = ws.share_(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)), ws.HashConfig(compression=1 / 2))
    ws.share_(net, ws.CodebookConfig(bits=2, granularity="per_tensor"))
    path = ws.save(net, tmp_path / "n")
    _edit_spec(path, lambda s: s["tensors"].update({"1.weight": {"map": "alias", "of": "0.weight.__buckets"}}))
    with pytest.raises(ws.PackError, match="alias of '0.weight.__buckets'"):
        ws.load(path, model=torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)))
    _edit_spec(path, lambda s: s["tensors"].update(
        {"1.weight.__extra": {"map": "dense", "shape": [1], "dtype": "float32"}}))
    with pytest.raises(ws.PackError):
        ws.load(path, model=torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)))


def test_a_map_nested_in_a_maps_state_goes_one_level_deep_only(tmp_path):
    net = ws.share_(torch.nn.Sequential(torch.nn.Linear(8, 8)), ws.HashConfig(compression=1 / 2))
    path = ws.save(net, tmp_path / "h")

    def nest_twice(spec):  # the buckets as a hash of their own, whose buckets are a hash again
        outer = spec["tensors"]["0.weight"]
        k = outer["buckets"]
        spec["tensors"]["0.weight.__buckets"] = {"map": "hash", "shape": [k], "dtype": "float32", "buckets": k,
                                                 "group": 1, "hash": "xxhash", "sign": False, "seed": 1}
        spec["tensors"]["0.weight.__buckets.__buckets"] = dict(spec["tensors"]["0.weight.__buckets"])

    _edit_spec(path, nest_twice)
    with pytest.raises(ws.PackError):
        ws.load(path, model=torch.nn.Sequential(torch.nn.Linear(8, 8)))


@pytest.mark.parametrize("plant", ["path out", "weights linked out"])
def test_export_refuses_side_module_weights_from_outside(sandbox, plant):
    # a sentence-transformers module besides the Transformer keeps its weights file: never one from elsewhere
    packed = sandbox / "packed"
    side = "../victim" if plant == "path out" else "2_Dense"
    if plant == "weights linked out":
        (packed / "2_Dense").mkdir()
        os.symlink(sandbox / "victim" / "model.safetensors", packed / "2_Dense" / "model.safetensors")
    (packed / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": side, "type": "sentence_transformers.models.Dense"}]))
    before = _snapshot(sandbox)
    with pytest.raises(ws.PackError, match="module path|leads out of the packed model"):
        ws.export(packed, sandbox / "out")
    assert _snapshot(sandbox) == before and not (sandbox / "out").exists()
