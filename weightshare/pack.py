"""The packed file format: ``ws.save`` / ``ws.load`` / ``export``.

A packed model is a directory: the source model's config, tokenizer and module
files as they were, plus ``weightshare.safetensors`` holding

* ``<name>.__tables``  (groups, 2**bits) fp16 (the weight's dtype when fp16 would round them)
* ``<name>.__indices`` uint8, the indices bit-packed at exactly ``bits`` bits each
* ``<name>``           every tensor no map touches, as it was

and, in its metadata, the format version and a JSON spec: per tensor its map
(dense / codebook / alias) with shape, dtype and config, and a sha256 per
stored tensor.  No pickle anywhere; the loader checks every field it reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn
from torch.nn.utils import parametrize

from weightshare import hub
from weightshare.sharing.codebook import (TABLE_DTYPES, CodebookConfig, _Codebook, channel_layout, codebook,
                                          group_layout, is_transposed_linear, tie_codebook)
from weightshare.space import config_from_dict, config_to_dict

__all__ = ["save", "load", "export", "read_spec", "PackError", "FILENAME", "FORMAT_VERSION"]

log = logging.getLogger(__name__)

FILENAME = "weightshare.safetensors"
FORMAT = "weightshare"
FORMAT_VERSION = 2  # 2 adds codebooks laid out over W^T ("transposed"); files without one are written as 1
READABLE_VERSIONS = ("1", "2")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
           "int8": torch.int8, "int16": torch.int16, "bool": torch.bool}
_BITS_CHUNK = 1 << 23  # values per bit-packing pass: a multiple of 8, bounds temporaries to ~64 MB


class PackError(ValueError):
    """A packed model that cannot be read: names the tensor and the problem."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers < 2**bits into a little-endian bit stream of exactly ``bits`` bits each."""
    v = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    parts = []
    for s in range(0, v.size, _BITS_CHUNK):
        chunk = np.unpackbits(v[s : s + _BITS_CHUNK, None], axis=1, bitorder="little")[:, :bits]
        parts.append(chunk.reshape(-1))
    return np.packbits(np.concatenate(parts) if parts else np.zeros(0, np.uint8), bitorder="little")


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` uint8 values of ``bits`` bits each."""
    out = np.empty(count, dtype=np.uint8)
    step = _BITS_CHUNK  # values per pass; a multiple of 8 so each pass starts on a byte
    for s in range(0, count, step):
        n = min(step, count - s)
        first = s * bits // 8
        raw = np.unpackbits(data[first : first + (n * bits + 7) // 8], bitorder="little", count=n * bits)
        out[s : s + n] = np.packbits(raw.reshape(n, bits), axis=1, bitorder="little")[:, 0]
    return out


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().data).hexdigest()


def _owned_modules(model: nn.Module):
    """(prefix, module) pairs outside parametrization internals, tied modules once per path."""
    for name, module in model.named_modules(remove_duplicate=False):
        if "parametrizations" in name.split("."):
            continue
        yield (name + "." if name else ""), module


def table_storage_dtype(tables: torch.Tensor, config: CodebookConfig) -> torch.dtype:
    """The config's table dtype when it holds the tables exactly, else the tables' own dtype.

    Tables leave the config's grid when they are trained, or when the weight's own
    dtype is coarser (bf16 tables of a bf16 model need not be fp16 values).
    """
    dtype = TABLE_DTYPES[config.table_dtype]
    if not torch.equal(tables.to(dtype).to(tables.dtype), tables):
        return tables.dtype
    return dtype


def _collect(inner: nn.Module) -> tuple[dict, dict]:
    """The tensors to write and the per-tensor spec of a (possibly shared) model."""
    tensors: dict[str, torch.Tensor] = {}
    spec: dict[str, dict] = {}
    seen: dict[int, str] = {}
    for prefix, module in _owned_modules(inner):
        if parametrize.is_parametrized(module):
            for tname, plist in module.parametrizations.items():
                full = prefix + tname
                if len(plist) != 1 or not isinstance(plist[0], _Codebook):
                    raise ValueError(f"save: {full} has a parametrization the packed format does not know ({plist})")
                cb, original = plist[0], plist.original
                if id(original) in seen:  # a codebook tied to another module's (LM head and embedding)
                    spec[full] = {"map": "alias", "of": seen[id(original)]}
                    continue
                seen[id(original)] = full
                tables = original.detach()
                store = table_storage_dtype(tables, cb.config)
                if store != TABLE_DTYPES[cb.config.table_dtype]:
                    log.warning("%s: tables moved off the %s grid (trained?): stored as %s to stay exact",
                                full, cb.config.table_dtype, _dtype_name(store))
                tensors[full + ".__tables"] = tables.to(store).contiguous()
                tensors[full + ".__indices"] = torch.from_numpy(pack_bits(cb.labels.numpy(), cb.config.bits))
                spec[full] = {"map": "codebook", "shape": list(cb.shape), "dtype": _dtype_name(tables.dtype),
                              "config": config_to_dict(cb.config)}
                if cb.transposed:  # labels and tables over W^T (transformers' Conv1D)
                    spec[full]["transposed"] = True
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
            tensors[full] = t.detach().contiguous()
            spec[full] = {"map": "dense", "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
    return tensors, spec


def _check_dest(path: Path, source_path: str | None) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"output exists and is a file\n  got: {str(path)!r}\n  choose a directory path for --out")
    if source_path and path.exists() and path.resolve() == Path(source_path).resolve():
        raise ValueError(f"output is the source model directory {str(path)!r}: choose another --out")
    if path.is_dir() and any(path.iterdir()) and not (path / FILENAME).is_file():
        raise ValueError(
            f"output directory is not empty and not a packed model\n  got: {str(path)!r}\n"
            "  choose a new or empty directory (an existing packed model is replaced)"
        )


def _write_atomic(data: bytes, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` as a packed directory at ``path`` and return the path.

    ``model`` is a transformers model or SentenceTransformer (its config,
    tokenizer and module files are copied from the directory it was loaded
    from with weightshare), or any ``nn.Module`` (then ``ws.load`` needs a
    skeleton module).  Each file is written atomically.
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
    # a reader of version 1 would lay a transposed codebook out wrongly: only such files say 2
    version = FORMAT_VERSION if any(e.get("transposed") for e in spec.values()) else 1
    meta = {"format": FORMAT, "format_version": str(version),
            "spec": json.dumps({"source": source_meta, "tensors": spec, "checksums": checksums})}
    path.mkdir(parents=True, exist_ok=True)
    if source is not None:
        hub.copy_non_weight_files(source.path, path)
    elif source_meta["kind"] == hub.TRANSFORMERS:
        inner.config.save_pretrained(path)
    _write_atomic(safetensors_save(tensors, metadata=meta), path / FILENAME)
    return path


