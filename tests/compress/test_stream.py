"""Streaming compression (compress/stream.py): the packed file equals the in-memory path's byte for byte, the
model never exists whole in memory, and a bad checkpoint is one clear error with nothing written."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig

import weightshare as ws
from weightshare import pack
from weightshare.compress import compress
from weightshare.hub import write_random_pretrained

TINY = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            architectures=["LlamaForCausalLM"])


def _llama(path, tie: bool, shard: str | None = None, seed: int = 1, dtype=torch.bfloat16):
    write_random_pretrained(LlamaConfig(**TINY, tie_word_embeddings=tie), path, seed=seed, dtype=dtype,
                            **({"max_shard_size": shard} if shard else {}))
    return path


def _gpt2(path):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                               eos_token_id=0, architectures=["GPT2LMHeadModel"])).save_pretrained(path)
    return path


def _same_packed(src, tmp_path, config, calibration=None, reports=True, **kwargs):
    """Compress ``src`` streamed (the default) and whole: the same packed file, report and recipe."""
    streamed, rep_s, _ = compress(src, tmp_path / "streamed", config, calibration=calibration, **kwargs)
    whole, rep_w, _ = compress(src, tmp_path / "whole", config, calibration=calibration, stream=False, **kwargs)
    assert streamed is None and whole is not None  # the first streamed, the second did not
    a = (tmp_path / "streamed" / pack.FILENAME).read_bytes()
    b = (tmp_path / "whole" / pack.FILENAME).read_bytes()
    assert a == b
    if reports:
        assert (rep_s.params_virtual, rep_s.bytes_packed) == (rep_w.params_virtual, rep_w.bytes_packed)
    recipe = (tmp_path / "streamed" / "weightshare_recipe.yml").read_text()
    assert recipe == (tmp_path / "whole" / "weightshare_recipe.yml").read_text()
    assert not (tmp_path / "streamed" / pack.PackWriter.SCRATCH).exists()
    return tmp_path / "streamed"


@pytest.mark.parametrize("tie", [True, False])
def test_streamed_llama_equals_the_whole_model_path(tmp_path, tie):
    """A bf16 Llama in three shards, its LM head tied or not: same file, and it loads and runs like the other."""
    src = _llama(tmp_path / "src", tie, shard="60KB")
    assert (src / "model.safetensors.index.json").is_file()
    out = _same_packed(src, tmp_path, ws.CodebookConfig(bits=3, granularity="per_channel"))
    if tie:
        assert pack.PackedFile(out).entries["lm_head.weight"] == {"map": "alias", "of": "model.embed_tokens.weight"}
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(ws.load(out)(ids).logits, ws.load(tmp_path / "whole")(ids).logits)


def test_streamed_gpt2_and_sentence_transformer(tmp_path, minilm_path):
    """Transposed weights (GPT-2's Conv1D) with a tied head; a sentence-transformers folder (weights in a module
    folder, tokenizer files copied)."""
    _same_packed(_gpt2(tmp_path / "gpt2"), tmp_path / "g", ws.CodebookConfig(bits=2, granularity="per_tensor"))
    out = _same_packed(minilm_path, tmp_path / "m", ws.CodebookConfig(bits=4, granularity="per_channel"))
    assert (out / "tokenizer.json").is_file() and (out / "modules.json").is_file()


def test_streamed_recipe_layers_and_dense(tmp_path):
    """A recipe's per-layer widths and dense layers stream too."""
    src = _llama(tmp_path / "src", tie=False)
    recipe = tmp_path / "r.yml"
    recipe.write_text("bits: 3\nlayers:\n  - match: '*.mlp.*'\n    bits: 2\n"
                      "dense: ['model.layers.0.self_attn.q_proj']\n")
    out = _same_packed(src, tmp_path, ws.CodebookConfig(bits=4), recipe=recipe)
    spec = pack.PackedFile(out).entries
    assert spec["model.layers.0.self_attn.q_proj.weight"]["map"] == "dense"
    assert spec["model.layers.1.mlp.up_proj.weight"]["config"]["bits"] == 2


def test_config_without_dtype_takes_the_checkpoints(tmp_path):
    """from_pretrained takes the checkpoint's dtype when config.json names none: the streamed model does too."""
    src = _llama(tmp_path / "src", tie=True, dtype=torch.float16)
    raw = json.loads((src / "config.json").read_text())
    raw.pop("dtype", None), raw.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps(raw))
    out = _same_packed(src, tmp_path, ws.CodebookConfig(bits=3))
    assert pack.PackedFile(out).entries["model.norm.weight"]["dtype"] == "float16"


def test_calibrated_work_loads_the_model_whole(tmp_path):
    src = _llama(tmp_path / "src", tie=False)
    model, _, _ = compress(src, tmp_path / "o", ws.CodebookConfig(bits=3), calibration=None, avg_bits=3.5)
    assert model is not None  # a size budget needs every tensor first
    with pytest.raises(ValueError, match="cannot stream .*size budget"):
        compress(src, tmp_path / "p", ws.CodebookConfig(bits=3), calibration=None, avg_bits=3.5, stream=True)
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------- bad input


def _no_output(tmp_path, out="o"):
    assert not (tmp_path / out).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out}.")]  # no staging folder left


