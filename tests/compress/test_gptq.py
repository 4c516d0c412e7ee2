"""Error-compensating codebook assignment (GPTQ on a codebook) against slow obvious versions, and
sequential calibration against statistics recomputed by brute force on the compressed model."""

import copy
import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weightshare as ws
from weightshare.compress import compress_model_, is_compressible
from weightshare.compress.calibrate import sequential_codebooks_, text_batches
from weightshare.compress.gptq import damped, fit_codebook, gptq_assign, layer_objective, nearest_assign, refit_tables
from weightshare.corpus import calibration_sentences, evaluation_sentences


def reference_gptq(W: np.ndarray, Hd: np.ndarray, tables: np.ndarray, col_group: np.ndarray) -> np.ndarray:
    """Optimal Brain Surgeon one column at a time, in order of decreasing diag(H), recomputing the inverse
    Hessian of the still-free columns at every step (no Cholesky, no blocks)."""
    W = W.astype(np.float64).copy()
    order = np.argsort(-np.diag(Hd), kind="stable")
    free = list(order)
    labels = np.zeros(W.shape, dtype=np.int64)
    rows = np.arange(W.shape[0])
    for j in order:
        Hinv = np.linalg.inv(Hd[np.ix_(free, free)])
        p = free.index(j)
        t = tables[:, col_group[j], :]
        idx = np.abs(W[:, j][:, None] - t).argmin(1)
        labels[:, j] = idx
        err = (W[:, j] - t[rows, idx]) / Hinv[p, p]
        W[:, free] -= err[:, None] * Hinv[p][None, :]
        free.remove(j)
    return labels


def _problem(seed, rows, K, n=None):
    g = torch.Generator().manual_seed(seed)
    n = n or 3 * K
    X = torch.randn(n, K, generator=g, dtype=torch.float64) @ torch.randn(K, K, generator=g, dtype=torch.float64) * 0.3
    X += torch.randn(n, K, generator=g, dtype=torch.float64)
    return torch.randn(rows, K, generator=g, dtype=torch.float64), X.T @ X / n


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 12), K=st.integers(2, 40), E=st.sampled_from([2, 4, 8]),
       groups=st.sampled_from([1, 2]), block=st.integers(1, 50))
def test_blocked_cholesky_sweep_equals_obs_one_column_at_a_time(seed, rows, K, E, groups, block):
    K = K - K % groups or groups
    W, H = _problem(seed, rows, K)
    Hd = damped(H)
    g = torch.Generator().manual_seed(seed + 1)
    tables = torch.sort(torch.randn(rows, groups, E, generator=g, dtype=torch.float64), dim=2).values
    col_group = torch.arange(K) // (K // groups)
    got = gptq_assign(W, Hd, tables, col_group, block=block).numpy()
    expect = reference_gptq(W.numpy(), Hd.numpy(), tables.numpy(), col_group.numpy())
    assert (got == expect).all()


def test_table_refit_is_the_least_squares_optimum():
    W, H = _problem(3, 6, 24)
    Hd = damped(H)
    E = 4
    labels = torch.randint(0, E, W.shape, generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    labels[:, :E] = torch.arange(E, dtype=torch.uint8)  # every entry used in every row
    start = torch.zeros(W.shape[0], 1, E, dtype=torch.float64)
    col_group = torch.zeros(W.shape[1], dtype=torch.long)
    got = refit_tables(W, Hd, labels, start, col_group)[:, 0]
    L = np.linalg.cholesky(Hd.numpy())  # Hd = L Lᵀ: the H metric is the Euclidean one after Lᵀ
    for r in range(W.shape[0]):
        A = np.eye(E)[labels[r].long().numpy()]  # (K, E) one-hot
        t, *_ = np.linalg.lstsq(L.T @ A, L.T @ W[r].numpy(), rcond=None)
        np.testing.assert_allclose(got[r].numpy(), t, rtol=1e-6, atol=1e-8)
    # one table for all rows (per-tensor): the summed system
    one = refit_tables(W, Hd, labels, torch.zeros(1, 1, E, dtype=torch.float64), col_group)[0, 0].numpy()
    A_all = np.concatenate([L.T @ np.eye(E)[labels[r].long().numpy()] for r in range(W.shape[0])])
    b_all = np.concatenate([L.T @ W[r].numpy() for r in range(W.shape[0])])
    np.testing.assert_allclose(one, np.linalg.lstsq(A_all, b_all, rcond=None)[0], rtol=1e-6, atol=1e-8)


def test_unused_table_entries_keep_their_value():
    W, H = _problem(4, 3, 10)
    labels = torch.zeros(W.shape, dtype=torch.uint8)  # only entry 0 used
    start = torch.tensor([[[0.0, 5.0, 7.0, 9.0]]], dtype=torch.float64).expand(3, 1, 4).clone()
    got = refit_tables(W, damped(H), labels, start, torch.zeros(10, dtype=torch.long))
    assert torch.allclose(got[:, 0, 1:], start[:, 0, 1:], atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"group_size": 16}, {"per_tensor": True}])