# ----------------------------------------------------------------------------- reading


def read_spec(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and fully validate a packed directory: returns (spec, stored tensors)."""
    path = Path(path)
    file = path / FILENAME
    if not path.is_dir():
        raise PackError(f"packed model not found\n  expected: a directory holding {FILENAME}\n  got: {str(path)!r}")
    if not file.is_file():
        raise PackError(f"not a packed model: {str(path)!r} has no {FILENAME}\n  create one with `weightshare compress`")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
        raise PackError(f"{file}: truncated or not a safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise PackError(f"{file}: not a weightshare file\n  expected metadata format={FORMAT!r}\n  got: {meta.get('format')!r}")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise PackError(
            f"{file}: unknown format version\n  expected: one of {', '.join(READABLE_VERSIONS)}\n"
            f"  got: {meta.get('format_version')!r}\n"
            "  upgrade weightshare to read it"
        )
    try:
        spec = json.loads(meta["spec"])
        entries, checksums, source = spec["tensors"], spec["checksums"], spec["source"]
        kind = source["kind"]
    except (KeyError, ValueError, TypeError) as exc:
        raise PackError(f"{file}: the sharing spec in the metadata is unreadable ({exc!r})") from None
    if kind not in (hub.TRANSFORMERS, hub.SENTENCE_TRANSFORMERS, "module"):
        raise PackError(f"{file}: unknown source kind {kind!r}")
    expected = set()
    for name, entry in entries.items():
        expected |= _validate_entry(name, entry, entries, tensors)
    for name in sorted(set(tensors) | set(checksums)):
        if name not in expected:
            raise PackError(f"{file}: tensor {name!r} is not described by the spec (tampered file?)")
        if name not in tensors:
            raise PackError(f"{file}: tensor {name!r} is missing")
        if checksums.get(name) != _sha256(tensors[name]):
            raise PackError(f"{file}: checksum mismatch for tensor {name!r}: the file is corrupted")
    for name in expected - set(checksums):
        raise PackError(f"{file}: no checksum for tensor {name!r}")
    return spec, tensors


def _need(name: str, tensors: dict, dtype_names, shape: tuple | None = None) -> torch.Tensor:
    if name not in tensors:
        raise PackError(f"tensor {name!r} is missing from the packed file")
    t = tensors[name]
    if _dtype_name(t.dtype) not in dtype_names:
        raise PackError(f"tensor {name!r}: wrong dtype\n  expected: one of {sorted(dtype_names)}\n  got: {_dtype_name(t.dtype)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise PackError(f"tensor {name!r}: wrong shape\n  expected: {tuple(shape)}\n  got: {tuple(t.shape)}")
    return t


def _shape(name: str, entry: dict) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise PackError(f"tensor {name!r}: bad shape in spec: {shape!r}")
    return tuple(shape)


def _validate_entry(name: str, entry: dict, entries: dict, tensors: dict) -> set[str]:
    kind = entry.get("map") if isinstance(entry, dict) else None
    if kind == "dense":
        dtype = entry.get("dtype")
        if dtype not in _DTYPES:
            raise PackError(f"tensor {name!r}: unknown dtype {dtype!r}")
        _need(name, tensors, {dtype}, _shape(name, entry))
        return {name}
    if kind == "alias":
        target = entries.get(entry.get("of"))
        if not isinstance(target, dict) or target.get("map") not in ("dense", "codebook"):
            raise PackError(f"tensor {name!r}: alias of {entry.get('of')!r}, which is not a stored tensor")
        return set()
    if kind == "codebook":
        shape = _layout(name, entry)
        if entry.get("dtype") not in ("float16", "bfloat16", "float32"):
            raise PackError(f"tensor {name!r}: bad codebook dtype {entry.get('dtype')!r}")
        try:
            config = config_from_dict(entry["config"])
            if not isinstance(config, CodebookConfig):
                raise ValueError(f"expected a CodebookConfig, got {type(config).__name__}")
            groups, _ = group_layout(shape, config.granularity, config.group_size, name)
        except (KeyError, TypeError, ValueError) as exc:
            raise PackError(f"tensor {name!r}: bad codebook config ({exc})") from None
        k = 1 << config.bits
        _need(f"{name}.__tables", tensors, {"float16", "bfloat16", "float32"}, (groups, k))
        numel = int(np.prod(shape))
        _need(f"{name}.__indices", tensors, {"uint8"}, ((numel * config.bits + 7) // 8,))
        return {f"{name}.__tables", f"{name}.__indices"}
    raise PackError(f"tensor {name!r}: unknown map {kind!r}")


def _layout(name: str, entry: dict) -> tuple[int, ...]:
    """The shape tables and labels are laid out in: the weight's, or W^T's for a transposed codebook."""
    shape = _shape(name, entry)
    transposed = entry.get("transposed", False)
    if transposed not in (True, False) or (transposed and len(shape) != 2):
        raise PackError(f"tensor {name!r}: bad 'transposed' in spec: {transposed!r} for shape {shape}")
    return channel_layout(shape, transposed)


def _codebook_parts(name: str, entry: dict, tensors: dict):
    """(config, tables, labels): labels shaped as the layout (see ``_layout``)."""
    config = config_from_dict(entry["config"])
    shape = _layout(name, entry)
    numel = int(np.prod(shape))
    labels = unpack_bits(tensors[f"{name}.__indices"].numpy(), config.bits, numel)
    tables = tensors[f"{name}.__tables"].to(torch.float32)
    if labels.size and int(labels.max()) >= tables.shape[1]:  # cannot happen with full tables; cheap to check
        raise PackError(f"tensor {name!r}: index {int(labels.max())} out of range for a table of {tables.shape[1]}")
    return config, tables, torch.from_numpy(labels).view(shape)


def dense_state_dict(spec: dict, tensors: dict) -> dict[str, torch.Tensor]:
    """The plain weights a packed model stands for (aliases as separate copies)."""
    out = {}
    entries = spec["tensors"]
    for name, entry in entries.items():
        if entry["map"] == "dense":
            out[name] = tensors[name]
        elif entry["map"] == "codebook":
            config, tables, labels = _codebook_parts(name, entry, tensors)
            groups, glen = group_layout(labels.shape, config.granularity, config.group_size)
            w = torch.gather(tables, 1, labels.view(groups, glen).long()).view(labels.shape)
            if entry.get("transposed"):
                w = w.t().contiguous()
            out[name] = w.to(_DTYPES[entry["dtype"]])
    for name, entry in entries.items():
        if entry["map"] == "alias":
            out[name] = out[entry["of"]].clone()
    return out


def _write_dense_dir(path: Path, dest: Path, spec: dict, tensors: dict) -> None:
    hub.copy_non_weight_files(path, dest)
    target = dest / spec["source"]["weights_subdir"] / "model.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(safetensors_save(dense_state_dict(spec, tensors), metadata={"format": "pt"}), target)


def export(path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Write the packed model at ``path`` as a plain model directory at ``dest``.

    ``transformers.AutoModel.from_pretrained(dest)`` or
    ``SentenceTransformer(dest)`` (whichever the source was) loads it unchanged.
    """
    spec, tensors = read_spec(path)
    if spec["source"]["kind"] == "module":
        raise ValueError("export: this packed file holds a plain nn.Module (no config); use ws.load(path, model=...)")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"export: destination exists and is not an empty directory\n  got: {str(dest)!r}")
    dest.mkdir(parents=True, exist_ok=True)
    _write_dense_dir(Path(path), dest, spec, tensors)
    return dest


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a packed directory back into a model with its sharing in place.

    Without ``model`` the architecture is rebuilt from the directory's config
    (transformers model or SentenceTransformer, as saved).  With ``model``
    (a skeleton of the same architecture) the weights are loaded into it.
    """
    spec, tensors = read_spec(path)
    kind = spec["source"]["kind"]
    if model is None:
        if kind == "module":
            raise ValueError("load: this packed file holds a plain nn.Module; pass a skeleton: ws.load(path, model=...)")
        with tempfile.TemporaryDirectory() as tmp:
            _write_dense_dir(Path(path), Path(tmp), spec, tensors)
            model = hub.load_dense_dir(tmp, kind)
        model._weightshare_source = hub.Source(kind, str(Path(path)), spec["source"]["weights_subdir"])
    inner = hub.inner_model(model)
    dense = {n: tensors[n] for n, e in spec["tensors"].items() if e["map"] == "dense"}
    missing, unexpected, mismatched = [], [], []
    own = dict(inner.state_dict())
    for name, entry in spec["tensors"].items():
        if entry["map"] == "codebook":
            continue
        if name not in own:
            unexpected.append(name)
    for name in own:
        if name not in spec["tensors"]:
            missing.append(name)
    # shapes too, before anything is written into the model: a mismatch is one error, not a half-loaded model
    for name, entry in spec["tensors"].items():
        if entry["map"] not in ("dense", "codebook"):
            continue
        owner_name, _, attr = name.rpartition(".")
        if entry["map"] == "dense":
            if name not in own:
                continue  # already listed as not in model
            have = tuple(own[name].shape)
        else:
            try:
                owner = inner.get_submodule(owner_name)
                have = tuple(getattr(owner, attr).shape)
            except AttributeError:
                unexpected.append(name)
                continue
            if bool(entry.get("transposed")) != (attr == "weight" and is_transposed_linear(owner)):
                layout = "over W^T" if entry.get("transposed") else "over W"
                mismatched.append(f"{name}: the file lays its codebook out {layout}, "
                                  f"which does not fit the model's {type(owner).__name__}")
        if have != tuple(entry["shape"]):
            mismatched.append(f"{name}: file {tuple(entry['shape'])}, model {have}")
    if missing or unexpected or mismatched:
        raise ValueError(
            "load: the model does not match the packed file\n"
            f"  missing in file: {missing[:5]}\n  not in model: {unexpected[:5]}\n  does not fit: {mismatched[:5]}\n"
            "  pass a skeleton of the architecture that was saved"
        )
    with torch.no_grad():
        for name, t in dense.items():
            own[name].copy_(t)
    entries = spec["tensors"]
    alias_of_kind = {n: entries[e["of"]]["map"] for n, e in entries.items() if e["map"] == "alias"}
    for name, entry in entries.items():
        if alias_of_kind.get(name) == "dense":  # restore the tie itself, not only the value
            owner_name, _, attr = name.rpartition(".")
            target_owner, _, target_attr = entry["of"].rpartition(".")
            setattr(inner.get_submodule(owner_name), attr, getattr(inner.get_submodule(target_owner), target_attr))
    for name, entry in entries.items():
        if entry["map"] == "codebook":
            config, tables, labels = _codebook_parts(name, entry, tensors)
            owner_name, _, attr = name.rpartition(".")
            codebook(inner.get_submodule(owner_name), attr, config, init=(tables, labels), fqn=name)
    for name, entry in entries.items():
        if alias_of_kind.get(name) == "codebook":  # after the codebooks exist: tie to one of them
            owner_name, _, attr = name.rpartition(".")
            target_owner, _, target_attr = entry["of"].rpartition(".")
            if target_attr != attr:
                raise PackError(f"tensor {name!r}: a codebook alias must name the same attribute as {entry['of']!r}")
            tie_codebook(inner.get_submodule(target_owner), inner.get_submodule(owner_name), attr)
    return model

