"""Benchmarks stay runnable and their figures mean what their tables say."""

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import weightshare as ws
from weightshare.bench._references import QUANTIZERS, ReferenceMissing, quantize_weights
from weightshare.bench.kmeans import same_case
from weightshare.bench.minilm import palettized_bytes, weight_error
from weightshare.compress import is_compressible


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_kmeans_same_data_case_is_exact_against_its_reference(dtype):
    rows = same_case(3000, dtype=dtype)
    assert rows[0]["solver"] == f"weightshare ({np.dtype(dtype).name})"
    reference = rows[1]
    if "missing" in reference["solver"]:  # kmeans1d is in the [bench] extra
        assert "pip install" in reference["solver"]
    else:
        assert reference["sse_rel_diff"] <= 1e-9
    assert rows[-1]["solver"] == "sklearn KMeans" and rows[-1]["sse_rel_diff"] >= -1e-12  # never beats the optimum


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 24)
        self.fc = torch.nn.Linear(24, 12)
        self.norm = torch.nn.LayerNorm(12)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_palettized_size_formula_equals_report(granularity):
    torch.manual_seed(0)
    dense = Tiny()
    model = ws.share_(copy.deepcopy(dense), ws.CodebookConfig(bits=3, granularity=granularity),
                      filter_fn=is_compressible)
    # fp16 tables: the formula used for coremltools' rows must agree with ws.report
    assert palettized_bytes(dense, 3, granularity, lut_itemsize=2) == ws.report(model).bytes_packed


def test_weight_error_is_relative_sse_of_clustered_weights():
    torch.manual_seed(0)
    dense = Tiny()
    model = ws.share_(copy.deepcopy(dense), ws.CodebookConfig(bits=2), filter_fn=is_compressible)
    assert weight_error(dense, dense) == 0.0
    with torch.no_grad():
        num = sum(float(((getattr(model, n).weight - getattr(dense, n).weight) ** 2).sum()) for n in ("emb", "fc"))
        den = sum(float((getattr(dense, n).weight ** 2).sum()) for n in ("emb", "fc"))
    assert weight_error(dense, model) == pytest.approx(num / den, rel=1e-6)
    assert 0 < weight_error(dense, model) < 0.5


def test_every_benchmark_is_registered_and_importable():
    import importlib

    from weightshare.bench import NAMES

    assert {"kmeans", "minilm", "load"} <= set(NAMES)
    for name in NAMES:
        assert callable(importlib.import_module(f"weightshare.bench.{name.replace('-', '_')}").main)


BENCH_DIR = Path(ws.__file__).parent / "bench"


def test_the_benchmarks_are_the_benchmark_files_in_the_readme_order():
    """Found by file: every non-underscore module in weightshare/bench/ is one, named after its file, listed in
    the order of the README's benchmark table (each file's ORDER)."""
    import re

    from weightshare.bench import NAMES, PLOTS

    files = {f.stem.replace("_", "-") for f in BENCH_DIR.glob("*.py") if not f.name.startswith("_")}
    assert set(NAMES) == files and len(NAMES) == len(files)
    assert "references" not in NAMES and "-references" not in NAMES  # _references.py is a helper
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("| `weightshare bench ...` |")[1].split("\n\n")[0]
    assert tuple(re.findall(r"^\| `([a-z-]+)` \|", table, re.M)) == NAMES
    assert PLOTS == ("minilm", "train-sharing")  # the benchmarks whose main takes plot (--plot FILE)


TOY = """
ORDER = 5

def main(quick: bool = False) -> dict:
    print("toy benchmark table")
    return {"quick": quick, "rows": 1}
"""


