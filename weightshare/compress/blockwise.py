"""Calibrated compression one transformer block at a time, streamed from the checkpoint.

GPTQ on codebooks (``calibrate.sequential_codebooks_``) fits each block's layers to the inputs the block
receives from the blocks before it, already compressed.  With the model loaded whole, it runs the model from
the start for every block.  Here the model is the meta skeleton of ``stream.py``.  The modules outside the
blocks (embeddings, final norm, LM head) are read once.  Each block is then read, calibrated, clustered,
written and freed in turn.

What carries one block to the next is the previous block's output for every calibration batch, held in
memory: one block's activations.  The blocks before the current one are *replayed*: the first returns that
output, the others pass it on, and the model's own forward still builds whatever a block takes besides its
hidden states (attention masks, rotary embeddings, cache positions).  So any architecture whose forward calls
its blocks once each, in order, works without knowing its block's signature; one that does not is stopped
with an error naming the block.  The packed file equals the whole-model path's byte for byte (the tests
compare them).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from weightshare import hub, io, pack
from weightshare._progress import progress
from weightshare.compress import stream
from weightshare.compress.calibrate import (
    Enough,
    cluster_embeddings_,
    fit_layer_,
    layer_statistics,
    run_batches,
    stop_pass,
    takes_calibration,
    text_batches,
)

__all__ = ["Layout", "layout", "compress_blockwise"]

log = logging.getLogger(__name__)


@dataclass
class Layout:
    """Where each module of a streamed model sits: before the blocks, in block ``b``, or after them."""

    blocks: nn.ModuleList
    section: list[int | None]  # per module of Work.modules: its block, or None outside the blocks
    first: int  # the index of the first module inside a block
    last: int  # the index of the last one
    tied: set[str]  # clustered names fit with the embeddings (an LM head sharing their weight)


def layout(ss: stream.StreamSource, work: stream.Work) -> tuple[Layout | None, str]:
    """``(Layout, "")`` when ``work`` can be calibrated one block at a time, else ``(None, the reason)``."""
    try:
        blocks = hub.transformer_blocks(ss.model)
    except ValueError:
        return None, "it has no stack of transformer blocks"
    if isinstance(blocks[0], (nn.ModuleList, nn.ModuleDict)):
        return None, "its transformer blocks are containers, never called themselves"
    if getattr(getattr(ss.model, "config", None), "num_kv_shared_layers", 0):
        return None, "its later layers reuse the keys and values of earlier ones (num_kv_shared_layers)"
    block_of = {id(m): b for b, blk in enumerate(blocks) for m in blk.modules()}
    section = [block_of.get(id(m)) for _, m in work.modules]
    inside = [i for i, s in enumerate(section) if s is not None]
    if not inside:
        return None, "none of its modules is inside its transformer blocks"
    first, last = inside[0], inside[-1]
    if any(s is None for s in section[first:last + 1]) or section[first:last + 1] != sorted(section[first:last + 1]):
        return None, "its modules are not stored block after block"
    owners: dict[int, set] = {}
    for i, (_, m) in enumerate(work.modules):
        for _, t in stream.stored_tensors(m):
            owners.setdefault(id(t), set()).add(section[i])
    if any(len(s) > 1 and s != {None} for s in owners.values()):
        return None, "a weight is shared between a transformer block and another module"
    embedding_weights = {id(work.modules[i][1].weight) for i in work.chosen
                         if isinstance(work.modules[i][1], nn.Embedding)}
    tied = set()
    for i, name in work.chosen.items():
        m = work.modules[i][1]
        if not (takes_calibration(m) or isinstance(m, nn.Embedding)):
            return None, f"{name} ({type(m).__name__}) is clustered without calibration"
        if isinstance(m, nn.Embedding) or id(m.weight) in embedding_weights:
            if section[i] is not None:
                return None, f"{name} is an embedding inside a transformer block"
            tied.add(name)
    return Layout(blocks, section, first, last, tied), ""


def compress_blockwise(ss: stream.StreamSource, out, config, compressible, texts: list[str], configs=None,
                       dense=frozenset(), records=None, outliers: float = 0.0, alternations: int = 2,
                       max_shard_size: int | str = pack.DEFAULT_MAX_SHARD_SIZE, work: stream.Work | None = None):
    """GPTQ codebooks fit to ``texts`` one block at a time: ``compress_streamed`` with calibration (the same
    arguments, ``work`` the ``plan`` already made, and ``outliers`` as in ``sequential_codebooks_``).
    Returns ``(report, seconds)``."""
    work = work or stream.plan(ss, config, compressible, configs, dense)
    lay, why = layout(ss, work)
    if lay is None:
        raise ValueError(f"compress: cannot calibrate one block at a time: {why}\n  expected: stream=None or False "
                         "to load the model whole")
    from transformers import AutoTokenizer

    weights = Path(ss.source.path) / ss.source.weights_subdir  # where the whole-model path's tokenizer comes from
    tokenizer = AutoTokenizer.from_pretrained(str(weights if any(weights.glob("tokenizer*")) else ss.source.path))
    limit = getattr(getattr(ss.model, "config", None), "max_position_embeddings", None)
    batches = text_batches(tokenizer, texts, max_length=min(limit, 512) if isinstance(limit, int) else None)

    def fill(writer):
        _blockwise(ss, work, lay, writer, batches, outliers, alternations)

    return stream.compress_streamed(ss, out, config, compressible, configs, dense, records, work=work, fill=fill,
                                    max_shard_size=max_shard_size)


class _Replay:
    """Blocks ``0 .. upto - 1`` replaced by the cached outputs of block ``upto - 1``: for each batch of ``batches``
    (known by its ``input_ids`` tensor as the model receives it), that batch's."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, upto: int, outputs: list | None, batches):
        self.model, self.blocks, self.upto, self.outputs = model, blocks, upto, outputs
        self.index = {id(batch["input_ids"]): k for k, batch in enumerate(batches)}
        self.batch = None
        self.expect = 0  # the replayed block the forward must call next

    def _which(self, module, args, kwargs):
        self.batch = self.index.get(id(kwargs.get("input_ids")))
        self.expect = 0

    def _check(self, j: int) -> None:
        if j != self.expect:
            raise RuntimeError(f"{type(self.blocks[j]).__name__} {j} was called out of turn (block {self.expect} "
                               "was due): this model does not call its blocks once each, in order\n  "
                               "compress it with the model loaded whole (stream=False)")

    def _real(self, module, args):  # the block after the replayed ones comes next, and runs
        self._check(self.upto)
        self.expect = self.upto + 1

    def _call(self, j: int):
        def forward(*args, **kwargs):
            self._check(j)
            if self.batch is None:
                raise RuntimeError("a forward pass on an input that is not one of the calibration batches")
            self.expect = j + 1
            return self.outputs[self.batch]
        return forward

    def _versions(self):
        """Each cached tensor's version counter: a block that changed its input in place would feed the next
        pass a different input than the whole-model path computes afresh."""
        return {(k, e): t._version for k, out in enumerate(self.outputs or []) if out is not None
                for e, t in enumerate(out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)}

    def __enter__(self):
        self.versions = self._versions()
        self.handles = []
        if self.upto:
            self.handles.append(self.model.register_forward_pre_hook(self._which, with_kwargs=True))
            if self.upto < len(self.blocks):
                self.handles.append(self.blocks[self.upto].register_forward_pre_hook(self._real))
        for j in range(self.upto):
            self.blocks[j].forward = self._call(j)  # an instance attribute: nn.Module.__call__ takes it
        return self

    def __exit__(self, kind, *exc):
        for h in self.handles:
            h.remove()
        for j in range(self.upto):
            del self.blocks[j].forward
        now = self._versions()
        if kind is None and any(v != self.versions.get(key) for key, v in now.items()):
            raise RuntimeError(f"{type(self.blocks[0]).__name__}: a block changed its input in place, which "
                               "block-by-block calibration cannot replay\n  compress it with the model loaded whole "
                               "(stream=False)")
        return False


