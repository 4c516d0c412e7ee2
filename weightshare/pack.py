"""The packed container: ``ws.save`` and the checked reader ``PackedFile`` (models are built in ``load.py``).

A packed model is a directory: the source model's config, tokenizer and module
files as they were (``config.json`` gains a ``quantization_config`` naming
weightshare, so that transformers' ``from_pretrained`` loads it through
weightshare's quantizer), plus ``weightshare.safetensors`` holding every tensor the
sharing maps store and every tensor no map touches, and in its metadata the
format version and a JSON spec::

    {"source": {"kind": "transformers" | "sentence-transformers" | "module", "weights_subdir": ""},
     "tensors": {name: {"map": "dense", "shape", "dtype"}
                     | {"map": "alias", "of": name}          # tied: one tensor, several names
                     | {"map": <a registered map>, "shape", "dtype", ...its own fields}},
     "checksums": {stored tensor: sha256}}

This module is the container only: metadata, checksums, aliases, versions, and
the checks of all of them (one pass each, composed by ``PackedFile``); safetensors
headers, reads, streaming writes and atomic folders are ``io.py``'s; it builds
no model.  Each sharing map (``weightshare/sharing/``) packs, checks, installs and
decodes its own entries through the registry in ``space.py``; nothing here knows
a map by name.

A packed model is untrusted input.  Reading one executes no code and writes
nothing; every field is checked before it becomes a path, an allocation or a
loop bound (sizes against the safetensors header, before any tensor is read);
every problem is one ``PackError`` naming the tensor or field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

import weightshare.sharing  # noqa: F401  (registers every map: a file names its maps, the registry knows them)
from weightshare import hub, io
from weightshare.errors import clip
from weightshare.io import DTYPES, HEADER_DTYPES, staged_dir
from weightshare.space import dtype_name, get_map, map_of, map_state, module_map, packable_maps

__all__ = ["save", "read_spec", "dense_state_dict", "PackedFile", "PackError", "FILENAME", "FORMAT_VERSION",
           "owned_modules", "check_dest", "file_size", "checksum", "tensor_checksum", "PackWriter", "write_side_files",
           "write_records", "INDEX", "is_packed"]

FILENAME = "weightshare.safetensors"
INDEX = "weightshare.safetensors.index.json"  # of a packed file in shards
SHARD_PATTERN = "weightshare{suffix}.safetensors"
_SHARD = re.compile(r"weightshare-([0-9]{5})-of-([0-9]{5})\.safetensors")  # ASCII digits: one spelling each
FORMAT = "weightshare"
# 2 added codebooks laid out over W^T ("transposed"); 3 makes each checksum cover the tensor's dtype
# and shape as well as its bytes, so that reinterpreting stored bytes (F16 tables read as BF16) is caught
FORMAT_VERSION = 3
READABLE_VERSIONS = ("1", "2", "3")
KINDS = (hub.TRANSFORMERS, hub.SENTENCE_TRANSFORMERS, "module")
_NAME = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_NAME = 512
_MAX_DIMS = 8
DEFAULT_MAX_SHARD_SIZE = "5GB"  # as transformers' save_pretrained


class PackError(ValueError):
    """A packed model that cannot be read: names the tensor or field and the problem."""


def checksum(dtype: str, shape, chunks, version: int = FORMAT_VERSION) -> str:
    """The checksum of a stored tensor: its dtype, shape and bytes (bytes only in files before version 3);
    ``chunks``: its bytes, in pieces."""
    h = hashlib.sha256()
    if version >= 3:
        h.update(f"{dtype}{list(shape)}".encode())
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def tensor_checksum(t: torch.Tensor, version: int = FORMAT_VERSION) -> str:
    """The checksum of a stored tensor held in memory."""
    return checksum(dtype_name(t.dtype), t.shape, [t.contiguous().reshape(-1).view(torch.uint8).numpy().data], version)


# ----------------------------------------------------------------------------- writing


def owned_modules(model: nn.Module):
    """(prefix, module) pairs outside parametrization internals, tied modules once per path."""
    for name, module in model.named_modules(remove_duplicate=False):
        if "parametrizations" in name.split("."):
            continue
        yield (name + "." if name else ""), module


class _Collector:
    """The tensors to write and the per-tensor spec of a (possibly shared) model, one module at a time.

    ``save`` feeds it every module of a model held whole; ``PackWriter`` feeds it the modules of a
    model streamed from its checkpoint, and ``forget``s each module once it is written.
    ``put(key, tensor)`` (``sink``) receives every stored tensor, in the order the file's spec lists them.
    """

    def __init__(self, sink):
        self.sink = sink
        self.spec: dict[str, dict] = {}
        self.keys: set[str] = set()
        self._stored_as: dict[int, str] = {}
        self._alive: dict[int, object] = {}  # ids are only unique while the objects live: nothing is reused
        self._seen: dict[int, str] = {}  # id of a tensor or parametrization state -> the first name written
        self._stacked: dict[str, parametrize.ParametrizationList] = {}  # state key -> the map stacked on that state

    def _hold(self, obj) -> None:
        self._alive[id(obj)] = obj

    def put(self, key: str, t: torch.Tensor) -> str:
        # a map's state that another map makes (hashed buckets in a codebook): the stacked map is
        # written as an entry of its own under ``key``, and nothing dense is stored for it
        if key in self._stacked:
            inner = self._stacked.pop(key)
            m2 = map_of(inner)
            if m2 is None:
                raise ValueError(f"save: {key} has a parametrization the packed format does not know ({list(inner)})")
            self.spec[key] = {"map": m2.name, **m2.pack(key, inner, self.put)}
            return key
        # one object stored once, whichever entries refer to it (a basis shared by several layers)
        if id(t) in self._stored_as:
            return self._stored_as[id(t)]
        if key in self.keys:
            raise ValueError(f"save: two tensors want the key {key!r}")
        self.keys.add(key)
        self.sink(key, t.detach().contiguous())
        self._stored_as[id(t)] = key
        self._hold(t)
        return key

    def module(self, prefix: str, module: nn.Module) -> None:
        """The entries of ``module``'s own tensors (not its children's), its name being ``prefix`` + "."."""
        spec, seen = self.spec, self._seen
        packed = module_map(module)
        if packed is not None:  # a packed module (CodebookLinear): its map writes the entry of its weight
            full = prefix + "weight"
            if id(module.indices) in seen:  # a tied LM head over its embedding's indices
                spec[full] = {"map": "alias", "of": seen[id(module.indices)]}
            else:
                seen[id(module.indices)] = full
                self._hold(module.indices)
                spec[full] = {"map": packed.name, **packed.pack_module(full, module, self.put)}
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
                self._hold(plist)
                state = map_state(full, plist)
                if state is not None and state.stacked is not None:
                    self._stacked[state.key] = state.stacked
                spec[full] = {"map": m.name, **m.pack(full, plist, self.put)}
                if self._stacked:  # the map's pack must hand its state to ``put`` under its state key
                    raise ValueError(f"save: the {m.name} map did not store {full}'s state under {state.key!r}, "
                                     "where another map is stacked on it\n  fix the map's pack")
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
            self.put(full, t)
            spec[full] = {"map": "dense", "shape": list(t.shape), "dtype": dtype_name(t.dtype)}

    def forget(self, keep=()) -> None:
        """Let go of every object written so far but those in ``keep`` (tied to a module still to come): a
        streamed model's modules are freed once written, and an id must not outlive its object here."""
        ids = {id(o) for o in keep}
        self._alive = {i: o for i, o in self._alive.items() if i in ids}
        self._seen = {i: n for i, n in self._seen.items() if i in ids}
        self._stored_as = {i: n for i, n in self._stored_as.items() if i in ids}


