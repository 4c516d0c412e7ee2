"""Building models from packed files: ``ws.load``, ``ws.export``, and the skeletons they fill.

``pack.py`` reads, checks and writes the container; this module turns a checked
``PackedFile`` into a model.  ``ws.load(path)`` builds the architecture named by
``config.json`` on the meta device and installs every entry: plain tensors as
they are, and each sharing map's entry either as a packed module that runs on the
native kernel (a codebook ``nn.Linear`` becomes a ``CodebookLinear`` holding only
indices and tables) or, with ``trainable=True`` or where no packed module fits,
as the map's parametrization (tables that train).  ``export`` decodes a packed
model into the plain directory its source was.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from weightshare import hub, io
from weightshare.errors import clip
from weightshare.pack import DEFAULT_MAX_SHARD_SIZE, PackedFile, PackError, owned_modules
from weightshare.space import get_map, share_parametrization_

__all__ = ["load", "export", "skeleton"]

# glibc keeps freed heap for reuse, and read tensors of a few MB come from the heap once its mmap threshold has
# grown: handed back every 64 MB of released reads, a 1.1 B model's load peaks at 1.06x what it keeps
# (1.5x when trimmed only at the end); each trim costs a few ms
_TRIM_EVERY = 64 << 20


def _split(name: str) -> tuple[str, str]:
    owner, _, attr = name.rpartition(".")
    return owner, attr


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name, tied ones under each of their names."""
    out = {}
    for prefix, module in owned_modules(model):
        for n, t in module._parameters.items():
            if t is not None:
                out[prefix + n] = t
        for n, t in module._buffers.items():
            if t is not None and n not in module._non_persistent_buffers_set:
                out[prefix + n] = t
    return out


def check_fit(inner: nn.Module, pf: PackedFile) -> None:
    """Every entry has a place of its shape in the model and every tensor of the model an entry: all problems at
    once."""
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


def _replace(inner: nn.Module, owner_name: str, new: nn.Module) -> None:
    parent_name, _, child = owner_name.rpartition(".")
    setattr(inner.get_submodule(parent_name), child, new)


def _install_packed(inner: nn.Module, pf: PackedFile, name: str, entry: dict, aliases: list[str]) -> bool:
    """Put a packed module in place of the owner of ``name`` (and of every alias of it); False if one cannot take it."""
    owner_name, attr = _split(name)
    if not owner_name:  # the root module cannot be replaced in a parent
        return False
    m = get_map(entry["map"])
    try:
        module = m.build_module(inner.get_submodule(owner_name), attr, name, entry, pf.fetch_any)
    except PackError:
        raise
    except (ValueError, RuntimeError) as exc:
        raise PackError(clip(f"tensor {name!r}: cannot be built ({exc})")) from None
    if module is None:
        return False
    shared = []
    for alias in aliases:  # a tied LM head gets a packed module over the same indices and tables
        a_owner, a_attr = _split(alias)
        other = m.share_module(module, inner.get_submodule(a_owner), a_attr) if a_owner else None
        if other is None:
            return False
        shared.append((a_owner, other))
    _replace(inner, owner_name, module)
    for a_owner, other in shared:
        _replace(inner, a_owner, other)
    return True


def _install_map(pf: PackedFile, holder: nn.Module, attr: str, name: str, entry: dict) -> None:
    """Entry ``name``'s map on ``holder.<attr>`` as a parametrization, and the map stacked on its state on that."""
    try:
        get_map(entry["map"]).install(holder, attr, name, entry, pf.fetch_any)
    except PackError:
        raise
    except (ValueError, RuntimeError) as exc:  # a map's own check of the file's content
        raise PackError(clip(f"tensor {name!r}: cannot be installed ({exc})")) from None
    key = pf.stacked.get(name)
    if key is not None:  # the state was decoded for the install: now the map that makes it goes onto the original
        _install_map(pf, holder.parametrizations[attr], "original", key, pf.internal[key])


