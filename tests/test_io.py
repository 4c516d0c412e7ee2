"""weightshare.io, the one safetensors layer: what it writes is what the safetensors library writes, and what
its header parser accepts is what the library reads (anything else is one HeaderError with a message)."""

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save as st_save

import tests.fuzz_helpers as fh
import weightshare as ws
from tests.conftest import TinyNet
from weightshare import io, pack
from weightshare.pack import FILENAME


def sorted_metadata(data: bytes) -> bytes:
    """A file the safetensors library wrote, with its ``__metadata__`` keys in sorted order (the library writes them
    in hash-map order, which changes from run to run): the same bytes otherwise, and the same length."""
    n = int.from_bytes(data[:8], "little")
    raw = data[8:8 + n]
    meta = json.loads(raw).get("__metadata__")
    if meta is None:
        return data

    def text(m):  # '{"__metadata__":{...}' as serde_json writes it
        return json.dumps({"__metadata__": m}, separators=(",", ":"), ensure_ascii=False)[:-1].encode()

    assert raw.startswith(text(meta)), "the reference's metadata is not re-serialized exactly"
    return data[:8] + text(dict(sorted(meta.items()))) + raw[len(text(meta)):] + data[8 + n:]


def _library_bytes(file: Path) -> bytes:
    """What ``safetensors.torch.save`` writes for the tensors and metadata of ``file`` (metadata keys sorted)."""
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    return sorted_metadata(st_save(tensors, metadata=meta))


# ----------------------------------------------------------------------------- writing


def _codebook():
    torch.manual_seed(0)
    return ws.share_(TinyNet(), ws.CodebookConfig(bits=3, granularity="per_channel"))


def _tied():
    torch.manual_seed(0)
    return ws.share_(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)]), ws.TieConfig(params=["*.weight"]))


def _hashed():
    torch.manual_seed(0)
    return ws.share_(TinyNet(), ws.HashConfig(compression=0.25))


def _half_codebook():
    torch.manual_seed(0)
    return ws.share_(TinyNet().to(torch.bfloat16), ws.CodebookConfig(bits=2))


def _dense():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(7, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2).half())


@pytest.mark.parametrize("make", [_codebook, _tied, _hashed, _half_codebook, _dense])
def test_save_writes_the_bytes_safetensors_writes(make, tmp_path):
    """ws.save streams the packed file, one tensor at a time: the file is byte for byte the one
    safetensors.torch.save makes of the same tensors and metadata (as ws.save wrote it, built whole in memory,
    before), with the metadata keys sorted; file_size tells its size; saving again gives the same bytes."""
    model = make()
    path = ws.save(model, tmp_path / "a")
    data = (path / FILENAME).read_bytes()
    assert data == _library_bytes(path / FILENAME)
    assert pack.file_size(model) == len(data)
    assert (ws.save(model, tmp_path / "b") / FILENAME).read_bytes() == data
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n])["__metadata__"]
    assert list(meta) == sorted(meta) == ["format", "format_version", "spec", "spec_sha256"]


names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: s != "__metadata__")
shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)
metadata = st.none() | st.dictionaries(st.text(st.characters(blacklist_categories=("Cs",)), max_size=6),
                                       st.text(st.characters(blacklist_categories=("Cs",)), max_size=12), max_size=4)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(names, st.tuples(st.sampled_from(sorted(io.DTYPES)), shapes), min_size=1, max_size=6),
       metadata, st.integers(0, 2**32 - 1))
def test_the_streaming_writer_writes_what_safetensors_writes(specs, meta, seed):
    """Any names (escapes, non-ASCII), dtypes, shapes (empty, scalar) and metadata: write_safetensors in
    layout's order gives safetensors' bytes; file_size its length; read_header and read_tensor read it back."""
    g = torch.Generator().manual_seed(seed)
    tensors = {name: (torch.randint(0, 255, shape, generator=g, dtype=torch.uint8) if io.DTYPES[d] == torch.bool
                      else torch.randn(shape, generator=g) * 100).to(io.DTYPES[d])
               for name, (d, shape) in specs.items()}
    entries = io.layout((name, tuple(t.shape), t.dtype) for name, t in tensors.items())
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "x.safetensors"
        io.write_safetensors(file, entries, (tensors[name] for name, _, _ in entries), meta)
        data = file.read_bytes()
        assert data == sorted_metadata(st_save(tensors, metadata=meta))
        assert io.file_size(entries, meta) == len(data)
        header = io.read_header(file)
        assert header.metadata == (meta or {}) and sorted(header.tensors) == sorted(tensors)
        for name, span in header.tensors.items():
            assert torch.equal(io.read_tensor(file, span), tensors[name])


