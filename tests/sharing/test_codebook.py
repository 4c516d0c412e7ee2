import numpy as np
import pytest
import torch

import weightshare as ws
from weightshare.kmeans import kmeans1d_rows
from weightshare.sharing.codebook import codebook_, group_layout


@pytest.mark.parametrize("granularity,group_size", [("per_tensor", None), ("per_channel", None), ("per_group", 4)])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_codebook_values_come_from_tables(tiny, granularity, group_size, bits):
    dense = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    ws.share_(tiny, ws.CodebookConfig(bits=bits, granularity=granularity, group_size=group_size))
    for name in ("emb.weight", "fc1.weight", "conv.weight", "fc2.weight"):
        mod = tiny.get_submodule(name.rsplit(".", 1)[0])
        w = mod.weight.detach()
        groups, glen = group_layout(w.shape, granularity, group_size)
        rows = w.reshape(groups, glen)
        for g in range(groups):
            assert rows[g].unique().numel() <= 2**bits
        # the tables are the exact optimum, rounded to fp16
        centroids, _ = kmeans1d_rows(dense[name].reshape(groups, glen), 2**bits) if groups > 1 else (None, None)
        if centroids is not None:
            table = mod.parametrizations.weight.original.detach().double().numpy()
            assert np.allclose(table, centroids.astype(np.float16), rtol=1e-3, atol=1e-6)
        err = (w - dense[name]).pow(2).sum()
        assert err <= dense[name].pow(2).sum() * (0.5 if bits == 1 else 0.1)
    assert tiny(torch.randint(0, 50, (2, 5))).shape == (2, 4)


def test_stored_once_and_gradients_reach_tables(tiny):
    ws.share_(tiny, ws.CodebookConfig(bits=2, granularity="per_channel"))
    names = [n for n, _ in tiny.named_parameters()]
    assert "fc1.parametrizations.weight.original" in names and "fc1.weight" not in names
    tables = tiny.fc1.parametrizations.weight.original
    labels = tiny.fc1.parametrizations.weight[0].labels.long()
    x = torch.randn(3, 16)
    out = tiny.fc1(x)
    g_out = torch.randn_like(out)
    out.backward(g_out)
    # reference: dL/dC[r, k] = sum of dL/dW[r, j] over j with label k
    dW = g_out.t() @ x  # (32, 16)
    expect = torch.zeros_like(tables).scatter_add_(1, labels, dW)
    assert torch.allclose(tables.grad, expect, atol=1e-5)


