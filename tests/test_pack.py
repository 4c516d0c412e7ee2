import hashlib
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

import weightshare as ws
from tests.conftest import TinyNet
from weightshare.bitpack import pack_bits, unpack_bits
from weightshare.kmeans import kmeans1d_rows
from weightshare.pack import FILENAME


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1001])
def test_bit_packing_round_trip_and_size(bits, count):
    values = np.random.default_rng(bits * 100 + count).integers(0, 2**bits, count).astype(np.uint8)
    packed = pack_bits(values, bits)
    assert packed.size == (count * bits + 7) // 8  # exactly `bits` bits per value
    assert np.array_equal(unpack_bits(packed, bits, count), values)


def test_bit_packing_layout_is_little_endian():
    # 3-bit values 1, 2, 7 -> bit stream (LSB first) 100 010 111 -> bytes 0b11010001, 0b00000001
    assert pack_bits(np.array([1, 2, 7], np.uint8), 3).tolist() == [0b11010001, 0b1]


@pytest.fixture
def packed_tiny(tiny, tmp_path):
    ws.share_(tiny, ws.CodebookConfig(bits=3, granularity="per_channel"))
    path = ws.save(tiny, tmp_path / "tiny")
    return tiny, path


def test_round_trip_is_bit_exact(packed_tiny):
    tiny, path = packed_tiny
    loaded = ws.load(path, model=TinyNet())
    for name in ("emb", "fc1", "conv", "fc2"):
        assert torch.equal(getattr(tiny, name).weight, getattr(loaded, name).weight)
        assert torch.equal(getattr(tiny, name).bias if name != "emb" else tiny.emb.weight,
                           getattr(loaded, name).bias if name != "emb" else loaded.emb.weight)
    x = torch.randint(0, 50, (2, 5))
    # packed modules sum in another order than F.linear on the decoded weight; the parametrized form is bit exact
    assert torch.allclose(tiny(x), loaded(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(tiny(x), ws.load(path, model=TinyNet(), trainable=True)(x))
    counts = [{k: v for k, v in ws.report(m).to_dict(layers=False).items() if k != "bytes_in_memory"}
              for m in (loaded, tiny)]
    assert counts[0] == counts[1]  # what is stored is the same; what is held in memory is each form's own


def test_file_size_is_within_2_percent_of_theory(packed_tiny):
    tiny, path = packed_tiny
    r = ws.report(tiny)
    size = os.path.getsize(path / FILENAME)
    # report.bytes_packed is the theoretical size: indices at 3 bits, fp16 tables, untouched tensors;
    # the tiny model's JSON header is large relative to it, so compare the tensor payload here
    with open(path / FILENAME, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    assert size - 8 - header == r.bytes_packed


def test_trained_tables_are_kept_exactly(tiny, tmp_path):
    ws.share_(tiny, ws.CodebookConfig(bits=2))
    with torch.no_grad():
        tiny.fc1.parametrizations.weight.original.add_(1e-4)  # off the fp16 grid, as after fine-tuning
    path = ws.save(tiny, tmp_path / "t")
    loaded = ws.load(path, model=TinyNet())
    assert torch.equal(tiny.fc1.weight, loaded.fc1.weight)


def test_tied_weights_round_trip(tmp_path):
    m = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)])
    ws.share_(m, ws.TieConfig(params=["*.weight"]))
    path = ws.save(m, tmp_path / "tied")
    fresh = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)])
    loaded = ws.load(path, model=fresh)
    assert loaded[2].weight is loaded[0].weight and torch.equal(loaded[0].weight, m[0].weight)


