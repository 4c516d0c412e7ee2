"""Helpers for tests/test_fuzz_pack.py: mutations of packed files and a filesystem sandbox.

A packed model is untrusted input (DESIGN.md section 4).  The fuzz tests take a real
packed directory, apply one or a few mutations drawn by hypothesis to its
``weightshare.safetensors``, and check what ``ws.load`` / ``read_spec`` / ``ws.export`` do
with it.  This module holds the parts that are not tests:

* mutation classes (``Replace``, ``Delete``, ``AddKey``, ``HeaderEdit``, ``Truncate``, ...):
  small, printable descriptions of one change (hypothesis prints them when it reports a
  failing example, so they must say exactly what was done);
* strategies that draw them, from the parsed spec, the safetensors header or the raw bytes;
* a per-example sandbox with a snapshot of every file in it, to see what a call wrote.

Nothing here imports weightshare internals: the format is described from the outside
(README "Packed format"), so that the tests keep working while pack.py is rewritten.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

FILENAME = "weightshare.safetensors"

# Absolute paths in a drawn spec must never point at the real filesystem (these tests may
# run as root: a loader that writes to "/etc/model.safetensors" must not damage the machine).
# Strategies produce this marker instead; ``encode_spec`` replaces it with the sandbox's
# directory, so "<SANDBOX>/victim" is an absolute path to the victim model of that example.
SANDBOX = "@SANDBOX@"

# How far ``..`` may climb before it leaves the sandbox (see ``Sandbox``): drawn strings
# with more ``..`` than this are not used, so even a loader that follows them stays inside.
MAX_DOTDOT = 5


# ----------------------------------------------------------------------------- the file format


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """(header dict, body bytes) of a well-formed safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: dict | str | bytes, body: bytes, length: int | None = None) -> bytes:
    """Encode a header and body; ``length`` overrides the 8-byte length prefix (to lie about it)."""
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw) if length is None else length % 2**64) + raw + body


def encode_spec(spec_json: str, sandbox_dir: Path) -> str:
    """Replace the ``SANDBOX`` marker by the sandbox's absolute path (JSON-escaped)."""
    return spec_json.replace(SANDBOX, json.dumps(str(sandbox_dir))[1:-1])


# ----------------------------------------------------------------------------- JSON values

DTYPE_NAMES = ["float16", "bfloat16", "float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
               "complex64", "float8_e4m3fn", "uint64", "object", "float", "torch.float32"]
MAP_NAMES = ["dense", "codebook", "alias", "tie", "hash", "Dense", ""]
KIND_NAMES = ["transformers", "sentence-transformers", "module", "gguf", ""]
GRANULARITIES = ["per_tensor", "per_channel", "per_group", "per_row"]
CONFIG_TYPES = ["CodebookConfig", "TieConfig", "object", "dict", "Path", "__class__"]
# path-like strings: relative climbs, absolute paths (inside the sandbox, see SANDBOX), odd names
PATH_STRINGS = ["../x", "..", ".", "../victim", "../../victim", "a/../../victim", "./../victim", "sub", "sub/../sub",
                "..\\victim", "C:\\x", "~", "~/x", "victim/model.safetensors", "x\x00y", "",
                SANDBOX + "/victim", SANDBOX + "/etc", SANDBOX, SANDBOX + "/../victim"]
SPECIAL_INTS = [0, 1, -1, 2, 3, 7, 8, 9, 16, 31, 32, 255, 256, 65535, 2**31, 10**9, 10**18, 2**63 - 1, 2**63, 2**64,
                -(2**63), 10**30]
SPECIAL_FLOATS = [0.0, -0.0, 0.5, 1.0, 3.0, 8.0, 1e-300, 1e308, -1e308]


def _safe_text(s: str) -> bool:
    # never a real absolute path, never a climb out of the sandbox (see SANDBOX, MAX_DOTDOT);
    # "~" is allowed: the tests point HOME into the sandbox during each call
    return not s.startswith("/") and s.count("..") <= MAX_DOTDOT


texts = st.text(max_size=12).filter(_safe_text)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(SPECIAL_INTS),
    st.integers(),
    st.sampled_from(SPECIAL_FLOATS),
    st.floats(allow_nan=False, allow_infinity=False),  # NaN and inf are not JSON
    st.sampled_from(PATH_STRINGS + DTYPE_NAMES + MAP_NAMES + KIND_NAMES + GRANULARITIES + CONFIG_TYPES),
    texts,
    st.just("a" * 300),  # a long string (longer ones only make failure reports unreadable)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=8,
)