def _collect(inner: nn.Module) -> tuple[dict, dict]:
    """The tensors to write and the per-tensor spec of a (possibly shared) model."""
    tensors: dict[str, torch.Tensor] = {}
    collector = _Collector(tensors.__setitem__)
    for prefix, module in owned_modules(inner):
        collector.module(prefix, module)
    return tensors, collector.spec


def is_packed(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a packed file (whole or in shards); ``PackedFile`` checks it."""
    path = Path(path)
    return path.is_dir() and ((path / FILENAME).is_file() or (path / INDEX).is_file())


def check_dest(path: Path, source_path: str | None = None) -> None:
    """``path`` may be new, an empty folder, or a packed model to replace: nothing else is overwritten (checked by
    ``save``, and by ``compress`` before its work)."""
    io.check_dest(path, source_path, (FILENAME, INDEX), "packed model")


def save(model: nn.Module, path: str | os.PathLike, records: dict[str, str] | None = None,
         max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write ``model`` as a packed directory at ``path`` and return the path.

    ``model`` is a transformers model or SentenceTransformer (its config,
    tokenizer and module files are copied from the directory it was loaded
    from with weightshare), or any ``nn.Module`` (then ``ws.load`` needs a
    skeleton module).  The folder is built beside ``path`` and renamed into
    place, so an existing packed model is replaced whole or not at all; the
    packed file is written one tensor at a time, never built whole in memory.
    ``records``: text files (name -> text) written at the folder's top, in place of
    the source's (how the model was made: a model card, the recipe).  A packed file larger than
    ``max_shard_size`` is written as shards ``weightshare-0000K-of-0000N.safetensors`` and
    ``weightshare.safetensors.index.json`` (the spec in the index's metadata), as ``save_pretrained`` shards.
    """
    from weightshare.training import training_sharing

    path = Path(path)
    training = training_sharing(model)
    if training:
        name, _, plist = training[0]
        mode = plist[0].config.train
        doing = {"recluster": "still re-clusters", "dkm": "still assigns softly (DKM)",
                 "soft": "still has soft shared weights"}.get(mode, "still shares while training")
        raise ValueError(f"save: {name} {doing} while training (train={mode!r})\n  call ws.freeze_(model) "
                         "first: it fixes each weight's cluster and makes the tables")
    source: hub.Source | None = getattr(model, "_weightshare_source", None)
    inner = hub.inner_model(model)
    check_dest(path, source.path if source else None)
    contents = _contents(model)
    plan = _shard_plan(contents.layout, max_shard_size)
    with staged_dir(path) as tmp:
        write_side_files(tmp, source, contents.source, inner, sharded=plan.is_sharded)
        _write_packed(tmp, contents.layout, plan, contents.metadata, lambda name: contents.tensors[name])
        write_records(tmp, records)
    return path


def _shard_plan(layout: list[io.Entry], max_shard_size):
    """The packed file's shards (huggingface_hub's splitter over the tensors in layout order)."""
    try:
        return io.shard_plan({name: (shape, dtype) for name, shape, dtype in layout}, max_shard_size,
                             filename_pattern=SHARD_PATTERN)
    except ValueError as exc:
        raise ValueError(f"max_shard_size {max_shard_size!r}: {exc}\n  expected: bytes, or a size such as "
                         "'500MB' or '5GB'") from None


def _write_packed(folder: Path, layout: list[io.Entry], plan, metadata: dict[str, str], tensor_of) -> None:
    """The packed file (or its shards and their index) in ``folder``; ``tensor_of(name)`` gives each tensor to
    write, one at a time."""
    shapes = {name: (shape, dtype) for name, shape, dtype in layout}
    if plan.is_sharded:  # from_pretrained takes the dtype of a sharded checkpoint from its index (a shard of
        # indices alone would say uint8); of one file, from its first float tensor: this is that tensor's dtype
        first = next((dtype for _, _, dtype in layout if dtype.is_floating_point), torch.float32)
        metadata = {**metadata, "dtype": dtype_name(first)}
    io.write_shards(folder, shapes, plan, lambda entries: (tensor_of(name) for name, _, _ in entries),
                    metadata=metadata, index=INDEX)


def write_side_files(folder: Path, source: hub.Source | None, source_meta: dict, inner=None,
                     sharded: bool = False) -> None:
    """The packed folder's files besides the packed file: the source's config, tokenizer and module files (or
    ``inner``'s config), ``config.json`` marked for transformers' quantizer registration (naming the index when
    the packed file is ``sharded``)."""
    if source is not None:
        hub.copy_non_weight_files(source.path, folder)
    elif source_meta["kind"] == hub.TRANSFORMERS:
        inner.config.save_pretrained(folder)
    _mark_config(folder, source_meta, sharded)


def _mark_config(folder: Path, source_meta: dict, sharded: bool) -> None:
    """``config.json`` gains the quantization_config (and, at the top, the packed file or its index to read)."""
    if source_meta["kind"] != "module":  # transformers' from_pretrained finds the packed file through it
        sub = source_meta["weights_subdir"]
        hub.mark_packed_config(folder / sub, (INDEX if sharded else FILENAME) if not sub else None)


def write_records(folder: Path, records: dict[str, str] | None) -> None:
    for name, text in (records or {}).items():
        (folder / name).write_text(text)


class PackWriter:
    """A packed file written module by module: for a model streamed from its checkpoint, never whole in memory.

    ``add`` takes one module at a time (its own tensors, not its children's), as ``save`` walks a whole model
    (``owned_modules``); the stored tensors go to a scratch file in ``folder`` as they come, their checksums
    taken on the way.  ``close`` then writes ``weightshare.safetensors``, whose header needs every tensor's
    dtype, shape and checksum (known only at the end), and copies the data into it in safetensors' layout.
    The file is the one ``save`` writes for the same model held whole, byte for byte; the scratch file costs
    the packed size on disk until ``close``.
    """

    SCRATCH = ".weightshare.scratch"

    def __init__(self, folder: Path, source_meta: dict):
        self.folder, self.source_meta = Path(folder), dict(source_meta)
        self._scratch = open(self.folder / self.SCRATCH, "wb+")  # noqa: SIM115 (closed by close)
        self._where: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        self._checksums: dict[str, str] = {}
        self._collector = _Collector(self._store)

    def _store(self, key: str, t: torch.Tensor) -> None:
        data = t.reshape(-1).view(torch.uint8).numpy().data
        self._checksums[key] = checksum(dtype_name(t.dtype), t.shape, [data])
        self._where[key] = (self._scratch.tell(), tuple(t.shape), t.dtype)
        self._scratch.write(data)

    def add(self, prefix: str, module: nn.Module) -> None:
        """Write the entries of ``module``'s own tensors (``prefix``: its name and a dot, or "")."""
        self._collector.module(prefix, module)

    def forget(self, keep=()) -> None:
        """Let go of what was written, but the objects in ``keep`` (tied to modules still to come)."""
        self._collector.forget(keep)

    def close(self, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
        """Write the packed file (shards and their index when larger than ``max_shard_size``, as ``save``) and
        delete the scratch file."""
        metadata = _metadata(self._collector.spec, self._checksums, self.source_meta)
        entries = io.layout((name, shape, dtype) for name, (_, shape, dtype) in self._where.items())
        plan = _shard_plan(entries, max_shard_size)
        if plan.is_sharded:  # config.json was written before the size was known
            _mark_config(self.folder, self.source_meta, sharded=True)
        self._scratch.flush()

        def span(name):
            offset, shape, dtype = self._where[name]
            return io.FileSpan(self._scratch, offset, shape, math.prod(shape) * dtype.itemsize)

        _write_packed(self.folder, entries, plan, metadata, span)
        self.discard()

    def discard(self) -> None:
        """Close and delete the scratch file (``close`` does; call it on failure)."""
        self._scratch.close()
        (self.folder / self.SCRATCH).unlink(missing_ok=True)


@dataclass(frozen=True)
class _Contents:
    """What the packed file of a model holds."""

    layout: list[io.Entry]  # (name, shape, dtype) of every stored tensor, in the order written (safetensors' own)
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]  # format, version, the spec and its sha256
    source: dict  # the spec's source: kind and weights_subdir


def _contents(model: nn.Module) -> _Contents:
    """The tensors and metadata of the packed file of ``model``."""
    source: hub.Source | None = getattr(model, "_weightshare_source", None)
    inner = hub.inner_model(model)
    tensors, spec = _collect(inner)
    checksums = {name: tensor_checksum(t) for name, t in tensors.items()}
    if source is not None:
        source_meta = source.to_dict()
    elif hasattr(inner, "config") and hasattr(inner.config, "save_pretrained") and inner is model:
        source_meta = {"kind": hub.TRANSFORMERS, "weights_subdir": ""}
    else:
        source_meta = {"kind": "module", "weights_subdir": ""}
    layout = io.layout((name, tuple(t.shape), t.dtype) for name, t in tensors.items())
    return _Contents(layout, tensors, _metadata(spec, checksums, source_meta), source_meta)


def _metadata(spec: dict, checksums: dict[str, str], source_meta: dict) -> dict[str, str]:
    """The packed file's metadata: format, version, the spec and its sha256."""
    spec_json = json.dumps({"source": source_meta, "tensors": spec, "checksums": checksums})
    return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "spec": spec_json,
            "spec_sha256": hashlib.sha256(spec_json.encode()).hexdigest()}