def test_truncated_shard_names_the_shard(tmp_path):
    src = _llama(tmp_path / "src", tie=False, shard="60KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    with pytest.raises(ValueError, match=shard.name):
        compress(src, tmp_path / "o", ws.CodebookConfig(bits=3), calibration=None)
    _no_output(tmp_path)


def test_shard_cut_after_its_header_was_read(tmp_path, monkeypatch):
    """A shard that shrinks mid-run: the read fails naming it, and nothing is written."""
    src = _llama(tmp_path / "src", tie=False, shard="60KB")
    from weightshare.compress import stream

    opened = stream.open_source

    def cut_later(s):
        ss, why = opened(s)
        file = ss.tensors.where["model.layers.1.mlp.down_proj.weight"][0]
        with open(file, "r+b") as f:
            f.truncate(os.path.getsize(file) // 2)
        return ss, why

    monkeypatch.setattr(stream, "open_source", cut_later)
    with pytest.raises(ValueError, match="cut short"):
        compress(src, tmp_path / "o", ws.CodebookConfig(bits=3), calibration=None)
    _no_output(tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "missing.safetensors"])
def test_index_naming_files_outside_or_missing_is_refused(tmp_path, shard):
    src = _llama(tmp_path / "src", tie=False, shard="60KB")
    (tmp_path / "outside.safetensors").write_bytes((src / sorted(src.glob("model-*"))[0].name).read_bytes())
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside|escapes|relative|not there"):
        compress(src, tmp_path / "o", ws.CodebookConfig(bits=3), calibration=None)
    _no_output(tmp_path)


def test_checkpoint_and_config_disagree_on_a_shape(tmp_path):
    src = _llama(tmp_path / "src", tie=False)
    raw = json.loads((src / "config.json").read_text())
    raw["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight.*\n  expected: \((64, 96|96, 64)\)"):
        compress(src, tmp_path / "o", ws.CodebookConfig(bits=3), calibration=None)
    _no_output(tmp_path)


def test_full_disk_says_so_and_removes_the_output(tmp_path, monkeypatch):
    src = _llama(tmp_path / "src", tie=False)
    calls = []

    def full(self, key, t):
        calls.append(key)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, key, t)

    original = pack.PackWriter._store
    monkeypatch.setattr(pack.PackWriter, "_store", full)
    with pytest.raises(ValueError, match="disk is full"):
        compress(src, tmp_path / "o", ws.CodebookConfig(bits=3), calibration=None)
    _no_output(tmp_path)


# ----------------------------------------------------------------------------- memory

CHILD = """
import sys
import torch, transformers  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
import weightshare as ws
from transformers import LlamaConfig
from weightshare.bench.load import memory_kb, reset_peak_rss
from weightshare.compress import compress
from weightshare.hub import write_random_pretrained

tmp, stream = sys.argv[1], sys.argv[2] == "1"
big = LlamaConfig(vocab_size=4000, hidden_size=512, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8)
tiny = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
write_random_pretrained(big, f"{tmp}/big", seed=1)
write_random_pretrained(tiny, f"{tmp}/tiny", seed=1)
config = ws.CodebookConfig(bits=4, granularity="per_channel")
compress(f"{tmp}/tiny", f"{tmp}/t", config, calibration=None, stream=stream)  # imports and first use not counted
before = memory_kb()["VmRSS"]
reset_peak_rss()
compress(f"{tmp}/big", f"{tmp}/b", config, calibration=None, stream=stream)
print((memory_kb()["VmHWM"] - before) // 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux /proc only")
def test_streamed_peak_is_a_fraction_of_the_model(tmp_path):
    """A 47 M-parameter bf16 Llama (94 MB; no tensor above 4 MB) streams with about 40 MB of scratch (the
    clustering's float64 spans and threads), where the whole-model path holds all of it and more."""
    def peak(stream):
        out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / str(stream)), "1" if stream else "0"],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    streamed, whole = peak(True), peak(False)
    assert streamed < 60 and whole > 94, (streamed, whole)


def test_tied_weights_stored_twice_load_whole(tmp_path):
    """A checkpoint holding an LM head and an embedding its config ties, with different values: from_pretrained
    unties them, so streaming (which would tie them) leaves the decision to the whole-model path."""
    from safetensors.torch import load_file, save_file

    src = _llama(tmp_path / "src", tie=True)
    state = load_file(src / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].flip(0).contiguous()
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    model, _, _ = compress(src, tmp_path / "o", ws.CodebookConfig(bits=3), calibration=None)
    assert model is not None  # loaded whole
    whole, _, _ = compress(src, tmp_path / "w", ws.CodebookConfig(bits=3), calibration=None, stream=False)
    assert (tmp_path / "o" / pack.FILENAME).read_bytes() == (tmp_path / "w" / pack.FILENAME).read_bytes()


def test_a_tied_weight_half_dense_is_refused_on_both_paths(tmp_path):
    """Clustering a tied weight in one owner and not the other would write a file that does not load."""
    src = _llama(tmp_path / "src", tie=True)
    recipe = tmp_path / "r.yml"
    recipe.write_text("dense: [lm_head]\n")
    for stream in (None, False):
        with pytest.raises(ValueError, match="tied to"):
            compress(src, tmp_path / "o", ws.CodebookConfig(bits=3), calibration=None, recipe=recipe, stream=stream)
    _no_output(tmp_path)


def test_cli_max_shard_size_takes_binary_units(tmp_path):
    from weightshare.cli import main

    src = _llama(tmp_path / "src", tie=False)
    assert main(["--quiet", "compress", str(src), "--data-free", "--bits", "3", "--max-shard-size", "30KiB",
                 "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / pack.INDEX).is_file()
    assert len(list((tmp_path / "o").glob("weightshare-*-of-*.safetensors"))) > 1