def test_fit_is_never_worse_than_nearest_and_much_better_on_correlated_inputs(kw):
    W, H = _problem(5, 32, 64)
    W = W.float()
    fit = fit_codebook(W, H, bits=3, **kw)
    stages = dict(fit.history)
    assert fit.objective == min(stages.values())
    assert fit.objective < 0.85 * stages["nearest"]
    # the returned state is the one scored: decode it and score it again
    tables = fit.tables if not kw.get("per_tensor") else fit.tables.expand(32, -1, -1)
    col_group = torch.arange(64) // kw.get("group_size", 64)
    W_hat = torch.gather(tables.reshape(32, -1), 1, col_group[None] * 8 + fit.labels.long())
    assert abs(layer_objective(W, W_hat, damped(H)) - fit.objective) <= 1e-6 * fit.objective
    assert (torch.diff(fit.tables, dim=2) >= 0).all()  # sorted, as k-means leaves them
    assert torch.equal(fit.tables, fit.tables.half().float())  # already what the file stores


def test_singular_statistics_are_damped_never_nan():
    W = torch.randn(8, 12)
    H = torch.zeros(12, 12, dtype=torch.float64)
    H[:3, :3] = 1.0  # rank one, nine columns never driven
    fit = fit_codebook(W, H, bits=2)
    assert torch.isfinite(fit.tables).all() and np.isfinite(fit.objective)
    assert torch.isfinite(damped(H)).all() and torch.linalg.eigvalsh(damped(H)).min() > 0
    with pytest.raises(ValueError, match="NaN or inf"):
        damped(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match=r"expected a \(12, 12\) matrix"):
        fit_codebook(W, torch.eye(5), bits=2)


def test_nearest_assign_is_the_nearest_entry():
    W = torch.randn(5, 9)
    tables = torch.sort(torch.randn(5, 1, 4), dim=2).values
    labels = nearest_assign(W, tables, torch.zeros(9, dtype=torch.long))
    brute = (W[:, :, None] - tables[:, 0][:, None, :]).abs().argmin(2)
    assert torch.equal(labels.long(), brute)


# ----------------------------------------------------------------------------- sequential, on MiniLM


