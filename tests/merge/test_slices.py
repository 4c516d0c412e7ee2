"""Frankenmerges (mergekit's ``slices`` and ``passthrough``): layer ranges of several models stacked into one,
against models built by hand, loaded back by transformers, from packed inputs, and refused clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import weightshare as ws
from tests.merge.test_merge import berts  # noqa: F401  (the tiny BERT checkpoints fixture)
from weightshare.merge import MergeError
from weightshare.merge.config import merge_from_config, read_config
from weightshare.merge.slices import is_after_stack, merge_slices


def layer(name: str, k: int, stack: str = "encoder.layer") -> str:
    return f"{stack}.{k}.{name}"


def by_hand(parts, stack="encoder.layer"):
    """The frankenmerge's state dict built directly: parts = [(state dict, first, end)], embeddings from the
    first part's model, what follows the stack (pooler, final norm, head) from the last part's."""
    out, k = {}, 0
    for sd, a, b in parts:
        for i in range(a, b):
            prefix = f"{stack}.{i}."
            for name, t in sd.items():
                if name.startswith(prefix):
                    out[f"{stack}.{k}.{name[len(prefix):]}"] = t
            k += 1
    first, last = parts[0][0], parts[-1][0]
    for name, t in first.items():
        if not name.startswith(stack + ".") and not is_after_stack(name):
            out[name] = t
    for name, t in last.items():
        if not name.startswith(stack + ".") and is_after_stack(name):
            out[name] = t
    return out


def test_a_bert_frankenmerge_matches_the_one_built_by_hand_and_loads(berts, tmp_path):  # noqa: F811
    from transformers import AutoModel

    config = tmp_path / "franken.yaml"
    config.write_text(json.dumps({"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(berts["a"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(berts["b"]), "layer_range": [1, 2]}]}]}))
    out = merge_from_config(config, tmp_path / "out")
    got = load_file(out / "model.safetensors")
    a, b = (load_file(berts[m] / "model.safetensors") for m in ("a", "b"))
    want = by_hand([(a, 0, 2), (b, 1, 2)])
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    model = AutoModel.from_pretrained(out)
    assert model.config.num_hidden_layers == 3 and len(model.encoder.layer) == 3
    assert "slices" in (out / "mergekit_config.yml").read_text()


def tiny_llama(seed: int, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))


def test_a_llama_frankenmerge_takes_embeddings_first_and_norm_and_head_last(tmp_path):
    from transformers import AutoModelForCausalLM

    for seed in (1, 2):
        tiny_llama(seed).save_pretrained(tmp_path / f"m{seed}")
    slices = [{"sources": [{"model": str(tmp_path / "m1"), "layer_range": [0, 2]}]},
              {"sources": [{"model": str(tmp_path / "m2"), "layer_range": [1, 3]}]},
              {"sources": [{"model": str(tmp_path / "m1"), "layer_range": [2, 3]}]}]
    out = merge_slices(slices, "passthrough", out=tmp_path / "out")
    m1, m2 = (load_file(tmp_path / f"m{s}" / "model.safetensors") for s in (1, 2))
    got = load_file(out / "model.safetensors")
    want = by_hand([(m1, 0, 2), (m2, 1, 3), (m1, 2, 3)], stack="model.layers")
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(got["lm_head.weight"], m1["lm_head.weight"])  # the last slice's model
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 5
    ids = torch.tensor([[1, 5, 7, 2]])
    assert torch.isfinite(model(ids).logits).all()


def test_slices_merged_with_a_method_and_gradients_run_over_each_slice(berts, tmp_path):  # noqa: F811
    a, b = (load_file(berts[m] / "model.safetensors") for m in ("a", "b"))
    slices = [{"sources": [{"model": str(berts["a"]), "layer_range": [0, 2], "parameters": {"weight": 1.0}},
                           {"model": str(berts["b"]), "layer_range": [0, 2], "parameters": {"weight": 3.0}}]},
              {"sources": [{"model": str(berts["a"]), "layer_range": [1, 2], "parameters": {"weight": 1.0}},
                           {"model": str(berts["b"]), "layer_range": [0, 1], "parameters": {"weight": 1.0}}]}]
    got = merge_slices(slices, "linear")
    name = "attention.output.dense.weight"
    for k, (i, j, wa, wb) in enumerate([(0, 0, 1, 3), (1, 1, 1, 3), (1, 0, 1, 1)]):
        want = (wa * a[layer(name, i)] + wb * b[layer(name, j)]) / (wa + wb)
        assert torch.allclose(got[layer(name, k)], want, atol=1e-6), k
    # passthrough's scale as a gradient: t = k / (L - 1) within the slice, the tensors outside the stack at 0
    got = merge_slices([{"sources": [{"model": str(berts["a"]), "layer_range": [0, 2]}],
                         "parameters": {"scale": [0.5, 1.0]}}], "passthrough")
    assert torch.allclose(got[layer(name, 0)], 0.5 * a[layer(name, 0)])
    assert torch.allclose(got[layer(name, 1)], a[layer(name, 1)])
    assert torch.allclose(got["embeddings.word_embeddings.weight"], 0.5 * a["embeddings.word_embeddings.weight"])


def test_a_packed_source_gives_its_decoded_layers(berts, tmp_path):  # noqa: F811
    from transformers import AutoModel

    from weightshare.load import export

    model = AutoModel.from_pretrained(berts["a"])
    ws.share_(model, ws.CodebookConfig(bits=3, granularity="per_channel"))
    packed = ws.save(model, tmp_path / "a-packed")
    dense = load_file(export(packed, tmp_path / "a-dense") / "model.safetensors")
    got = merge_slices([{"sources": [{"model": str(berts["b"]), "layer_range": [0, 1]}]},
                        {"sources": [{"model": str(packed), "layer_range": [1, 2]}]}], "passthrough")
    assert torch.equal(got[layer("output.dense.weight", 1)], dense[layer("output.dense.weight", 1)])
    assert torch.equal(got["pooler.dense.weight"], dense["pooler.dense.weight"])


def test_bad_slices_are_refused_naming_the_field_before_anything_is_read(berts, tmp_path):  # noqa: F811
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(tmp_path / "wide")
    a, b = str(berts["a"]), str(berts["b"])
    with pytest.raises(MergeError) as exc:
        merge_slices([{"sources": [{"model": a, "layer_range": [0, 3]}]},
                      {"sources": [{"model": a, "layer_range": [0, 1]}, {"model": b, "layer_range": [0, 2]}]},
                      {"sources": [{"model": str(tmp_path / "wide"), "layer_range": [0, 1]}]},
                      {"sources": [{"model": a, "layer_range": [1]}]}], "passthrough", out=tmp_path / "o")
    text = str(exc.value)
    assert "slices[0].sources[0].layer_range: [0, 3] is outside" in text and "layers [0, 2)" in text
    assert "slices[1].sources: every source of a slice gives the same number of layers; got [1, 2]" in text
    assert "slices[2].sources[0]: hidden size 32" in text
    assert "slices[3].sources[0].layer_range: expected two whole numbers" in text
    assert not (tmp_path / "o").exists()
    config = tmp_path / "both.yaml"
    config.write_text(json.dumps({"merge_method": "passthrough", "models": [{"model": a}],
                                  "slices": [{"sources": [{"model": a, "layer_range": [0, 1]}]}]}))
    with pytest.raises(MergeError, match="models and slices: a config has one or the other"):
        read_config(config)


def test_a_slice_base_must_be_one_of_its_sources(berts, tmp_path):  # noqa: F811
    with pytest.raises(MergeError, match=r"slices\[0\]: base_model .* is not one of this slice's sources"):
        merge_slices([{"sources": [{"model": str(berts["a"]), "layer_range": [0, 2]},
                                   {"model": str(berts["b"]), "layer_range": [0, 2]}]}],
                     "ties", base=str(berts["base"]), density=0.5)


def test_a_malformed_slices_config_names_every_field_at_once(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(json.dumps({"merge_method": "passthrough", "slices": [
        {"sources": "./a"},
        {"sources": [{"model": 3, "layer_range": [0, 1]}, {"model": "./a", "layer_range": [0, 1], "colour": 1}],
         "residual": 0.5}]}))
    with pytest.raises(MergeError) as exc:
        read_config(config)
    text = str(exc.value)
    for part in ("slices[0]: expected {sources: [{model: PATH, layer_range: [a, b]}]}, got {'sources': './a'}",
                 "slices[1]: unsupported keys ['residual']", "slices[1].sources[0]: expected {model: PATH",
                 "slices[1].sources[1]: unsupported keys ['colour']"):
        assert part in text, part
