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
from weightshare.sharing.codebook import CodebookConfig
from weightshare.space import share_

__all__ = ["compress", "is_compressible"]

log = logging.getLogger(__name__)


def is_compressible(module: nn.Module, name: str) -> bool:
    """The modules post-training compression clusters: Linear and Embedding."""
    return isinstance(module, (nn.Linear, nn.Embedding))


def compress(src: str | os.PathLike, out: str | os.PathLike, config: CodebookConfig) -> tuple[nn.Module, Report, float]:
    """Load ``src``, cluster its weights with ``config``, write the packed directory ``out``.

    Returns ``(model, report, seconds spent clustering)``.  Everything that can
    be checked (config, source directory, output path) is checked before the
    model is loaded.
    """
    source = hub.detect(src)
    out = Path(out)
    pack._check_dest(out, source.path)
    model, inner, _ = hub.load_pretrained(src)
    t0 = time.perf_counter()
    share_(inner, config, filter_fn=is_compressible)
    seconds = time.perf_counter() - t0
    log.info("clustered in %.2f s", seconds)
    pack.save(model, out)
    return model, report(model), seconds
