"""Reference implementations that weightshare's benchmarks compare against.

Everything here runs in the same process as the benchmark, so timings and
quality numbers of the references and of weightshare come from one run on one
machine.

* :func:`coremltools_palettize` - coremltools' data-free post-training
  palettization (k-means LUT per tensor / per group of output rows) of every
  ``nn.Linear`` and ``nn.Embedding`` weight, the same set of weights
  weightshare compresses.
* :func:`coremltools_skm_palettize` - coremltools' data-aware SKMPalettizer
  (k-means weighted by squared gradients of a loss on calibration data).
* :func:`rtn_per_channel` - round-to-nearest uniform asymmetric quantization
  per output row, the usual "no clustering at all" baseline.
* :func:`weight_quantizer` / :data:`QUANTIZERS` - the weight-only quantizers a
  user would pick instead (bitsandbytes nf4, HQQ, torchao IntxWeightOnly,
  optimum-quanto), each applied to every ``nn.Linear`` / ``nn.Embedding``
  weight and dequantized back, with its real bits per weight.
* :func:`kmeans1d_reference` - the optimal 1-D k-means of the ``kmeans1d``
  package (dynamic programming, globally optimal).
* :func:`sklearn_kmeans_reference` - scikit-learn's Lloyd k-means (k-means++,
  one init), a locally optimal baseline.
* :func:`distinct_values_per_group` / :func:`coremltools_skipped_weights` -
  helpers to check and annotate the above.

How coremltools 9.0 palettizes (read from
``coremltools/optimize/torch/_utils/k_means.py``, checked on this machine):

* ``nn.Linear``, ``nn.Embedding``, ``nn.Conv2d`` and
  ``nn.MultiheadAttention.in_proj_weight`` are supported; only the ``weight``
  is clustered, biases and norms are left alone. Embeddings need nothing
  special.
* Scalar clustering (``cluster_dim`` None/1, the default) uses coremltools'
  own vendored fork ``coremltools._deps.kmeans1d`` (optimal 1-D DP k-means,
  with sample weights added by Apple), never the PyPI ``kmeans1d`` package
  and never scikit-learn. ``cluster_dim > 1`` would use its torch
  ``_EfficientKMeans`` (Lloyd, k-means++, n_init=5); we never use it.
* With ``enable_fast_kmeans_mode=True`` (the default) fp32 weights are cast to
  fp16, rounded to 4 decimals (``rounding_precision``), reduced with
  ``np.unique`` to (value, count) pairs and the weighted DP runs on the unique
  values only. A per-tensor fp32 weight therefore costs one sort of the
  tensor plus a DP over at most a few thousand points, not a DP over all
  elements. The centroids are optimal for the *rounded* weights.
* ``per_grouped_channel`` runs one such clustering per group of
  ``group_size`` rows (Python loop, so cost grows with the number of groups).
  A weight whose row count is not divisible by ``group_size`` is silently
  left uncompressed by coremltools (see :func:`coremltools_skipped_weights`).
* The model gets ``_COREML_/...`` metadata buffers (LUTs etc.); we strip them
  so the returned model has exactly the input's ``state_dict`` keys.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "ReferenceMissing",
    "coremltools_palettize",
    "coremltools_skm_palettize",
    "coremltools_skipped_weights",
    "distinct_values_per_group",
    "QUANTIZERS",
    "kmeans1d_reference",
    "quantize_weights",
    "rtn_per_channel",
    "sklearn_kmeans_reference",
]

_log = logging.getLogger(__name__)

# Buffer-name prefix coremltools uses for its compression metadata
# (coremltools.optimize.torch._utils.metadata_utils.STATE_DICT_METADATA_BUFFER_PREFIX).
_COREML_BUFFER_PREFIX = "_COREML_"

_BENCH_INSTALL_HINT = "pip install -e .[bench]"

_COREML_LOGGERS = ("coremltools", "coremltools.optimize.torch")


class ReferenceMissing(RuntimeError):
    """A third-party package needed by a reference implementation is not installed."""


# --------------------------------------------------------------------------
# coremltools post-training palettization
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_coremltools(capture_stderr: bool = False):
    """Silence coremltools while it imports or runs.

    coremltools logs a dozen warnings on import on Linux (no native Core ML
    framework, untested torch/sklearn versions), logs at INFO per weight and
    per block while clustering, and draws a tqdm bar on stderr. None of that
    is useful in benchmark output, so its logger is raised to ERROR, Python
    warnings are ignored and, if asked, stderr (the tqdm bar) is captured and
    re-emitted at DEBUG on our logger.
    """
    # "coremltools.optimize.torch" sets its own INFO level and stderr handler
    # on import (and stops propagating), so it must be quietened separately.
    loggers = [logging.getLogger(name) for name in _COREML_LOGGERS]
    previous_levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    captured = io.StringIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if capture_stderr:
                with contextlib.redirect_stderr(captured):
                    yield
            else:
                yield
    finally:
        for logger, level in zip(loggers, previous_levels):
            # The first import of coremltools.optimize.torch sets that
            # logger's level itself; keep a level set inside the block.
            if logger.level == logging.ERROR:
                logger.setLevel(level)
        if captured.getvalue():
            _log.debug("coremltools stderr: %s", captured.getvalue().strip())


@functools.lru_cache(maxsize=None)
def _palettization_api() -> Any:
    """Import ``coremltools.optimize.torch.palettization`` once, quietly."""
    try:
        with _quiet_coremltools():
            from coremltools.optimize.torch import palettization
    except ImportError as exc:
        raise ReferenceMissing(f"coremltools not installed: {_BENCH_INSTALL_HINT}") from exc
    return palettization


def coremltools_missing() -> str | None:
    """Why coremltools' palettizers cannot run here (None when they can): a benchmark leaves their rows out."""
    try:
        _palettization_api()
    except ReferenceMissing as exc:
        return str(exc)
    return None