def test_codebook_model_trains(tiny):
    ws.share_(tiny, ws.CodebookConfig(bits=3))
    opt = torch.optim.Adam(tiny.parameters(), lr=0.02)
    tokens, target = torch.randint(0, 50, (16, 5)), torch.randn(16, 4)
    losses = []
    for _ in range(80):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(tiny(tokens), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    for mod in (tiny.fc1, tiny.emb):  # still a codebook: few distinct values per row
        assert all(r.unique().numel() <= 8 for r in mod.weight.detach())


def test_state_dict_round_trip_keeps_sharing(tiny):
    from tests.conftest import TinyNet

    ws.share_(tiny, ws.CodebookConfig(bits=4))
    fresh = ws.share_(TinyNet(), ws.CodebookConfig(bits=4))
    fresh.load_state_dict(tiny.state_dict())
    for a, b in zip(tiny.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(tiny.fc1.weight, fresh.fc1.weight)


def test_materialize_gives_plain_tensors(tiny):
    ws.share_(tiny, ws.CodebookConfig(bits=2))
    before = tiny.fc1.weight.detach().clone()
    ws.materialize_(tiny)
    assert "fc1.weight" in dict(tiny.named_parameters())
    assert torch.equal(tiny.fc1.weight, before)
    assert not hasattr(tiny.fc1, "parametrizations")


def test_filter_fn_selects_modules(tiny):
    ws.share_(tiny, ws.CodebookConfig(bits=2), filter_fn=lambda m, name: name.startswith("fc"))
    assert hasattr(tiny.fc1, "parametrizations") and not hasattr(tiny.emb, "parametrizations")


def test_data_aware_importance_changes_tables():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 2)
    w = lin.weight.detach().clone()
    plain = torch.nn.Linear(64, 2)
    plain.weight.data.copy_(w)
    importance = torch.ones_like(w)
    importance[:, :4] = 1000.0  # these inputs matter: with 8 centroids they get their own
    codebook_(lin, config=ws.CodebookConfig(bits=3), importance=importance)
    codebook_(plain, config=ws.CodebookConfig(bits=3))
    err_weighted = (lin.weight[:, :4] - w[:, :4]).abs().max()
    err_plain = (plain.weight[:, :4] - w[:, :4]).abs().max()
    assert err_weighted < 1e-3 < err_plain


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"granularity": "per_row"}, "granularity"),
        ({"granularity": "per_group"}, "group_size"),
        ({"granularity": "per_channel", "group_size": 4}, "group_size"),
        ({"table_dtype": "int8"}, "table_dtype"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ws.CodebookConfig(**kwargs)


def test_group_size_must_divide_and_nothing_is_half_applied(tiny):
    with pytest.raises(ValueError, match=r"fc2.weight: group_size=\d+ does not divide its rows"):
        ws.share_(tiny, ws.CodebookConfig(bits=2, granularity="per_group", group_size=16))
    assert not any(hasattr(m, "parametrizations") for m in tiny.modules())


def test_nan_weight_is_named(tiny):
    with torch.no_grad():
        tiny.conv.weight[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"conv.weight: weight contains NaN"):
        ws.share_(tiny, ws.CodebookConfig(bits=2))
    assert not any(hasattr(m, "parametrizations") for m in tiny.modules())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_non_finite_value_is_refused_in_every_dtype(bad, dtype):
    """The finite check is a min and max (both propagate NaN): each kind of bad value, anywhere, is caught."""
    from weightshare.kmeans import all_finite

    for where in (0, 777, 4095):
        x = torch.randn(64, 64).to(dtype)
        assert all_finite(x)
        x.view(-1)[where] = bad
        assert not all_finite(x)
        with pytest.raises(ValueError, match="NaN or inf"):
            kmeans1d_rows(x, 4)
        lin = torch.nn.Linear(64, 64).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(x)
        with pytest.raises(ValueError, match="weight contains NaN or inf"):
            codebook_(lin, config=ws.CodebookConfig(bits=2))


@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_indices_are_the_bit_stream_of_the_labels(bits):
    """What the packed file stores as indices is ``pack_bits`` of the labels at every width (at 4 and 8 bits
    the parametrization's own codes are written as they are)."""
    from weightshare.bitpack import pack_bits
    from weightshare.space import get_map

    lin = torch.nn.Linear(37, 5)  # an odd count of weights: the last byte is padded
    codebook_(lin, config=ws.CodebookConfig(bits=bits, granularity="per_tensor"))
    stored = {}
    get_map("codebook").pack("w", lin.parametrizations["weight"], lambda k, t: stored.setdefault(k, t))
    labels = lin.parametrizations["weight"][0].labels.numpy()
    assert np.array_equal(stored["w.__indices"].numpy(), pack_bits(labels, bits))


@pytest.mark.parametrize("granularity,group_size", [("per_channel", None), ("per_group", 8)])
def test_transformers_conv1d_gets_tables_per_output_channel(granularity, group_size):
    # GPT-2's Conv1D stores its weight (in, out): an output channel is a column
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(nf=6, nx=16)  # in 16, out 6
    dense = layer.weight.detach().clone()
    ws.share_(layer, ws.CodebookConfig(bits=2, granularity=granularity, group_size=group_size))
    w = layer.weight.detach()
    assert w.shape == (16, 6)
    columns = dense.t().reshape(-1, group_size or 16)  # (groups, values): consecutive inputs of one output
    centroids, _ = kmeans1d_rows(columns, 4)
    assert np.allclose(layer.parametrizations.weight.original.detach().double().numpy(),
                       centroids.astype(np.float16), rtol=1e-3, atol=1e-6)
    for g, group in enumerate(w.t().reshape(-1, group_size or 16)):
        assert group.unique().numel() <= 4
    x = torch.randn(3, 16)
    assert torch.allclose(layer(x), x @ w + layer.bias, atol=1e-6)


@pytest.mark.parametrize("bits", [3, 4, 6])
@pytest.mark.parametrize("granularity,group_size", [("per_tensor", None), ("per_channel", None), ("per_group", 3)])
@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_inference_decode_and_row_lookup_equal_the_plain_gather(bits, granularity, group_size, chunk, monkeypatch):
    # at inference weights decode in chunks from two-per-byte codes, and an embedding looks up
    # only its rows; both must equal the one-shot gather over the unpacked labels exactly
    import importlib

    cb_mod = importlib.import_module("weightshare.sharing.codebook")

    monkeypatch.setattr(cb_mod, "_DECODE_CHUNK", chunk)  # 7: odd chunks start mid-byte
    torch.manual_seed(bits)
    emb = torch.nn.Embedding(13, 9)  # odd sizes: a row of nibbles ends mid-byte
    lin = torch.nn.Linear(9, 11)
    for m in (emb, lin):
        ws.share_(torch.nn.Sequential(m), ws.CodebookConfig(bits=bits, granularity=granularity, group_size=group_size))
    for m in (emb, lin):
        plist = m.parametrizations.weight
        labels = plist[0].labels
        assert labels.shape == m.weight.shape and int(labels.max()) < 2**bits
        groups, glen = group_layout(labels.shape, granularity, group_size)
        expect = torch.gather(plist.original, 1, labels.reshape(groups, glen).long()).view(labels.shape)
        with torch.no_grad():
            assert torch.equal(m.weight, expect)
    tokens = torch.randint(0, 13, (4, 5))
    with torch.no_grad():
        assert type(emb).__name__.endswith("RowLookupEmbedding")
        assert torch.equal(emb(tokens), torch.nn.functional.embedding(tokens, emb.weight))
