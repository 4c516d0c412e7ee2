"""The one safetensors layer: dtype tables, checked headers, positioned reads, streaming writes, staged folders.

The ``safetensors`` library parses and checks a file's header, but it reads a tensor through a memory
map of the whole file and writes a file by building all of it in memory.  Models larger than memory
need neither: this module reads one tensor (or a span of one) into memory of its own with positioned
reads, and writes a file header first, every offset computed up front, then one tensor at a time,
laid out and serialized as the library lays out and serializes its own files (``layout``), so that a
file written here is byte for byte the one ``safetensors.torch.save`` would write, with its
``__metadata__`` keys sorted (the library writes them in hash-map order, which changes from run to run).

Output folders are built beside their destination and renamed into place (``staged_dir``), after
``check_dest`` has made sure nothing but an earlier output of the same kind is replaced.

pack.py (the packed container), load.py (export), merge/streaming.py, compress and report use it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from weightshare.errors import clip

__all__ = ["DTYPES", "HEADER_DTYPES", "TORCH_DTYPES", "CODES", "HeaderError", "TensorSpan", "Header", "read_header",
           "read_bytes", "read_tensor", "read_chunks", "layout", "header_bytes", "file_size", "write_safetensors",
           "Tensors", "FileSpan", "SHARD_INDEX", "shard_plan", "write_shards", "trim_heap", "staged_dir", "check_dest"]

# the dtypes weightshare reads and writes, by the names packed specs use (torch's, without "torch.")
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
    "bool": torch.bool}
# safetensors' dtype codes for them
HEADER_DTYPES: dict[str, str] = {
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32",
    "U8": "uint8", "I8": "int8", "I16": "int16", "BOOL": "bool"}
TORCH_DTYPES: dict[str, torch.dtype] = {code: DTYPES[name] for code, name in HEADER_DTYPES.items()}
CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in TORCH_DTYPES.items()}
# safetensors' own dtype enum, in its order: its writer lays tensors out by this order, largest first, then by name
_ENUM_ORDER = ("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")


class HeaderError(ValueError):
    """A file the safetensors library refuses, or whose header does not hold together.

    The message is the cause as ``"TypeName: detail"``; each caller puts it in its own words.
    """


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's bytes lie in a safetensors file."""

    dtype: str  # safetensors' code ("F16"); may be one weightshare does not read (not in TORCH_DTYPES)
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    """A checked safetensors header: its ``__metadata__`` and every tensor's span, in the library's order of names."""

    metadata: dict[str, str]
    tensors: dict[str, TensorSpan]


def read_header(path: str | os.PathLike) -> Header:
    """Read and check the header of the safetensors file at ``path``; no tensor data is read.

    The safetensors library checks the header first (its size bounds, the JSON, offsets contiguous from
    zero to the end of the file, every byte count against its dtype and shape); the raw header is then
    read again for the offsets the library does not give, and, the file being untrusted input that may
    have changed since, every span is checked once more against its dtype, shape and the file's size.
    Raises ``HeaderError``.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            claimed = {}
            for key in handle.keys():
                piece = handle.get_slice(key)
                claimed[key] = (piece.get_dtype(), tuple(piece.get_shape()))
        return Header(metadata, _spans(Path(path), claimed))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # safetensors raises its own types, and a Rust panic is a BaseException
        raise HeaderError(f"{type(exc).__name__}: {exc}") from None


def _spans(path: Path, claimed: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, TensorSpan]:
    """Each tensor's span from the raw header, checked against its (dtype, shape) in ``claimed`` and the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= size - 8:
            raise ValueError(f"header length {n}")
        header = json.loads(f.read(n))
    spans = {}
    for key, (dtype, shape) in claimed.items():
        begin, end = header[key]["data_offsets"]
        fits = isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end and 8 + n + end <= size
        # a dtype weightshare does not read has no size here: its count was the library's check, its reader refuses it
        if not fits or (dtype in TORCH_DTYPES and end - begin != math.prod(shape) * TORCH_DTYPES[dtype].itemsize):
            raise ValueError(f"tensor {key!r}: data offsets {begin}..{end}")
        spans[key] = TensorSpan(dtype, shape, 8 + n + begin, end - begin)
    return spans


