"""Streaming compression: a checkpoint clustered tensor by tensor, the packed file written as it goes.

A model larger than memory compresses: it is built on the meta device from its config
(``hub.skeleton``) and holds real weights only for the module being worked on.  Each module's own
tensors are read from the checkpoint (``hub.checkpoint``: ``model.safetensors`` or shards and their
index, positioned reads, no memory map), cast to the dtype ``from_pretrained`` would give them,
clustered (``codebook_``), handed to ``pack.PackWriter`` and let go.  A weight tied across modules
(an LM head on its embedding) is found from the skeleton's own ties before any tensor is read,
clustered once with its first owner, and that owner is kept until the last one is written.  The
packed file equals, byte for byte, the one ``compress`` writes from the model loaded whole (the
tests compare them).

Data-free clustering only (a recipe's per-layer configs and dense layers included): calibration
needs activations through the whole model, and a size budget every tensor's error curve first.  A
checkpoint on which this path could not do what ``from_pretrained`` does (names it would rename,
weights it would initialise because the checkpoint lacks them, modules transformers keeps in
float32) gets a reason from ``open_source`` instead of a plan, and ``compress`` loads it whole.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections import defaultdict
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from weightshare import hub, io, pack
from weightshare._progress import progress
from weightshare.report import Report, report_file
from weightshare.sharing.codebook import (
    CodebookConfig,
    channel_layout,
    codebook_,
    group_layout,
    warn_if_tables_dominate,
)
from weightshare.space import share_parametrization_

__all__ = ["StreamSource", "Work", "open_source", "plan", "compress_streamed", "cluster_weight"]

log = logging.getLogger(__name__)



@dataclass
class StreamSource:
    """A checkpoint ready to stream: its files, the model skeleton on the meta device, and where each of the
    skeleton's tensors lies in the checkpoint."""

    source: hub.Source
    tensors: io.Tensors
    model: nn.Module
    names: dict[str, str]  # the skeleton's parameter and saved-buffer names -> the checkpoint's


def _config_dtype(config_dir: Path):
    raw = hub.read_json(config_dir / "config.json", "config.json")
    return raw.get("dtype", raw.get("torch_dtype")) if isinstance(raw, dict) else None


def open_source(src) -> tuple[StreamSource | None, str]:
    """``(StreamSource, "")`` for a model directory that can be streamed, else ``(None, the reason)``.

    Raises ``ValueError`` for a directory that is not a model, or whose checkpoint is unreadable or
    disagrees with its config (a tensor of another shape): what loading it whole would refuse too.
    """
    source = hub.detect(src)
    config_dir = Path(source.path) / source.weights_subdir
    hub.check_model_type(config_dir)  # before the weights: the first thing loading the model whole would say
    if not any((config_dir / f).is_file() for f in (hub.WEIGHTS, io.SHARD_INDEX)):
        return None, "it has no safetensors checkpoint (transformers reads its other formats)"
    tensors = hub.checkpoint(config_dir)
    dtype = None
    if _config_dtype(config_dir) is None:  # from_pretrained takes the checkpoint's dtype then
        floats = {dt for _, dt in tensors.meta.values() if dt.is_floating_point}
        if len(floats) > 1:
            return None, f"its config names no dtype and its checkpoint mixes {sorted(map(str, floats))}"
        dtype = next(iter(floats), None)
    # what from_pretrained would build too (GPT-Neo's causal masks): bounded by the checkpoint's own size
    budget = hub.BUFFER_BUDGET + sum(math.prod(shape) * dt.itemsize for shape, dt in tensors.meta.values())
    model = hub.skeleton(config_dir, len(tensors.meta), budget, dtype=dtype)
    model.tie_weights()  # as from_pretrained does: the config's ties (an LM head on its embedding), before any read
    main = next((p.dtype for p in model.parameters()), torch.float32)
    strict = getattr(model, "_keep_in_fp32_modules_strict", None)
    loose = getattr(model, "_keep_in_fp32_modules", None)
    if (strict and main in (torch.float16, torch.bfloat16)) or (loose and main == torch.float16):
        return None, "transformers keeps some of its modules in float32"
    names, why = _match_names(model, tensors)
    if names is None:
        return None, why
    return StreamSource(source, tensors, model, names), ""


