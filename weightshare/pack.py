"""The packed container: ``ws.save`` / ``ws.load`` / ``export``.

A packed model is a directory: the source model's config, tokenizer and module
files as they were, plus ``weightshare.safetensors`` holding every tensor the
sharing maps store and every tensor no map touches, and in its metadata the
format version and a JSON spec::

    {"source": {"kind": "transformers" | "sentence-transformers" | "module", "weights_subdir": ""},
     "tensors": {name: {"map": "dense", "shape", "dtype"}
                     | {"map": "alias", "of": name}          # tied: one tensor, several names
                     | {"map": <a registered map>, "shape", "dtype", ...its own fields}},
     "checksums": {stored tensor: sha256}}

This module is the container only: safetensors, metadata, checksums, aliases,
atomic folder writes, versions.  Each sharing map (``weightshare/sharing/``)
packs, checks, installs and decodes its own entries through the registry in
``space.py``; nothing here knows a map by name.

A packed model is untrusted input.  Reading one executes no code and writes
nothing; every field is checked before it becomes a path, an allocation or a
loop bound (sizes against the safetensors header, before any tensor is read);
every problem is one ``PackError`` naming the tensor or field.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn
from torch.nn.utils import parametrize

from weightshare import hub
from weightshare.space import dtype_name, get_map, map_of, packable_maps, share_parametrization

__all__ = ["save", "load", "export", "read_spec", "dense_state_dict", "PackError", "FILENAME", "FORMAT_VERSION"]

FILENAME = "weightshare.safetensors"
FORMAT = "weightshare"
# 2 added codebooks laid out over W^T ("transposed"); 3 makes each checksum cover the tensor's dtype
# and shape as well as its bytes, so that reinterpreting stored bytes (F16 tables read as BF16) is caught
FORMAT_VERSION = 3
READABLE_VERSIONS = ("1", "2", "3")
KINDS = (hub.TRANSFORMERS, hub.SENTENCE_TRANSFORMERS, "module")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
           "int8": torch.int8, "int16": torch.int16, "bool": torch.bool}
_HEADER_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64",
                  "I32": "int32", "U8": "uint8", "I8": "int8", "I16": "int16", "BOOL": "bool"}
_NAME = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_NAME = 512
_MAX_DIMS = 8
_BUFFER_BUDGET = 64 << 20  # unsaved buffers (position ids, rotary tables) a config.json may make us build
DEFAULT_MAX_SHARD_SIZE = "5GB"  # as transformers' save_pretrained


class PackError(ValueError):
    """A packed model that cannot be read: names the tensor or field and the problem."""


def _sha256(t: torch.Tensor, version: int = FORMAT_VERSION) -> str:
    """The checksum of a stored tensor: its dtype, shape and bytes (bytes only in files before version 3)."""
    h = hashlib.sha256()
    if version >= 3:
        h.update(f"{dtype_name(t.dtype)}{list(t.shape)}".encode())
    h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# ----------------------------------------------------------------------------- writing


def _owned_modules(model: nn.Module):
    """(prefix, module) pairs outside parametrization internals, tied modules once per path."""
    for name, module in model.named_modules(remove_duplicate=False):
        if "parametrizations" in name.split("."):
            continue
        yield (name + "." if name else ""), module


def _collect(inner: nn.Module) -> tuple[dict, dict]:
    """The tensors to write and the per-tensor spec of a (possibly shared) model."""
    tensors: dict[str, torch.Tensor] = {}
    stored_as: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # ids are only unique while the objects live: temporaries must not be reused
    spec: dict[str, dict] = {}
    seen: dict[int, str] = {}  # id of a tensor or parametrization state -> the first name it was written under

    def put(key: str, t: torch.Tensor, source: nn.Module | None = None) -> str:
        # a map's own state that another map produces (hashed buckets in a codebook): the inner
        # map is written as an entry of its own under ``key``, and nothing dense is stored for it
        if source is not None and parametrize.is_parametrized(source, "original"):
            inner = source.parametrizations["original"]
            m2 = map_of(inner)
            if m2 is None:
                raise ValueError(f"save: {key} has a parametrization the packed format does not know ({list(inner)})")
            spec[key] = {"map": m2.name, **m2.pack(key, inner, put)}
            return key
        # one object stored once, whichever entries refer to it (a basis shared by several layers)
        if id(t) in stored_as:
            return stored_as[id(t)]
        if key in tensors:
            raise ValueError(f"save: two tensors want the key {key!r}")
        tensors[key] = t.detach().contiguous()
        stored_as[id(t)] = key
        alive.append(t)
        return key

    for prefix, module in _owned_modules(inner):
        if parametrize.is_parametrized(module):
            for tname, plist in module.parametrizations.items():
                full = prefix + tname
                # one parametrization used by two modules (LM head and embedding) is one object; its
                # `original` may be computed (a composed map), and a temporary's id can come back
                if id(plist) in seen:
                    spec[full] = {"map": "alias", "of": seen[id(plist)]}
                    continue
                m = map_of(plist)
                if m is None:
                    raise ValueError(f"save: {full} has a parametrization the packed format does not know\n"
                                     f"  expected: one map registered in weightshare.space\n  got: {list(plist)}")
                seen[id(plist)] = full
                spec[full] = {"map": m.name, **m.pack(full, plist, put)}
        items = list(module._parameters.items())
        items += [(n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
        for pname, t in items:
            if t is None:
                continue
            full = prefix + pname
            if id(t) in seen:
                spec[full] = {"map": "alias", "of": seen[id(t)]}
                continue
            seen[id(t)] = full
            put(full, t)
            spec[full] = {"map": "dense", "shape": list(t.shape), "dtype": dtype_name(t.dtype)}
    return tensors, spec


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_dest(path: Path, source_path: str | None) -> None:
    """``path`` may be new, an empty folder, or a packed model to replace: nothing else is overwritten."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"output exists and is a file\n  got: {str(path)!r}\n  choose a directory path for --out")
    if source_path and path.exists() and path.resolve() == Path(source_path).resolve():
        raise ValueError(f"output is the source model directory {str(path)!r}: choose another --out")
    if path.is_dir() and any(path.iterdir()) and not (path / FILENAME).is_file():
        raise ValueError(
            f"output directory is not empty and not a packed model\n  got: {str(path)!r}\n"
            "  choose a new or empty directory (an existing packed model is replaced)"
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


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as a packed directory at ``path`` and return the path.

    ``model`` is a transformers model or SentenceTransformer (its config,
    tokenizer and module files are copied from the directory it was loaded
    from with weightshare), or any ``nn.Module`` (then ``ws.load`` needs a
    skeleton module).  The folder is built beside ``path`` and renamed into
    place, so an existing packed model is replaced whole or not at all.
    """
    path = Path(path)
    source: hub.Source | None = getattr(model, "_weightshare_source", None)
    inner = hub.inner_model(model)
    _check_dest(path, source.path if source else None)
    tensors, spec = _collect(inner)
    checksums = {name: _sha256(t) for name, t in tensors.items()}
    if source is not None:
        source_meta = source.to_dict()
    elif hasattr(inner, "config") and hasattr(inner.config, "save_pretrained") and inner is model:
        source_meta = {"kind": hub.TRANSFORMERS, "weights_subdir": ""}
    else:
        source_meta = {"kind": "module", "weights_subdir": ""}
    spec_json = json.dumps({"source": source_meta, "tensors": spec, "checksums": checksums})
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "spec": spec_json,
            "spec_sha256": hashlib.sha256(spec_json.encode()).hexdigest()}
    with staged_dir(path) as tmp:
        if source is not None:
            hub.copy_non_weight_files(source.path, tmp)
        elif source_meta["kind"] == hub.TRANSFORMERS:
            inner.config.save_pretrained(tmp)
        (tmp / FILENAME).write_bytes(safetensors_save(tensors, metadata=meta))
    return path


# ----------------------------------------------------------------------------- reading


def _shape(value, field: str) -> tuple[int, ...]:
    if (not isinstance(value, list) or len(value) > _MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 48 for d in value)):
        raise PackError(f"{field}: bad shape\n  expected: a list of at most {_MAX_DIMS} non-negative integers\n"
                        f"  got: {value!r}"[:300])
    return tuple(value)


def _keys(entry: dict, allowed: set[str], field: str) -> None:
    if set(entry) != allowed:
        raise PackError(f"{field}: keys\n  expected: {sorted(allowed)}\n  got: {sorted(map(str, entry))}"[:400])


class PackedFile:
    """An opened, fully checked packed directory.  Tensor data is read on ``fetch`` only.

    Opening checks the safetensors header (by the safetensors library), the
    format and version, and every field of the spec against the header's dtypes
    and shapes, without reading any tensor; ``fetch`` reads one tensor and
    checks its sha256.
    """

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        self.file = self.root / FILENAME
        if not self.root.is_dir():
            raise PackError(f"packed model not found\n  expected: a directory holding {FILENAME}\n  got: {str(path)!r}")
        if not self.file.is_file():
            raise PackError(f"not a packed model: {str(path)!r} has no {FILENAME}\n  create one with `weightshare compress`")
        try:
            self._handle = safe_open(str(self.file), framework="pt")
            meta = self._handle.metadata() or {}
            self.infos = {}
            for key in self._handle.keys():
                sl = self._handle.get_slice(key)
                self.infos[key] = (_HEADER_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape()))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # safetensors raises its own types, and a Rust panic is a BaseException
            raise PackError(f"{self.file}: truncated or not a safetensors file ({type(exc).__name__}: {exc})"[:400]) from None
        self._cache: dict[str, torch.Tensor] = {}
        try:
            self._check(meta)
        except BaseException:
            self.close()
            raise

    def _check(self, meta: dict) -> None:
        file = self.file
        if meta.get("format") != FORMAT:
            raise PackError(f"{file}: not a weightshare file\n  expected metadata format={FORMAT!r}\n  got: {meta.get('format')!r}"[:300])
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise PackError(f"{file}: unknown format version\n  expected: one of {', '.join(READABLE_VERSIONS)}\n"
                            f"  got: {meta.get('format_version')!r}\n  upgrade weightshare to read it"[:300])
        self.version = int(meta["format_version"])
        try:
            spec = json.loads(meta["spec"])
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise PackError(f"{file}: the sharing spec in the metadata is unreadable ({type(exc).__name__})") from None
        if not isinstance(spec, dict):
            raise PackError(f"{file}: the sharing spec in the metadata is unreadable (not a JSON object)")
        _keys(spec, {"source", "tensors", "checksums"}, "spec")
        self.spec = spec
        self.source = self._check_source(spec["source"])
        self.entries = self._check_entries(spec["tensors"])
        self._check_checksums(spec["checksums"])
        # last, after every field was checked on its own: the spec is the one that was written. The tensors'
        # checksums cannot see a spec that still fits them but means other weights (an alias retargeted)
        if self.version >= 3 and meta.get("spec_sha256") != hashlib.sha256(meta["spec"].encode()).hexdigest():
            raise PackError(f"{file}: checksum mismatch for the sharing spec: it was changed after it was written")

    def _check_source(self, source) -> dict:
        if not isinstance(source, dict):
            raise PackError(f"spec source\n  expected: a JSON object\n  got: {source!r}"[:300])
        _keys(source, {"kind", "weights_subdir"}, "spec source")
        if not isinstance(source["kind"], str) or source["kind"] not in KINDS:
            raise PackError(f"spec source.kind\n  expected one of: {KINDS}\n  got: {source['kind']!r}"[:300])
        try:
            sub = hub.check_relpath(source["weights_subdir"], "spec source.weights_subdir")
        except ValueError as exc:
            raise PackError(str(exc)) from None
        if source["kind"] == "module" and sub:
            raise PackError(f"spec source.weights_subdir\n  expected: '' for a plain module\n  got: {sub!r}"[:300])
        return {"kind": source["kind"], "weights_subdir": sub}

    def _check_entries(self, entries) -> dict:
        if not isinstance(entries, dict):
            raise PackError("spec tensors\n  expected: a JSON object of tensor entries")
        claims: dict[str, tuple[set[str], tuple]] = {}
        self.keys_of: dict[str, set[str]] = {}  # entry -> the stored tensors it decodes from

        def claim(key, dtypes, shape, by):
            if key in claims and claims[key] != (set(dtypes), tuple(shape)):
                raise PackError(f"tensor {key!r}: described twice, differently (by {by!r})")
            claims[key] = (set(dtypes), tuple(shape))

        for name, entry in entries.items():
            if len(name) > _MAX_NAME or not _NAME.fullmatch(name):
                raise PackError(f"spec tensor name\n  expected: dotted identifiers\n  got: {name!r}"[:300])
            if not isinstance(entry, dict) or not isinstance(entry.get("map"), str):
                raise PackError(f"tensor {name!r}: entry\n  expected: a JSON object with a 'map'\n  got: {entry!r}"[:300])
            kind = entry["map"]
            if kind == "dense":
                _keys(entry, {"map", "shape", "dtype"}, f"tensor {name!r}")
                if not isinstance(entry["dtype"], str) or entry["dtype"] not in _DTYPES:
                    raise PackError(f"tensor {name!r}: unknown dtype\n  expected one of: {sorted(_DTYPES)}\n"
                                    f"  got: {entry['dtype']!r}"[:300])
                claim(name, {entry["dtype"]}, _shape(entry["shape"], f"tensor {name!r}"), name)
            elif kind == "alias":
                _keys(entry, {"map", "of"}, f"tensor {name!r}")
                target = entries.get(entry["of"]) if isinstance(entry["of"], str) else None
                if (entry["of"] == name or not isinstance(target, dict) or target.get("map") in ("alias", None)
                        or _internal(entry["of"])):  # an alias names a tensor of the model, not a map's state
                    raise PackError(f"tensor {name!r}: alias of {entry['of']!r}, which is not a stored tensor"[:300])
            else:
                m = get_map(kind)
                if kind not in packable_maps():
                    raise PackError(f"tensor {name!r}: unknown map\n  expected one of: dense, alias, "
                                    f"{', '.join(packable_maps())}\n  got: {kind!r}"[:300])
                shape = _shape(entry.get("shape"), f"tensor {name!r}")
                if not isinstance(entry.get("dtype"), str) or entry["dtype"] not in _DTYPES:
                    raise PackError(f"tensor {name!r}: bad {kind} dtype {entry.get('dtype')!r}"[:300])
                try:
                    needs = m.check(name, entry, shape, entry["dtype"])
                except PackError:
                    raise
                except (ValueError, TypeError, KeyError, OverflowError) as exc:
                    raise PackError(f"tensor {name!r}: bad {kind} entry ({exc})"[:500]) from None
                for key, (dtypes, kshape) in needs.items():
                    claim(key, dtypes, kshape, name)
                self.keys_of[name] = set(needs)
        # an entry under a map's original key (hashed buckets in a codebook) stands for that tensor
        self.nested: dict[str, str] = {}  # internal entry -> the entry whose original it is
        for name, entry in entries.items():
            if entry["map"] in ("dense", "alias") or name not in self.keys_of or _internal(name):
                continue  # one level: the state of a model tensor's map, never the state of a state
            key = get_map(entry["map"]).original_key(name, entry)
            if key is not None and key in claims and key not in self.infos and key in entries:
                inner = entries[key]
                if not _internal(key) or inner["map"] in ("dense", "alias") or key in self.nested:
                    raise PackError(f"tensor {key!r}: not a map another entry's state can be made of"[:300])
                dtypes, shape = claims.pop(key)
                if inner.get("dtype") not in dtypes or tuple(inner.get("shape")) != shape:
                    raise PackError(f"tensor {key!r}: its map gives {inner.get('dtype')} {inner.get('shape')}\n"
                                    f"  expected: one of {sorted(dtypes)} {list(shape)}"[:300])
                self.nested[key] = name
        for name in entries:
            if _internal(name) and name not in self.nested:
                raise PackError(f"spec entry {name!r} is no tensor of the model and no other entry's state"[:300])
        for key, (dtypes, shape) in claims.items():
            if key not in self.infos:
                raise PackError(f"{self.file}: tensor {key!r} is missing")
            dtype, have = self.infos[key]
            if dtype not in dtypes:
                raise PackError(f"tensor {key!r}: wrong dtype\n  expected: one of {sorted(dtypes)}\n  got: {dtype}")
            if have != shape:
                raise PackError(f"tensor {key!r}: wrong shape\n  expected: {shape}\n  got: {have}")
        for key in self.infos:
            if key not in claims:
                raise PackError(f"{self.file}: tensor {key!r} is not described by the spec (tampered file?)"[:300])
        self.internal = {n: e for n, e in entries.items() if n in self.nested}
        return {n: e for n, e in entries.items() if n not in self.nested}  # the model's own tensors

    def _check_checksums(self, checksums) -> None:
        if not isinstance(checksums, dict):
            raise PackError("spec checksums\n  expected: a JSON object of sha256 hex digests")
        for key in self.infos:
            if key not in checksums:
                raise PackError(f"{self.file}: no checksum for tensor {key!r}")
        for key, digest in checksums.items():
            if key not in self.infos:
                raise PackError(f"{self.file}: checksum for tensor {key!r}, which is not stored"[:300])
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise PackError(f"checksum of {key!r}\n  expected: 64 hex digits\n  got: {digest!r}"[:300])
        self.checksums = checksums

    def dense_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of every tensor of the model as ``decode`` gives it (an alias as its
        target's), from the checked spec: nothing is read or decoded."""
        out = {}
        for name, entry in self.entries.items():
            target = self.entries[entry["of"]] if entry["map"] == "alias" else entry
            out[name] = (tuple(target["shape"]), _DTYPES[target["dtype"]])
        return out

    def fetch(self, key: str) -> torch.Tensor:
        """The stored tensor ``key``, read once and checked against its sha256 (the same object every time)."""
        if key not in self._cache:
            if key not in self.infos:
                raise PackError(f"{self.file}: tensor {key!r} is missing")
            try:
                t = self._handle.get_tensor(key)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                raise PackError(f"{self.file}: tensor {key!r} cannot be read ({type(exc).__name__}: {exc})"[:400]) from None
            if _sha256(t, self.version) != self.checksums[key]:
                raise PackError(f"{self.file}: checksum mismatch for tensor {key!r}: the file is corrupted")
            self._cache[key] = t
        return self._cache[key]

    def fetch_any(self, key: str) -> torch.Tensor:
        """A stored tensor, or the tensor an internal entry stands for (decoded through its map)."""
        if key in self.nested:
            return self._decode_map(key, self.internal[key], self.fetch)
        return self.fetch(key)

    def _decode_map(self, name: str, entry: dict, fetch) -> torch.Tensor:
        try:
            return get_map(entry["map"]).decode(name, entry, fetch)
        except PackError:
            raise
        except (ValueError, RuntimeError) as exc:
            raise PackError(f"tensor {name!r}: cannot be decoded ({exc})"[:400]) from None

    def fetch_all(self) -> None:
        """Read and check every stored tensor: a corrupted file is refused before anything is written."""
        for key in self.infos:
            self.fetch(key)

    def release(self, entry: str) -> None:
        """Forget the read tensors of an installed entry that no later entry needs (the model keeps what it uses).

        A tensor several entries share (a basis) stays until the last of them, so
        that all of them get the same object.
        """
        if not hasattr(self, "_users"):
            self._users: dict[str, int] = {}
            for keys in self.keys_of.values():
                for key in keys:
                    self._users[key] = self._users.get(key, 0) + 1
        for key in self.keys_of.get(entry, ()):
            self._users[key] -= 1
            if self._users[key] == 0:
                self._cache.pop(key, None)

    def decode(self, name: str) -> torch.Tensor:
        """The plain tensor entry ``name`` stands for (an alias as its own copy)."""
        entry = self.entries[name]
        if entry["map"] == "alias":
            return self.decode(entry["of"]).clone()
        if entry["map"] == "dense":
            return self.fetch(name)
        return self._decode_map(name, entry, self.fetch_any)

    def close(self) -> None:
        self._cache.clear()
        handle, self._handle = getattr(self, "_handle", None), None
        if handle is not None and hasattr(handle, "__exit__"):
            handle.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _internal(name: str) -> bool:
    """A name inside a map's state (``fc.weight.__buckets``), not a tensor of the model."""
    return any(part.startswith("__") for part in name.split("."))


def read_spec(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and fully validate a packed directory: returns (spec, stored tensors, each checked)."""
    with PackedFile(path) as pf:
        pf.fetch_all()
        return pf.spec, dict(pf._cache)


def dense_state_dict(spec: dict, tensors: dict) -> dict[str, torch.Tensor]:
    """The plain weights a checked spec and its stored tensors stand for (aliases as separate copies)."""
    entries = spec["tensors"]

    def fetch(key):  # a stored tensor, or an internal entry decoded through its map
        if key in tensors:
            return tensors[key]
        return get_map(entries[key]["map"]).decode(key, entries[key], fetch)

    out = {}
    for name, entry in entries.items():
        if _internal(name):
            continue
        if entry["map"] == "dense":
            out[name] = tensors[name]
        elif entry["map"] != "alias":
            out[name] = get_map(entry["map"]).decode(name, entry, fetch)
    for name, entry in entries.items():
        if entry["map"] == "alias" and not _internal(name):
            out[name] = out[entry["of"]].clone()
    return out


def export(path: str | os.PathLike, dest: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write the packed model at ``path`` as a plain model directory at ``dest``.

    ``transformers.AutoModel.from_pretrained(dest)`` or
    ``SentenceTransformer(dest)`` (whichever the source was) loads it unchanged.
    Weights are written as ``save_pretrained`` writes them: one
    ``model.safetensors``, or shards of at most ``max_shard_size`` with a
    ``model.safetensors.index.json``; a shard index of the source is never copied.
    Tensors are decoded shard by shard, and the folder is renamed into place at the end.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    dest = Path(dest)
    with PackedFile(path) as pf:
        if pf.source["kind"] == "module":
            raise PackError("export: this packed file holds a plain nn.Module (no config); use ws.load(path, model=...)")
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise PackError(f"export: destination exists and is not an empty directory\n  got: {str(dest)!r}\n"
                            "  choose a new or empty directory")
        if dest.resolve().is_relative_to(pf.root.resolve()):
            raise PackError(f"export: destination {str(dest)!r} is inside the packed model: choose another")
        _check_fit(_skeleton(pf), pf)  # the export must be a model its config.json describes, nothing else
        pf.fetch_all()  # every checksum before the first byte is written
        shapes = {name: torch.empty(shape, dtype=dtype, device="meta")
                  for name, (shape, dtype) in pf.dense_shapes().items()}
        try:
            plan = split_torch_state_dict_into_shards(shapes, max_shard_size=max_shard_size)
        except ValueError as exc:
            raise PackError(f"export: max_shard_size {max_shard_size!r}: {exc}"[:300]) from None
        with staged_dir(dest) as tmp:
            try:
                hub.copy_non_weight_files(pf.root, tmp, confine=True)
            except ValueError as exc:
                raise PackError(str(exc)) from None
            out = tmp / pf.source["weights_subdir"]
            out.mkdir(parents=True, exist_ok=True)
            for filename, names in plan.filename_to_tensors.items():
                shard = {name: pf.decode(name).contiguous() for name in names}
                (out / filename).write_bytes(safetensors_save(shard, metadata={"format": "pt"}))
                del shard
            if plan.is_sharded:
                index = {"metadata": {"total_size": plan.metadata["total_size"]}, "weight_map": plan.tensor_to_filename}
                (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return dest


# ----------------------------------------------------------------------------- loading


def _split(name: str) -> tuple[str, str]:
    owner, _, attr = name.rpartition(".")
    return owner, attr


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name, tied ones under each of their names."""
    out = {}
    for prefix, module in _owned_modules(model):
        for n, t in module._parameters.items():
            if t is not None:
                out[prefix + n] = t
        for n, t in module._buffers.items():
            if t is not None and n not in module._non_persistent_buffers_set:
                out[prefix + n] = t
    return out


def _check_fit(inner: nn.Module, pf: PackedFile) -> None:
    """Every entry has a place of its shape in the model and every tensor of the model an entry: all problems at once."""
    own = _state_tensors(inner)
    missing = [n for n in own if n not in pf.entries]
    not_in_model, mismatched = [], []
    for name, entry in pf.entries.items():
        target = pf.entries[entry["of"]] if entry["map"] == "alias" else entry
        owner_name, attr = _split(name)
        try:
            owner = inner.get_submodule(owner_name)
        except AttributeError:
            not_in_model.append(name)
            continue
        if parametrize.is_parametrized(owner, attr) or attr not in owner._parameters and attr not in owner._buffers:
            not_in_model.append(name)
            continue
        have = tuple(getattr(owner, attr).shape)
        if have != tuple(target["shape"]):
            mismatched.append(f"{name}: file {tuple(target['shape'])}, model {have}")
        if target["map"] not in ("dense", "alias"):
            if attr not in owner._parameters:
                mismatched.append(f"{name}: a {target['map']} map needs a parameter, the model has a buffer")
            elif (why := get_map(target["map"]).fits(owner, attr, target)) is not None:
                mismatched.append(f"{name}: {why}")
        if entry["map"] == "alias" and target["map"] not in ("dense", "alias") and _split(entry["of"])[1] != attr:
            mismatched.append(f"{name}: a shared {target['map']} map must name the same attribute as {entry['of']!r}")
    if missing or not_in_model or mismatched:
        raise PackError(
            "load: the model does not match the packed file\n"
            f"  missing in file: {missing[:5]}\n  not in model: {not_in_model[:5]}\n  does not fit: {mismatched[:5]}\n"
            "  pass a skeleton of the architecture that was saved"
        )


def _install(inner: nn.Module, pf: PackedFile) -> None:
    """Put every entry into the checked model: dense tensors as they are, maps by their own install."""
    for name, entry in pf.entries.items():
        owner_name, attr = _split(name)
        owner = inner.get_submodule(owner_name)
        if entry["map"] == "dense":
            t = pf.fetch(name)
            current = getattr(owner, attr)
            if current.is_meta:  # a skeleton without memory: the read tensor becomes the model's own
                t = t.to(current.dtype)
                if attr in owner._parameters:
                    owner._parameters[attr] = nn.Parameter(t, requires_grad=current.requires_grad)
                else:
                    owner._buffers[attr] = t
            else:
                with torch.no_grad():
                    current.copy_(t)
        elif entry["map"] != "alias":
            get_map(entry["map"]).install(owner, attr, name, entry, pf.fetch_any)
            pf.release(name)  # packed indices are garbage once unpacked: keep the peak low
    for key, outer in pf.nested.items():  # the inner map goes onto the outer map's original
        owner_name, attr = _split(outer)
        plist = inner.get_submodule(owner_name).parametrizations[attr]
        get_map(pf.internal[key]["map"]).install(plist, "original", key, pf.internal[key], pf.fetch)
        pf.release(key)
    for name, entry in pf.entries.items():
        if entry["map"] != "alias":
            continue
        owner_name, attr = _split(name)
        target_owner, target_attr = _split(entry["of"])
        source = inner.get_submodule(target_owner)
        if pf.entries[entry["of"]]["map"] == "dense":  # restore the tie itself, not only the value
            setattr(inner.get_submodule(owner_name), attr, getattr(source, target_attr))
        else:
            share_parametrization(source, inner.get_submodule(owner_name), attr)


def _trim_heap() -> None:
    """Hand the reading scratch (file bytes, packed indices) back to the OS (glibc keeps freed heap otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _skeleton(pf: PackedFile) -> nn.Module:
    """The architecture ``config.json`` names, parameters on the meta device; every failure one PackError."""
    sub = pf.source["weights_subdir"]
    try:
        config_dir = hub.inside(pf.root, sub, "spec source.weights_subdir")
        if not (config_dir / "config.json").is_file():
            raise ValueError(f"{pf.root}: no config.json in {sub or 'the folder'}")
        return hub.skeleton(config_dir, len(pf.entries), _BUFFER_BUDGET + sum(math.prod(s) for _, s in pf.infos.values()))
    except PackError:
        raise
    except Exception as exc:  # the config is untrusted: whatever transformers makes of it is one error
        msg = str(exc) if isinstance(exc, ValueError) and "weights_subdir" in str(exc) else \
            f"{pf.root}: cannot build the model from its config ({type(exc).__name__}: {exc})"
        raise PackError(msg[:500]) from None


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a packed directory back into a model with its sharing in place.

    Without ``model`` the architecture is rebuilt from the directory's
    ``config.json`` (a transformers model, or a SentenceTransformer when the
    source was one) with its weights on the meta device, and the stored tables,
    indices and tensors are installed directly: no dense copy, no temporary file.
    With ``model`` (a skeleton of the same architecture) the weights are loaded
    into it.  Any problem with the file is one ``PackError``; a model that does
    not fit is refused before anything is written into it.
    """
    with PackedFile(path) as pf:
        kind, sub = pf.source["kind"], pf.source["weights_subdir"]
        if model is None:
            if kind == "module":
                raise PackError("load: this packed file holds a plain nn.Module; pass a skeleton: ws.load(path, model=...)")
            inner = _skeleton(pf)
        else:
            inner = hub.inner_model(model)
        _check_fit(inner, pf)
        pf.fetch_all()
        _install(inner, pf)
    _trim_heap()
    if model is not None:
        return model
    if kind == hub.SENTENCE_TRANSFORMERS:
        try:
            model = hub.packed_sentence_transformer(pf.root, sub, inner)
        except Exception as exc:
            raise PackError(f"{pf.root}: cannot build the sentence-transformers pipeline ({type(exc).__name__}: {exc})"[:500]) from None
    else:
        model = inner
    model._weightshare_source = hub.Source(kind, str(pf.root), sub)
    return model
