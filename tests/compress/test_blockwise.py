"""Calibrated compression one transformer block at a time (compress/blockwise.py): the packed file equals the
whole-model path's byte for byte, only one block is ever read at a time, and what cannot replay its blocks is
refused or loaded whole."""

import logging
import os
import random
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig

import weightshare as ws
from tests.compress.test_stream import _same_packed as same_packed
from weightshare.compress import blockwise, compress
from weightshare.hub import write_random_pretrained, write_word_tokenizer

WORDS = [f"w{i}" for i in range(280)]
TEXTS = [" ".join(random.Random(k).choice(WORDS) for _ in range(3 + k % 17)) for k in range(40)]


def _tokenizer(path):
    assert write_word_tokenizer(path, len(WORDS)) == WORDS  # ids 3..282


def _llama(path, tie: bool, layers: int = 3):
    write_random_pretrained(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=layers, num_attention_heads=4, tie_word_embeddings=tie,
                                        architectures=["LlamaForCausalLM"]),
                            path, seed=1, dtype=torch.bfloat16, max_shard_size="60KB")
    _tokenizer(path)
    return path


def _same_packed(src, tmp_path, config, **kwargs):
    return same_packed(src, tmp_path, config, calibration=TEXTS, **kwargs)


@pytest.mark.parametrize("tie", [True, False])
def test_blockwise_llama_equals_the_whole_model_path(tmp_path, tie):
    """A bf16 Llama in shards, its LM head tied (fit with the embedding) or its own (fit after the last block, on
    the replayed outputs): the same file, and it runs as the other does."""
    src = _llama(tmp_path / "src", tie)
    out = _same_packed(src, tmp_path, ws.CodebookConfig(bits=3, granularity="per_channel"))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(ws.load(out)(ids).logits, ws.load(tmp_path / "whole")(ids).logits)


def test_blockwise_one_block_llama(tmp_path):
    """One block: the codebook's own ParametrizationList (a ModuleList of length 1 after the embedding is
    clustered) is not taken for the stack of blocks by the whole-model path either."""
    _same_packed(_llama(tmp_path / "src", tie=True, layers=1), tmp_path, ws.CodebookConfig(bits=3))


def test_a_layer_stored_after_the_blocks_but_run_before_them(tmp_path):
    """Gemma 4 with per-layer inputs: its per_layer_model_projection is stored after the blocks and runs before
    them; it is fit first, as the whole-model path fits it.  Sharing keys and values across layers cannot be
    replayed: that model loads whole, with the reason."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma4TextConfig"):
        pytest.skip("this transformers has no Gemma 4")
    base = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=8,
                vocab_size_per_layer_input=300, pad_token_id=1, eos_token_id=2, bos_token_id=2,
                architectures=["Gemma4ForCausalLM"])
    src = tmp_path / "ple"
    write_random_pretrained(transformers.Gemma4TextConfig(**base, hidden_size_per_layer_input=8), src, seed=1,
                            dtype=torch.float32)
    _tokenizer(src)
    # the whole-model report counts 4 values more than the file's report (the layer_scalar buffers, one per block):
    # the files are compared, not the reports
    _same_packed(src, tmp_path / "a", ws.CodebookConfig(bits=3, granularity="per_channel"), reports=False)
    kv = tmp_path / "kv"
    write_random_pretrained(transformers.Gemma4TextConfig(
        **base, hidden_size_per_layer_input=0, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2), kv, seed=1, dtype=torch.float32)
    _tokenizer(kv)
    with pytest.raises(ValueError, match="num_kv_shared_layers"):
        compress(kv, tmp_path / "kv-out", ws.CodebookConfig(bits=3), calibration=TEXTS, stream=True)


def test_blockwise_with_outliers_and_per_group(tmp_path):
    src = _llama(tmp_path / "src", tie=False, layers=2)
    _same_packed(src, tmp_path, ws.CodebookConfig(bits=2, granularity="per_group", group_size=32), outliers=0.01)


def test_blockwise_gpt2(tmp_path):
    """GPT-2: Conv1D layers (transposed), blocks returning tuples, learned positions outside the blocks."""
    src = tmp_path / "src"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=2,
                               eos_token_id=2, architectures=["GPT2LMHeadModel"])).save_pretrained(src)
    _tokenizer(src)
    _same_packed(src, tmp_path, ws.CodebookConfig(bits=3, granularity="per_channel"))


def test_blockwise_sentence_transformer(tmp_path):
    """A sentence-transformers folder (BERT blocks, token type ids, a pooler after the blocks): the same file."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert)
    _tokenizer(bert)
    word = models.Transformer(str(bert), max_seq_length=64)
    SentenceTransformer(modules=[word, models.Pooling(32)], device="cpu").save(str(tmp_path / "st"))
    out = _same_packed(tmp_path / "st", tmp_path, ws.CodebookConfig(bits=3, granularity="per_channel"))
    a, b = SentenceTransformer(str(out), device="cpu"), SentenceTransformer(str(tmp_path / "whole"), device="cpu")
    assert torch.equal(a.encode(TEXTS[:4], convert_to_tensor=True), b.encode(TEXTS[:4], convert_to_tensor=True))