def file_size(model: nn.Module) -> int:
    """The bytes of the ``weightshare.safetensors`` that ``save(model, ...)`` would write."""
    contents = _contents(model)
    return io.file_size(contents.layout, contents.metadata)


# ----------------------------------------------------------------------------- reading


def _shape(value, field: str) -> tuple[int, ...]:
    if (not isinstance(value, list) or len(value) > _MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 48 for d in value)):
        raise PackError(clip(f"{field}: bad shape\n  expected: a list of at most {_MAX_DIMS} non-negative integers\n"
                             f"  got: {value!r}"))
    return tuple(value)


def _keys(entry: dict, allowed: set[str], field: str) -> None:
    if set(entry) != allowed:
        raise PackError(clip(f"{field}: keys\n  expected: {sorted(allowed)}\n  got: {sorted(map(str, entry))}"))


# The checks of a packed file, one pass each, in the order PackedFile runs them: each takes what earlier
# passes returned and returns what it checked; none reads a tensor.  ``infos``: {stored tensor: (dtype, shape)}
# from the safetensors header.

Claim = tuple[set[str], tuple[int, ...]]  # what a stored tensor must be: (allowed dtype names, shape)


def _read_header(file: Path) -> io.Header:
    """The file's safetensors header (io.read_header's checks), every tensor of a dtype weightshare reads."""
    try:
        header = io.read_header(file)
    except io.HeaderError as exc:
        raise PackError(clip(f"{file}: truncated or not a safetensors file ({exc})")) from None
    for key, span in header.tensors.items():
        if span.dtype not in HEADER_DTYPES:
            raise PackError(clip(f"{file}: tensor {key!r} has dtype {span.dtype}, which weightshare does not read"))
    return header


