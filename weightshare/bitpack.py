"""Bit packing of small unsigned integers: exactly ``bits`` bits per value, little-endian bit stream.

Value i occupies bits [i*bits, (i+1)*bits) of the stream, least significant bit
first.  Eight values fill exactly ``bits`` bytes, so both directions work on
groups of eight values held in one 64-bit word: a few vectorised shifts per
group instead of one byte per bit (``np.unpackbits``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack_bits", "unpack_bits", "packed_size"]

_GROUPS_PER_PASS = 1 << 20  # eight values each: bounds temporaries to ~8 MB per pass


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits\n  expected: 1..8\n  got: {bits!r}")


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers < 2**bits into a little-endian bit stream of exactly ``bits`` bits each."""
    _check_bits(bits)
    v = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    n = v.size
    groups = -(-n // 8)
    out = np.empty(groups * bits, dtype=np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for g0 in range(0, groups, _GROUPS_PER_PASS):
        g1 = min(groups, g0 + _GROUPS_PER_PASS)
        chunk = v[g0 * 8 : g1 * 8]
        if chunk.size < (g1 - g0) * 8:  # the last, partial group is padded with zeros
            chunk = np.concatenate([chunk, np.zeros((g1 - g0) * 8 - chunk.size, np.uint8)])
        chunk = chunk.reshape(-1, 8)
        word = np.zeros(g1 - g0, dtype=np.uint64)
        for k in range(8):
            word |= (chunk[:, k].astype(np.uint64) & mask) << np.uint64(bits * k)
        out[g0 * bits : g1 * bits] = word.view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)
    return out[: packed_size(n, bits)]


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` uint8 values of ``bits`` bits each.

    ``data`` must hold at least ``packed_size(count, bits)`` bytes (callers check
    sizes against the file's header before calling).
    """
    _check_bits(bits)
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    need = packed_size(count, bits)
    if data.size < need:
        raise ValueError(f"unpack_bits: too few bytes\n  expected: >= {need}\n  got: {data.size}")
    groups = -(-count // 8)
    out = np.empty(groups * 8, dtype=np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for g0 in range(0, groups, _GROUPS_PER_PASS):
        g1 = min(groups, g0 + _GROUPS_PER_PASS)
        raw = data[g0 * bits : min(g1 * bits, need)]
        padded = np.zeros(((g1 - g0), 8), dtype=np.uint8)  # each group's bytes in the low end of a word
        flat = np.zeros((g1 - g0) * bits, dtype=np.uint8)
        flat[: raw.size] = raw
        padded[:, :bits] = flat.reshape(-1, bits)
        word = padded.view(np.uint64).reshape(-1)
        block = out[g0 * 8 : g1 * 8].reshape(-1, 8)
        for k in range(8):
            block[:, k] = (word >> np.uint64(bits * k)) & mask
    return out[:count]