def read_bytes(path: str | os.PathLike, offset: int, nbytes: int) -> torch.Tensor:
    """``nbytes`` bytes of the file at ``offset``, as a uint8 tensor in memory of its own.

    Positioned reads, not a memory map: a map would keep the file's pages counted against the
    process while the caller holds its copy.  Raises ``OSError``, or ``EOFError`` when the file
    is shorter than its header says.
    """
    buf = torch.empty(nbytes, dtype=torch.uint8, device="cpu")  # from_pretrained reads under a meta device
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        view, got = memoryview(buf.numpy()), 0
        while got < nbytes:
            step = f.readinto(view[got:])
            if not step:
                raise EOFError(f"{nbytes - got} bytes missing")
            got += step
    return buf


def read_tensor(path: str | os.PathLike, span: TensorSpan, start: int | None = None,
                stop: int | None = None) -> torch.Tensor:
    """The tensor ``span`` describes (its dtype one of ``TORCH_DTYPES``), or with ``start``/``stop`` its flat
    entries [start, stop), a byte range of the row-major data.  Raises as ``read_bytes``."""
    dtype = TORCH_DTYPES[span.dtype]
    offset, nbytes, shape = span.offset, span.nbytes, span.shape
    if start is not None:
        offset, nbytes, shape = offset + start * dtype.itemsize, (stop - start) * dtype.itemsize, (stop - start,)
    return read_bytes(path, offset, nbytes).view(dtype).reshape(shape)


def read_chunks(f, offset: int, nbytes: int, buffer: memoryview, name: str) -> Iterator[memoryview]:
    """The ``nbytes`` bytes at ``offset`` of the open file ``f`` (tensor ``name``'s), in pieces of at most
    ``len(buffer)``: each piece is a view of ``buffer``, valid until the next.  Raises ``EOFError`` when short."""
    f.seek(offset)
    left = nbytes
    while left:
        step = f.readinto(buffer[:min(len(buffer), left)])
        if not step:
            raise EOFError(f"{left} bytes of {name!r} missing")
        yield buffer[:step]
        left -= step


class Tensors:
    """Tensors spread over safetensors files (a checkpoint, sharded or not): every header is read and checked
    when it is opened, a tensor's data when it is asked for (``read``), with positioned reads.

    ``files`` maps a tensor name to the file holding it (a shard index's ``weight_map``), or ``""`` to a
    file all of whose tensors are taken; ``meta`` is ``{name: (shape, dtype)}``.  Raises ``ValueError``
    naming the file for one that is not a readable safetensors file or holds a dtype weightshare does not read.
    """

    def __init__(self, files: dict[str, Path]):
        self.meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.where: dict[str, tuple[Path, TensorSpan]] = {}
        for file in sorted(set(files.values())):
            try:
                header = read_header(file)
            except HeaderError as exc:
                raise ValueError(clip(f"{file}: not a readable safetensors file ({exc})")) from None
            for name, span in header.tensors.items():
                if files.get(name, file) != file:
                    continue  # an index names another shard for it
                if span.dtype not in TORCH_DTYPES:
                    raise ValueError(f"{file}: tensor {name!r} has dtype {span.dtype}\n"
                                     f"  expected one of: {', '.join(TORCH_DTYPES)}")
                self.meta[name] = (span.shape, TORCH_DTYPES[span.dtype])
                self.where[name] = (file, span)
        missing = sorted(name for name in files if name and name not in self.meta)
        if missing:
            raise ValueError(clip(f"{files[missing[0]]}: the shard index names {len(missing)} tensor(s) this file "
                                   f"does not hold: {missing[:3]}"))

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor ``name``, or with ``start``/``stop`` its flat entries [start, stop)."""
        file, span = self.where[name]
        try:
            return read_tensor(file, span, start, stop)
        except EOFError:
            raise ValueError(f"{file}: tensor {name!r} is cut short (the file changed or was truncated "
                             "after its header was read)") from None
        except OSError as exc:
            raise ValueError(f"{file}: tensor {name!r} cannot be read ({exc.strerror or exc})") from None


# ----------------------------------------------------------------------------- writing

Entry = tuple[str, tuple[int, ...], torch.dtype]  # (name, shape, dtype) of a tensor to write


@dataclass(frozen=True)
class FileSpan:
    """A tensor to write that lies, already serialized, in an open file (a scratch file): ``write_safetensors``
    copies its ``nbytes`` at ``offset`` without holding them."""

    file: object  # an open binary file
    offset: int
    shape: tuple[int, ...]
    nbytes: int


_COPY_PIECE = 1 << 24


def _copy_span(src, dst, offset: int, nbytes: int) -> None:
    """Copy ``nbytes`` of ``src`` at ``offset`` to ``dst``'s position, in the kernel where it can."""
    dst.flush()
    at = dst.tell()
    done = 0
    copy = getattr(os, "copy_file_range", None)  # Linux only
    try:
        while copy is not None and done < nbytes:
            step = copy(src.fileno(), dst.fileno(), min(nbytes - done, 1 << 30), offset + done, at + done)
            if not step:
                raise OSError(errno.EIO, f"{nbytes - done} bytes of the scratch file are missing")
            done += step
        if copy is None:
            raise OSError(errno.ENOSYS, "no copy_file_range")
    except OSError as exc:  # no copy_file_range here (another file system, an old kernel): copy through memory
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        dst.seek(at + done)
        buffer = memoryview(bytearray(min(_COPY_PIECE, nbytes - done)))
        try:
            for piece in read_chunks(src, offset + done, nbytes - done, buffer, "scratch"):
                dst.write(piece)
        except EOFError as short:
            raise OSError(errno.EIO, f"the scratch file is short: {short}") from None
        return
    dst.seek(at + nbytes)