def test_a_benchmark_file_added_to_the_package_path_is_listed_and_runs(tmp_path, monkeypatch, capsys):
    """Adding a benchmark is adding one file: dropped on ``weightshare.bench.__path__``, it is listed (by its
    ORDER, before kmeans), runs through ``run`` with its JSON line, and helpers (``_*.py``) are not listed."""
    import json
    import sys

    import weightshare.bench as bench

    (tmp_path / "toy_bench.py").write_text(TOY)
    (tmp_path / "toy_chart.py").write_text("def main(quick=False, plot=None):\n    return {'plot': plot}\n")
    (tmp_path / "toy_sized.py").write_text("def main(quick=False, size='s'):\n    return {'size': size}\n")
    (tmp_path / "_toy_helper.py").write_text("raise AssertionError('a helper is never imported to list it')\n")
    monkeypatch.setattr(bench, "__path__", [*bench.__path__, str(tmp_path)])
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    try:
        found = bench.discover()
        assert list(found)[0] == "toy-bench" and list(found)[-2:] == ["toy-chart", "toy-sized"]  # no ORDER: last
        assert "toy-helper" not in found and "-toy-helper" not in found
        assert found["toy-chart"].draws_chart and not found["toy-bench"].draws_chart
        capsys.readouterr()
        assert bench.run("toy-bench", quick=True, as_json=True) == {"quick": True, "rows": 1}
        out = capsys.readouterr().out.splitlines()
        assert "toy benchmark table" in out and json.loads(out[-1]) == {"quick": True, "rows": 1}
        assert bench.run("toy-chart", plot="c.png") == {"plot": "c.png"}
        with pytest.raises(ValueError, match=r"draws a chart \(minilm, train-sharing, toy-chart\)"):
            bench.run("toy-bench", plot="c.png")
        assert found["toy-sized"].takes_size and not found["toy-chart"].takes_size
        assert bench.run("toy-sized", size="xl") == {"size": "xl"}
        with pytest.raises(ValueError, match=r"runs at sizes \(scale, toy-sized\)"):
            bench.run("toy-bench", size="1b")
        (tmp_path / "toy_bench.py").write_text("ORDER = 'first'\n" + TOY)
        with pytest.raises(ValueError, match="toy_bench.py: ORDER\n  expected: a number"):
            bench.discover()
    finally:
        for name in ("toy_bench", "toy_chart"):
            sys.modules.pop(f"weightshare.bench.{name}", None)


def imported_modules(path: Path, package: str):
    """(line, module) for every module an import statement in ``path`` names (inside functions too), relative
    imports resolved against ``package``; ``from a import b`` names both ``a`` and ``a.b``."""
    import ast

    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            start = parts[:len(parts) - node.level + 1] if node.level else []  # level 1: this package
            base = ".".join(start + ([node.module] if node.module else []))
            yield node.lineno, base
            yield from ((node.lineno, f"{base}.{a.name}") for a in node.names)