def _read_shards(root: Path) -> tuple[dict, dict[str, tuple[Path, io.TensorSpan]]]:
    """A packed file in shards: the index's metadata (the spec) and every stored tensor's (shard, span).

    The index is untrusted: a JSON object with exactly ``metadata`` and ``weight_map``; every shard it
    names is ``weightshare-0000K-of-0000N.safetensors`` with one N, every K from 1 to N used (so no path
    is ever taken from it), each shard a file of the folder; and each shard holds exactly the tensors the
    index assigns to it, no tensor in two.
    """
    index = root / INDEX
    try:
        raw = hub.read_json(index, "shard index")
    except ValueError as exc:
        raise PackError(str(exc)) from None
    if not isinstance(raw, dict) or set(raw) != {"metadata", "weight_map"}:
        raise PackError(clip(f"{index}: keys\n  expected: ['metadata', 'weight_map']\n"
                             f"  got: {sorted(map(str, raw)) if isinstance(raw, dict) else type(raw).__name__}"))
    meta, weight_map = raw["metadata"], raw["weight_map"]
    if not isinstance(meta, dict) or not all(isinstance(v, str) for k, v in meta.items() if k != "total_size"):
        raise PackError(f"{index}: metadata\n  expected: a JSON object of strings (and total_size)")
    if not isinstance(weight_map, dict) or not weight_map:
        raise PackError(f"{index}: weight_map\n  expected: a non-empty JSON object {{tensor: shard file}}")
    shards: dict[str, list[str]] = {}
    count = None
    for key, shard in weight_map.items():
        m = _SHARD.fullmatch(shard) if isinstance(shard, str) else None
        if m is None or not 1 <= int(m[1]) <= int(m[2]) or (count is not None and int(m[2]) != count):
            raise PackError(clip(f"{index}: shard of {key!r}\n  expected: weightshare-0000K-of-0000N.safetensors, one "
                                 f"N for all\n  got: {shard!r}"))
        count = int(m[2])
        shards.setdefault(shard, []).append(key)
    numbers = {int(_SHARD.fullmatch(shard)[1]) for shard in shards}
    if len(shards) != count or numbers != set(range(1, count + 1)):
        raise PackError(f"{index}: names {len(shards)} shard(s) of {count}\n  expected: every shard 1..{count}")
    spans: dict[str, tuple[Path, io.TensorSpan]] = {}
    for shard in sorted(shards):
        file = root / shard
        if not file.is_file() or file.is_symlink():
            raise PackError(f"{index}: the shard {shard} is not a file of {root}")
        header = _read_header(file)
        if set(header.tensors) != set(shards[shard]):
            extra = sorted(set(header.tensors) - set(shards[shard]))[:3]
            missing = sorted(set(shards[shard]) - set(header.tensors))[:3]
            raise PackError(clip(f"{file}: holds other tensors than the index says\n  not in the index: {extra}\n"
                                 f"  missing: {missing}"))
        spans.update((key, (file, span)) for key, span in header.tensors.items())
    return meta, spans