@pytest.fixture(scope="module")
def minilm(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


@pytest.fixture(scope="module")
def calibrated(minilm_path):
    from weightshare.hub import load_pretrained

    model = load_pretrained(minilm_path)  # knows its source folder: ws.save can write it
    texts = calibration_sentences(48)
    batches = text_batches(model.tokenizer, texts, batch_size=16)
    ws.set_progress(False)
    results = sequential_codebooks_(model[0].auto_model, ws.CodebookConfig(bits=3), batches, filter_fn=is_compressible)
    return model, batches, results


def test_sequential_statistics_are_those_of_the_model_compressed_so_far(minilm, calibrated):
    """Each layer's recorded objective, recomputed from scratch: H from the compressed model's own hidden
    states at that block's input (which only the earlier, already compressed blocks produce)."""
    model, batches, results = calibrated
    inner, original = model[0].auto_model, minilm[0].auto_model
    for layer in (0, 3, 5):
        name = f"encoder.layer.{layer}.attention.self.query"
        xs = []
        with torch.no_grad():
            for batch in batches:
                hidden = inner(**batch, output_hidden_states=True).hidden_states[layer]
                xs.append(hidden[batch["attention_mask"].bool()].double())
        x = torch.cat(xs)
        H = x.T @ x / x.shape[0]
        W = original.get_submodule(name).weight.detach()
        W_hat = inner.get_submodule(name).weight.detach()
        got = layer_objective(W, W_hat, damped(H))
        assert results[f"{name}.weight"]["tokens"] == x.shape[0]
        assert got == pytest.approx(results[f"{name}.weight"]["objective"], rel=1e-4)


def test_sequential_beats_nearest_on_every_layer_and_compresses_everything(calibrated):
    model, _, results = calibrated
    inner = model[0].auto_model
    assert len(results) == 37  # every encoder Linear and the pooler (its input: the [CLS] states)
    assert all(r["objective"] <= r["nearest"] for r in results.values())
    ratios = sorted(r["objective"] / r["nearest"] for r in results.values())
    assert ratios[len(ratios) // 2] < 0.6  # measured at 3 bits: median 0.4
    assert torch.nn.utils.parametrize.is_parametrized(inner.embeddings.word_embeddings, "weight")


def test_calibrated_3bit_minilm_keeps_its_embeddings(minilm, calibrated):
    model, _, _ = calibrated
    sentences = evaluation_sentences(120)
    ref = minilm.encode(sentences, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(ref, model.encode(sentences, convert_to_tensor=True))
    wk = compress_model_(copy.deepcopy(minilm), ws.CodebookConfig(bits=3), calibration_sentences(48), method="wkmeans")
    cos_wk = torch.nn.functional.cosine_similarity(ref, wk.encode(sentences, convert_to_tensor=True))
    assert cos.mean() > 0.94  # measured 0.948 with 48 calibration sentences (0.964 with 256)
    assert cos.mean() > cos_wk.mean() + 0.03


def test_calibrated_model_packs_and_loads_into_packed_modules(calibrated, tmp_path):
    from weightshare.modules import CodebookLinear

    model, _, _ = calibrated
    ws.save(model, tmp_path / "p")
    loaded = ws.load(tmp_path / "p")
    assert isinstance(loaded[0].auto_model.encoder.layer[0].attention.self.query, CodebookLinear)
    s = evaluation_sentences(8)
    a = model.encode(s, convert_to_tensor=True)
    b = loaded.encode(s, convert_to_tensor=True)
    assert torch.allclose(a, b, atol=1e-5)


def test_text_batches_warn_about_truncation_and_empty_input_is_refused(minilm, caplog):
    with caplog.at_level(logging.WARNING):
        batches = text_batches(minilm.tokenizer, ["word " * 600, "short"], max_length=64)
    assert batches[0]["input_ids"].shape[1] == 64
    assert "1 of 2 texts are longer than 64 tokens" in caplog.text
    with pytest.raises(ValueError, match="no texts"):
        text_batches(minilm.tokenizer, [])
    with pytest.raises(ValueError, match="no batches"):
        sequential_codebooks_(torch.nn.Linear(3, 3), ws.CodebookConfig(), [])


def test_any_module_with_tensor_batches():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    ref = copy.deepcopy(net)
    x = torch.randn(256, 16) @ torch.randn(16, 16)
    batches = [x[i:i + 64] for i in range(0, 256, 64)]
    results = sequential_codebooks_(net, ws.CodebookConfig(bits=2), batches)
    assert set(results) == {"0.weight", "2.weight"}
    plain = copy.deepcopy(ref)
    ws.share_(plain, ws.CodebookConfig(bits=2))
    with torch.no_grad():
        err = ((net(x) - ref(x)) ** 2).mean()
        err_plain = ((plain(x) - ref(x)) ** 2).mean()
    assert err < 0.7 * err_plain


def test_nearest_assign_takes_one_table_for_every_row():
    """A (1, groups, E) table broadcasts over all rows, in row pieces as with a table per row."""
    from weightshare.compress.gptq import nearest_assign

    torch.manual_seed(0)
    W = torch.randn(3000, 512)
    table = torch.sort(torch.randn(1, 1, 16), dim=2).values
    labels = nearest_assign(W, table, torch.zeros(512, dtype=torch.long))
    assert torch.equal(labels.long(), (W[:, :, None] - table[0, 0]).abs().argmin(2))