def test_no_library_module_imports_a_benchmark():
    """weightshare.bench depends on the library, never the reverse: only bench/ itself and the CLI (which runs
    them) may import it."""
    root = BENCH_DIR.parent.parent
    edges = {}  # "file:line" -> the first benchmark module that statement names
    for path in sorted(BENCH_DIR.parent.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[1] == "bench" or rel.as_posix() == "weightshare/cli.py":
            continue
        for line, module in imported_modules(path, ".".join(rel.parent.parts)):
            if module == "weightshare.bench" or module.startswith("weightshare.bench."):
                edges.setdefault(f"{rel}:{line}", module)
    assert not edges, "the library imports a benchmark (move what it needs into the library):\n" + "\n".join(
        f"{where} imports {module}" for where, module in edges.items())


def test_the_import_walk_sees_every_form_of_import(tmp_path):
    code = ("import weightshare.bench.kmeans as k\n"
            "def f():\n    from weightshare import bench\n"
            "from ..bench import cotrain\n"
            "from . import zoo\n")
    (tmp_path / "m.py").write_text(code)
    got = set(imported_modules(tmp_path / "m.py", "weightshare.merge"))
    assert {(1, "weightshare.bench.kmeans"), (3, "weightshare.bench"), (4, "weightshare.bench.cotrain"),
            (5, "weightshare.merge.zoo")} <= got


def test_omp_wait_policy_line():
    from weightshare.bench import _startup_environ, omp_wait_policy_line

    assert omp_wait_policy_line("PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}).startswith("OMP_WAIT_POLICY=PASSIVE is set")
    assert "subprocesses" in omp_wait_policy_line("PASSIVE", {})  # set after start-up
    assert "subprocesses" not in omp_wait_policy_line("PASSIVE", None)  # unknown: no claim
    assert "not PASSIVE" in omp_wait_policy_line("ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE"})
    env = _startup_environ()
    assert env is None or env.get("PATH")


def test_parse_proc_status():
    from weightshare.bench.load import parse_status

    text = "Name:\tpython3\nUmask:\t0022\nVmHWM:\t  412345 kB\nVmRSS:\t  200001 kB\nThreads:\t3\nRssFile:\t     7 kB\n"
    assert parse_status(text) == {"VmHWM": 412345, "VmRSS": 200001, "RssFile": 7}


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux /proc only")
def test_peak_rss_reset_forgets_an_earlier_peak():
    from weightshare.bench.load import memory_kb, reset_peak_rss

    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MB touched, then freed: the peak stays up
    del block
    assert memory_kb()["VmHWM"] >= memory_kb()["VmRSS"] + 32 * 1024
    reset_peak_rss()
    m = memory_kb()
    assert m["VmHWM"] <= m["VmRSS"] + 1024


def test_load_summary_medians_and_ratios():
    from weightshare.bench.load import summarize

    def run(system, seconds, peak):
        return {"system": system, "load_seconds": seconds, "encode_seconds": 1.0, "peak_rss_load_mb": peak / 2,
                "peak_rss_total_mb": peak, "rss_file_mb": 0.0}

    runs = [run("dense", 1.0, 100.0), run("packed", 3.0, 50.0), run("dense", 2.0, 300.0), run("packed", 1.0, 70.0),
            run("dense", 9.0, 200.0), run("packed", 2.0, 60.0)]
    s = summarize(runs)
    assert (s["load_seconds_dense"], s["load_seconds_packed"]) == (2.0, 2.0)
    assert (s["peak_rss_mb_dense"], s["peak_rss_mb_packed"]) == (200.0, 60.0)
    assert s["load_time_ratio"] == 1.0 and s["peak_rss_ratio"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="expected: runs of dense and packed"):
        summarize(runs[:1])


def test_dir_bytes(tmp_path):
    from weightshare.bench.load import dir_bytes

    (tmp_path / "sub").mkdir()
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub" / "b").write_bytes(b"y" * 5)
    assert dir_bytes(tmp_path) == 15


def test_runtime_weights_held_counts_packed_tensors_once(tmp_path):
    import weightshare as ws
    from weightshare.bench.runtime import weights_held

    lm = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64, bias=False))
    lm[1].weight = lm[0].weight  # a tied head
    dense = weights_held(lm)
    assert dense == 64 * 32 * 4  # one storage for the two uses
    ws.share_(lm, ws.CodebookConfig(bits=4))
    skeleton = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64, bias=False))
    skeleton[1].weight = skeleton[0].weight
    packed = ws.load(ws.save(lm, tmp_path / "p"), model=skeleton)
    # one set of indices (64 rows x one 32-byte block) and fp32 tables (64 x 16), shared by head and embedding
    assert weights_held(packed) == 64 * 32 + 64 * 16 * 4