def stored_tensors(module: nn.Module):
    """(name, tensor) of ``module``'s own parameters and saved buffers."""
    for n, t in module._parameters.items():
        if t is not None:
            yield n, t
    for n, b in module._buffers.items():
        if b is not None and n not in module._non_persistent_buffers_set:
            yield n, b


def _match_names(model: nn.Module, tensors: io.Tensors) -> tuple[dict[str, str] | None, str]:
    """Each parameter and saved buffer of ``model`` -> its name in the checkpoint (as from_pretrained finds it:
    as it is, or with the base model's prefix added or removed); a tied parameter needs one of its names."""
    prefix = getattr(model, "base_model_prefix", "") or ""

    def find(name: str) -> str | None:
        for candidate in (name, f"{prefix}.{name}" if prefix else None,
                          name.removeprefix(prefix + ".") if prefix and name.startswith(prefix + ".") else None):
            if candidate is not None and candidate in tensors.meta:
                return candidate
        return None

    by_object: dict[int, list[str]] = defaultdict(list)
    buffers: set[str] = set()
    for prefix_, module in pack.owned_modules(model):
        for n, t in stored_tensors(module):
            by_object[id(t)].append(prefix_ + n)
            if n in module._buffers:
                buffers.add(prefix_ + n)
    names: dict[str, str] = {}
    missing = []
    for group in by_object.values():
        present = {c for c in map(find, group) if c is not None}
        if len(present) > 1:  # from_pretrained compares them and unties what differs: the whole model decides
            return None, f"its checkpoint stores the tied weights {sorted(present)} separately"
        found = next(iter(present), None)
        if found is None:
            if all(n in buffers for n in group):
                continue  # a buffer the checkpoint does not hold keeps its constructor's value, as in from_pretrained
            missing.append(group[0])
            continue
        for n in group:
            names[n] = found
    if missing:
        return None, (f"{len(missing)} of its tensors are not in the checkpoint under a name from_pretrained would "
                      f"take as it is ({missing[:3]})")
    return names, ""


def _check_shapes(ss: StreamSource) -> None:
    """Every tensor of the checkpoint the model takes has the skeleton's shape, before anything is written."""
    for prefix, module in pack.owned_modules(ss.model):
        for n, t in stored_tensors(module):
            name = ss.names.get(prefix + n)
            if name is None:
                continue
            shape = ss.tensors.meta[name][0]
            if tuple(shape) != tuple(t.shape):
                file = ss.tensors.where[name][0]
                raise ValueError(f"{file}: tensor {name!r} is {tuple(shape)}\n  expected: {tuple(t.shape)}, as "
                                 f"config.json describes the model\n  the checkpoint and its config disagree")


def read_as(ss: StreamSource, name: str, like: torch.Tensor) -> torch.Tensor:
    t = ss.tensors.read(ss.names[name])
    if t.dtype != like.dtype:
        if not (t.dtype.is_floating_point and like.dtype.is_floating_point):
            file = ss.tensors.where[ss.names[name]][0]
            raise ValueError(f"{file}: tensor {ss.names[name]!r} is {t.dtype}\n  expected: {like.dtype}")
        t = t.to(like.dtype)  # from_pretrained casts a float tensor to the model's dtype
    return t


@dataclass
class Work:
    """What a streamed compression does, worked out from the skeleton before any tensor is read (the same on every
    process of a distributed run)."""

    modules: list[tuple[str, nn.Module]]  # owned_modules of the skeleton: the order the packed file is written in
    chosen: dict[int, str]  # index in modules -> module name, for the modules whose weight is clustered
    clustered: list[int]  # the indices whose weight is clustered there (a tied weight's first owner)
    last_use: dict[int, int]  # id of a module or skeleton tensor -> the last index that uses it
    config: CodebookConfig
    configs: dict[str, CodebookConfig]

    def config_of(self, i: int) -> CodebookConfig:
        return self.configs.get(self.chosen[i], self.config)

    def numel(self, i: int) -> int:
        return self.modules[i][1].weight.numel()