def _check_format(meta: dict, file: Path) -> int:
    """The format and its version, from the metadata: returns the version."""
    if meta.get("format") != FORMAT:
        raise PackError(clip(f"{file}: not a weightshare file\n  expected metadata format={FORMAT!r}\n"
                             f"  got: {meta.get('format')!r}"))
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise PackError(clip(f"{file}: unknown format version\n  expected: one of {', '.join(READABLE_VERSIONS)}\n"
                             f"  got: {meta.get('format_version')!r}\n  upgrade weightshare to read it"))
    return int(meta["format_version"])


def _parse_spec(meta: dict, file: Path) -> dict:
    """The sharing spec in the metadata: a JSON object with exactly its three fields."""
    try:
        spec = json.loads(meta["spec"])
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise PackError(f"{file}: the sharing spec in the metadata is unreadable ({type(exc).__name__})") from None
    if not isinstance(spec, dict):
        raise PackError(f"{file}: the sharing spec in the metadata is unreadable (not a JSON object)")
    _keys(spec, {"source", "tensors", "checksums"}, "spec")
    return spec


def _check_source(source) -> dict:
    """The spec's source: which kind of model, and the folder its weights live in."""
    if not isinstance(source, dict):
        raise PackError(clip(f"spec source\n  expected: a JSON object\n  got: {source!r}"))
    _keys(source, {"kind", "weights_subdir"}, "spec source")
    if not isinstance(source["kind"], str) or source["kind"] not in KINDS:
        raise PackError(clip(f"spec source.kind\n  expected one of: {KINDS}\n  got: {source['kind']!r}"))
    try:
        sub = hub.check_relpath(source["weights_subdir"], "spec source.weights_subdir")
    except ValueError as exc:
        raise PackError(str(exc)) from None
    if source["kind"] == "module" and sub:
        raise PackError(clip(f"spec source.weights_subdir\n  expected: '' for a plain module\n  got: {sub!r}"))
    return {"kind": source["kind"], "weights_subdir": sub}