def test_runtime_quantile_codebooks_stand_in_for_kmeans():
    from weightshare.bench.runtime import quantile_codebooks_
    from weightshare.modules import CodebookEmbedding, CodebookLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(40, 64), torch.nn.Linear(64, 48))
    model[1].weight.data = torch.randn(48, 64)
    dense_w = model[1].weight.detach().clone()
    quantile_codebooks_(model)
    assert isinstance(model[0], CodebookEmbedding) and isinstance(model[1], CodebookLinear)
    w = model[1].weight
    assert all(row.unique().numel() <= 16 for row in w)
    # nearest of 16 normal quantiles: about the error of a 4-bit codebook on Gaussian rows
    assert float(((w - dense_w) ** 2).sum() / (dense_w ** 2).sum()) < 0.02


def test_runtime_no_grad_encoder_equals_encode(minilm_path):
    from sentence_transformers import SentenceTransformer

    from weightshare.bench.runtime import encode_no_grad

    model = SentenceTransformer(minilm_path, device="cpu")
    texts = ["a short one", "a somewhat longer sentence about shared weights", "mid length text"]
    ours = encode_no_grad(model, texts, batch_size=2)
    assert np.allclose(ours, model.encode(texts, batch_size=2), atol=1e-5)


@pytest.mark.parametrize("name,bits", [(n, b) for n, (_, g, _, _) in QUANTIZERS.items() for b in g])
def test_reference_quantizers_keep_their_levels_and_count_their_scales(name, bits):
    """Each reference quantizes every Linear/Embedding weight in place of its own format.

    Dequantized, a group of ``g`` weights along a row holds at most ``2**bits``
    distinct values, and the returned bits per weight is the code width plus
    the group's stored metadata; other parameters are untouched.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 128), torch.nn.Linear(128, 64), torch.nn.LayerNorm(64))
    try:
        out, bpw, _ = quantize_weights(model, name, bits)
    except ReferenceMissing as exc:  # the [bench] extra is not installed
        pytest.skip(str(exc))
    _, groups, meta_bits, _ = QUANTIZERS[name]
    group = groups[bits]
    assert bpw == bits + meta_bits / group
    for before, after in ((model[0].weight, out[0].weight), (model[1].weight, out[1].weight)):
        assert not torch.equal(before, after)
        per_group = after.detach().reshape(-1, group)
        distinct = max(len(torch.unique(g)) for g in per_group)
        assert distinct <= 2**bits
        assert float((after - before).detach().norm() / before.norm()) < {4: 0.2, 3: 0.4, 2: 0.9}[bits]
    assert torch.equal(model[2].weight, out[2].weight) and torch.equal(model[1].bias, out[1].bias)


def test_coremltools_skm_reference_palettizes_every_weight_from_its_sensitivity(minilm_path):
    """The SKMPalettizer reference: every Linear / Embedding weight of the copy holds at most 2**bits values,
    the original is untouched, and the sensitivity (SimCSE gradients on the texts) moved the tables away from
    the data-free palettizer's."""
    from sentence_transformers import SentenceTransformer

    from weightshare.bench._references import coremltools_palettize, coremltools_skm_palettize

    model = SentenceTransformer(minilm_path, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts = [f"sentence {i} about weights shared between layers" for i in range(8)]
    try:
        skm, _ = coremltools_skm_palettize(model, 1, "per_tensor", texts, batch_size=4)
        free, _ = coremltools_palettize(model, 1, "per_tensor")
    except ReferenceMissing as exc:  # the [bench] extra is not installed
        pytest.skip(str(exc))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    weights = {n: m.weight for n, m in skm[0].auto_model.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    expected = sum(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in model[0].auto_model.modules())
    assert len(weights) == expected == 40 and all(len(torch.unique(w)) <= 2 for w in weights.values())
    q = skm[0].auto_model.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(q, free[0].auto_model.encoder.layer[0].attention.self.query.weight)


def test_bench_package_imports_without_torch():
    """The CLI imports weightshare.bench (for its names) before it sets OMP_WAIT_POLICY; torch must not load
    by then, or every benchmark runs with spin-waiting OpenMP threads (a step 8x slower on a busy machine)."""
    import subprocess
    import sys

    code = "import sys, weightshare.bench, weightshare.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
