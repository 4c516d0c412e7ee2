"""tokenizer_source: models with different vocabularies merged in one output vocabulary, each token's
embedding row placed as mergekit places it, against rows computed by hand."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import weightshare as ws
from weightshare.merge import MergeError
from weightshare.merge.config import merge_from_config

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_with_vocab(path, words, seed):
    from transformers import AutoTokenizer, BertConfig, BertModel

    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(SPECIAL + words) + "\n")
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(SPECIAL) + len(words), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)).save_pretrained(path)
    AutoTokenizer.from_pretrained(path).save_pretrained(path)
    return path


@pytest.fixture()
def vocabs(tmp_path):
    return {"base": bert_with_vocab(tmp_path / "base", ["a", "b", "c"], 0),
            "x": bert_with_vocab(tmp_path / "x", ["a", "b", "c", "d"], 1),      # adds d
            "y": bert_with_vocab(tmp_path / "y", ["b", "a", "e", "c"], 2)}      # same words, other ids, adds e


EMB = "embeddings.word_embeddings.weight"


def rows(path):
    from transformers import AutoTokenizer

    table = load_file(path / "model.safetensors")[EMB]
    return {tok: table[i] for tok, i in AutoTokenizer.from_pretrained(path).get_vocab().items()}


def test_union_places_every_row_as_mergekit_does(vocabs, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    out = ws.merge([vocabs["x"], vocabs["y"]], "linear", weights=[1.0, 3.0], tokenizer_source="union",
                   out=tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    assert set(vocab) == set(SPECIAL + ["a", "b", "c", "d", "e"]) and sorted(vocab.values()) == list(range(10))
    got = load_file(out / "model.safetensors")[EMB]
    x, y = rows(vocabs["x"]), rows(vocabs["y"])
    for t in SPECIAL + ["a", "b", "c"]:  # both have it: the method on their own rows
        torch.testing.assert_close(got[vocab[t]], (x[t] + 3 * y[t]) / 4, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[vocab["d"]], x["d"], rtol=0, atol=1e-6)  # only x has d: x's row everywhere
    torch.testing.assert_close(got[vocab["e"]], y["e"], rtol=0, atol=1e-6)
    model = AutoModel.from_pretrained(out)
    assert model.config.vocab_size == 10
    ids = tok("a d e", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).last_hidden_state).all()


def test_base_vocabulary_and_a_task_vector_method(vocabs, tmp_path):
    # the base's vocabulary: y's rows remapped by token (its a and b swap places), d and e dropped
    got = ws.merge([vocabs["x"], vocabs["y"]], "task_arithmetic", base=vocabs["base"], tokenizer_source="base")
    b, x, y = rows(vocabs["base"]), rows(vocabs["x"]), rows(vocabs["y"])
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(vocabs["base"]).get_vocab()
    assert got[EMB].shape[0] == len(vocab) == 8
    for t in ("a", "b", "c"):
        torch.testing.assert_close(got[EMB][vocab[t]], b[t] + (x[t] - b[t]) + (y[t] - b[t]), rtol=0, atol=1e-5)


def test_a_config_with_tokenizer_source_runs_and_a_bad_one_is_named(vocabs, tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(json.dumps({"merge_method": "linear", "tokenizer_source": "union",
                                  "models": [{"model": str(vocabs["x"])}, {"model": str(vocabs["y"])}]}))
    out = merge_from_config(config, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 10
    assert "tokenizer_source" in (out / "mergekit_config.yml").read_text()
    with pytest.raises(MergeError, match="tokenizer_source: './nowhere' is neither base, union nor one of the models"):
        ws.merge([vocabs["x"], vocabs["y"]], "linear", tokenizer_source="./nowhere")
    (vocabs["y"] / "vocab.txt").unlink()
    for f in vocabs["y"].glob("tokenizer*"):
        f.unlink()
    with pytest.raises(MergeError, match=r"tokenizer_source: a model \(.*y\) has no tokenizer files"):
        ws.merge([vocabs["x"], vocabs["y"]], "linear", tokenizer_source="union")
