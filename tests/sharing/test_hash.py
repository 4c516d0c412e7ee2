"""HashedNets: the hash against a reference XXH32, the map against a dense autograd reference, packing."""

import struct

import pytest
import torch

import weightshare as ws
from weightshare.pack import FILENAME
from weightshare.sharing.hash import hash_index, xxh32_pair

M32 = 1 << 32
Q1, Q2, Q3, Q4, Q5 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1


def _rotl(x, r):
    return ((x << r) | (x >> (32 - r))) % M32


def xxh32_reference(data: bytes, seed: int) -> int:
    """XXH32 as its specification gives it, for inputs shorter than 16 bytes: the slow obvious version."""
    h = (seed + Q5 + len(data)) % M32
    p = 0
    while p + 4 <= len(data):
        h = _rotl((h + struct.unpack("<I", data[p:p + 4])[0] * Q3) % M32, 17) * Q4 % M32
        p += 4
    while p < len(data):
        h = _rotl((h + data[p] * Q5) % M32, 11) * Q1 % M32
        p += 1
    h ^= h >> 15
    h = h * Q2 % M32
    h ^= h >> 13
    h = h * Q3 % M32
    return h ^ (h >> 16)


def test_reference_xxh32_matches_the_published_vector():
    assert xxh32_reference(b"", 0) == 0x02CC5D05  # XXH32 of the empty input, seed 0
    assert xxh32_reference(b"a", 0) == 0x550D7456


@pytest.mark.parametrize("i,j,seed", [(0, 0, 0), (1, 2, 3), (123456, 789, 42), (2**31 - 1, 2**31 - 1, 2**32 - 1)])
def test_kernel_hash_is_xxh32_of_the_pair(i, j, seed):
    assert xxh32_pair(i, j, seed) == xxh32_reference(struct.pack("<II", i, j), seed)


@pytest.mark.parametrize("hash", ["xxhash", "modular"])
@pytest.mark.parametrize("sign", [True, False])
def test_index_and_sign_follow_the_definition(hash, sign):
    shape, k, seed = (7, 3, 5), 11, 1234  # a conv weight: rows = 7 outputs, columns = 3*5
    idx, sgn = hash_index(shape, k, seed, hash, sign)
    for i in range(7):
        for j in range(15):
            x = xxh32_reference(struct.pack("<II", i, j), seed)
            want = (seed + i * j) % k if hash == "modular" else ((x >> 1) * k) >> 31
            assert idx.reshape(7, 15)[i, j] == want
            assert sgn.reshape(7, 15)[i, j] == (-1 if sign and x & 1 else 1)


def _reference_weight(theta, shape, p):
    idx, sgn = hash_index(shape, p.buckets, p.seed, p.hash, p.sign)
    return theta[torch.from_numpy(idx)] * torch.from_numpy(sgn).to(theta.dtype)


MODULES = {
    "linear": (lambda: torch.nn.Linear(20, 30), lambda: torch.randn(4, 20)),
    "conv2d": (lambda: torch.nn.Conv2d(3, 8, 3, padding=1), lambda: torch.randn(2, 3, 6, 6)),
    "embedding": (lambda: torch.nn.Embedding(50, 12), lambda: torch.randint(0, 50, (3, 5))),
}


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the C kernels, and the portable path
@pytest.mark.parametrize("hash", ["xxhash", "modular"])
def test_forward_and_gradient_equal_a_dense_autograd_reference(kind, dtype, hash):
    make, data = MODULES[kind]
    torch.manual_seed(0)
    m = make().to(dtype)
    ws.share_(torch.nn.Sequential(m), ws.HashConfig(compression=1 / 4, hash=hash, seed=7))
    plist = m.parametrizations.weight
    theta, p = plist.original, plist[0]
    x = data()
    x = x.to(dtype) if x.is_floating_point() else x
    m(x).square().sum().backward()
    # reference: W built by autograd-tracked indexing of a copy of θ, the layer's own functional form
    ref_theta = theta.detach().clone().requires_grad_()
    w = _reference_weight(ref_theta, m.weight.shape, p)
    with torch.no_grad():
        assert torch.equal(m.weight, w)
    if kind == "linear":
        out = torch.nn.functional.linear(x, w, m.bias)
    elif kind == "conv2d":
        out = torch.nn.functional.conv2d(x, w, m.bias, padding=1)
    else:
        out = torch.nn.functional.embedding(x, w)
    out.square().sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(theta.grad, ref_theta.grad, rtol=tol, atol=tol)