def test_work_that_cannot_go_block_by_block_loads_whole(tmp_path, caplog):
    """wkmeans weighs every layer in one pass; a folder without tokenizer files; table fine-tuning: each says why
    and loads the model whole (stream=True refuses instead)."""
    src = _llama(tmp_path / "src", tie=True, layers=1)
    config = ws.CodebookConfig(bits=3)
    with caplog.at_level(logging.INFO, logger="weightshare"):
        model, _, _ = compress(src, tmp_path / "a", config, calibration=TEXTS, method="wkmeans")
    assert model is not None and "wkmeans method weighs every layer" in caplog.text
    with pytest.raises(ValueError, match="table fine-tuning trains every table at once"):
        compress(src, tmp_path / "b", config, calibration=TEXTS, finetune_steps=2, stream=True)
    for f in src.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ValueError, match="no tokenizer files"):
        compress(src, tmp_path / "c", config, calibration=TEXTS, stream=True)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_replay_refuses_blocks_called_out_of_turn():
    """A forward that calls its blocks in another order than they are stacked cannot be replayed: one error that
    names the block and the way out, not a silently wrong input."""
    class Skipping(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, input_ids):
            x = input_ids.float()
            for j in (0, 2, 1):  # out of order
                x = self.layers[j](x)
            return x

    model, batch = Skipping(), {"input_ids": torch.ones(1, 4)}
    with blockwise._Replay(model, model.layers, 3, [torch.zeros(1, 4)], [batch]):
        with pytest.raises(RuntimeError, match=r"(?s)Linear 2 was called out of turn \(block 1 was due\).*"
                                               r"stream=False"):
            model(**batch)
    assert "forward" not in vars(model.layers[0])  # the blocks are themselves again
    with blockwise._Replay(model, model.layers, 2, [torch.full((1, 4), 7.0)], [batch]):
        with pytest.raises(RuntimeError, match="out of turn"):
            model(**batch)


CHILD = """
import sys
import torch, transformers  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
import weightshare as ws
from transformers import LlamaConfig
from weightshare.bench.load import memory_kb, reset_peak_rss
from weightshare.compress import blockwise, calibrate, compress
from weightshare.hub import write_random_pretrained
from weightshare.sharing.codebook import codebook_
sys.path.insert(0, sys.argv[3])  # this file's folder
from test_blockwise import TEXTS, _tokenizer

def cheap_fit(module, name, H, tokens, cfg, alternations, outliers):  # GPTQ's own scratch is the same on both paths
    codebook_(module, "weight", cfg, fqn=f"{name}.weight")
    return {}

blockwise.fit_layer_ = calibrate.fit_layer_ = cheap_fit
tmp = sys.argv[1]
big = LlamaConfig(vocab_size=300, hidden_size=512, intermediate_size=1024, num_hidden_layers=int(sys.argv[2]),
                  num_attention_heads=8, num_key_value_heads=8)
tiny = LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
for name, cfg in (("big", big), ("tiny", tiny)):
    write_random_pretrained(cfg, f"{tmp}/{name}", seed=1)
    _tokenizer(f"{tmp}/{name}")
config = ws.CodebookConfig(bits=2, granularity="per_tensor")
compress(f"{tmp}/tiny", f"{tmp}/t", config, calibration=TEXTS)  # imports and first use not counted
before = memory_kb()["VmRSS"]
reset_peak_rss()
compress(f"{tmp}/big", f"{tmp}/b", config, calibration=TEXTS)
print((memory_kb()["VmHWM"] - before) // 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux /proc only")
def test_blockwise_peak_does_not_grow_with_depth(tmp_path):
    """bf16 Llamas of 8 and 24 blocks (42 and 126 MB, one block 5 MB) calibrated block by block: the peak is one
    block's calibration statistics (its layers' H in float64, about 4 blocks of bf16 weights) and scratch, the same
    for both depths, and below the deeper model's size (the whole-model path holds all of it: 502 MB measured at 24
    blocks, in 5 times the time, as it runs the model from the start for each block; not run here).  Each layer's
    fit is replaced by a data-free one: GPTQ's own scratch is the same on both paths, and slow to run."""
    def peak(layers):
        out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / str(layers)), str(layers),
                              os.path.dirname(__file__)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    shallow, deep = peak(8), peak(24)
    assert deep - shallow < 30 and deep < 126, (shallow, deep)
