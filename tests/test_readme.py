"""The README's Python example runs as written."""

import re
from pathlib import Path


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
    from weightshare.cotrain import check, read_config

    text = (Path(__file__).parents[1] / "README.md").read_text()
    (config,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "workers:" in b]
    (tmp_path / "cotrain.yaml").write_text(config)
    check(read_config(tmp_path / "cotrain.yaml"), world=2)  # every field and both workers' shared subsets


def test_readme_merge_config_is_read_as_mergekit_reads_it(tmp_path):
    from weightshare.merge import settings
    from weightshare.merge.config import read_config

    text = (Path(__file__).parents[1] / "README.md").read_text()
    (config,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "merge_method:" in b]
    (tmp_path / "merge.yaml").write_text(config)
    kwargs = read_config(tmp_path / "merge.yaml")  # checked without opening a model
    assert kwargs["models"] == ["./ft-a", "./ft-b"] and kwargs["dtype"] == "bfloat16"
    t = kwargs["t"]  # at layer 1 of 5 (t = 0.25): attention 0.5, mlp 0.5; a norm outside the stack: 0.5
    assert settings.resolve(t, "model.layers.1.self_attn.q_proj.weight", 0.25) == 0.5
    assert settings.resolve(t, "model.layers.2.mlp.up_proj.weight", 0.5) == 0.7
    assert settings.resolve(t, "model.norm.weight", 0.0) == 0.5
