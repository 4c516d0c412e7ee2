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


def test_readme_cotrain_config_is_valid(tmp_path):
    from weightshare.cotrain import check, read_config

    text = (Path(__file__).parents[1] / "README.md").read_text()
    (config,) = re.findall(r"```yaml\n(.*?)```", text, re.S)
    (tmp_path / "cotrain.yaml").write_text(config)
    check(read_config(tmp_path / "cotrain.yaml"), world=2)  # every field and both workers' shared subsets