@contextmanager
def _hooks(*handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _stop(module, args, output):
    raise Enough


@torch.no_grad()
def _outputs(model: nn.Module, block: nn.Module, batches, release: list | None = None) -> list:
    """``block``'s output for every batch (the rest of the model is not run).  ``release``: the previous block's
    outputs, each let go once its batch has gone through (two blocks' activations are never held whole)."""
    outs = []

    def grab(module, args, output):
        outs.append(output)
        if release is not None:
            release[len(outs) - 1] = None
        raise Enough

    model.eval()
    with _hooks(block.register_forward_hook(grab)):
        run_batches(model, batches, {})
    if len(outs) != len(batches):
        raise RuntimeError(f"{type(block).__name__}: called for {len(outs)} of {len(batches)} calibration batches")
    return outs


def _execution_order(model: nn.Module, batch, linears: dict[str, nn.Module], stop: nn.Module | None = None,
                     before: bool = False) -> list:
    """The names of ``linears`` in the order one forward pass calls them (those never called last), the pass
    stopped after ``stop`` runs, or as it is called with ``before``: then only the layers called are named."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
               for n, m in linears.items()]
    if stop is not None:
        handles.append(stop.register_forward_pre_hook(stop_pass) if before else stop.register_forward_hook(_stop))
    with _hooks(*handles), torch.no_grad():
        model.eval()
        run_batches(model, [batch], {})
    return order if before else order + [n for n in linears if n not in order]


def _between(name: str):
    def hook(module, args):
        raise RuntimeError(f"{name} runs between the transformer blocks, which block-by-block calibration cannot "
                           "replay\n  compress it with the model loaded whole (stream=False)")
    return hook


def _blockwise(ss: stream.StreamSource, work: stream.Work, lay: Layout, writer: pack.PackWriter, batches,
               outliers: float, alternations: int) -> None:
    """Read, calibrate, cluster, write and free each block in turn (``compress_blockwise``'s loop)."""
    model, modules, blocks = ss.model, work.modules, lay.blocks
    skeleton = [t for _, m in modules for _, t in stream.stored_tensors(m)]  # noqa: F841 (held: ids below stay unique)
    real: dict[int, torch.Tensor] = {}  # id of a skeleton tensor -> its real tensor (tied owners share it)
    config, configs = work.config, work.configs
    outer = [i for i, s in enumerate(lay.section) if s is None]
    for i in outer:
        _load(ss, *modules[i], real)
    by_name = {work.chosen[i]: modules[i][1] for i in work.chosen}
    calibrated = [n for n in by_name if n not in lay.tied]
    bar = progress(total=len(calibrated), desc="calibrated codebooks (block by block)", unit="layer")
    if lay.tied:
        cluster_embeddings_(model, {n: by_name[n] for n in lay.tied}, batches, config, configs, outliers,
                            stop_at=blocks[0])
    outside = {work.chosen[i]: modules[i][1] for i in work.chosen
               if lay.section[i] is None and work.chosen[i] not in lay.tied}
    # the layers outside the blocks that run before them (wherever they are stored), each fit as its own stage
    for name in _execution_order(model, batches[0], outside, stop=blocks[0], before=True):
        stats, tokens = layer_statistics(model, {name: outside.pop(name)}, batches, stop_after=name)
        fit_layer_(by_name[name], name, stats.get(name), tokens.get(name, 0), configs.get(name, config),
                   alternations, outliers)
        bar.update(1)
    for i in range(lay.first):
        writer.add(*modules[i])
    keep = [obj for i in outer for obj in stream.held_by(modules[i][1])]
    outputs = None
    between = [m.register_forward_pre_hook(_between(n)) for n, m in outside.items()]
    for b, block in enumerate(blocks):
        inside = [i for i in range(lay.first, lay.last + 1) if lay.section[i] == b]
        for i in inside:
            _load(ss, *modules[i], {})  # a block's tensors are its own (layout checked): none is kept past it
        linears = {work.chosen[i]: modules[i][1] for i in inside if i in work.chosen}
        with _Replay(model, blocks, b, outputs, batches):
            if linears:
                order = _execution_order(model, batches[0], linears, stop=block)
                with _hooks(block.register_forward_hook(_stop)):
                    stats, tokens = layer_statistics(model, linears, batches)
                for name in order:
                    fit_layer_(linears[name], name, stats.get(name), tokens.get(name, 0),
                               configs.get(name, config), alternations, outliers)
                    bar.update(1)
                del stats, tokens
            outputs = _outputs(model, block, batches, release=outputs)
        for i in inside:
            writer.add(*modules[i])
        writer.forget(keep)
        for i in inside:
            stream.free_module(modules[i][1])
        io.trim_heap()
    for h in between:
        h.remove()
    # the layers after the blocks (an LM head of its own, a pooler), each fit with the earlier ones compressed
    with _Replay(model, blocks, len(blocks), outputs, batches):
        for name in _execution_order(model, batches[0], outside) if outside else []:
            stats, tokens = layer_statistics(model, {name: outside[name]}, batches, stop_after=name)
            fit_layer_(outside[name], name, stats.get(name), tokens.get(name, 0), configs.get(name, config),
                       alternations, outliers)
            bar.update(1)
    bar.close()
    for i in range(lay.last + 1, len(modules)):
        writer.add(*modules[i])


def _load(ss: stream.StreamSource, prefix: str, module: nn.Module, real: dict) -> None:
    """Give ``module`` its own tensors from the checkpoint (a tensor tied to one already read: that one)."""
    for n, t in list(stream.stored_tensors(module)):
        if id(t) in real:
            value = real[id(t)]
        elif prefix + n in ss.names:
            value = stream.read_as(ss, prefix + n, t)
            if n in module._parameters:
                value = nn.Parameter(value, t.requires_grad)
            real[id(t)] = value
        else:
            continue  # a buffer the checkpoint does not hold: the constructor's value
        if n in module._parameters:
            module._parameters[n] = value
        else:
            module._buffers[n] = value