def _rewrite(path, mutate_tensors=None, mutate_meta=None, fix_spec_checksum=True):
    file = path / FILENAME
    with safe_open(str(file), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_meta:
        mutate_meta(meta)
    if fix_spec_checksum and "spec_sha256" in meta:  # as a deliberate attacker would
        meta["spec_sha256"] = hashlib.sha256(meta["spec"].encode()).hexdigest()
    file.write_bytes(st_save(tensors, metadata=meta))


def _spec_edit(fn):
    def mutate(meta):
        spec = json.loads(meta["spec"])
        fn(spec)
        meta["spec"] = json.dumps(spec)

    return mutate


def _flip_index_byte(t):
    t["fc1.weight.__indices"][0] ^= 0xFF


def _shrink_table(t):
    t["fc1.weight.__tables"] = t["fc1.weight.__tables"][:, :4].contiguous()


@pytest.mark.parametrize(
    "tamper,match",
    [
        (dict(mutate_meta=lambda m: m.update(format_version="99")), "unknown format version"),
        (dict(mutate_meta=lambda m: m.update(format="other")), "not a weightshare file"),
        (dict(mutate_meta=lambda m: m.update(spec="{")), "spec in the metadata is unreadable"),
        (dict(mutate_tensors=_flip_index_byte), "checksum mismatch for tensor 'fc1.weight.__indices'"),
        (dict(mutate_tensors=_shrink_table), r"fc1.weight.__tables'?: wrong shape"),
        (dict(mutate_tensors=lambda t: t.update(extra=torch.zeros(1))), "not described by the spec"),
        (dict(mutate_tensors=lambda t: t.pop("fc2.bias")), "'fc2.bias' is missing"),
        (dict(mutate_meta=_spec_edit(lambda s: s["tensors"]["fc1.weight"]["config"].update(bits=12))),
         "bad codebook entry.*bits must be an integer in 1..8"),
        (dict(mutate_meta=_spec_edit(lambda s: s["tensors"]["fc1.weight"].update(map="magic"))), "unknown map"),
        (dict(mutate_meta=_spec_edit(lambda s: s["tensors"]["fc1.weight"].update(transposed="yes"))),
         "bad 'transposed'"),
        (dict(mutate_meta=_spec_edit(lambda s: s["tensors"]["conv.weight"].update(transposed=True))),
         "bad 'transposed'"),
    ],
)
def test_tampered_files_are_refused(packed_tiny, tamper, match):
    _, path = packed_tiny
    _rewrite(path, **tamper)
    with pytest.raises(ws.PackError, match=match):
        ws.load(path, model=TinyNet())


def test_truncated_file_is_refused(packed_tiny):
    _, path = packed_tiny
    file = path / FILENAME
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ws.PackError, match="truncated"):
        ws.load(path, model=TinyNet())


def test_missing_dir_and_file(tmp_path):
    with pytest.raises(ws.PackError, match="not found"):
        ws.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ws.PackError, match="no weightshare.safetensors"):
        ws.load(tmp_path / "empty")


def test_failed_write_leaves_old_file(packed_tiny, monkeypatch):
    tiny, path = packed_tiny
    before = (path / FILENAME).read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        ws.save(tiny, path)
    assert (path / FILENAME).read_bytes() == before
    assert sorted(p.name for p in path.iterdir()) == [FILENAME]  # no temp file left behind