def plan(ss: StreamSource, config: CodebookConfig, compressible, configs: dict | None = None,
         dense=frozenset()) -> Work:
    """The modules of ``ss`` to cluster with ``config`` (``compressible(module, name)``, a recipe's ``configs``
    and ``dense`` names), every shape and group layout checked, and the ties between modules."""
    configs = dict(configs or {})
    _check_shapes(ss)
    modules = list(pack.owned_modules(ss.model))
    chosen: dict[int, str] = {}
    for i, (prefix, module) in enumerate(modules):
        name = prefix[:-1]
        if name not in dense and compressible(module, name) and isinstance(module.weight, torch.Tensor):
            chosen[i] = name
    # when each module and each tensor is used for the last time: tied owners keep the first one alive
    last_use: dict[int, int] = {}
    owners: dict[int, list[int]] = defaultdict(list)
    for i, (_, module) in enumerate(modules):
        last_use[id(module)] = i
        for _, t in stored_tensors(module):
            last_use[id(t)] = i
            owners[id(t)].append(i)
    first: dict[int, int] = {}  # id of a clustered weight -> its first owner
    for i, name in chosen.items():
        module = modules[i][1]
        w = module.weight
        if any(j not in chosen for j in owners[id(w)]):
            raise ValueError(f"{name}.weight is tied to a layer kept dense\n  expected: all of its owners "
                             f"({', '.join(modules[j][0][:-1] for j in owners[id(w)])}) clustered or all dense")
        first.setdefault(id(w), i)
        cfg = configs.get(name, config)
        transposed = hub.is_transposed_linear(module)
        group_layout(channel_layout(w.shape, transposed), cfg.granularity, cfg.group_size, f"{name}.weight")
    clustered = sorted(set(first.values()))
    warn_if_tables_dominate([(tuple(modules[i][1].weight.shape), hub.is_transposed_linear(modules[i][1]))
                             for i in clustered], config)
    return Work(modules, chosen, clustered, last_use, config, configs)


def compress_streamed(ss: StreamSource, out, config: CodebookConfig, compressible, configs: dict | None = None,
                      dense=frozenset(), records=None, work: Work | None = None, results=None,
                      max_shard_size: int | str = pack.DEFAULT_MAX_SHARD_SIZE, fill=None) -> tuple[Report, float]:
    """Cluster the checkpoint of ``ss`` data-free with ``config`` and write the packed directory ``out``.

    ``compressible(module, name)``: the modules whose weights are clustered (``is_compressible``);
    ``configs``: a recipe's per-module configs; ``dense``: module names kept as they are.
    ``records(report, seconds)`` -> the text files of the folder's top (model card, recipe).
    ``work``: the ``plan`` already made; ``results(i)`` -> ``(tables, codes)`` of module ``i`` clustered
    elsewhere (``distributed.py``): installed as they are, the weight not read.  A packed file larger than
    ``max_shard_size`` is written in shards (``pack.save``).  ``fill(writer)``: what reads, clusters and hands
    the modules to the writer instead of the data-free loop (``blockwise.py``: calibrated, block by block).
    Returns ``(report of the packed file, seconds spent reading, clustering and writing)``.
    """
    out = Path(out)
    pack.check_dest(out, ss.source.path)
    work = work or plan(ss, config, compressible, configs, dense)
    t0 = time.perf_counter()
    try:
        with io.staged_dir(out) as tmp:
            source_meta = ss.source.to_dict()
            pack.write_side_files(tmp, ss.source, source_meta)
            writer = pack.PackWriter(tmp, source_meta)
            try:
                fill(writer) if fill is not None else _stream(ss, work, writer, results)
                writer.close(max_shard_size)
            except BaseException:
                writer.discard()
                raise
            seconds = time.perf_counter() - t0
            rep = report_file(tmp)
            pack.write_records(tmp, records(rep, seconds) if records else None)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ValueError(f"--out {out}: the disk is full (no space left on device)\n  nothing was written; free "
                             "some space or choose another --out (the packed model needs about twice its size "
                             "while it is written)") from None
        raise
    return rep, seconds