def layout(entries: Iterable[Entry]) -> list[Entry]:
    """``entries`` in the order the safetensors library lays out a file: larger dtypes first, then by name."""
    entries = list(entries)
    for name, _, dtype in entries:
        _code(name, dtype)
    return sorted(entries, key=lambda e: (-_ENUM_ORDER.index(CODES[e[2]]), e[0]))


def _code(name: str, dtype: torch.dtype) -> str:
    if dtype not in CODES:
        raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be written\n"
                         f"  expected one of: {', '.join(map(str, CODES))}\n  convert it first (tensor.to(...))")
    return CODES[dtype]


def header_bytes(entries: Iterable[Entry], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and JSON header of a file holding ``entries`` in this order, as safetensors writes
    them: ``__metadata__`` first (its keys sorted), compact JSON, padded with spaces so that the data starts
    8-byte aligned."""
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = dict(sorted(metadata.items()))
    for name, shape, dtype in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _code(name, dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()  # serde_json's escaping
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def file_size(entries: Iterable[Entry], metadata: dict[str, str] | None = None) -> int:
    """The bytes ``write_safetensors(path, entries, ..., metadata)`` writes."""
    entries = list(entries)
    return len(header_bytes(entries, metadata)) + sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in entries)


def write_safetensors(path: str | os.PathLike, entries: list[Entry], tensors: Iterable,
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose header is known up front, pulling one tensor at a time from ``tensors``
    (an iterator in ``entries`` order): nothing is held but the tensor being written.

    Each item of ``tensors`` is a tensor, a ``FileSpan`` (its bytes copied from another file), or an object
    with a ``shape`` that yields the tensor's flat pieces in order (a tensor made piece by piece is written as
    it is made, never whole).  ``entries``
    are written in the order given: ``layout(entries)`` is the safetensors library's order.
    """
    with open(path, "wb") as f:
        f.write(header_bytes(entries, metadata))
        for (name, shape, dtype), t in zip(entries, tensors, strict=True):
            if tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"write_safetensors: {name} is {tuple(t.shape)}, the header says {shape}")
            if isinstance(t, FileSpan):
                if t.nbytes != math.prod(shape) * dtype.itemsize:
                    raise RuntimeError(f"write_safetensors: {name} spans {t.nbytes} bytes, the header says {shape}")
                _copy_span(t.file, f, t.offset, t.nbytes)
                continue
            for piece in ([t] if isinstance(t, torch.Tensor) else t):
                if piece.dtype != dtype:
                    raise RuntimeError(f"write_safetensors: {name} is {piece.dtype}, the header says {dtype}")
                if piece.numel():
                    f.write(piece.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)


