"""The native codebook GEMM against F.linear on the decoded weight, on every dispatch path.

The reference weight is decoded from the packed file's bit stream by plain indexing
(``ref_weight``), independently of the kernel's in-memory layout; each path is forced
with ``WEIGHTSHARE_KERNEL`` as a user would.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightshare import kernels
from weightshare.bitpack import pack_bits

PATHS = kernels.available()
NATIVE = [p for p in PATHS if p != "torch"]


def make_layer(rng, n, k, bits, tables_per_row):
    """Random labels and tables; ``tables_per_row`` 0 means one table for the tensor."""
    labels = rng.integers(0, 1 << bits, size=(n, k)).astype(np.uint8)
    t = 1 if tables_per_row == 0 else n * tables_per_row
    tables = torch.from_numpy(rng.standard_normal((t, 1 << bits)).astype(np.float32))
    indices = kernels.encode_stream(pack_bits(labels, bits), bits, n, k)
    return labels, tables, indices


def ref_weight(labels, tables, tables_per_row):
    """W[n, k] = table of (n, k)[label]: the slow obvious decode."""
    n, k = labels.shape
    lab = torch.from_numpy(labels).long()
    if tables_per_row == 0:
        return tables[0][lab]
    group = k // tables_per_row
    table_of = torch.arange(n)[:, None] * tables_per_row + torch.arange(k)[None, :] // group
    return tables[table_of, lab]


def groups_of(k):
    """Tables per row that divide k: one per row, and groups of whole 64-blocks (AVX2's byte-plane path), 16
    (SIMD-sized), 8 and odd sizes where they fit."""
    return sorted({1} | {k // g for g in (128, 64, 16, 32, 8, 5, 3) if k % g == 0 and k // g > 1})


@st.composite
def layers(draw):
    n = draw(st.integers(1, 70))
    k = draw(st.integers(1, 300))
    bits = draw(st.integers(1, 8))
    tables_per_row = draw(st.sampled_from([0, *groups_of(k)]))
    m = draw(st.sampled_from([0, 1, 2, 3, 5, 8, 9, 13, 16, 17, 25, 40, 64, 130, 300]))
    return n, k, bits, tables_per_row, m, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layer=layers())
def test_fp32_equals_f_linear_on_the_decoded_weight(monkeypatch, path, layer):
    n, k, bits, per_row, m, bias, seed = layer
    monkeypatch.setenv(kernels.ENV, path)
    rng = np.random.default_rng(seed)
    labels, tables, indices = make_layer(rng, n, k, bits, per_row)
    w = ref_weight(labels, tables, per_row)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) if bias else None
    y = kernels.linear(x, indices, kernels.pad_tables(tables, bits), b, k, bits)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == (m, n) and y.dtype == torch.float32
    if m:
        assert float((y.double() - ref).abs().max()) <= 1e-5 * max(float(ref.abs().max()), 1e-30)


BF16_PATHS = [p for p, ok in (("amx", kernels.amx_supported()), ("vdpbf16ps", kernels.bf16_supported())) if ok]


@pytest.mark.skipif(not BF16_PATHS, reason="this CPU has no AVX512_BF16")
@pytest.mark.parametrize("bf16_path", BF16_PATHS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layer=layers())
def test_bf16_compute_is_within_bf16_rounding(monkeypatch, bf16_path, layer):
    n, k, bits, per_row, m, bias, seed = layer
    monkeypatch.setenv(kernels.ENV, "avx512")
    if bf16_path == "vdpbf16ps":
        monkeypatch.setenv("WEIGHTSHARE_NO_AMX", "1")
    rng = np.random.default_rng(seed)
    labels, tables, indices = make_layer(rng, n, k, bits, per_row)
    w = ref_weight(labels, tables, per_row).double()
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) if bias else None
    y = kernels.linear(x, indices, kernels.pad_tables(tables, bits), b, k, bits, compute="bf16")
    ref = x.double() @ w.T + (0 if b is None else b.double())
    # each product rounds both factors to bf16 (relative error <= 2^-8 each), sums stay fp32
    bound = 2.0 ** -7 * (x.double().abs() @ w.abs().T) + 1e-5 * max(float(ref.abs().max()) if m else 0.0, 1e-30)
    assert bool(((y.double() - ref).abs() <= bound).all())


@pytest.mark.parametrize("path", PATHS)
def test_paths_agree_on_3d_bf16_and_strided_inputs(monkeypatch, path):
    monkeypatch.setenv(kernels.ENV, path)
    rng = np.random.default_rng(1)
    labels, tables, indices = make_layer(rng, 96, 160, 4, 1)
    w = ref_weight(labels, tables, 1)
    tab = kernels.pad_tables(tables, 4)
    x = torch.randn(3, 7, 320)[..., ::2]  # (batch, sequence, hidden), not contiguous
    y = kernels.linear(x, indices, tab, None, 160, 4)
    assert y.shape == (3, 7, 96)
    assert torch.allclose(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    yb = kernels.linear(xb, indices, tab, None, 160, 4)
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.float(), F.linear(xb.float(), w), rtol=1e-2, atol=1e-2)  # one bf16 rounding of y


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("k,per_row", [(256, 0), (256, 1), (256, 2), (256, 4), (200, 1), (384, 3)])
def test_every_input_count_of_the_fused_path_on_whole_block_groups(monkeypatch, path, bits, k, per_row):
    """The small-M kernels for each number of inputs (1..17: every pass size and a split pass), on one table
    per tensor, per row, and per group of whole 64-weight blocks (where AVX2 reloads its byte planes)."""
    monkeypatch.setenv(kernels.ENV, path)
    rng = np.random.default_rng(bits * 1000 + k + per_row)
    labels, tables, indices = make_layer(rng, 37, k, bits, per_row)
    w = ref_weight(labels, tables, per_row).double()
    b = torch.from_numpy(rng.standard_normal(37).astype(np.float32))
    for m in range(1, 18):
        x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
        y = kernels.linear(x, indices, kernels.pad_tables(tables, bits), b, k, bits)
        ref = x.double() @ w.T + b.double()
        assert float((y.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), (m, k, per_row)


@pytest.mark.parametrize("bits", range(1, 9))
def test_layout_round_trips_and_the_c_and_numpy_encoders_agree(bits):
    rng = np.random.default_rng(bits)
    n, k = 37, 203  # odd sizes: rows and blocks do not end on byte or block boundaries
    labels = rng.integers(0, 1 << bits, size=(n, k)).astype(np.uint8)
    indices = kernels.encode_stream(pack_bits(labels, bits), bits, n, k)
    layout = kernels.Layout(n, k, bits, n)
    assert np.array_equal(kernels.labels_of(indices, layout), labels)
    assert np.array_equal(indices.numpy(), kernels._encode_numpy(labels, kernels.layout_bits(bits)))
    assert torch.equal(kernels._labels_torch(indices, kernels.layout_bits(bits), k), torch.from_numpy(labels).long())


def test_a_short_bit_stream_is_refused():
    with pytest.raises(ValueError, match="fewer than"):
        kernels.encode_stream(np.zeros(10, np.uint8), 4, 5, 5)


@pytest.mark.parametrize("path", PATHS)
def test_row_lookup_decodes_only_the_asked_rows(monkeypatch, path):
    monkeypatch.setenv(kernels.ENV, path)
    rng = np.random.default_rng(2)
    labels, tables, indices = make_layer(rng, 50, 40, 3, 5)  # groups of 8: not a SIMD vector
    w = ref_weight(labels, tables, 5)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    out = kernels.embedding(ids, indices, kernels.pad_tables(tables, 3), 40, 3)
    assert out.shape == (2, 3, 40) and torch.equal(out, w[ids])
    with pytest.raises(IndexError, match="out of range"):
        kernels.embedding(torch.tensor([50]), indices, kernels.pad_tables(tables, 3), 40, 3)


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("m,n,k,bits", [(200, 512, 768, 4),  # the tile path, split over threads
                                        (1, 8195, 1536, 4), (5, 2051, 1536, 3), (16, 1031, 1024, 2)])  # the fused path
def test_results_do_not_depend_on_the_thread_count(monkeypatch, path, m, n, k, bits):
    # layers large enough to split over threads; the fused path hands out chunks of rows as threads go,
    # and N is odd so that the last chunk is short and not a multiple of the four rows decoded together
    monkeypatch.setenv(kernels.ENV, path)
    rng = np.random.default_rng(3)
    labels, tables, indices = make_layer(rng, n, k, bits, 1)
    tab = kernels.pad_tables(tables, bits)
    x = torch.randn(m, k)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.linear(x, indices, tab, None, k, bits)
        torch.set_num_threads(2)
        two = kernels.linear(x, indices, tab, None, k, bits)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each output is summed by one thread in a fixed order
    ref = F.linear(x.double(), ref_weight(labels, tables, 1).double())
    assert (two.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_gradients_reach_the_input_and_bias():
    rng = np.random.default_rng(4)
    labels, tables, indices = make_layer(rng, 300, 70, 4, 1)  # more rows than one decoded block
    w = ref_weight(labels, tables, 1)
    x = torch.randn(5, 70, requires_grad=True)
    b = torch.randn(300, requires_grad=True)
    kernels.linear(x, indices, kernels.pad_tables(tables, 4), b, 70, 4).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True)
    F.linear(x2, w, b2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(b.grad, b2.grad, rtol=1e-4, atol=1e-4)


def test_runs_under_inference_mode_no_grad_and_compile():
    rng = np.random.default_rng(5)
    labels, tables, indices = make_layer(rng, 64, 48, 4, 1)
    tab = kernels.pad_tables(tables, 4)
    w = ref_weight(labels, tables, 1)
    x = torch.randn(4, 48)
    with torch.inference_mode():
        assert torch.allclose(kernels.linear(x, indices, tab, None, 48, 4), F.linear(x, w), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(kernels.linear(x, indices, tab, None, 48, 4), F.linear(x, w), atol=1e-5)

    def f(x):
        return torch.relu(kernels.linear(x, indices, tab, None, 48, 4)) * 2

    explained = torch._dynamo.explain(f)(x)
    assert explained.graph_break_count == 0  # one opaque node in the graph
    compiled = torch.compile(f, backend="eager")  # the graph capture, without a C++ compiler in CI
    assert torch.allclose(compiled(x), torch.relu(F.linear(x, w)) * 2, atol=1e-5)


def test_buffers_that_do_not_fit_the_layer_are_refused():
    rng = np.random.default_rng(6)
    labels, tables, indices = make_layer(rng, 8, 40, 4, 1)
    tab = kernels.pad_tables(tables, 4)
    x = torch.randn(2, 40)
    with pytest.raises(ValueError, match="indices"):
        kernels.linear(x, indices[:, :-1].contiguous(), tab, None, 40, 4)
    with pytest.raises(ValueError, match="tables"):
        kernels.linear(x, indices, tab[:, :8].contiguous(), None, 40, 4)
    with pytest.raises(ValueError, match="tables"):
        kernels.linear(x, indices, tab.double(), None, 40, 4)
    with pytest.raises(ValueError, match="input features"):
        kernels.linear(torch.randn(2, 41), indices, tab, None, 40, 4)
    with pytest.raises(ValueError, match="bias"):
        kernels.linear(x, indices, tab, torch.zeros(9), 40, 4)


def test_a_bad_kernel_choice_names_the_variable(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "sse9")
    with pytest.raises(ValueError, match="WEIGHTSHARE_KERNEL='sse9'"):
        kernels.isa()
    monkeypatch.setenv(kernels.ENV, "auto")
    assert kernels.isa() == PATHS[0]


def test_without_the_c_core_the_torch_path_runs_and_says_why(monkeypatch, caplog):
    rng = np.random.default_rng(7)
    labels, tables, indices = make_layer(rng, 33, 70, 3, 1)
    w = ref_weight(labels, tables, 1)
    monkeypatch.setattr(kernels, "_core", None)
    monkeypatch.setattr(kernels, "_core_missing", "the native kernel was not built (no compiler)")
    monkeypatch.setattr(kernels, "_cached", (None, ""))
    monkeypatch.setattr(kernels, "_warned_missing", False)
    monkeypatch.delenv(kernels.ENV, raising=False)
    with caplog.at_level("WARNING"):
        assert kernels.isa() == "torch"
    assert "not built" in caplog.text
    x = torch.randn(5, 70)
    assert torch.allclose(kernels.linear(x, indices, kernels.pad_tables(tables, 3), None, 70, 3), F.linear(x, w),
                          rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(kernels.ENV, "avx512")
    with pytest.raises(RuntimeError, match="not built"):
        kernels.isa()