# ----------------------------------------------------------------------------- spec mutations


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _has(tree, path) -> bool:
    try:
        _get(tree, path)
        return True
    except (KeyError, IndexError, TypeError):
        return False


@dataclass(frozen=True)
class Replace:
    """Set the value at ``path`` (a tuple of dict keys / list indices into the spec)."""

    path: tuple
    value: Any

    def apply(self, spec):
        if not self.path:
            return copy.deepcopy(self.value)
        if _has(spec, self.path[:-1]):
            parent = _get(spec, self.path[:-1])
            key = self.path[-1]
            if isinstance(parent, dict) or (isinstance(parent, list) and isinstance(key, int) and key < len(parent)):
                parent[key] = copy.deepcopy(self.value)
        return spec


@dataclass(frozen=True)
class Delete:
    """Remove the key or list item at ``path``."""

    path: tuple

    def apply(self, spec):
        if self.path and _has(spec, self.path):
            parent = _get(spec, self.path[:-1])
            if isinstance(parent, (dict, list)):  # not a character of a string
                del parent[self.path[-1]]
        return spec


@dataclass(frozen=True)
class AddKey:
    """Add ``key: value`` to the dict at ``path`` (an unknown field, or a new tensor entry)."""

    path: tuple
    key: str
    value: Any

    def apply(self, spec):
        if _has(spec, self.path) and isinstance(_get(spec, self.path), dict):
            _get(spec, self.path)[self.key] = copy.deepcopy(self.value)
        return spec


def all_paths(tree, prefix=()) -> list[tuple]:
    """Every path into a parsed JSON tree, the root ``()`` first, parents before children."""
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += all_paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += all_paths(v, prefix + (i,))
    return out


def domain_values(spec: dict, key) -> st.SearchStrategy | None:
    """Plausible values for a field: ones that pass a loader's first checks and so go deeper."""
    names = sorted(spec.get("tensors", {}))
    shapes = [e["shape"] for e in spec.get("tensors", {}).values() if isinstance(e, dict) and "shape" in e]
    table = {
        "map": st.sampled_from(MAP_NAMES),
        "dtype": st.sampled_from(DTYPE_NAMES),
        "table_dtype": st.sampled_from(DTYPE_NAMES),
        "kind": st.sampled_from(KIND_NAMES),
        "weights_subdir": st.sampled_from(PATH_STRINGS),
        "granularity": st.sampled_from(GRANULARITIES),
        "type": st.sampled_from(CONFIG_TYPES),
        "of": st.sampled_from(names + ["", "nope", ".weight"]) | json_values,
        "bits": st.integers(-1, 10),
        "group_size": st.sampled_from([None, 0, -1, 1, 2, 3, 4, 8, 16, 32, 64, 10**9]),
        "version": st.integers(-1, 3),
        "transposed": st.sampled_from([True, False, None, 1, 0, "true"]),
        # reshapes that keep the element count, other tensors' shapes, and odd ones
        "shape": st.sampled_from(shapes or [[1]]).flatmap(
            lambda s: st.sampled_from([s, s[::-1], s + [1], [1] + s, s[:1] + [0], [], [-1] + s[1:], [10**18] + s[1:],
                                       [2**63] + s[1:], [s[0] * 2] + [max(d // 2, 1) for d in s[1:]],
                                       [int(x) for x in s] + [0]])),
    }
    return table.get(key)


@st.composite
def spec_mutation(draw, spec: dict):
    """One change to the parsed spec: a random or plausible value, a deleted or an added key."""
    paths = all_paths(spec)
    # "field" and "junk" aim at the fields a loader reads (map, dtype, shape, config, of, ...):
    # a plausible value goes deeper, junk of another JSON type tests the type checks
    op = draw(st.sampled_from(["replace", "field", "junk", "delete", "add", "alias", "subdir"]))
    if op == "subdir":  # the path-bearing field, directly (most important for writes outside dest)
        return Replace(("source", "weights_subdir"), draw(st.sampled_from(PATH_STRINGS) | json_values))
    if op == "alias":  # a tensor entry turned into (or added as) an alias of another, or of junk
        names = sorted(spec["tensors"])
        name = draw(st.sampled_from(names) | st.sampled_from(["zzz.weight", "fc1.weight2", "", "."]))
        target = draw(st.sampled_from(names) | json_values)
        return Replace(("tensors", name), {"map": "alias", "of": target})
    if op in ("field", "junk"):
        keyed = [p for p in paths if p and domain_values(spec, p[-1]) is not None]
        path = draw(st.sampled_from(keyed))
        return Replace(path, draw(domain_values(spec, path[-1]) if op == "field" else json_values))
    if op == "delete":
        return Delete(draw(st.sampled_from(paths[1:])))
    if op == "add":
        dicts = [p for p in paths if isinstance(_get(spec, p), dict)]
        key = draw(texts | st.sampled_from(["transposed", "of", "map", "version", "shape", "__proto__",
                                            "weights_subdir", "fc1.weight", "extra.weight"]))
        known = domain_values(spec, key)  # e.g. "transposed": true on a square weight
        return AddKey(draw(st.sampled_from(dicts)), key, draw(json_values if known is None else known | json_values))
    return Replace(draw(st.sampled_from(paths)), draw(json_values))


def spec_mutations(spec: dict, max_size: int = 3):
    """One to ``max_size`` spec mutations, applied in order (a later one may find its path gone)."""
    return st.lists(spec_mutation(spec), min_size=1, max_size=max_size)


def apply_spec_mutations(spec: dict, mutations) -> Any:
    out = copy.deepcopy(spec)
    for m in mutations:
        out = m.apply(out)
    return out


# ----------------------------------------------------------------------------- header mutations

ST_DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "U16", "U32", "U64",
             "F8_E4M3", "F8_E5M2", "C64", "f32", "", "F31", "\u00c9", "F32 "]
ST_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}