SHARD_INDEX = "model.safetensors.index.json"


def shard_plan(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], max_shard_size,
               filename_pattern: str = "model{suffix}.safetensors"):
    """How ``save_pretrained`` would split tensors of these shapes and dtypes (in this order) into files of at most
    ``max_shard_size`` (an int, or a string such as "500MB"): huggingface_hub's splitter, its file names
    (``filename_pattern``'s ``{suffix}`` is "" for one file, "-00001-of-00003" for shards).

    Raises ValueError (the splitter's message) for a ``max_shard_size`` it cannot read."""
    from huggingface_hub import split_torch_state_dict_into_shards

    metas = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in shapes.items()}
    return split_torch_state_dict_into_shards(metas, max_shard_size=max_shard_size, filename_pattern=filename_pattern)


def write_shards(out: Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], plan, tensors,
                 metadata: dict[str, str] | None = None, index: str = SHARD_INDEX) -> None:
    """Write the files of a ``shard_plan`` into ``out``, and the index ``index`` when there are several.
    ``tensors(entries)`` yields one file's tensors in ``entries`` order (see ``write_safetensors``), so nothing but
    the tensor being written is held.  ``metadata``: the one file's (default ``{"format": "pt"}``); when sharded,
    each shard has ``{"format": "pt"}`` and the index's ``metadata`` holds ``metadata`` and ``total_size``."""
    shard_meta = {"format": "pt"}
    for filename, names in plan.filename_to_tensors.items():  # as safetensors lays a shard out
        entries = layout((name, *shapes[name]) for name in names)
        write_safetensors(out / filename, entries, tensors(entries),
                          metadata=shard_meta if plan.is_sharded else (metadata or shard_meta))
    if plan.is_sharded:
        extra = {} if metadata is None else metadata
        body = {"metadata": {**extra, "total_size": plan.metadata["total_size"]}, "weight_map": plan.tensor_to_filename}
        (out / index).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def trim_heap() -> None:
    """Hand freed scratch (file bytes read, tensors written) back to the OS: glibc keeps freed heap otherwise, and
    a model read or written tensor by tensor would hold its largest tensors' worth of it to the end."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


# ----------------------------------------------------------------------------- folders


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_dest(path: Path, source_path: str | None, marker: str | tuple[str, ...], kind: str) -> None:
    """``path`` may be new, an empty folder, or an earlier ``kind`` (a folder holding ``marker``, or one of the
    ``marker``s) to replace: nothing else is overwritten, and never the source model's own folder
    (``source_path``)."""
    markers = (marker,) if isinstance(marker, str) else marker
    if path.exists() and not path.is_dir():
        raise ValueError(f"output exists and is a file\n  got: {str(path)!r}\n  choose a directory path for --out")
    if source_path and path.exists() and path.resolve() == Path(source_path).resolve():
        raise ValueError(f"output is the source model directory {str(path)!r}: choose another --out")
    if path.is_dir() and any(path.iterdir()) and not any((path / m).is_file() for m in markers):
        raise ValueError(
            f"output directory is not empty and not a {kind}\n  got: {str(path)!r}\n"
            f"  choose a new or empty directory (an existing {kind} is replaced)"
        )


@contextlib.contextmanager
def staged_dir(dest: str | os.PathLike):
    """Build an output folder beside ``dest`` and rename it into place when the block succeeds.

    A crash or kill leaves the old ``dest`` or none, never a folder that looks
    like a model but is not (a temporary ``.NAME.*.tmp`` sibling may remain).
    An existing ``dest`` is replaced by two renames; files get the mode the umask gives.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the finished folder is an ordinary one
        yield tmp
        for folder, _, files in os.walk(tmp):  # durable before it becomes visible
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    os.fsync(f.fileno())
        if dest.exists() and any(dest.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if dest.exists():
                dest.rmdir()
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