def _entry_needs(entries) -> dict[str, dict[str, Claim]]:
    """Entry syntax: every entry's name and fields (a map's own fields through its ``check``).

    Returns the stored tensors each entry decodes from: a dense entry is its own tensor, a map's
    entry needs what its ``check`` says, an alias needs none (it is not in the result).
    """
    if not isinstance(entries, dict):
        raise PackError("spec tensors\n  expected: a JSON object of tensor entries")
    needs: dict[str, dict[str, Claim]] = {}
    for name, entry in entries.items():
        if len(name) > _MAX_NAME or not _NAME.fullmatch(name):
            raise PackError(clip(f"spec tensor name\n  expected: dotted identifiers\n  got: {name!r}"))
        if not isinstance(entry, dict) or not isinstance(entry.get("map"), str):
            raise PackError(clip(f"tensor {name!r}: entry\n  expected: a JSON object with a 'map'\n  got: {entry!r}"))
        if entry["map"] == "dense":
            _keys(entry, {"map", "shape", "dtype"}, f"tensor {name!r}")
            if not isinstance(entry["dtype"], str) or entry["dtype"] not in DTYPES:
                raise PackError(clip(f"tensor {name!r}: unknown dtype\n  expected one of: {sorted(DTYPES)}\n"
                                     f"  got: {entry['dtype']!r}"))
            needs[name] = {name: ({entry["dtype"]}, _shape(entry["shape"], f"tensor {name!r}"))}
        elif entry["map"] == "alias":
            _keys(entry, {"map", "of"}, f"tensor {name!r}")
            target = entries.get(entry["of"]) if isinstance(entry["of"], str) else None
            if (entry["of"] == name or not isinstance(target, dict) or target.get("map") in ("alias", None)
                    or _internal(entry["of"])):  # an alias names a tensor of the model, not a map's state
                raise PackError(clip(f"tensor {name!r}: alias of {entry['of']!r}, which is not a stored tensor"))
        else:
            needs[name] = _map_needs(name, entry)
    return needs


def _map_needs(name: str, entry: dict) -> dict[str, Claim]:
    """The stored tensors a map's entry decodes from, as its map's ``check`` gives them."""
    kind = entry["map"]
    m = get_map(kind)
    if kind not in packable_maps():
        raise PackError(clip(f"tensor {name!r}: unknown map\n  expected one of: dense, alias, "
                             f"{', '.join(packable_maps())}\n  got: {kind!r}"))
    shape = _shape(entry.get("shape"), f"tensor {name!r}")
    if not isinstance(entry.get("dtype"), str) or entry["dtype"] not in DTYPES:
        raise PackError(clip(f"tensor {name!r}: bad {kind} dtype {entry.get('dtype')!r}"))
    try:
        needs = m.check(name, entry, shape, entry["dtype"])
    except PackError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise PackError(clip(f"tensor {name!r}: bad {kind} entry ({exc})")) from None
    return {key: (set(dtypes), tuple(kshape)) for key, (dtypes, kshape) in needs.items()}


def _claims(needs: dict[str, dict[str, Claim]]) -> dict[str, Claim]:
    """Tensor claims: one description of every stored tensor the entries need, however many need it."""
    claims: dict[str, Claim] = {}
    for by, wanted in needs.items():
        for key, claim in wanted.items():
            if key in claims and claims[key] != claim:
                raise PackError(f"tensor {key!r}: described twice, differently (by {by!r})")
            claims[key] = claim
    return claims


def _stacking(entries: dict, claims: dict[str, Claim], infos: dict) -> dict[str, str]:
    """Stacking: an entry under a map's state key (``SharingMap.state_key``: hashed buckets in a codebook) stands
    for that state, one level deep, and every other internal entry is refused.
    Returns {entry: the key of the entry stacked on its state}."""
    stacked: dict[str, str] = {}
    for name, entry in entries.items():
        if entry["map"] in ("dense", "alias") or _internal(name):
            continue  # one level: the state of a model tensor's map, never the state of a state
        key = get_map(entry["map"]).state_key(name)
        if key is not None and key in claims and key not in infos and key in entries:
            inner = entries[key]
            if inner["map"] in ("dense", "alias"):
                raise PackError(clip(f"tensor {key!r}: not a map another entry's state can be made of"))
            dtypes, shape = claims[key]
            if inner.get("dtype") not in dtypes or tuple(inner.get("shape")) != shape:
                raise PackError(clip(f"tensor {key!r}: its map gives {inner.get('dtype')} {inner.get('shape')}\n"
                                     f"  expected: one of {sorted(dtypes)} {list(shape)}"))
            stacked[name] = key
    states = set(stacked.values())
    for name in entries:
        if _internal(name) and name not in states:
            raise PackError(clip(f"spec entry {name!r} is no tensor of the model and no other entry's state"))
    return stacked