def _target_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` / ``nn.Embedding`` (subclasses included) by qualified name.

    This is the set of weights weightshare compresses. ``isinstance`` is used
    on purpose: coremltools' ``module_type_configs`` matches ``type(module)``
    exactly and would miss subclasses such as
    ``NonDynamicallyQuantizableLinear``.
    """
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding))
    }


def _resolve_granularity(granularity: str, group_size: int | None) -> tuple[str, int | None]:
    """Map weightshare's granularity names onto coremltools' two granularities."""
    if granularity == "per_tensor":
        if group_size is not None:
            raise ValueError("group_size must be None for granularity='per_tensor'")
        return "per_tensor", None
    if granularity == "per_channel":
        if group_size not in (None, 1):
            raise ValueError("group_size must be None or 1 for granularity='per_channel'")
        return "per_grouped_channel", 1
    if granularity == "per_grouped_channel":
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(
                "granularity='per_grouped_channel' needs a positive int group_size, "
                f"got {group_size!r}"
            )
        return "per_grouped_channel", group_size
    raise ValueError(
        "granularity must be 'per_tensor', 'per_channel' or 'per_grouped_channel', "
        f"got {granularity!r}"
    )


def coremltools_skipped_weights(
    model: nn.Module, granularity: str, group_size: int | None = None
) -> list[str]:
    """Names (``"<module>.weight"``) of target weights coremltools leaves uncompressed.

    coremltools' config validation skips (with only a log line) any weight
    whose number of rows is not divisible by ``group_size`` under
    ``per_grouped_channel``; e.g. at ``group_size=16`` MiniLM's
    ``word_embeddings`` (30522 rows) and ``token_type_embeddings`` (2 rows).
    Benchmarks should report these next to coremltools' numbers, since the
    skipped weights stay at full precision.
    """
    ct_granularity, ct_group_size = _resolve_granularity(granularity, group_size)
    if ct_granularity != "per_grouped_channel":
        return []
    return [
        f"{name}.weight" if name else "weight"
        for name, module in _target_modules(model).items()
        if module.weight.shape[0] % ct_group_size != 0
    ]


def distinct_values_per_group(weight: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Number of distinct values in each group of rows of ``weight``.

    ``group_size=None`` treats the whole tensor as one group (per-tensor);
    otherwise consecutive blocks of ``group_size`` rows (dim 0) form a group
    and the row count must be divisible by it. Returns an int64 tensor with
    one count per group. Vectorised: one sort per call.
    """
    w = weight.detach()
    if w.ndim == 0:
        w = w.reshape(1)
    if group_size is None:
        flat = w.reshape(1, -1)
    else:
        if w.shape[0] % group_size != 0:
            raise ValueError(f"{w.shape[0]} rows are not divisible by group_size={group_size}")
        flat = w.reshape(w.shape[0] // group_size, -1)
    ordered = flat.sort(dim=1).values
    return (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1) + 1


def coremltools_palettize(
    model: nn.Module,
    bits: int,
    granularity: str,
    group_size: int | None = None,
    *,
    enable_fast_kmeans_mode: bool = True,
) -> tuple[nn.Module, float]:
    """Palettize a copy of ``model`` with coremltools' post-training palettizer.

    Runs ``coremltools.optimize.torch.palettization.PostTrainingPalettizer``
    (data-free k-means, ``n_bits=bits``, LUT in the weight's own dtype, i.e.
    ``lut_dtype=None``, scalar centroids, i.e. ``cluster_dim`` None, no
    per-channel scale, one process) on every ``nn.Linear`` and
    ``nn.Embedding`` weight of a deep copy of ``model``. Biases, norms and all
    other parameters are left untouched; ``model`` itself is not modified.

    Args:
        model: a float32 (or float16) torch model.
        bits: index width; each LUT has at most ``2**bits`` entries.
        granularity: ``"per_tensor"`` (one LUT per weight), ``"per_channel"``
            (one LUT per output row; coremltools' ``per_grouped_channel`` with
            ``group_size=1``) or ``"per_grouped_channel"`` (one LUT per
            ``group_size`` consecutive output rows).
        group_size: rows per LUT for ``"per_grouped_channel"``; must be None
            for ``"per_tensor"`` and None or 1 for ``"per_channel"``.
        enable_fast_kmeans_mode: coremltools' default (True) clusters the
            weights rounded to fp16 and 4 decimals, weighted by multiplicity.
            False clusters the exact values (much slower: the DP is run on
            every element, and kmeans1d's DP keeps O(2**bits * n) memory).

    Returns:
        ``(palettized_model, seconds)``: the copy, whose compressed weights
        hold the dense de-palettized values (every group has at most
        ``2**bits`` distinct values, checked before returning) and whose
        ``state_dict`` keys equal the input's (coremltools' ``_COREML_``
        metadata buffers are removed); and the wall-clock seconds of
        coremltools' ``compress()``, which includes coremltools' own deep
        copy of the model but not this function's checks.

    Weights coremltools refuses (row count not divisible by ``group_size``)
    are left at full precision and logged at WARNING; list them with
    :func:`coremltools_skipped_weights`.

    Raises:
        ReferenceMissing: coremltools is not installed.
        ValueError: bad ``bits`` / ``granularity`` / ``group_size``.
        RuntimeError: coremltools left more than ``2**bits`` values in a
            group it should have palettized.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in [1, 16], got {bits!r}")
    ct_granularity, ct_group_size = _resolve_granularity(granularity, group_size)
    api = _palettization_api()

    targets = _target_modules(model)
    skipped = set(coremltools_skipped_weights(model, granularity, group_size))
    if skipped:
        _log.warning(
            "coremltools leaves %d weight(s) uncompressed "
            "(rows not divisible by group_size=%s): %s",
            len(skipped),
            ct_group_size,
            ", ".join(sorted(skipped)),
        )

    module_config = api.ModulePostTrainingPalettizerConfig(
        n_bits=bits,
        granularity=ct_granularity,
        group_size=ct_group_size,
        enable_fast_kmeans_mode=enable_fast_kmeans_mode,
    )
    # One exact-name entry per target module rather than module_type_configs
    # (exact-type match, misses subclasses) or global_config (would also hit
    # Conv2d and MultiheadAttention.in_proj_weight). Names are regexes to
    # coremltools, hence re.escape.
    config = api.PostTrainingPalettizerConfig(
        module_name_configs={re.escape(name): module_config for name in targets}
    )

    with _quiet_coremltools(capture_stderr=True):
        palettizer = api.PostTrainingPalettizer(model, config)
        start = time.perf_counter()
        # inplace=False: coremltools deep-copies the model itself; copying it
        # ourselves too would only add a second copy.
        palettized = palettizer.compress(num_kmeans_workers=1, inplace=False)
        seconds = time.perf_counter() - start

    _strip_coreml_metadata(palettized)
    _check_palettized(palettized, bits, ct_group_size, skipped)
    _log.info(
        "coremltools palettization (%d bits, %s, group_size=%s) took %.2f s",
        bits,
        ct_granularity,
        ct_group_size,
        seconds,
    )
    return palettized, seconds


def _simcse_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Unsupervised SimCSE (Gao et al. 2021): each sentence encoded twice with dropout on, InfoNCE over
    the batch at temperature 0.05; mean pooling, as the sentence-transformers model pools."""
    model.train()
    mask = batch["attention_mask"][..., None].float()
    one, two = model(**batch), model(**batch)
    a, b = ((o.last_hidden_state * mask).sum(1) / mask.sum(1) for o in (one, two))
    sim = nn.functional.cosine_similarity(a[:, None], b[None], dim=-1) / 0.05
    loss = nn.functional.cross_entropy(sim, torch.arange(len(a)))
    pooler = [o.pooler_output for o in (one, two) if getattr(o, "pooler_output", None) is not None]
    # coremltools reads a gradient of every parameter: the unused pooler gets zeros
    return loss + sum(0.0 * p.sum() for p in pooler)


def coremltools_skm_palettize(model, bits: int, granularity: str, texts: list[str],
                              batch_size: int = 16) -> tuple[nn.Module, float]:
    """Palettize a copy of a SentenceTransformer with coremltools' SKMPalettizer (sensitive k-means,
    Apple's data-aware post-training palettizer: k-means weighted by the squared gradients of a loss on
    calibration data, a Fisher-information estimate).  A sentence embedder has no training loss of its
    own, so the loss is unsupervised SimCSE on ``texts`` (:func:`_simcse_loss`).  The same weights as
    :func:`coremltools_palettize` (every ``nn.Linear`` / ``nn.Embedding``), LUT in the weight's dtype.

    Returns ``(palettized_copy, seconds)``; raises :class:`ReferenceMissing` without coremltools.
    """
    import copy

    ct_granularity, ct_group_size = _resolve_granularity(granularity, None)
    api = _palettization_api()
    out = copy.deepcopy(model)
    inner = out[0].auto_model
    targets = _target_modules(inner)
    module_config = api.ModuleSKMPalettizerConfig(n_bits=bits, granularity=ct_granularity, group_size=ct_group_size)
    config = api.SKMPalettizerConfig(module_name_configs={re.escape(name): module_config for name in targets},
                                     calibration_nsamples=len(texts))
    tok = model.tokenizer
    batches = [dict(tok(texts[i:i + batch_size], padding=True, truncation=True, return_tensors="pt"))
               for i in range(0, len(texts), batch_size)]
    with _quiet_coremltools(capture_stderr=True):
        start = time.perf_counter()
        palettized = api.SKMPalettizer(inner, config).compress(dataloader=batches, loss_fn=_simcse_loss,
                                                               num_kmeans_workers=1, inplace=True)
        seconds = time.perf_counter() - start
    palettized.eval()
    _strip_coreml_metadata(palettized)
    _check_palettized(palettized, bits, ct_group_size, set())
    out[0].auto_model = palettized
    return out, seconds


def coremltools_dkm_palettize(model: nn.Module, bits: int, granularity: str, fit) -> tuple[nn.Module, float]:
    """Train a copy of ``model`` with coremltools' DKMPalettizer (differentiable k-means during training, Cho et
    al. 2022): ``prepare`` on every ``nn.Linear``, ``nn.Embedding`` and ``nn.Conv2d`` (what ``ws.share_``
    compresses; LUT in the weight's dtype), then ``fit(prepared, on_step)``, the caller's training loop, which
    calls ``on_step(k)`` after each optimizer step (coremltools' ``palettizer.step()``), then ``finalize``.

    Returns ``(palettized_copy, seconds)`` (prepare, training and finalize); raises :class:`ReferenceMissing`
    without coremltools."""
    import copy

    ct_granularity, ct_group_size = _resolve_granularity(granularity, None)
    api = _palettization_api()
    out = copy.deepcopy(model)
    targets = {**_target_modules(out), **{n: m for n, m in out.named_modules() if isinstance(m, nn.Conv2d)}}
    module_config = api.ModuleDKMPalettizerConfig(n_bits=bits, granularity=ct_granularity, group_size=ct_group_size)
    config = api.DKMPalettizerConfig(module_name_configs={re.escape(name): module_config for name in targets})
    with _quiet_coremltools(capture_stderr=True):
        start = time.perf_counter()
        palettizer = api.DKMPalettizer(out, config)
        prepared = palettizer.prepare(inplace=True)
        fit(prepared, lambda k: palettizer.step())
        palettized = palettizer.finalize(inplace=True)
        seconds = time.perf_counter() - start
    palettized.eval()
    _strip_coreml_metadata(palettized)
    _check_palettized(palettized, bits, ct_group_size, set())
    return palettized, seconds


def _strip_coreml_metadata(model: nn.Module) -> None:
    """Remove the ``_COREML_/...`` buffers coremltools registers (LUTs, version)."""
    for module in model.modules():
        for name in [n for n in module._buffers if n.startswith(_COREML_BUFFER_PREFIX)]:
            del module._buffers[name]
            module._non_persistent_buffers_set.discard(name)


def _check_palettized(
    model: nn.Module, bits: int, group_size: int | None, skipped: set[str]
) -> None:
    """Raise unless every palettized weight has <= 2**bits values per group."""
    limit = 2**bits
    for name, module in _target_modules(model).items():
        qualified = f"{name}.weight" if name else "weight"
        if qualified in skipped:
            continue
        worst = int(distinct_values_per_group(module.weight, group_size).max())
        if worst > limit:
            raise RuntimeError(
                f"coremltools left {worst} distinct values in a group of {qualified} "
                f"(expected <= {limit}); it was probably not palettized"
            )


# --------------------------------------------------------------------------
# Round-to-nearest baseline
# --------------------------------------------------------------------------


def rtn_per_channel(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest uniform asymmetric quantization per output row, dequantized.

    Each row (dim 0; trailing dims are flattened into the row) gets the
    ``2**bits`` evenly spaced levels ``min + i * scale``, ``i = 0 ..
    2**bits - 1``, with ``scale = (max - min) / (2**bits - 1)`` from that
    row's min and max; every element is replaced by its nearest level
    (``torch.round``, ties to even). The offset is the float row minimum, not
    an integer zero point, so the full [min, max] range is used and both
    extremes are reproduced exactly (up to float rounding). Constant rows come
    back unchanged.

    Returns a new tensor of ``weight``'s shape and dtype (maths in float32,
    or float64 for float64 input) with at most ``2**bits`` distinct values
    per row. Gradients are not tracked.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in [1, 16], got {bits!r}")
    if weight.ndim < 2:
        raise ValueError(f"weight must have >= 2 dims (rows, ...), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")

    compute_dtype = torch.promote_types(weight.dtype, torch.float32)
    rows = weight.detach().reshape(weight.shape[0], -1).to(compute_dtype)
    lo = rows.amin(dim=1, keepdim=True)
    hi = rows.amax(dim=1, keepdim=True)
    max_level = 2**bits - 1
    scale = (hi - lo) / max_level
    # Constant rows have scale 0: divide by 1 instead, every element maps to
    # level 0, i.e. back to the row's value.
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    levels = torch.round((rows - lo) / safe_scale).clamp_(0, max_level)
    dequantized = lo + levels * scale
    return dequantized.reshape(weight.shape).to(weight.dtype)


# --------------------------------------------------------------------------
# Weight-only quantizers (bitsandbytes, HQQ, torchao, optimum-quanto)
# --------------------------------------------------------------------------
#
# Each entry quantizes one 2-D weight (rows = output channels, groups run
# along a row, as every one of these libraries does for nn.Linear) with the
# library's own code and returns the dequantized tensor. Embedding weights go
# through the same call: a (vocab, dim) table is quantized as a Linear with
# ``vocab`` outputs would be, which is what these libraries do for the tied
# LM heads that share it (bitsandbytes and quanto have no embedding path).
#
# Bits per weight count what each format stores per group, at the width a
# user would store it in a half-precision model: bitsandbytes keeps an fp32
# absmax per block (no double quantization here); HQQ an fp16 scale and zero;
# torchao's symmetric int-N a 16-bit scale (its zero points are all 0 and need
# not be stored); quanto an fp16 scale and shift per group of 128.


def _bnb_nf4(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=group, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).reshape(w.shape)


def _hqq(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    from hqq.core.quantize import Quantizer

    # HQQ's default: optimize=True (its half-quadratic solve of scale and zero).
    wq, meta = Quantizer.quantize(w, nbits=bits, group_size=group, axis=1, device="cpu",
                                  compute_dtype=torch.float32)
    return Quantizer.dequantize(wq, meta).reshape(w.shape)


def _torchao(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    dtype = getattr(torch, f"int{bits}")
    quantize_(lin, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(group)))
    return lin.weight.dequantize().reshape(w.shape)


def _quanto(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    from optimum import quanto

    lin = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))
    lin[0].weight.data.copy_(w)
    quanto.quantize(lin, weights={2: quanto.qint2, 4: quanto.qint4}[bits])
    quanto.freeze(lin)
    return lin[0].weight.dequantize().reshape(w.shape)


# name -> (function, supported bits, group size at each bit, metadata bits per group)
QUANTIZERS: dict[str, tuple[Any, dict[int, int], int, str]] = {
    "bitsandbytes nf4": (_bnb_nf4, {4: 64}, 32, "bitsandbytes"),
    "HQQ": (_hqq, {4: 64, 3: 64, 2: 16}, 32, "hqq"),
    "torchao IntxWeightOnly": (_torchao, {4: 32, 3: 32, 2: 32}, 16, "torchao"),
    "optimum-quanto": (_quanto, {4: 128, 2: 128}, 32, "optimum.quanto"),
}


def quantize_weights(model: nn.Module, name: str, bits: int) -> tuple[nn.Module, float, float]:
    """A copy of ``model`` with every Linear/Embedding weight quantized by ``name`` and dequantized.

    Returns ``(model, bits_per_weight, seconds)``; bits per weight counts the
    codes and each group's stored scales (see the table above). Raises
    :class:`ReferenceMissing` when the library is not installed and
    ``ValueError`` when it has no ``bits``-bit format.
    """
    import copy
    import importlib

    fn, groups, meta_bits, module = QUANTIZERS[name]
    if bits not in groups:
        raise ValueError(f"{name} has no {bits}-bit format (it has {sorted(groups)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(module)
    except ImportError as exc:
        raise ReferenceMissing(f"{module} not installed: {_BENCH_INSTALL_HINT}") from exc
    group = groups[bits]
    out = copy.deepcopy(model)
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod in _target_modules(out).values():
            w = mod.weight
            if w.shape[1] % group:
                raise ValueError(f"{name}: rows of {tuple(w.shape)} do not split into groups of {group}")
            mod.weight.copy_(fn(w.detach().float(), bits, group).to(w.dtype))
    seconds = time.perf_counter() - start
    return out, bits + meta_bits / group, seconds


# --------------------------------------------------------------------------
# 1-D k-means references
# --------------------------------------------------------------------------


def _as_1d_float64(x: Any) -> np.ndarray:
    """Validate the data argument shared by the k-means references."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"x must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("x must not be empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError("x must be finite")
    return arr


def _as_weights(weights: Any, n: int) -> np.ndarray | None:
    """Validate optional sample weights: 1-D, length ``n``, finite, > 0."""
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("weights must be finite and > 0")
    return w


def _check_k(k: Any) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)


def _canonical(centroids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep only non-empty clusters, sort centroids ascending, relabel to match.

    Both solvers can return clusters nobody is assigned to when the data has
    fewer distinct values than ``k`` (kmeans1d then reports a meaningless
    0.0 centroid, sklearn a duplicate); dropping them gives both references
    the same contract.
    """
    centroids = np.asarray(centroids, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    used = np.unique(labels)
    order = used[np.argsort(centroids[used], kind="stable")]
    new_label = np.empty(centroids.shape[0], dtype=np.int64)
    new_label[order] = np.arange(order.size, dtype=np.int64)
    return centroids[order], new_label[labels]


def kmeans1d_reference(
    x: np.ndarray, k: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Globally optimal 1-D k-means from the ``kmeans1d`` package.

    ``kmeans1d.cluster`` implements the O(k n + n log n) dynamic programme of
    Wu (1991) / Gronlund et al. (2017) and returns the exact minimum of the
    (weighted) sum of squared errors. Its C++ core is slow per element
    (about 6 s for n = 1e6, k = 16 on this machine) and keeps O(k n) memory,
    so keep ``n`` moderate.

    Weights: PyPI ``kmeans1d`` 0.5.0 has no weights argument
    (``cluster(array, k)``; its library exports only ``cluster``). For
    ``weights`` this function therefore uses coremltools' vendored fork,
    ``coremltools._deps.kmeans1d.cluster(array, k, weights=...)`` (same
    algorithm, weighted DP, exactly what coremltools' palettizer calls); it
    matches the unweighted package on data repeated by integer weights.

    Args:
        x: 1-D finite data (converted to float64).
        k: number of clusters; at most ``len(x)`` are used.
        weights: optional positive per-element weights, same length as x.

    Returns:
        ``(centroids, labels)``: float64 centroids of the non-empty clusters,
        strictly ascending (``<= k`` of them; fewer when x has fewer than k
        distinct values), and int64 labels with ``centroids[labels]`` the
        reconstruction of ``x``.

    Raises:
        ReferenceMissing: ``kmeans1d`` (or, with weights, coremltools) is not
            installed.
    """
    arr = _as_1d_float64(x)
    k = _check_k(k)
    w = _as_weights(weights, arr.size)
    if w is None:
        try:
            import kmeans1d
        except ImportError as exc:
            raise ReferenceMissing(f"kmeans1d not installed: {_BENCH_INSTALL_HINT}") from exc
        result = kmeans1d.cluster(arr, k)
    else:
        try:
            with _quiet_coremltools():
                from coremltools._deps import kmeans1d as weighted_kmeans1d
        except ImportError as exc:
            raise ReferenceMissing(
                "weighted kmeans1d needs coremltools' vendored fork (PyPI kmeans1d 0.5.0 "
                f"has no weights): {_BENCH_INSTALL_HINT}"
            ) from exc
        if weighted_kmeans1d is None:
            raise ReferenceMissing("coremltools' vendored kmeans1d failed to load")
        result = weighted_kmeans1d.cluster(arr, k, weights=w)
    return _canonical(np.asarray(result.centroids), np.asarray(result.clusters))


def sklearn_kmeans_reference(
    x: np.ndarray, k: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's Lloyd k-means on 1-D data (local optimum).

    ``sklearn.cluster.KMeans(n_clusters=min(k, len(x)), init="k-means++",
    n_init=1, random_state=0)`` with default ``max_iter=300`` and ``tol=1e-4``,
    ``weights`` passed as ``sample_weight``. Deterministic for given inputs
    and thread count.

    Args:
        x: 1-D finite data (converted to float64).
        k: number of clusters; at most ``len(x)`` are used.
        weights: optional positive per-element weights, same length as x.

    Returns:
        ``(centroids, labels)`` with the same contract as
        :func:`kmeans1d_reference`: float64 centroids of the non-empty
        clusters, ascending, and int64 labels into them.

    Raises:
        ReferenceMissing: scikit-learn is not installed.
    """
    arr = _as_1d_float64(x)
    k = _check_k(k)
    w = _as_weights(weights, arr.size)
    try:
        from sklearn.cluster import KMeans
    except ImportError as exc:
        raise ReferenceMissing(f"scikit-learn not installed: {_BENCH_INSTALL_HINT}") from exc
    estimator = KMeans(
        n_clusters=min(k, arr.size), init="k-means++", n_init=1, random_state=0
    )
    with warnings.catch_warnings():
        # ConvergenceWarning when x has fewer distinct values than k; the
        # resulting empty/duplicate clusters are dropped by _canonical.
        warnings.simplefilter("ignore")
        estimator.fit(arr.reshape(-1, 1), sample_weight=w)
    return _canonical(estimator.cluster_centers_[:, 0], estimator.labels_)
