"""hub.write_random_pretrained: seeded random causal LMs written tensor by tensor, never built."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from weightshare.hub import random_tensors, write_random_pretrained


def small_llama(**kw):
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(**{**base, **kw})


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_loads_in_transformers_with_every_weight_and_the_seeded_values(tmp_path):
    cfg = small_llama()
    out = write_random_pretrained(cfg, tmp_path / "m", seed=3, max_shard_size=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # sharded as save_pretrained shards
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == ["LlamaForCausalLM"]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    state = model.state_dict()
    expected = random_tensors(cfg, seed=3)
    assert set(expected) == set(state)
    for name, t in expected.items():
        assert torch.equal(state[name], t.materialize()), name
    up = state["model.layers.0.mlp.up_proj.weight"].float()
    assert abs(up.std().item() - cfg.initializer_range) < 0.002 and abs(up.mean().item()) < 0.002
    assert torch.equal(state["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert not torch.equal(state["model.layers.0.mlp.up_proj.weight"], state["model.layers.1.mlp.up_proj.weight"])


def test_same_seed_same_bytes_and_values_independent_of_sharding(tmp_path):
    cfg = small_llama()
    a = write_random_pretrained(cfg, tmp_path / "a", seed=1, max_shard_size=60_000)
    b = write_random_pretrained(cfg, tmp_path / "b", seed=1, max_shard_size=60_000)
    one = write_random_pretrained(cfg, tmp_path / "one", seed=1)
    other = write_random_pretrained(cfg, tmp_path / "other", seed=2)
    assert digest(a) == digest(b)
    assert sorted(p.name for p in one.iterdir()) == ["config.json", "model.safetensors"]
    sa, s1, s2 = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (a, one, other))
    assert all(torch.equal(sa[k], s1[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], s2["model.embed_tokens.weight"])


def test_tied_embeddings_are_written_once(tmp_path):
    cfg = small_llama(tie_word_embeddings=True)
    out = write_random_pretrained(cfg, tmp_path / "tied", seed=0)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_a_tensor_larger_than_one_piece_spans_pieces_and_the_model_is_never_built(tmp_path):
    """A 2048 x 8192 embedding is 4 pieces of 2**22 values; peak RSS while writing ~170 MB of weights grows
    by far less than the weights (the model would be 340 MB in float32)."""
    code = f"""
import resource, sys, torch
from transformers import LlamaConfig
import weightshare.hub as hub
cfg = LlamaConfig(vocab_size=8192, hidden_size=2048, intermediate_size=4096, num_hidden_layers=2,
                  num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True)
hub.random_tensors(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                               num_attention_heads=1))  # imports and first-use allocations before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
hub.write_random_pretrained(cfg, {str(tmp_path / 'big')!r}, seed=0, max_shard_size="100MB")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    grown_mb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True).stdout.split()[-1])
    total = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))
    assert total > 160e6
    assert grown_mb < 100, grown_mb
    emb = random_tensors(LlamaConfig(vocab_size=8192, hidden_size=2048, intermediate_size=4096,
                                     num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4,
                                     tie_word_embeddings=True))["model.embed_tokens.weight"]
    pieces = list(emb)
    assert len(pieces) == 4 and sum(p.numel() for p in pieces) == 8192 * 2048
    assert not torch.equal(pieces[0], pieces[1])  # one stream continued, not restarted per piece


@pytest.mark.parametrize("size", ["0", "lots"])
def test_an_unreadable_shard_size_is_refused_before_anything_is_written(tmp_path, size):
    with pytest.raises(ValueError):
        write_random_pretrained(small_llama(), tmp_path / "m", max_shard_size=size)
    assert not (tmp_path / "m").exists()