def _match_header(claims: dict[str, Claim], infos: dict, file: Path) -> None:
    """Header cross-check: the stored tensors are exactly the claimed ones, each of a claimed dtype and shape."""
    for key, (dtypes, shape) in claims.items():
        if key not in infos:
            raise PackError(f"{file}: tensor {key!r} is missing")
        dtype, have = infos[key]
        if dtype not in dtypes:
            raise PackError(f"tensor {key!r}: wrong dtype\n  expected: one of {sorted(dtypes)}\n  got: {dtype}")
        if have != shape:
            raise PackError(f"tensor {key!r}: wrong shape\n  expected: {shape}\n  got: {have}")
    for key in infos:
        if key not in claims:
            raise PackError(clip(f"{file}: tensor {key!r} is not described by the spec (tampered file?)"))


@dataclass(frozen=True)
class _CheckedEntries:
    """The spec's tensor entries, checked against each other and against the file's header."""

    entries: dict[str, dict]  # the model's own tensors
    internal: dict[str, dict]  # entries stacked on a map's state, by its state key (a codebook of hashed buckets)
    stacked: dict[str, str]  # entry -> the key of the internal entry stacked on its state
    keys_of: dict[str, set[str]]  # map entry -> the stored tensors it decodes from (a stacked entry's among them)


def _check_entries(entries, infos: dict, file: Path) -> _CheckedEntries:
    """Every pass over the spec's tensor entries: entry syntax, tensor claims, stacking, header cross-check."""
    needs = _entry_needs(entries)
    keys_of = {name: set(need) for name, need in needs.items() if entries[name]["map"] != "dense"}
    claims = _claims(needs)
    stacked = _stacking(entries, claims, infos)
    states = set(stacked.values())
    _match_header({key: claim for key, claim in claims.items() if key not in states}, infos, file)
    for name, key in stacked.items():  # the state is not stored: the stacked entry's tensors stand for it
        keys_of[name] = (keys_of[name] - {key}) | keys_of.pop(key)
    return _CheckedEntries({n: e for n, e in entries.items() if n not in states},
                          {n: e for n, e in entries.items() if n in states}, stacked, keys_of)


def _check_checksums(checksums, infos: dict, file: Path) -> dict[str, str]:
    """One sha256 hex digest for every stored tensor, and none for anything else."""
    if not isinstance(checksums, dict):
        raise PackError("spec checksums\n  expected: a JSON object of sha256 hex digests")
    for key in infos:
        if key not in checksums:
            raise PackError(f"{file}: no checksum for tensor {key!r}")
    for key, digest in checksums.items():
        if key not in infos:
            raise PackError(clip(f"{file}: checksum for tensor {key!r}, which is not stored"))
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise PackError(clip(f"checksum of {key!r}\n  expected: 64 hex digits\n  got: {digest!r}"))
    return checksums


def _check_spec_sha256(meta: dict, version: int, file: Path) -> None:
    """Last, after every field was checked on its own: the spec is the one that was written.  The tensors'
    checksums cannot see a spec that still fits them but means other weights (an alias retargeted)."""
    if version >= 3 and meta.get("spec_sha256") != hashlib.sha256(meta["spec"].encode()).hexdigest():
        raise PackError(f"{file}: checksum mismatch for the sharing spec: it was changed after it was written")


