"""README, Extending weightshare: each plug-in shown there is one new file that is found and runs.

The package is copied, each README block is written at the path its fence names, and a fresh
interpreter with only that copy on its path uses the plug-in by name: nothing else is edited.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BLOCKS = dict(re.findall(r"```python title=(\S+)\n(.*?)```", (ROOT / "README.md").read_text(), re.S))

SHARING = """
import torch
from torch import nn
import weightshare as ws
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 6))
ws.share_(net, ws.ScaleConfig(alpha=2.0))
ws.share_(net, ws.CodebookConfig(bits=3, granularity="per_tensor"))  # a codebook stacked on theta
theta = net[0].parametrizations.weight.original
assert theta.unique().numel() <= 8 and torch.equal(net[0].weight, 2.0 * theta)
x = torch.randn(5, 32)
path = ws.save(net, "scaled")
fresh = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 6))
loaded = ws.load(path, model=fresh)
assert torch.allclose(loaded(x), net(x), atol=1e-6), (loaded(x) - net(x)).abs().max()
assert "alpha=2.0" in str(ws.report(loaded))
"""

MERGE = """
import torch, weightshare as ws
from weightshare.merge import MERGE_METHODS
a, b = {"w": torch.tensor([1.0, -2.0, 3.0])}, {"w": torch.tensor([0.5, 4.0, -1.0])}
out = ws.merge([a, b], method="elementwise_max", scale=0.5)
assert torch.equal(out["w"], 0.5 * torch.maximum(a["w"], b["w"])), out
try:
    ws.merge([a, b], method="elementwise_max", scale=1.5)
except ValueError as e:
    assert "scale must be in (0, 1]; got 1.5" in str(e), e
else:
    raise AssertionError("scale 1.5 was accepted")
"""

WEIGHTING = """
import torch
from torch import nn
import weightshare.multitask as mt
assert "first_task_only" in mt.METHODS
torch.manual_seed(0)
x = torch.randn(64, 4)
targets = {"a": (x[:, 0] > 0).long(), "b": (x[:, 1] > 0).long()}
def make():
    torch.manual_seed(1)
    return mt.MultiTaskModel(nn.Linear(4, 8), {"a": nn.Linear(8, 2), "b": nn.Linear(8, 2)})
init = make().heads["b"].weight.detach().clone()
res = mt.fit(make, x, targets, "first_task_only", mt.TrainConfig(epochs=3, batch_size=16), cv=None,
             keep_models=True)
model = res.models[0]
assert torch.equal(model.heads["b"].weight, init), "task b's head moved: its weight was not 0"
assert not torch.equal(model.heads["a"].weight, make().heads["a"].weight), "task a's head did not train"
"""


def _package_with(tmp_path: Path, rel: str) -> Path:
    root = tmp_path / "site"
    shutil.copytree(ROOT / "weightshare", root / "weightshare", ignore=shutil.ignore_patterns("__pycache__"))
    (root / rel).write_text(BLOCKS[rel])
    return root


def _run(root: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_readme_shows_one_plugin_of_each_kind():
    assert {Path(p).parent.as_posix() for p in BLOCKS} >= {"weightshare/sharing", "weightshare/merge/methods",
                                                           "weightshare/multitask/weighting", "weightshare/bench"}


@pytest.mark.parametrize("rel, check", [("weightshare/sharing/scale.py", SHARING),
                                        ("weightshare/merge/methods/elementwise_max.py", MERGE),
                                        ("weightshare/multitask/weighting/first_task_only.py", WEIGHTING)])
def test_a_plugin_file_is_found_and_used_by_name(tmp_path, rel, check):
    root = _package_with(tmp_path, rel)
    _run(root, "-c", "import weightshare; assert weightshare.__file__.startswith(%r)\n" % str(root) + check)


def test_a_benchmark_file_runs_from_the_command_line(tmp_path):
    root = _package_with(tmp_path, "weightshare/bench/toy_speed.py")
    cli = "import sys; from weightshare.cli import main; sys.exit(main(sys.argv[1:]))"  # as the console script
    out = _run(root, "-c", cli, "bench", "toy-speed", "--quick", "--json")
    assert "toy: one matrix product" in out
    assert json.loads(out.strip().splitlines()[-1])["n"] == 256
    assert "toy-speed" in _run(root, "-c", cli, "bench", "--help")