def cluster_weight(ss: StreamSource, work: Work, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and cluster module ``i``'s weight alone: its ``(tables, codes)``, as ``compress_streamed`` installs them
    (a distributed run's share of the work).  The skeleton is left as it was: a copy of the module is clustered."""
    prefix, module = work.modules[i]
    copy = deepcopy(module)  # on the meta device: costs nothing
    weight = read_as(ss, prefix + "weight", module.weight)
    copy._parameters["weight"] = nn.Parameter(weight, module.weight.requires_grad)
    codebook_(copy, "weight", work.config_of(i), fqn=f"{work.chosen[i]}.weight")
    plist = copy.parametrizations["weight"]
    return plist.original.detach(), plist[0].codes


def _stream(ss: StreamSource, work: Work, writer: pack.PackWriter, results=None) -> None:
    """Read, cluster, write and let go of each module in turn (``compress_streamed``'s loop)."""
    modules, chosen, last_use, config = work.modules, work.chosen, work.last_use, work.config
    skeleton = [t for _, m in modules for _, t in stored_tensors(m)]  # noqa: F841 (held: ids below stay unique)
    real: dict[int, torch.Tensor] = {}  # id of a skeleton tensor -> its real tensor, while a later owner needs it
    clustered: dict[int, nn.Module] = {}  # id of a clustered weight -> its first owner, while a later one needs it
    done: set[int] = set()
    release: dict[int, list[nn.Module]] = defaultdict(list)  # step -> modules to free after it
    bar = progress(total=len(chosen), desc=f"codebook {config.bits}-bit {config.granularity}", unit="tensor")
    for i, (prefix, module) in enumerate(modules):
        if id(module) not in done:  # a module registered under two names is read once
            done.add(id(module))
            own = list(stored_tensors(module))
            release[max([last_use[id(module)], *(last_use[id(t)] for _, t in own)])].append(module)
            weight = module.weight if i in chosen else None
            for n, t in own:
                if weight is not None and t is weight and (id(t) in clustered or results is not None):
                    continue  # its first owner's codebook is shared below, or it was clustered elsewhere
                if id(t) in real:
                    value = real[id(t)]
                elif prefix + n in ss.names:
                    value = read_as(ss, prefix + n, t)
                else:
                    continue  # a buffer the checkpoint does not hold: the constructor's value
                if n in module._parameters:
                    value = value if isinstance(value, nn.Parameter) else nn.Parameter(value, t.requires_grad)
                    module._parameters[n] = value
                else:
                    module._buffers[n] = value
                if last_use[id(t)] > i:
                    real[id(t)] = value
            if weight is not None:
                if id(weight) in clustered:
                    share_parametrization_(clustered[id(weight)], module)
                elif results is not None:
                    tables, codes = results(i)
                    codebook_(module, "weight", work.config_of(i), init=(tables, None, codes))
                    if last_use[id(weight)] > i:
                        clustered[id(weight)] = module
                else:
                    codebook_(module, "weight", work.config_of(i), fqn=f"{chosen[i]}.weight")
                    if last_use[id(weight)] > i:
                        clustered[id(weight)] = module
                bar.update(1)
        writer.add(prefix, module)
        for key in [k for k in real if last_use[k] <= i]:
            del real[key]
        for key in [k for k in clustered if last_use[k] <= i]:
            del clustered[key]
        keep = list(real.values())
        for j, later in release.items():
            if j > i:
                keep += [obj for m in later for obj in held_by(m)]
        writer.forget(keep)
        for m in release.pop(i, []):
            free_module(m)
        if i in chosen:
            io.trim_heap()  # the clustering's scratch, before the next tensor is read (a few ms)
    bar.close()


def held_by(module: nn.Module):
    """What the packed writer remembers ``module`` by: its stored tensors and its parametrizations."""
    yield from (t for _, t in stored_tensors(module))
    if parametrize.is_parametrized(module):
        yield from module.parametrizations.values()


def free_module(module: nn.Module) -> None:
    """Drop a written module's tensors (it stays in the skeleton, empty)."""
    module._modules.pop("parametrizations", None)
    for n in module._parameters:
        module._parameters[n] = None
    for n in module._buffers:
        module._buffers[n] = None
