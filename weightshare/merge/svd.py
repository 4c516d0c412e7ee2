"""Streaming for the merge methods that take an SVD of a changed weight matrix (TSV-Merge, Iso-C).

An SVD needs the whole matrix, so such a matrix is merged whole; everything else streams.
"""

from __future__ import annotations

__all__ = ["svd_prepare"]


def svd_prepare(read, numel: int, *, name: str, shape, weight, **_) -> dict | None:
    """A large tensor (TSV-Merge, Iso-C): merged in pieces when no model changed it or when it
    is not a matrix; whole (None) otherwise."""
    if len(shape) != 2:
        return {"matrix": False}
    for models, base in read():
        if any(bool((m != base).any()) for m in models):
            return None
    return {"unchanged": True}
