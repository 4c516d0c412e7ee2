"""Data-free post-training clustering: every Linear and Embedding weight gets codebooks.

LayerNorm weights, biases and buffers stay as they are: they are a tiny part of
the model and quantising them costs accuracy for almost no bytes.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from torch import nn

from weightshare import hub, pack
from weightshare.report import Report, report
from weightshare.compress.calibrate import importance_from_texts, read_texts
from weightshare.sharing.codebook import CodebookConfig, codebook_model_, is_transposed_linear
from weightshare.space import share_

__all__ = ["compress", "compress_model_", "is_compressible"]

log = logging.getLogger(__name__)


def is_compressible(module: nn.Module, name: str) -> bool:
    """The modules post-training compression clusters: Linear (and transformers' Conv1D) and Embedding."""
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_transposed_linear(module)


def compress_model_(model: nn.Module, config: CodebookConfig, calibration: list[str] | None = None) -> nn.Module:
    """Cluster a loaded transformers model or SentenceTransformer in place.

    With ``calibration`` texts, each weight is clustered with the importance of
    its input features on those texts (see ``calibrate.py``); without, data-free.
    """
    inner = hub.inner_model(model)
    if not calibration:
        share_(inner, config, filter_fn=is_compressible)
        return model
    importance = importance_from_texts(inner, hub.tokenizer_of(model), calibration, filter_fn=is_compressible)
    codebook_model_(inner, config, filter_fn=is_compressible, importance=importance)
    return model


def compress(src: str | os.PathLike, out: str | os.PathLike, config: CodebookConfig,
             calibration: str | os.PathLike | None = None) -> tuple[nn.Module, Report, float]:
    """Load ``src``, cluster its weights with ``config``, write the packed directory ``out``.

    ``calibration`` is an optional text file (one text per line) for
    data-aware clustering.  Returns ``(model, report, seconds spent clustering,
    calibration included)``.  Everything that can be checked (config, source
    directory, output path, calibration file) is checked before the model is loaded.
    """
    source = hub.detect(src)
    out = Path(out)
    pack._check_dest(out, source.path)
    texts = read_texts(calibration) if calibration else None
    model, _, _ = hub.load_pretrained(src)
    t0 = time.perf_counter()
    compress_model_(model, config, texts)
    seconds = time.perf_counter() - t0
    log.info("clustered in %.2f s", seconds)
    pack.save(model, out)
    return model, report(model), seconds