def test_write_refuses_a_tensor_unlike_its_header_entry(tmp_path):
    with pytest.raises(RuntimeError, match="the header says"):
        io.write_safetensors(tmp_path / "x", [("a", (2,), torch.float32)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="dtype torch.complex64 cannot be written"):
        io.layout([("a", (2,), torch.complex64)])


# ----------------------------------------------------------------------------- reading


def test_read_tensor_reads_a_span_of_flat_entries(tmp_path):
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    (tmp_path / "x.safetensors").write_bytes(st_save({"t": t}))
    span = io.read_header(tmp_path / "x.safetensors").tensors["t"]
    assert torch.equal(io.read_tensor(tmp_path / "x.safetensors", span, 5, 17), t.reshape(-1)[5:17])


def test_a_file_cut_after_its_header_was_read_is_an_eof_error(tmp_path):
    file = tmp_path / "x.safetensors"
    file.write_bytes(st_save({"t": torch.ones(100)}))
    span = io.read_header(file).tensors["t"]
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(EOFError, match="10 bytes missing"):
        io.read_tensor(file, span)
    with pytest.raises(io.HeaderError, match="^[A-Za-z]+: "):  # the cause, named by its type
        io.read_header(file)


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
    """A real safetensors file: the packed file of a small codebook model (indices, tables, dense tensors)."""
    return (ws.save(_codebook(), tmp_path_factory.mktemp("io") / "m") / FILENAME).read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_read_header_parses_what_safetensors_reads_or_refuses_with_one_error(packed_file, data):
    """Mutations of a real header (dtypes, shapes, offsets, metadata, the length prefix): read_header either raises
    HeaderError with a message, or gives each tensor's dtype, shape and span as the mutated header says, and
    read_tensor then reads what the safetensors library reads."""
    header, _ = fh.split_safetensors(packed_file)
    mutated = fh.apply_header_mutations(packed_file, data.draw(fh.header_mutations(header, max_size=3)))
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "m.safetensors"
        file.write_bytes(mutated)
        try:
            got = io.read_header(file)
        except io.HeaderError as exc:
            assert str(exc).strip(), "a HeaderError without a message"
            return
        n = int.from_bytes(mutated[:8], "little")
        raw = json.loads(mutated[8:8 + n])
        with safe_open(str(file), framework="pt") as f:
            assert got.metadata == (f.metadata() or {}) and list(got.tensors) == list(f.keys())
            for name, span in got.tensors.items():
                begin, end = raw[name]["data_offsets"]
                assert (span.dtype, list(span.shape), span.offset, span.nbytes) == \
                    (raw[name]["dtype"], raw[name]["shape"], 8 + n + begin, end - begin)
                if span.dtype in io.TORCH_DTYPES:  # bytes compared: reinterpreted ones may read as NaN
                    have, want = io.read_tensor(file, span), f.get_tensor(name)
                    assert (have.dtype, have.shape) == (want.dtype, want.shape)
                    assert torch.equal(have.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


# ----------------------------------------------------------------------------- folders


def test_check_dest_replaces_only_its_own_kind(tmp_path):
    (tmp_path / "out").mkdir()
    io.check_dest(tmp_path / "out", None, FILENAME, "packed model")  # empty: fine
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and not a packed model"):
        io.check_dest(tmp_path / "out", None, FILENAME, "packed model")
    (tmp_path / "out" / FILENAME).write_bytes(b"")
    io.check_dest(tmp_path / "out", None, FILENAME, "packed model")  # an earlier packed model: replaced
    with pytest.raises(ValueError, match="is the source model directory"):
        io.check_dest(tmp_path / "out", str(tmp_path / "out"), FILENAME, "packed model")
    with pytest.raises(ValueError, match="exists and is a file"):
        io.check_dest(tmp_path / "out" / "notes.txt", None, FILENAME, "packed model")