def test_buckets_compression_and_counting():
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    ws.share_(net, ws.HashConfig(compression=1 / 8))
    assert net[0].parametrizations.weight.original.shape == (64 * 256 // 8,)
    assert net[2].parametrizations.weight.original.shape == (2560 // 8,)
    r = ws.report(net)
    assert r.params_stored == 2048 + 320 + 256 + 10 and r.params_virtual == 64 * 256 + 2560 + 266
    assert {layer.map for layer in r.layers} == {"hash", "dense"}
    assert sum(p.numel() for p in net.parameters()) == r.params_stored  # θ once each, in the optimizer too
    net2 = torch.nn.Sequential(torch.nn.Linear(8, 8))
    ws.share_(net2, ws.HashConfig(buckets=5, hash="modular"))
    assert net2[0].parametrizations.weight.original.shape == (5,)


def test_layers_hash_differently_and_init_keeps_the_scale():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    std = net[0].weight.std().item()
    ws.share_(net, ws.HashConfig(compression=1 / 8))
    a, b = (net[i].parametrizations.weight[0] for i in (0, 1))
    assert a.seed != b.seed
    assert 0.8 < net[0].weight.std().item() / std < 1.25  # a sample of the dense init, not an average of it


def test_project_init_is_the_least_squares_fit():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    dense = lin.weight.detach().clone()
    ws.share_(torch.nn.Sequential(lin), ws.HashConfig(buckets=20, init="project"))
    p, theta = lin.parametrizations.weight[0], lin.parametrizations.weight.original.detach()
    idx, sgn = hash_index(p.shape, 20, p.seed, p.hash, p.sign)
    for k in range(20):
        mask = torch.from_numpy(idx == k)
        if mask.any():
            want = (dense[mask] * torch.from_numpy(sgn)[mask].float()).mean()
            assert torch.allclose(theta[k], want, atol=1e-6)


@pytest.mark.parametrize("config,match", [
    (dict(compression=1 / 1000), "leaves no bucket"),
    (dict(compression=0), "compression"),
    (dict(compression=1.5), "compression"),
    (dict(), "exactly one of compression and buckets"),
    (dict(compression=0.5, buckets=3), "exactly one of compression and buckets"),
    (dict(buckets=0), "buckets"),
    (dict(buckets=4, hash="md5"), "HashConfig.hash"),
    (dict(buckets=4, seed=-1), "HashConfig.seed"),
])
def test_bad_configs_are_refused_before_any_change(config, match):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(100, 100))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        ws.share_(net, ws.HashConfig(**config))
    assert not any(hasattr(m, "parametrizations") for m in net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_packed_file_holds_theta_and_the_seed_only(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, 10))
    ws.share_(net, ws.HashConfig(compression=1 / 8))
    path = ws.save(net, tmp_path / "h")
    data = (path / FILENAME).read_bytes()
    header = int.from_bytes(data[:8], "little")
    theta_bytes = sum(net[i].parametrizations.weight.original.numel() * 4 for i in (0, 2, 4))
    dense_bytes = sum(net[i].bias.numel() * 4 for i in (0, 2, 4))
    assert len(data) - 8 - header == theta_bytes + dense_bytes == ws.report(net).bytes_packed
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    loaded = ws.load(path, model=fresh)
    x = torch.randn(5, 64)
    assert torch.equal(loaded(x), net(x))
    assert loaded[2].parametrizations.weight[0].seed == net[2].parametrizations.weight[0].seed
    from weightshare.pack import dense_state_dict, read_spec

    spec, stored = read_spec(path)
    assert spec["tensors"]["2.weight"]["map"] == "hash" and "2.weight.__buckets" in stored
    assert torch.equal(dense_state_dict(spec, stored)["2.weight"], net[2].weight)  # export decodes the same weights
    ws.materialize_(loaded)
    assert not hasattr(loaded[2], "parametrizations") and torch.equal(loaded(x), net(x))


@pytest.mark.parametrize("hash", ["xxhash", "modular"])
def test_kernel_units_draw_whole_kernels_from_a_bank(hash):
    shape, k, seed, g = (4, 3, 2, 2), 5, 99, 4  # conv (out 4, in 3, 2x2): 12 channel pairs, a bank of 5 kernels
    idx, sgn = hash_index(shape, k, seed, hash, True, group=g)
    idx, sgn = idx.reshape(4, 3, g), sgn.reshape(4, 3, g)
    for i in range(4):
        for c in range(3):
            x = xxh32_reference(struct.pack("<II", i, c), seed)
            b = (seed + i * c) % k if hash == "modular" else ((x >> 1) * k) >> 31
            assert idx[i, c].tolist() == [b * g + t for t in range(g)]  # one kernel, its values in order
            assert set(sgn[i, c].tolist()) == {-1 if x & 1 else 1}


def test_conv_with_a_kernel_bank_trains_against_the_dense_reference(tmp_path):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    ws.share_(torch.nn.Sequential(conv), ws.HashConfig(compression=1 / 4, unit="kernel"))
    plist = conv.parametrizations.weight
    p, theta = plist[0], plist.original
    assert p.group == 9 and theta.shape == (24 // 4 * 9,)  # 6 of the 24 channel pairs' worth of kernels
    x = torch.randn(2, 4, 5, 5)
    conv(x).square().sum().backward()
    ref = theta.detach().clone().requires_grad_()
    idx, sgn = hash_index(p.shape, p.buckets, p.seed, p.hash, p.sign, group=p.group)
    w = ref[torch.from_numpy(idx)] * torch.from_numpy(sgn).float()
    torch.nn.functional.conv2d(x, w, conv.bias, padding=1).square().sum().backward()
    assert torch.allclose(theta.grad, ref.grad, rtol=1e-5, atol=1e-5)
    loaded = ws.load(ws.save(torch.nn.Sequential(conv), tmp_path / "k"),
                     model=torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1)))
    assert torch.equal(loaded[0](x), conv(x))


