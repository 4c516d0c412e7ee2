"""Dense-and-sparse outliers: the most sensitive weights kept exact beside their codebook.

Selection against a brute-force ranking, the error-compensating fit with exact weights
against its definition, the packed file's round trip (parametrized, packed modules,
decoded, saved again), the packed modules against F.linear on the decoded weight, and a
file whose outlier tensors an attacker rewrote (checksums recomputed).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import weightshare as ws
from tests import fuzz_helpers as fh
from weightshare import kernels
from weightshare.compress.calibrate import sequential_codebooks_
from weightshare.compress.gptq import _decode, damped, fit_codebook, layer_objective, refit_tables, select_outliers
from weightshare.modules import CodebookEmbedding, CodebookLinear
from weightshare.pack import FILENAME, PackError


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 24)
        self.fc1 = torch.nn.Linear(24, 48)
        self.fc2 = torch.nn.Linear(48, 8)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


def _batches(n=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 40, (4, 12), generator=g) for _ in range(n)]


def _net():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.fc1.weight[5, 3] = 3.0  # far outside the row's bulk: a table would spend an entry on it
    return net


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    net = _net()
    sequential_codebooks_(net, ws.CodebookConfig(bits=2), _batches(), outliers=0.03)
    return ws.save(net, tmp_path_factory.mktemp("outliers") / "net"), net


def test_selection_is_the_top_fraction_by_magnitude_times_root_importance():
    torch.manual_seed(0)
    W, imp = torch.randn(7, 11), torch.rand(11)
    mask = select_outliers(W, imp[None, :], 0.1)
    score = (W.abs() * imp.sqrt()).reshape(-1)
    expected = set(sorted(range(W.numel()), key=lambda i: -float(score[i]))[: int(0.1 * W.numel())])
    assert set(mask.reshape(-1).nonzero().flatten().tolist()) == expected
    assert select_outliers(W, None, 0.001) is None  # fewer than one weight


def test_refit_with_exact_weights_is_least_squares_over_the_others():
    torch.manual_seed(0)
    W, X = torch.randn(3, 10, dtype=torch.float64), torch.randn(50, 10, dtype=torch.float64)
    H = X.T @ X
    labels = torch.randint(0, 4, (3, 10), dtype=torch.uint8)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 2] = mask[1, 7] = mask[2, 0] = True
    col_group = torch.zeros(10, dtype=torch.long)
    tables = refit_tables(W, H, labels, torch.zeros(3, 1, 4, dtype=torch.float64), col_group, ridge=0, outliers=mask)
    for r in range(3):  # brute force: minimise |X (w - A t) - X (exact part)|² directly
        A = F.one_hot(labels[r].long(), 4).double() * (~mask[r]).double()[:, None]
        target = X @ (W[r] * (~mask[r]).double())
        t = torch.linalg.lstsq(X @ A, target).solution
        assert torch.allclose(tables[r, 0], t, atol=1e-8)


def test_fit_keeps_outliers_exact_and_never_loses_to_nearest():
    torch.manual_seed(0)
    X = torch.randn(400, 32)
    W = torch.randn(16, 32)
    W[3, 4] = 12.0
    H = X.T @ X / 400
    mask = select_outliers(W, torch.diagonal(H)[None, :], 0.02)
    fit = fit_codebook(W, H, bits=2, outliers=mask)
    plain = fit_codebook(W, H, bits=2)
    W_hat = _decode(fit.tables, fit.labels, torch.zeros(32, dtype=torch.long), W, mask)
    assert torch.equal(W_hat[mask], W[mask])
    assert fit.objective == pytest.approx(layer_objective(W, W_hat, damped(H)), rel=1e-9)
    assert fit.objective <= fit.history[0][1]  # never worse than nearest assignment with k-means tables
    assert fit.objective < 0.8 * plain.objective  # the 12-sigma weight no longer costs a table entry


def test_every_form_of_the_file_holds_the_same_weights(packed_dir, tmp_path):
    path, net = packed_dir
    ids = _batches(1)[0]
    expected = net(ids)
    packed = ws.load(path, model=Net())
    assert isinstance(packed.fc1, CodebookLinear) and isinstance(packed.emb, CodebookEmbedding)
    assert packed.fc1.outliers is not None and packed.fc1.outliers.index.numel() == int(0.03 * 48 * 24)
    trainable = ws.load(path, model=Net(), trainable=True)
    assert torch.allclose(packed(ids), expected, atol=1e-5)
    assert torch.equal(trainable(ids), expected)
    # the 3.0 weight is one of fc1's outliers and comes back exact in every form
    assert float(packed.fc1.weight[5, 3]) == 3.0 and float(trainable.fc1.weight.detach()[5, 3]) == 3.0
    dense = ws.materialize_(ws.load(path, model=Net()))
    assert torch.allclose(dense(ids), expected, atol=1e-5)
    again = ws.save(packed, tmp_path / "again")
    a, b = safe_open(str(path / FILENAME), "pt"), safe_open(str(again / FILENAME), "pt")
    assert sorted(a.keys()) == sorted(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    rep = ws.report(packed)
    assert rep.bytes_packed == ws.report(trainable).bytes_packed
    outlier_bytes = sum(6 * int(0.03 * n) for n in (40 * 24, 48 * 24, 8 * 48))  # int32 position + fp16 value
    plain = _net()
    sequential_codebooks_(plain, ws.CodebookConfig(bits=2), _batches())
    assert rep.bytes_packed == ws.report(plain).bytes_packed + outlier_bytes


@pytest.mark.parametrize("shape", [(1, 24), (5, 24), (3, 7, 24)])
def test_packed_linear_with_outliers_equals_f_linear_on_the_decoded_weight(packed_dir, shape):
    path, _ = packed_dir
    fc1 = ws.load(path, model=Net()).fc1
    x = torch.randn(*shape, requires_grad=True)
    y = fc1(x)
    w = fc1.weight.detach()
    ref = F.linear(x, w, fc1.bias)
    assert torch.allclose(y, ref, atol=1e-5)
    (g,) = torch.autograd.grad(y.square().sum(), x)  # adapters train through a frozen packed layer
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert torch.allclose(g, g_ref, atol=1e-4)


def test_a_packed_model_with_outliers_deep_copies(packed_dir):
    import copy

    path, net = packed_dir
    packed = ws.load(path, model=Net())
    ids = _batches(1)[0]
    assert torch.equal(copy.deepcopy(packed)(ids), packed(ids))


def test_packed_embedding_with_outliers_looks_up_exact_rows(packed_dir):
    path, _ = packed_dir
    emb = ws.load(path, model=Net()).emb
    ids = torch.tensor([[0, 39, 5, 5], [7, 0, 1, 2]])
    assert torch.equal(emb(ids), F.embedding(ids, emb.weight.detach()))


def _set(key, fn):
    def edit(tensors, spec):
        tensors[key] = fn(tensors[key].clone())
    return edit


def _count(value):
    return lambda tensors, spec: spec["tensors"]["fc1.weight"].update(outliers=value)


ATTACKS = {
    "position past the end": (_set("fc1.weight.__outlier_index",
                                   lambda t: t.index_fill_(0, torch.tensor([len(t) - 1]), 48 * 24)),
                              "outlier positions"),
    "negative position": (_set("fc1.weight.__outlier_index", lambda t: t.index_fill_(0, torch.tensor([0]), -1)),
                          "outlier positions"),
    "positions out of order": (_set("fc1.weight.__outlier_index", lambda t: t.flip(0)), "outlier positions"),
    "repeated position": (_set("fc1.weight.__outlier_index", lambda t: t.index_fill_(0, torch.tensor([1]), int(t[0]))),
                          "outlier positions"),
    "NaN value": (_set("fc1.weight.__outlier_values", lambda t: t.index_fill_(0, torch.tensor([0]), float("nan"))),
                  "NaN or inf"),
    "count above the weight": (_count(48 * 24 + 1), "outliers"),
    "count of zero": (_count(0), "outliers"),
    "count not a number": (_count("all"), "outliers"),
    "count that disagrees with the tensors": (_count(3), "outlier"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("trainable", [False, True])
def test_rewritten_outliers_are_one_clear_error(packed_dir, tmp_path, attack, trainable):
    import shutil

    path, _ = packed_dir
    shutil.copytree(path, tmp_path / "net")
    edit, match = ATTACKS[attack]
    fh.rewrite_packed(tmp_path / "net", edit)
    with pytest.raises(PackError, match=match):
        ws.load(tmp_path / "net", model=Net(), trainable=trainable)


def test_outliers_need_calibration_and_gptq(minilm_path, tmp_path):
    from weightshare.compress import compress

    with pytest.raises(ValueError, match="--outliers needs calibration"):
        compress(minilm_path, tmp_path / "a", ws.CodebookConfig(bits=3), calibration=None, outliers=0.005)
    with pytest.raises(ValueError, match=r"--outliers\n  expected: a fraction"):
        compress(minilm_path, tmp_path / "b", ws.CodebookConfig(bits=3), outliers=0.7)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("attack", ["position past the end", "positions out of order", "NaN value"])
def test_rewritten_outliers_do_not_export_or_decode(packed_dir, tmp_path, attack):
    import shutil

    from weightshare.pack import dense_state_dict, read_spec

    path, _ = packed_dir
    shutil.copytree(path, tmp_path / "net")
    edit, match = ATTACKS[attack]
    fh.rewrite_packed(tmp_path / "net", edit)
    with pytest.raises(PackError, match=match):
        dense_state_dict(*read_spec(tmp_path / "net"))


def test_outliers_under_a_budget_land_below_it_and_run_packed(tmp_path):
    """A tiny BERT calibrated on its own batches: the outliers' bytes come out of the budget."""
    import os

    from transformers import BertConfig, BertModel

    from weightshare import pack
    from weightshare.compress import compress_model_

    ws.set_progress(False)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=32)
    model = BertModel(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 300, (4, 16), generator=g),
                "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(4)]
    want = 100_000
    compress_model_(model, ws.CodebookConfig(), batches, outliers=0.01, target_bytes=want)
    path = ws.save(model, tmp_path / "bert")
    size = os.path.getsize(path / FILENAME)
    assert size == pack.file_size(model) and 0.99 * want <= size <= want
    packed, trainable = ws.load(path), ws.load(path, trainable=True)
    counts = [m.outliers.index.numel() for m in packed.modules() if isinstance(m, (CodebookLinear, CodebookEmbedding))]
    assert len(counts) >= 14 and all(c > 0 for c in counts)
    ids = batches[0]["input_ids"]
    a, b = packed(input_ids=ids).last_hidden_state, trainable(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("path", kernels.available())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), k=st.integers(1, 70), m=st.integers(0, 9), density=st.floats(0.0, 0.3),
       seed=st.integers(0, 2**16))
