"""Data-aware clustering: calibration statistics are exact, and they improve fidelity on real text."""

import copy

import pytest
import torch

import weightshare as ws
from weightshare.compress import compress_model_, importance_from_texts, read_texts
from weightshare.corpus import calibration_sentences, evaluation_sentences


@pytest.fixture(scope="module")
def minilm(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


def test_importance_is_second_moment_of_layer_inputs(minilm):
    inner = minilm[0].auto_model
    texts = calibration_sentences(12)
    imp = importance_from_texts(inner, minilm.tokenizer, texts, batch_size=5)
    batch = minilm.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = inner(**batch, output_hidden_states=True).hidden_states[0]  # input of layer 0's query
    x = hidden[batch["attention_mask"].bool()]  # (tokens, 384)
    second = (x * x).mean(0)
    expect = second + 1e-3 * second.mean() + 1e-12
    q = imp["encoder.layer.0.attention.self.query.weight"]
    assert q.shape == (384, 384)
    assert torch.allclose(q[0], expect, rtol=1e-4)
    assert torch.equal(q[0], q[100])  # one value per input feature, shared by all rows
    emb = imp["embeddings.word_embeddings.weight"]
    cls = minilm.tokenizer.cls_token_id
    assert emb[cls, 0] == 1 + len(texts)  # [CLS] once per text, plus the floor of 1


def test_calibration_improves_fidelity_on_held_out_text(minilm):
    sentences = evaluation_sentences(150)
    ref = minilm.encode(sentences, convert_to_tensor=True)
    config = ws.CodebookConfig(bits=3, granularity="per_tensor")
    scores = []
    for calibration in (None, calibration_sentences(128)):
        model = compress_model_(copy.deepcopy(minilm), config, calibration, method="wkmeans")
        scores.append(
            torch.nn.functional.cosine_similarity(ref, model.encode(sentences, convert_to_tensor=True)).mean())
    assert scores[0] > 0.78  # data-free floor
    assert scores[1] > scores[0] + 0.01  # measured: 0.823 -> 0.844 on 300 sentences


def test_read_texts(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("one\n\n  two  \n")
    assert read_texts(f) == ["one", "two"]
    with pytest.raises(ValueError, match="not found"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no text lines"):
        read_texts(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_texts(tmp_path / "bin.txt")


def test_layers_fed_one_input_share_one_statistic(tmp_path):
    """A Llama block's q, k, v (and gate, up) take the very same tensor: their H is computed once and shared, and
    equals, bit for bit, the one each would get alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from weightshare.compress.calibrate import layer_statistics

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4))
    mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers.0" in n}
    batches = [{"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3])}
               for _ in range(3)]
    shared, tokens = layer_statistics(model, mods, batches)
    alone, tokens_alone = layer_statistics(model, mods, batches, share=False)
    assert tokens == tokens_alone and set(shared) == set(alone) == set(mods)
    for n in mods:
        assert torch.equal(shared[n], alone[n]), n
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert shared[attn + "k_proj"] is shared[attn + "q_proj"] is shared[attn + "v_proj"]
    assert shared[mlp + "up_proj"] is shared[mlp + "gate_proj"]
    assert shared[attn + "o_proj"] is not shared[attn + "q_proj"]


def test_layers_that_share_an_input_only_sometimes_are_measured_apart():
    """Two layers fed one tensor in the first batch and two equal copies later: measured again without sharing,
    the same statistics as computed apart."""
    from weightshare.compress.calibrate import layer_statistics

    class Toggle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

        def forward(self, x):  # the first batch has 5 rows, the others 6
            return self.a(x) + self.b(x if len(x) == 5 else x * 2)

    torch.manual_seed(0)
    net, batches = Toggle(), [torch.randn(5 if k == 0 else 6, 4) for k in range(3)]
    stats, _ = layer_statistics(net, {"a": net.a, "b": net.b}, batches)
    apart, _ = layer_statistics(net, {"a": net.a, "b": net.b}, batches, share=False)
    assert torch.equal(stats["a"], apart["a"]) and torch.equal(stats["b"], apart["b"])
    assert not torch.equal(stats["a"], stats["b"])