def test_refuses_non_empty_foreign_directory(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and not a packed model"):
        ws.save(tiny, tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_half_precision_model_stays_half_and_round_trips(tmp_path, dtype, granularity):
    torch.manual_seed(0)
    model = TinyNet().to(dtype)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    ws.share_(model, ws.CodebookConfig(bits=3, granularity=granularity))
    assert model.fc1.weight.dtype == dtype  # computes in its own precision, like its biases
    tokens = torch.randint(0, 50, (2, 5))
    assert model(tokens).dtype == dtype
    # the tables are still the optimum of the weights (as float32), rounded to fp16 and then to dtype: the solver's
    # own centroids (a half row can have two optimal clusterings of equal SSE; any solver may pick either)
    w = dense["fc1.weight"].float()
    if granularity == "per_tensor":
        centroids = [ws.kmeans1d(w.reshape(-1).half(), 8)[0]]
    else:
        centroids = list(kmeans1d_rows(w, 8)[0])
    for r, c in enumerate(centroids):
        table = model.fc1.parametrizations.weight.original[r].float()
        assert torch.equal(table[: c.size], torch.from_numpy(c).half().to(dtype).float())
        x = w.reshape(len(centroids), -1)[r].double()
        def sse(centres):
            return float(((x[:, None] - torch.from_numpy(centres)[None]) ** 2).min(1).values.sum())

        assert sse(c) == pytest.approx(sse(ws.kmeans1d(x, 8)[0]), rel=1e-9)
    path = ws.save(model, tmp_path / "half")
    loaded = ws.load(path, model=TinyNet().to(dtype))
    for name in ("emb", "fc1", "conv", "fc2"):
        assert torch.equal(getattr(model, name).weight, getattr(loaded, name).weight)
    assert torch.equal(model(tokens), loaded(tokens))
    from weightshare.pack import dense_state_dict, read_spec

    spec, tensors = read_spec(path)
    assert spec["tensors"]["fc1.weight"]["dtype"] == str(dtype).removeprefix("torch.")
    assert dense_state_dict(spec, tensors)["fc1.weight"].dtype == dtype  # export keeps the dtype


class TiedLM(torch.nn.Module):
    """Embedding -> Linear -> head whose weight is the embedding (as in most language models)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 12)
        self.mix = torch.nn.Linear(12, 12)
        self.head = torch.nn.Linear(12, 30, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):  # (B, T) -> (B, T, 30)
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


def test_tied_weight_gets_one_codebook_through_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    # cluster the tied pair only, so that mix stays dense and the counts below are plain
    ws.share_(model, ws.CodebookConfig(bits=2, granularity="per_channel"), filter_fn=lambda m, name: name != "mix")
    tables = model.emb.parametrizations.weight.original
    assert model.head.parametrizations.weight.original is tables  # one table parameter for both uses
    assert torch.equal(model.head.weight, model.emb.weight)
    assert sum(p.numel() for p in model.parameters()) == tables.numel() + 12 * 12 + 12
    assert ws.report(model).params_stored == tables.numel() + 12 * 12 + 12
    # gradients of both uses add up in the shared tables, as in the tied dense weight
    tokens = torch.randint(0, 30, (3, 5))
    model(tokens).square().sum().backward()
    labels = model.emb.parametrizations.weight[0].labels.long()
    dense = TiedLM()
    with torch.no_grad():
        dense.emb.weight.copy_(model.emb.weight)
        dense.mix.load_state_dict(model.mix.state_dict())
    dense(tokens).square().sum().backward()
    expect = torch.zeros_like(tables).scatter_add_(1, labels, dense.emb.weight.grad)
    assert torch.allclose(tables.grad, expect, atol=1e-5)
    path = ws.save(model, tmp_path / "tied")
    from weightshare.pack import dense_state_dict, read_spec

    spec, stored = read_spec(path)
    assert spec["tensors"]["head.weight"] == {"map": "alias", "of": "emb.weight"}
    assert not any(name.startswith("head.") for name in stored)  # nothing of the head is written twice
    loaded = ws.load(path, model=TiedLM(), trainable=True)
    assert loaded.head.parametrizations.weight.original is loaded.emb.parametrizations.weight.original
    assert torch.equal(loaded(tokens), model(tokens))
    packed = ws.load(path, model=TiedLM())  # the packed modules share one set of indices and tables
    assert packed.head.indices is packed.emb.indices and packed.head.tables is packed.emb.tables
    assert torch.allclose(packed(tokens), model(tokens), rtol=1e-5, atol=1e-6)
    plain = dense_state_dict(spec, stored)
    assert torch.equal(plain["head.weight"], plain["emb.weight"])


class WithConv1D(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.proj = Conv1D(nf=24, nx=8)  # weight (8, 24)
        self.out = torch.nn.Linear(24, 8)


def test_transposed_codebook_round_trip_and_version(tmp_path):
    torch.manual_seed(0)
    model = ws.share_(WithConv1D(), ws.CodebookConfig(bits=3))
    path = ws.save(model, tmp_path / "t")
    from weightshare.pack import dense_state_dict, read_spec

    with safe_open(str(path / FILENAME), framework="pt") as f:
        assert f.metadata()["format_version"] == "3"
    spec, stored = read_spec(path)
    assert spec["tensors"]["proj.weight"]["transposed"] is True and "transposed" not in spec["tensors"]["out.weight"]
    loaded = ws.load(path, model=WithConv1D())
    assert torch.equal(loaded.proj.weight, model.proj.weight) and torch.equal(loaded.out.weight, model.out.weight)
    assert torch.equal(dense_state_dict(spec, stored)["proj.weight"], model.proj.weight)
    # a model whose layer is not a Conv1D cannot take these tables
    wrong = WithConv1D()
    wrong.proj = torch.nn.Linear(8, 24)  # computes the same map, but its weight is (24, 8), laid out over W
    before = {n: t.clone() for n, t in wrong.state_dict().items()}
    with pytest.raises(ValueError, match="over W\\^T, which does not fit the model's Linear") as err:
        ws.load(path, model=wrong)
    assert "proj.weight: file (8, 24), model (24, 8)" in str(err.value)
    assert all(torch.equal(before[n], t) for n, t in wrong.state_dict().items())  # refused before any write



def _as_version(path, version):
    """Rewrite a packed file as an older writer made it: checksums over the bytes alone, no spec checksum."""

    def mutate(meta):
        spec = json.loads(meta["spec"])
        with safe_open(str(path / FILENAME), "pt") as f:
            spec["checksums"] = {k: hashlib.sha256(f.get_tensor(k).contiguous().view(-1).view(torch.uint8).numpy().data)
                                 .hexdigest() for k in f.keys()}
        meta.update(format_version=version, spec=json.dumps(spec))
        del meta["spec_sha256"]

    _rewrite(path, mutate_meta=mutate)


@pytest.mark.parametrize("version", ["1", "2"])
def test_files_of_earlier_versions_still_load(packed_tiny, version):
    tiny, path = packed_tiny
    _as_version(path, version)
    loaded = ws.load(path, model=TinyNet(), trainable=True)
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), loaded.state_dict().values()))
    packed = ws.materialize_(ws.load(path, model=TinyNet())).state_dict()
    plain = ws.materialize_(tiny).state_dict()
    assert packed.keys() == plain.keys() and all(torch.equal(plain[k], packed[k]) for k in plain)


def test_bytes_read_as_another_dtype_are_refused(packed_tiny):
    # fp16 tables relabelled bf16 in the safetensors header keep their bytes (and a bytes-only checksum),
    # and bf16 is an allowed table dtype: version 3 checksums cover the dtype and the shape too
    _, path = packed_tiny
    data = bytearray((path / FILENAME).read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["fc1.weight.__tables"]["dtype"] = "BF16"
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # same length: the body stays where it was
    (path / FILENAME).write_bytes(bytes(data[:8]) + raw + bytes(data[8 + n:]))
    with pytest.raises(ws.PackError, match="checksum mismatch for tensor 'fc1.weight.__tables'"):
        ws.load(path, model=TinyNet())


def test_a_changed_spec_is_refused_even_when_it_still_fits_the_tensors(packed_tiny):
    # fc1's weight declared float16: a valid field, every tensor checksum holds, but the model would differ
    _, path = packed_tiny
    _rewrite(path, mutate_meta=_spec_edit(lambda s: s["tensors"]["fc1.weight"].update(dtype="float16")),
             fix_spec_checksum=False)
    with pytest.raises(ws.PackError, match="checksum mismatch for the sharing spec"):
        ws.load(path, model=TinyNet())


def test_the_model_inside_a_sentence_transformer_saves_a_complete_folder(tmp_path, minilm_path):
    """load_pretrained returns the model; saving the transformers model inside it (what a codebook was applied
    to) writes the same complete folder: tokenizer and pooling are not lost."""
    from weightshare.hub import inner_model, load_pretrained

    model = load_pretrained(minilm_path)
    inner = inner_model(model)
    ws.share_(inner, ws.CodebookConfig(bits=2), filter_fn=lambda m, n: n.endswith("layer.5.output.dense"))
    ws.save(inner, tmp_path / "p")
    assert (tmp_path / "p" / "tokenizer.json").is_file() and (tmp_path / "p" / "modules.json").is_file()
    emb = ws.load(tmp_path / "p").encode(["weight sharing"])
    assert emb.shape == (1, 384)
