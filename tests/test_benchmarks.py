"""Benchmarks stay runnable and their figures mean what their tables say."""

import copy

import numpy as np
import pytest
import torch

import weightshare as ws
from benchmarks.kmeans import same_case
from benchmarks.minilm import _palettized_bytes, weight_error
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
    model = ws.share_(copy.deepcopy(dense), ws.CodebookConfig(bits=3, granularity=granularity), filter_fn=is_compressible)
    # fp16 tables: the formula used for coremltools' rows must agree with ws.report
    assert _palettized_bytes(dense, 3, granularity, lut_itemsize=2) == ws.report(model).bytes_packed


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