def test_training_keeps_no_index_per_virtual_weight():
    # what autograd saves for backward is the layer's input and the one weight matrix it computed with:
    # no int64 index (8 bytes per virtual weight) and no sign matrix
    lin = torch.nn.Linear(300, 200)
    ws.share_(torch.nn.Sequential(lin), ws.HashConfig(compression=1 / 16))
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    x = torch.randn(8, 300)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lin(x).sum().backward()
    assert all(dtype == torch.float32 for dtype, _ in saved)
    assert sum(n for _, n in saved) <= x.numel() + 200 * 300  # the input and one virtual weight matrix
    state = [t for t in list(lin.parameters()) + list(lin.buffers())]
    assert sum(t.numel() for t in state) == 200 * 300 // 16 + 200  # θ and the bias: nothing per weight


def test_packed_file_is_within_2_percent_of_theta_and_the_dense_tensors(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                              torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    ws.share_(net, ws.HashConfig(compression=1 / 8))
    path = ws.save(net, tmp_path / "big")
    payload = sum(p.numel() * 4 for p in net.parameters())  # θ of each layer and the biases
    size = (path / FILENAME).stat().st_size
    assert payload < size <= 1.02 * payload


def test_hash_then_codebook_compose_and_round_trip(tmp_path):
    # the buckets θ of a hashed layer clustered into an 8-entry table: W = s·C[a[h(i,j)]]
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))  # noqa: E731
    net = ws.share_(make(), ws.HashConfig(compression=1 / 8))
    ws.share_(net, ws.CodebookConfig(bits=3, granularity="per_tensor"))
    plist = net[0].parametrizations.weight
    assert plist.original.unique().numel() <= 8
    assert [n for n, _ in net.named_parameters()] == [
        "0.bias", "0.parametrizations.weight.parametrizations.original.original",
        "2.bias", "2.parametrizations.weight.parametrizations.original.original"]
    r = ws.report(net)
    assert r.params_stored == 2 * 8 + 128 + 10 and r.bits_per_weight < 0.5
    x = torch.randn(4, 64)
    net(x).sum().backward()  # gradients reach the tables through both maps
    assert plist.parametrizations.original.original.grad.abs().sum() > 0
    path = ws.save(net, tmp_path / "hc")
    from weightshare.pack import dense_state_dict, read_spec

    spec, stored = read_spec(path)
    assert spec["tensors"]["0.weight.__buckets"]["map"] == "codebook" and "0.weight.__buckets" not in stored
    loaded = ws.load(path, model=make())
    assert torch.equal(loaded(x), net(x))
    assert loaded[0].parametrizations.weight.parametrizations.original[0].labels.shape == plist.original.shape
    assert torch.equal(dense_state_dict(spec, stored)["0.weight"], net[0].weight)
    with pytest.raises(ValueError, match="single row of buckets"):
        ws.share_(ws.share_(make(), ws.HashConfig(compression=1 / 8)), ws.CodebookConfig(bits=3))