def install_(inner: nn.Module, pf: PackedFile, trainable: bool = False) -> None:
    """Put every entry into the checked model: plain tensors as they are, maps as packed modules
    (unless ``trainable``) or by their own install (a parametrization)."""
    aliases: dict[str, list[str]] = {}
    for name, entry in pf.entries.items():
        if entry["map"] == "alias":
            aliases.setdefault(entry["of"], []).append(name)
    # plain tensors first: a packed module takes its owner's bias as it is then
    for name, entry in pf.entries.items():
        if entry["map"] != "dense":
            continue
        owner_name, attr = _split(name)
        owner = inner.get_submodule(owner_name)
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
    packed: set[str] = set()
    released = 0
    for name, entry in pf.entries.items():
        if entry["map"] in ("dense", "alias"):
            continue
        owner_name, attr = _split(name)
        # a map with another stacked on its state keeps its parametrized form, which the stacked map goes onto
        if not trainable and name not in pf.stacked and _install_packed(inner, pf, name, entry, aliases.get(name, [])):
            packed.add(name)
        else:
            _install_map(pf, inner.get_submodule(owner_name), attr, name, entry)
        pf.release(name)  # packed indices are garbage once unpacked: keep the peak low
        released += sum(math.prod(shape) * io.DTYPES[dtype].itemsize
                        for dtype, shape in (pf.infos[key] for key in pf.keys_of.get(name, ())))
        if released >= _TRIM_EVERY:
            io.trim_heap()
            released = 0
    for name, entry in pf.entries.items():
        if entry["map"] != "alias" or entry["of"] in packed:
            continue
        owner_name, attr = _split(name)
        target_owner, target_attr = _split(entry["of"])
        source = inner.get_submodule(target_owner)
        if pf.entries[entry["of"]]["map"] == "dense":  # restore the tie itself, not only the value
            setattr(inner.get_submodule(owner_name), attr, getattr(source, target_attr))
        else:
            share_parametrization_(source, inner.get_submodule(owner_name), attr)


def install_checked_(inner: nn.Module, pf: PackedFile, trainable: bool = False, own: bool = False) -> None:
    """Check that ``inner`` fits the file and every checksum holds, then install: a bad file changes nothing.

    ``own``: ``inner`` was built for this load and is dropped if it fails (a skeleton, transformers'
    ``from_pretrained`` model).  Then the checksums are checked by streaming the file and each tensor is read
    again as it is installed, so that the load's peak holds the model and one tensor, not the model and the
    whole file.  A user's model instead waits until every tensor is read and checked, so that a file that
    changes under the load cannot leave it half written."""
    check_fit(inner, pf)
    if own:
        pf.verify()
    else:
        pf.fetch_all()
    install_(inner, pf, trainable=trainable)


def skeleton(pf: PackedFile) -> nn.Module:
    """The architecture ``config.json`` names, parameters on the meta device; every failure one PackError."""
    sub = pf.source["weights_subdir"]
    try:
        config_dir = hub.inside(pf.root, sub, "spec source.weights_subdir")
        if not (config_dir / "config.json").is_file():
            raise ValueError(f"{pf.root}: no config.json in {sub or 'the folder'}")
        return hub.skeleton(config_dir, len(pf.entries),
                            hub.BUFFER_BUDGET + sum(math.prod(s) for _, s in pf.infos.values()))
    except PackError:
        raise
    except Exception as exc:  # the config is untrusted: whatever transformers makes of it is one error
        msg = str(exc) if isinstance(exc, ValueError) and "weights_subdir" in str(exc) else \
            f"{pf.root}: cannot build the model from its config ({type(exc).__name__}: {exc})"
        raise PackError(clip(msg)) from None