def test_sparse_add_equals_the_dense_product_on_every_path(monkeypatch, path, n, k, m, density, seed):
    """kernels.sparse_add_ (native loop, or torch's sparse product where forced) against x @ Sᵀ dense."""
    from weightshare.modules import Outliers

    monkeypatch.setenv(kernels.ENV, path)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n * k, generator=g) < density
    index = mask.nonzero().flatten()
    o = Outliers(index, torch.randn(index.numel(), generator=g), (n, k))
    dense = torch.zeros(n * k)
    dense[index] = o.values
    x, y = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
    expected = y.double() + x.double() @ dense.view(n, k).double().t()
    with torch.no_grad():
        got = kernels.sparse_add_(y.clone(), x, o.crow, o.cols, o.values)
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_sparse_add_over_threads_equals_one_thread_and_the_dense_product():
    """Blocks of 16 rows of x split over threads (107 rows: a short last block), against one thread and x @ Sᵀ."""
    from weightshare.modules import Outliers

    g = torch.Generator().manual_seed(5)
    n, k, m = 300, 400, 107
    index = (torch.rand(n * k, generator=g) < 0.05).nonzero().flatten()  # 6000 entries x 107 rows: splits
    o = Outliers(index, torch.randn(index.numel(), generator=g), (n, k))
    dense = torch.zeros(n * k)
    dense[index] = o.values
    x, y = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = kernels.sparse_add_(y.clone(), x, o.crow, o.cols, o.values)
            torch.set_num_threads(2)
            two = kernels.sparse_add_(y.clone(), x, o.crow, o.cols, o.values)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    expected = y.double() + x.double() @ dense.view(n, k).double().t()
    assert torch.allclose(two.double(), expected, atol=1e-4)


@pytest.mark.parametrize("path", kernels.available())
def test_packed_linear_with_outliers_at_inference_on_every_path(packed_dir, monkeypatch, path):
    monkeypatch.setenv(kernels.ENV, path)
    path_, _ = packed_dir
    fc1 = ws.load(path_, model=Net()).fc1
    w = fc1.weight.detach()
    for shape in ((1, 24), (7, 24), (2, 3, 24)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            assert torch.allclose(fc1(x), F.linear(x, w, fc1.bias), atol=1e-5)
