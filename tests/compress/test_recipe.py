"""compress --recipe: per-layer bits and granularity, dense layers, settings; checked before any work."""

from __future__ import annotations

import pytest
import torch

from weightshare.cli import main
from weightshare.compress.recipe import read_recipe
from weightshare.pack import read_spec


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("recipe")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(root / "bert")
    return root / "bert"


def _write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


RECIPE = """\
bits: 2
calibration: none
layers:
  - match: "encoder.layer.*.attention.self.*"
    bits: 4
    granularity: per_group
    group_size: 16
  - match: "encoder.layer.0.*"
    bits: 3
dense: [pooler.dense]
"""


def test_a_recipe_sets_each_layers_bits_and_keeps_dense_ones(bert_dir, tmp_path):
    recipe = _write(tmp_path, RECIPE)
    assert main(["--quiet", "compress", str(bert_dir), "--recipe", str(recipe), "--out", str(tmp_path / "out")]) == 0
    spec, _ = read_spec(tmp_path / "out")
    entries = spec["tensors"]
    assert entries["pooler.dense.weight"]["map"] == "dense"
    for layer in (0, 1):
        for proj in ("query", "key", "value"):  # the first matching entry wins over layers[1]
            cfg = entries[f"encoder.layer.{layer}.attention.self.{proj}.weight"]["config"]
            assert (cfg["bits"], cfg["granularity"], cfg["group_size"]) == (4, "per_group", 16)
    assert entries["encoder.layer.0.intermediate.dense.weight"]["config"]["bits"] == 3
    assert entries["encoder.layer.1.intermediate.dense.weight"]["config"]["bits"] == 2
    assert entries["embeddings.word_embeddings.weight"]["config"]["bits"] == 2


@pytest.mark.parametrize("text,match", [
    ("bits: 3\nlayer: []\n", "unknown key 'layer'"),
    ("layers:\n  - match: x\n    bits: 12\n", r"layers\[0\]: bits must be an integer in 1..8"),
    ("layers:\n  - match: x\n    group: 4\n", r"layers\[0\]: unknown keys \['group'\]"),
    ("layers:\n  - bits: 3\n", r"layers\[0\]: expected \{match: GLOB"),
    ("layers:\n  - {match: x, bits: 3}\ntarget_size: 8MB\n", "the budget chooses every width"),
    ("dense: 3\n", "dense: expected a list"),
    ("outliers: 0.9\n", "outliers: 0.9, expected a fraction"),
    ("method: rtn\n", "method: 'rtn', expected gptq or wkmeans"),
    ("[1, 2]\n", "expected: a mapping"),
    ("bits: [\n", "not a readable YAML file"),
])
def test_a_bad_recipe_is_one_error_naming_the_key(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        read_recipe(_write(tmp_path, text))


@pytest.mark.parametrize("text,match", [
    ("calibration: none\nlayers:\n  - {match: 'encoder.layer.9.*', bits: 3}\n",
     r"layers\[0\]\.match 'encoder.layer.9.\*' matches no layer"),
    ("calibration: none\ndense: [pooler]\n", r"dense\[0\] 'pooler' matches no layer"),
])
def test_a_recipe_naming_missing_layers_fails_before_any_work(bert_dir, tmp_path, capsys, text, match):
    recipe = _write(tmp_path, text)
    code = main(["compress", str(bert_dir), "--recipe", str(recipe), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    import re

    assert re.search(match, err) and "layers are named like: embeddings.word_embeddings" in err
    assert not (tmp_path / "out").exists()


def test_the_readme_recipe_reads_and_fits_minilm(tmp_path, minilm_path):
    import re
    from pathlib import Path

    from weightshare import hub
    from weightshare.compress import is_compressible
    from weightshare.compress.recipe import resolve
    from weightshare.sharing.codebook import CodebookConfig

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "dense:" in b]
    recipe = read_recipe(_write(tmp_path, block))
    model = hub.load_pretrained(minilm_path)
    configs, dense = resolve(recipe, hub.inner_model(model), recipe.base_config(CodebookConfig()), is_compressible)
    assert dense == {"pooler.dense"}
    assert configs["encoder.layer.5.attention.self.value"].bits == 4
    assert configs["embeddings.word_embeddings"].group_size == 64 and configs["embeddings.word_embeddings"].bits == 3