def load(path: str | os.PathLike, model: nn.Module | None = None, trainable: bool = False,
         compute: str = "fp32") -> nn.Module:
    """Load a packed directory back into a model with its sharing in place.

    Without ``model`` the architecture is rebuilt from the directory's
    ``config.json`` (a transformers model, or a SentenceTransformer when the
    source was one) with its weights on the meta device, and the stored tables,
    indices and tensors are installed directly: no dense copy, no temporary file.
    With ``model`` (a skeleton of the same architecture) the weights are loaded
    into it.

    By default codebook Linear/Conv1D/Embedding weights become packed modules
    (``CodebookLinear``, ``CodebookEmbedding``) that hold only indices and tables
    and run on the native kernel; ``compute="bf16"`` lets their large-batch GEMMs
    multiply in bf16.  ``trainable=True`` gives the parametrized form instead,
    whose tables train.  Any problem with the file is one ``PackError``; a model
    that does not fit is refused before anything is written into it.
    """
    from weightshare.modules import set_compute_

    with PackedFile(path) as pf:
        kind, sub = pf.source["kind"], pf.source["weights_subdir"]
        if model is None:
            if kind == "module":
                raise PackError("load: this packed file holds a plain nn.Module; "
                                "pass a skeleton: ws.load(path, model=...)")
            inner = skeleton(pf)
        else:
            inner = hub.inner_model(model)
        install_checked_(inner, pf, trainable=trainable, own=model is None)
    io.trim_heap()
    if compute != "fp32":
        set_compute_(inner, compute)
    if model is not None:
        return model
    if kind == hub.SENTENCE_TRANSFORMERS:
        try:
            model = hub.packed_sentence_transformer(pf.root, sub, inner)
        except Exception as exc:
            raise PackError(clip(f"{pf.root}: cannot build the sentence-transformers pipeline "
                                 f"({type(exc).__name__}: {exc})")) from None
    else:
        model = inner
    model._weightshare_source = hub.Source(kind, str(pf.root), sub)
    return model


def export(path: str | os.PathLike, dest: str | os.PathLike,
           max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write the packed model at ``path`` as a plain model directory at ``dest``.

    ``transformers.AutoModel.from_pretrained(dest)`` or
    ``SentenceTransformer(dest)`` (whichever the source was) loads it unchanged.
    Weights are written as ``save_pretrained`` writes them: one
    ``model.safetensors``, or shards of at most ``max_shard_size`` with a
    ``model.safetensors.index.json``; a shard index of the source is never copied.
    Tensors are decoded and written one at a time, and the folder is renamed into place at the end.
    """
    dest = Path(dest)
    with PackedFile(path) as pf:
        if pf.source["kind"] == "module":
            raise PackError("export: this packed file holds a plain nn.Module (no config); "
                            "use ws.load(path, model=...)")
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise PackError(f"export: destination exists and is not an empty directory\n  got: {str(dest)!r}\n"
                            "  choose a new or empty directory")
        if dest.resolve().is_relative_to(pf.root.resolve()):
            raise PackError(f"export: destination {str(dest)!r} is inside the packed model: choose another")
        check_fit(skeleton(pf), pf)  # the export must be a model its config.json describes, nothing else
        pf.fetch_all()  # every checksum before the first byte is written
        shapes = pf.dense_shapes()
        try:
            plan = io.shard_plan(shapes, max_shard_size)
        except ValueError as exc:
            raise PackError(clip(f"export: max_shard_size {max_shard_size!r}: {exc}")) from None
        with io.staged_dir(dest) as tmp:
            try:
                hub.copy_non_weight_files(pf.root, tmp, confine=True)
            except ValueError as exc:
                raise PackError(str(exc)) from None
            hub.strip_packed_config(tmp / pf.source["weights_subdir"])
            out = tmp / pf.source["weights_subdir"]
            out.mkdir(parents=True, exist_ok=True)
            io.write_shards(out, shapes, plan, lambda entries: _decoded(pf, entries))
    return dest


def _decoded(pf: PackedFile, entries: list[io.Entry]):
    """The plain tensors of ``entries``, decoded one at a time as the writer asks for them."""
    for name, shape, dtype in entries:
        t = pf.decode(name)
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:  # a map's decode must give what the spec says
            raise PackError(clip(f"tensor {name!r}: decodes to {t.dtype} {list(t.shape)}\n"
                                 f"  expected: {dtype} {list(shape)} (the spec's)"))
        yield t