@dataclass(frozen=True)
class HeaderEdit:
    """Set ``header[tensor][field]`` (``value == "<delete>"``: remove it) in the safetensors header."""

    tensor: str
    field: str
    value: Any

    def apply(self, header):
        entry = header.get(self.tensor)
        if isinstance(entry, dict):
            if self.value == "<delete>":
                entry.pop(self.field, None)
            else:
                entry[self.field] = copy.deepcopy(self.value)
        return header


@dataclass(frozen=True)
class Reinterpret:
    """Change a tensor's dtype and its last dimension so that its byte size stays the same.

    Such a header still passes safetensors' own size checks: only the loader's dtype
    and shape checks can refuse it.
    """

    tensor: str
    dtype: str

    def apply(self, header):
        entry = header[self.tensor]
        dtype, shape = entry.get("dtype"), entry.get("shape")
        intact = isinstance(dtype, str) and dtype in ST_SIZES and isinstance(shape, list) and len(shape) > 0 \
            and all(type(d) is int for d in shape)
        if not intact:
            return header  # an earlier mutation already broke this entry
        old, new, shape = ST_SIZES[entry["dtype"]], ST_SIZES[self.dtype], entry["shape"]
        if (shape[-1] * old) % new == 0:
            entry["dtype"], entry["shape"] = self.dtype, shape[:-1] + [shape[-1] * old // new]
        return header


@dataclass(frozen=True)
class SwapOffsets:
    """Exchange two tensors' data_offsets (same-size tensors: their data trade places)."""

    a: str
    b: str

    def apply(self, header):
        a, b = header[self.a], header[self.b]
        a["data_offsets"], b["data_offsets"] = b.get("data_offsets"), a.get("data_offsets")
        return header


@dataclass(frozen=True)
class MetaEdit:
    """Set (or with ``"<delete>"`` remove) a ``__metadata__`` key, or replace ``__metadata__`` itself (key None)."""

    key: str | None
    value: Any

    def apply(self, header):
        if self.key is None:
            header["__metadata__"] = copy.deepcopy(self.value)
        elif isinstance(header.get("__metadata__"), dict):
            if self.value == "<delete>":
                header["__metadata__"].pop(self.key, None)
            else:
                header["__metadata__"][self.key] = copy.deepcopy(self.value)
        return header


@dataclass(frozen=True)
class LengthPrefix:
    """Write ``delta`` more (or fewer) than the true header length in the 8-byte prefix."""

    delta: int


@st.composite
def header_mutation(draw, header: dict):
    names = sorted(k for k in header if k != "__metadata__")
    op = draw(st.sampled_from(["retype", "dtype", "reinterpret", "shape", "offsets", "swap", "delete", "meta",
                               "length"]))
    name = draw(st.sampled_from(names))
    if op == "retype":  # another dtype of the same size (F16 <-> BF16, F32 <-> I32, U8 <-> I8/BOOL): same bytes
        dtype = header[name]["dtype"]
        same = sorted(d for d, n in ST_SIZES.items() if n == ST_SIZES.get(dtype) and d != dtype)
        return HeaderEdit(name, "dtype", draw(st.sampled_from(same or ST_DTYPES)))
    if op == "dtype":
        return HeaderEdit(name, "dtype", draw(st.sampled_from(ST_DTYPES) | json_values))
    if op == "reinterpret":
        return Reinterpret(name, draw(st.sampled_from(sorted(ST_SIZES))))
    if op == "shape":
        shape = header[name]["shape"]
        return HeaderEdit(name, "shape", draw(st.sampled_from([shape[::-1], shape + [1], [], [0], [1] + shape,
                                                                [-1], [2**64 - 1], [10**18, 0]]) | json_values))
    if op == "offsets":
        lo, hi = header[name]["data_offsets"]
        choices = [[lo, hi - 1], [lo + 1, hi], [lo, hi + 1], [hi, lo], [0, hi], [lo, 2**64 - 1], [lo, lo], [-1, hi],
                   [lo, hi, 0], [lo]]
        return HeaderEdit(name, "data_offsets", draw(st.sampled_from(choices) | json_values))
    if op == "swap":
        return SwapOffsets(name, draw(st.sampled_from(names)))
    if op == "delete":
        return HeaderEdit(name, draw(st.sampled_from(["dtype", "shape", "data_offsets"])), "<delete>")
    if op == "meta":
        key = draw(st.sampled_from(["format", "format_version", "spec", "extra", None]))
        if key == "format_version":
            value = draw(st.sampled_from(["1", "2", "3", "0", "-1", "1.0", " 1", "", 1, 2, "<delete>"]) | json_values)
        elif key == "format":
            value = draw(st.sampled_from(["weightshare", "pt", "WeightShare", "", "<delete>"]) | json_values)
        elif key == "spec":
            value = draw(st.sampled_from(["{", "", "null", "[]", "1", '"x"', "{}", "<delete>"]) | json_values)
        else:
            value = draw(json_values)
        return MetaEdit(key, value)
    return LengthPrefix(draw(st.sampled_from([-1, 1, -8, 8, -(2**20), 2**20, 2**63, -100000])))


def header_mutations(header: dict, max_size: int = 2):
    return st.lists(header_mutation(header), min_size=1, max_size=max_size)


def apply_header_mutations(data: bytes, mutations) -> bytes:
    """Re-encode the file with a mutated header and the original body bytes."""
    header, body = split_safetensors(data)
    header = copy.deepcopy(header)
    delta = 0
    for m in mutations:
        if isinstance(m, LengthPrefix):
            delta += m.delta
        else:
            header = m.apply(header)
    raw = json.dumps(header).encode()
    return join_safetensors(raw, body, length=len(raw) + delta if delta else None)


# ----------------------------------------------------------------------------- byte mutations


@dataclass(frozen=True)
class Overwrite:
    """Write ``data`` at ``offset`` (clamped to the file; XOR it in when ``xor``)."""

    offset: int
    data: bytes
    xor: bool = False

    def apply(self, buf: bytearray):
        start = min(self.offset, max(len(buf) - 1, 0))
        for i, b in enumerate(self.data):
            if start + i < len(buf):
                buf[start + i] = (buf[start + i] ^ b) if self.xor else b
        return buf


@dataclass(frozen=True)
class Truncate:
    length: int

    def apply(self, buf: bytearray):
        return buf[: self.length]


@dataclass(frozen=True)
class Append:
    data: bytes

    def apply(self, buf: bytearray):
        return buf + self.data


@st.composite
def byte_mutation(draw, data: bytes):
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    n = len(data)
    # offsets: anywhere, in the tensor data only, or in the length prefix
    offset = draw(st.integers(0, n - 1) | st.integers(header_end, n - 1) | st.integers(0, 7))
    op = draw(st.sampled_from(["flip", "overwrite", "truncate", "append"]))
    if op == "flip":
        return Overwrite(offset, bytes([1 << draw(st.integers(0, 7))]), xor=True)
    if op == "overwrite":
        return Overwrite(offset, draw(st.binary(min_size=1, max_size=16)))
    if op == "truncate":
        return Truncate(draw(st.integers(0, n - 1) | st.sampled_from([0, 7, 8, header_end - 1, header_end, n - 1])))
    return Append(draw(st.binary(min_size=1, max_size=64)))


def byte_mutations(data: bytes, max_size: int = 3):
    return st.lists(byte_mutation(data), min_size=1, max_size=max_size)


def apply_byte_mutations(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    for m in mutations:
        buf = m.apply(buf)
    return bytes(buf)


# ----------------------------------------------------------------------------- sandbox


class Sandbox:
    """A directory tree in which one fuzz example runs, and a snapshot of all of it.

    ::

        root/                   the snapshot covers all of root
          d1/d2/d3/d4/d5/d6/    padding: up to MAX_DOTDOT ".." from `work` stay inside root
            work/
              packed/           copy of the packed model, with the mutated file
              victim/           another model directory: config.json, model.safetensors
              scratch/          tempfile.tempdir and HOME during the call (ws.load writes its temp dir here)
              out/              export destination (does not exist before the call)

    Absolute paths in a drawn spec are rooted at ``work`` (see ``SANDBOX``).
    """

    def __init__(self, root: Path, packed_src: Path):
        self.root = root
        self.work = root.joinpath(*[f"d{i}" for i in range(1, MAX_DOTDOT + 2)], "work")
        self.packed = self.work / "packed"
        self.victim = self.work / "victim"
        self.scratch = self.work / "scratch"
        self.out = self.work / "out"
        shutil.copytree(packed_src, self.packed)
        self.victim.mkdir()
        (self.victim / "config.json").write_text('{"model_type": "bert"}')
        (self.victim / "model.safetensors").write_bytes(b"victim weights: must not be overwritten")
        self.scratch.mkdir()

    def snapshot(self) -> dict[str, tuple]:
        """relative path -> (kind, size, mtime_ns, mode, sha256) of every entry under root, root included."""
        snap = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in [""] + dirnames + filenames:
                p = Path(dirpath) / name if name else Path(dirpath)
                if name == "" and p != self.root:
                    continue  # directories are listed by their parent
                st_ = p.lstat()
                kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if kind == "file" and st_.st_size < 2**20 else None
                snap[str(p.relative_to(self.root))] = (kind, st_.st_size, st_.st_mtime_ns, st_.st_mode, digest)
        return snap

    def changes(self, before: dict, after: dict, allowed_dir: Path | None = None) -> list[str]:
        """Entries added, removed or changed, except inside ``allowed_dir`` (and its creation in its parent).

        The scratch directory's own mtime may change (a temp dir made and removed in
        it), but anything left in it is a change.
        """
        rel = lambda p: str(p.relative_to(self.root))  # noqa: E731
        skip_mtime = {rel(self.scratch)}
        inside = None
        if allowed_dir is not None:
            inside = rel(allowed_dir)
            skip_mtime.add(rel(allowed_dir.parent))  # creating the destination touches its parent
        out = []
        for key in sorted(set(before) | set(after)):
            if inside is not None and (key == inside or key.startswith(inside + os.sep)):
                continue
            a, b = before.get(key), after.get(key)
            if a is not None and b is not None and key in skip_mtime:
                a, b = a[:1] + a[3:], b[:1] + b[3:]  # compare without size and mtime
            if a != b:
                what = "created" if a is None else "removed" if b is None else "changed"
                out.append(f"{what}: {key}")
        return out


def rewrite_packed(folder: Path, edit) -> None:
    """Rewrite a packed folder's file as an attacker who recomputes every checksum would.

    ``edit(tensors, spec)`` changes the stored tensors and the spec in place; each stored
    tensor's sha256 and the spec's own are then recomputed, so what a test exercises is
    every defence behind the checksums.
    """
    import hashlib
    import json

    from safetensors import safe_open
    from safetensors.torch import save as st_save

    from weightshare.pack import FILENAME, tensor_checksum

    file = Path(folder) / FILENAME
    with safe_open(str(file), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    spec = json.loads(meta["spec"])
    before = {k: tensor_checksum(t) for k, t in tensors.items()}
    edit(tensors, spec)
    for key, t in tensors.items():  # only what the edit changed: a file may use an older checksum version
        if key in spec.get("checksums", {}) and tensor_checksum(t) != before.get(key):
            spec["checksums"][key] = tensor_checksum(t)
    meta["spec"] = json.dumps(spec)
    meta["spec_sha256"] = hashlib.sha256(meta["spec"].encode()).hexdigest()
    file.write_bytes(st_save(tensors, metadata=meta))
