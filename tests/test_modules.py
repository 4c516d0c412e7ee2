"""Packed modules: what ws.load builds by default, and where users already load models (transformers,
sentence-transformers).  Outputs are checked against the parametrized form (``trainable=True``), which
decodes the same tables and labels and multiplies with F.linear."""

from __future__ import annotations

import json

import pytest
import torch

import weightshare as ws
from weightshare.compress import compress
from weightshare.modules import CodebookEmbedding, CodebookLinear, PackedModule, set_compute_
from weightshare.pack import FILENAME, read_spec
from weightshare.sharing.codebook import CodebookConfig


@pytest.fixture(scope="module")
def mini4(minilm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("modules") / "mini4"
    compress(minilm_path, out, CodebookConfig(bits=4, granularity="per_channel"))
    return out


SENTENCES = ["Weight sharing maps many parameters into one small space.",
             "A packed model holds indices and tables, never fp32 weights.", "short"]


def test_minilm_loads_as_packed_modules_that_hold_no_dense_weight(mini4, minilm_path):
    from sentence_transformers import SentenceTransformer

    packed = ws.load(mini4)
    inner = packed[0].auto_model
    kinds = {type(m) for m in inner.modules()}
    assert CodebookLinear in kinds and CodebookEmbedding in kinds
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Embedding) for m in inner.modules())
    # no tensor the model holds has the size of a compressed weight in a float dtype
    dense = SentenceTransformer(minilm_path, device="cpu")[0].auto_model
    shapes = {tuple(m.weight.shape) for m in dense.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    shapes.discard((2, 384))  # token types: as small as a LayerNorm
    held = [t for m in inner.modules() for t in [*m._parameters.values(), *m._buffers.values(),
                                                 *((m.indices, m.tables) if isinstance(m, PackedModule) else ())]]
    assert not any(t is not None and t.is_floating_point() and tuple(t.shape) in shapes for t in held)
    rep = ws.report(packed)
    assert rep.bytes_in_memory <= 0.2 * rep.bytes_dense  # the target: weights held <= 0.2x


def test_packed_embeddings_equal_the_parametrized_models(mini4):
    packed, trainable = ws.load(mini4), ws.load(mini4, trainable=True)
    a = packed.encode(SENTENCES, convert_to_tensor=True)
    b = trainable.encode(SENTENCES, convert_to_tensor=True)
    assert float((a - b).abs().max()) < 1e-5


def test_save_of_a_packed_model_writes_the_same_packed_file(mini4, tmp_path):
    again = ws.save(ws.load(mini4), tmp_path / "again")
    spec0, tensors0 = read_spec(mini4)
    spec1, tensors1 = read_spec(again)
    assert spec0["tensors"] == spec1["tensors"]
    assert tensors0.keys() == tensors1.keys()
    assert all(torch.equal(tensors0[k], tensors1[k]) and tensors0[k].dtype == tensors1[k].dtype for k in tensors0)


def test_from_pretrained_sentence_transformers_and_pipelines_load_packed_modules(mini4):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, pipeline

    import weightshare  # noqa: F401  (registers the quantizer)

    config = json.loads((mini4 / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "weightshare"}
    assert config["transformers_weights"] == FILENAME
    model = AutoModel.from_pretrained(mini4)
    assert isinstance(model.encoder.layer[0].attention.self.query, CodebookLinear)
    ref = ws.load(mini4, trainable=True)
    st = SentenceTransformer(str(mini4), device="cpu")
    assert isinstance(st[0].auto_model.encoder.layer[5].output.dense, CodebookLinear)
    a = st.encode(SENTENCES, convert_to_tensor=True)
    assert float((a - ref.encode(SENTENCES, convert_to_tensor=True)).abs().max()) < 1e-5
    features = pipeline("feature-extraction", model=str(mini4), device="cpu")("hello world")
    assert torch.tensor(features).shape[-1] == 384


def test_from_pretrained_refuses_what_it_cannot_do_and_takes_set_compute(mini4, minilm_path):
    from transformers import AutoModel

    from weightshare.hf_quantizer import WeightshareConfig

    with pytest.raises(ValueError, match="cannot compress a model inside from_pretrained"):
        AutoModel.from_pretrained(minilm_path, quantization_config=WeightshareConfig())
    with pytest.raises(ValueError, match="run on the CPU"):
        AutoModel.from_pretrained(mini4, device_map="cuda")
    model = set_compute_(AutoModel.from_pretrained(mini4), "bf16")
    assert model.encoder.layer[0].attention.self.query.compute == "bf16"


def test_a_tampered_file_is_refused_by_from_pretrained_too(mini4, tmp_path):
    import shutil

    from transformers import AutoModel

    bad = tmp_path / "bad"
    shutil.copytree(mini4, bad)
    data = bytearray((bad / FILENAME).read_bytes())
    data[-100] ^= 0xFF  # one byte of the last stored tensor
    (bad / FILENAME).write_bytes(bytes(data))
    with pytest.raises(ws.PackError, match="checksum mismatch"):
        AutoModel.from_pretrained(bad)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_lms_with_tied_heads_generate_as_the_parametrized_model(tmp_path, arch):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":  # Conv1D layers, weights stored (in, out)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=300, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                             tie_word_embeddings=True, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(tmp_path / "src")
    compress(tmp_path / "src", tmp_path / "p", CodebookConfig(bits=3))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert isinstance(hf.lm_head, CodebookLinear) and hf.lm_head.indices is hf.get_input_embeddings().indices
    ref = ws.load(tmp_path / "p", trainable=True)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(hf.generate(ids[:1], max_new_tokens=6, do_sample=False),
                       ref.generate(ids[:1], max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("bits,granularity,group_size", [(1, "per_channel", None), (2, "per_tensor", None),
                                                         (3, "per_group", 8), (5, "per_channel", None),
                                                         (6, "per_group", 16), (8, "per_tensor", None),
                                                         (4, "per_group", 8)])
def test_every_width_and_granularity_runs_packed(tiny, tmp_path, bits, granularity, group_size):
    # groups of 8 do not fill an AVX-512 vector (that path falls back to portable C); fc2's rows hold 8 weights
    keep = (lambda m, name: name != "fc2") if group_size == 16 else None
    ws.share_(tiny, CodebookConfig(bits=bits, granularity=granularity, group_size=group_size), filter_fn=keep)
    path = ws.save(tiny, tmp_path / "t")
    from tests.conftest import TinyNet

    packed = ws.load(path, model=TinyNet())
    assert isinstance(packed.fc1, CodebookLinear) and isinstance(packed.emb, CodebookEmbedding)
    assert hasattr(packed.conv, "parametrizations")  # convolutions keep the parametrized form
    x = torch.randint(0, 50, (3, 6))
    assert torch.allclose(packed(x), tiny(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(packed.fc1.weight, tiny.fc1.weight)


def test_materialize_turns_packed_modules_back_into_plain_ones(tiny, tmp_path):
    from tests.conftest import TinyNet

    ws.share_(tiny, CodebookConfig(bits=3))
    packed = ws.load(ws.save(tiny, tmp_path / "t"), model=TinyNet())
    weight = packed.fc1.weight
    ws.materialize_(packed)
    assert type(packed.fc1) is torch.nn.Linear and type(packed.emb) is torch.nn.Embedding
    assert torch.equal(packed.fc1.weight, weight)
    x = torch.randint(0, 50, (2, 4))
    assert torch.allclose(packed(x), tiny(x), atol=1e-6)


def test_to_bfloat16_rounds_the_tables_and_outputs_follow_the_input(tiny, tmp_path):
    from tests.conftest import TinyNet

    ws.share_(tiny, CodebookConfig(bits=4))
    packed = ws.load(ws.save(tiny, tmp_path / "t"), model=TinyNet())
    before = packed.fc1.tables.clone()
    packed.to(torch.bfloat16)
    assert packed.fc1.tables.dtype == torch.float32 and packed.fc1.weight_dtype == torch.bfloat16
    assert torch.equal(packed.fc1.tables, before.bfloat16().float())
    assert packed.emb(torch.tensor([1, 2])).dtype == torch.bfloat16
    assert packed.fc1(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_set_compute_checks_its_argument(tiny, tmp_path):
    from tests.conftest import TinyNet

    ws.share_(tiny, CodebookConfig(bits=4))
    packed = ws.load(ws.save(tiny, tmp_path / "t"), model=TinyNet(), compute="bf16")
    assert packed.fc1.compute == "bf16"
    with pytest.raises(ValueError, match="compute"):
        set_compute_(packed, "fp8")


def test_an_embedding_that_renormalises_rows_keeps_the_parametrized_form(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8, max_norm=1.0), torch.nn.Linear(8, 4))
    ws.share_(model, CodebookConfig(bits=3))
    packed = ws.load(ws.save(model, tmp_path / "e"),
                     model=torch.nn.Sequential(torch.nn.Embedding(20, 8, max_norm=1.0), torch.nn.Linear(8, 4)))
    assert hasattr(packed[0], "parametrizations") and isinstance(packed[1], CodebookLinear)


def test_a_packed_module_compiles_without_graph_breaks(tiny, tmp_path):
    from tests.conftest import TinyNet

    ws.share_(tiny, CodebookConfig(bits=4))
    packed = ws.load(ws.save(tiny, tmp_path / "t"), model=TinyNet())
    x = torch.randn(3, 16)
    explained = torch._dynamo.explain(packed.fc1)(x)
    assert explained.graph_break_count == 0
    assert torch.allclose(torch.compile(packed.fc1, backend="eager")(x), tiny.fc1(x), rtol=1e-5, atol=1e-6)