class PackedFile:
    """An opened, fully checked packed directory.  Tensor data is read on ``fetch`` only.

    Opening checks the safetensors header (io.read_header), the format and version,
    and every field of the spec against the header's dtypes and shapes, without
    reading any tensor; ``fetch`` reads one tensor and checks its sha256.
    """

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        self.file = self.root / FILENAME  # the index, for a packed file in shards: what messages name
        if not self.root.is_dir():
            raise PackError(f"packed model not found\n  expected: a directory holding {FILENAME}\n  got: {str(path)!r}")
        if self.file.is_file():
            header = _read_header(self.file)
            self._spans = {key: (self.file, span) for key, span in header.tensors.items()}
            meta = header.metadata
        elif (self.root / INDEX).is_file():
            self.file = self.root / INDEX
            meta, self._spans = _read_shards(self.root)
        else:
            raise PackError(f"not a packed model: {str(path)!r} has no {FILENAME} (or {INDEX} and its shards)\n"
                            "  create one with `weightshare compress`")
        self.files = sorted({file for file, _ in self._spans.values()}) or [self.file]  # the data files
        self.infos = {key: (HEADER_DTYPES[s.dtype], s.shape) for key, (_, s) in self._spans.items()}
        self._cache: dict[str, torch.Tensor] = {}
        self.version = _check_format(meta, self.file)
        self.spec = _parse_spec(meta, self.file)
        self.source = _check_source(self.spec["source"])
        checked = _check_entries(self.spec["tensors"], self.infos, self.file)
        self.entries, self.internal, self.stacked, self.keys_of = (checked.entries, checked.internal, checked.stacked,
                                                                   checked.keys_of)
        self.checksums = _check_checksums(self.spec["checksums"], self.infos, self.file)
        _check_spec_sha256(meta, self.version, self.file)

    def dense_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of every tensor of the model as ``decode`` gives it (an alias as its
        target's), from the checked spec: nothing is read or decoded."""
        out = {}
        for name, entry in self.entries.items():
            target = self.entries[entry["of"]] if entry["map"] == "alias" else entry
            out[name] = (tuple(target["shape"]), DTYPES[target["dtype"]])
        return out

    def fetch(self, key: str) -> torch.Tensor:
        """The stored tensor ``key``, read once and checked against its sha256 (the same object every time;
        a copy of its own, not a view of the file)."""
        if key not in self._cache:
            if key not in self.infos:
                raise PackError(f"{self.file}: tensor {key!r} is missing")
            t = self._read(key)
            if tensor_checksum(t, self.version) != self.checksums[key]:
                raise PackError(f"{self.file}: checksum mismatch for tensor {key!r}: the file is corrupted")
            self._cache[key] = t
        return self._cache[key]

    def _read(self, key: str) -> torch.Tensor:
        """One tensor by a positioned read into memory of its own (io.read_tensor)."""
        try:
            return io.read_tensor(*self._spans[key])
        except (OSError, EOFError) as exc:
            raise PackError(clip(f"{self.file}: tensor {key!r} cannot be read ({type(exc).__name__}: {exc})")) from None

    def fetch_any(self, key: str) -> torch.Tensor:
        """A stored tensor, or the state a stacked entry stands for (decoded through its map)."""
        if key in self.internal:
            return self._decode_map(key, self.internal[key], self.fetch)
        return self.fetch(key)

    def _decode_map(self, name: str, entry: dict, fetch) -> torch.Tensor:
        try:
            return get_map(entry["map"]).decode(name, entry, fetch)
        except PackError:
            raise
        except (ValueError, RuntimeError) as exc:
            raise PackError(clip(f"tensor {name!r}: cannot be decoded ({exc})")) from None

    def fetch_all(self) -> None:
        """Read and check every stored tensor: a corrupted file is refused before anything is written."""
        for key in self.infos:
            self.fetch(key)

    def verify(self, chunk: int = 1 << 20) -> None:
        """Check every stored tensor's sha256 by reading it through in chunks, keeping none of it: a corrupted file
        is refused before anything is written, at a peak of one chunk instead of the whole file (``fetch`` reads
        and checks each tensor again when it is used)."""
        buffer = memoryview(bytearray(chunk))
        files = {}
        try:
            for key, (dtype, shape) in self.infos.items():
                if key in self._cache:
                    continue
                file, span = self._spans[key]
                if file not in files:
                    for f in files.values():  # one file open at a time: a shard is read through in one go
                        f.close()
                    files = {file: open(file, "rb", buffering=0)}  # noqa: SIM115 (closed below)
                pieces = io.read_chunks(files[file], span.offset, span.nbytes, buffer, key)
                if checksum(dtype, shape, pieces, self.version) != self.checksums[key]:
                    raise PackError(f"{file}: checksum mismatch for tensor {key!r}: the file is corrupted")
        except (OSError, EOFError) as exc:
            raise PackError(clip(f"{self.file}: cannot be read ({type(exc).__name__}: {exc})")) from None
        finally:
            for f in files.values():
                f.close()

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
            try:
                out[name] = get_map(entry["map"]).decode(name, entry, fetch)
            except PackError:
                raise
            except (ValueError, RuntimeError) as exc:  # a map's own check of the file's content
                raise PackError(clip(f"tensor {name!r}: cannot be decoded ({exc})")) from None
    for name, entry in entries.items():
        if entry["map"] == "alias" and not _internal(name):
            out[name] = out[entry["of"]].clone()
    return out
