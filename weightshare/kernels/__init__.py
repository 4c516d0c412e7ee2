"""Native codebook GEMM behind torch ops: y = x·Wᵀ + b from b-bit indices and small tables.

A packed layer holds W (N x K) as b-bit indices into fp32 tables (one per output
row, per group of a row, or one per tensor) and never as fp32 weights.  The
kernel (``_codebook.c``, built at install) decodes indices inside the GEMM:

* small M (a query of a few tokens, an LLM decode step): each row is decoded into
  registers and FMA'd against up to 8 inputs a pass, so the layer is read once at b/8
  bytes per weight.  AVX-512 looks 16 weights up in a one-register table
  (``vpermps``); AVX2 holds a table of up to 16 entries as four byte planes and looks
  32 weights up with four ``vpshufb`` (exact fp32, assembled by unpacks: 12 shuffles
  for 32 weights where two 8-entry ``vpermps`` and a blend take about 20), the inputs
  laid out in the order that decode produces;
* large M: 32 rows at a time are decoded and transposed into a tile that stays in
  L2, then a 12 x 32 register-blocked micro-kernel runs over the inputs; exact fp32
  by default, or bf16 products with fp32 sums (``compute="bf16"``): on AMX tiles where
  the CPU has them (the decoded tile is AMX's B operand as it is), else AVX512_BF16
  ``vdpbf16ps`` (``WEIGHTSHARE_NO_AMX=1`` forces the latter).

Indices of 2, 3 and 4 bits are decoded natively from 2, 3 and 4 bits a weight;
1-bit codebooks use the 2-bit layout (2 bits a weight in memory); 5 to 8 bits are
native too, from one byte a weight (vpermt2ps for 32 and 64 entries, a gather for
128 and 256).

The path is chosen at run time from the CPU (``isa()``), and can be forced with
``WEIGHTSHARE_KERNEL=avx512|avx2|portable|torch`` (``torch``: decode a block of
rows with torch ops and ``F.linear`` it, the path taken when the C core could not
be built).  Threads follow ``torch.get_num_threads()``; layers below 1 M
multiply-adds run on one thread, and up to 12 M only while the workers are still
polling (waking a sleeping thread costs 60-100 us on a virtual machine); the fused
path hands rows out in chunks as threads go, so a thread that starts late or runs
slower than its partner does not hold the layer up.

The ops ``torch.ops.weightshare.codebook_linear`` and ``codebook_rows`` are
registered with ``torch.library`` (with fake kernels), so they run under
``torch.inference_mode``, ``torch.no_grad`` and ``torch.compile`` (as one opaque
node: no graph break).  Gradients flow to a packed layer's input and bias (an
adapter trained on a frozen packed model), not to its tables: the trainable form of
a packed model is the parametrized one (``ws.load(path, trainable=True)``).
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ENV", "ISAS", "COMPUTES", "Layout", "Plan", "isa", "available", "bf16_supported", "amx_supported",
           "describe", "encode_stream", "labels_of", "linear", "linear_eager", "embedding", "decode", "pad_tables",
           "layout_bits", "table_entries", "row_bytes", "fused_max"]

log = logging.getLogger(__name__)

ENV = "WEIGHTSHARE_KERNEL"
ISAS = ("avx512", "avx2", "portable", "torch")  # best first
_ISA_CODE = {"portable": 0, "avx2": 1, "avx512": 2}
COMPUTES = ("fp32", "bf16")
# every buffer the C core writes into names its device: from_pretrained builds models under torch.device("meta")
_CPU_DEVICE = torch.device("cpu")
_DECODE_ROWS = 256  # rows decoded at a time on the torch path: bounds its dense temporary
# the largest M that takes the fused decode + FMA path (decoded weights in registers);
# above it the tile GEMM amortises decoding over many inputs
_FUSED_MAX = {"avx512": 16, "avx2": 16}


def layout_bits(bits: int) -> int:
    """Bits a weight takes in memory: 1-bit codebooks use the 2-bit layout, 5..8 bits one byte."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codebook bits\n  expected: 1..8\n  got: {bits!r}")
    return 2 if bits <= 2 else bits if bits <= 4 else 8


def table_entries(bits: int) -> int:
    """Entries of a table in memory: 2**bits, padded to 4 for 1-bit codebooks."""
    return max(4, 1 << bits)


def row_bytes(lbits: int, in_features: int) -> int:
    """Bytes of one row of indices in the kernel's layout (blocks of 64 weights)."""
    return -(-in_features // 64) * {2: 16, 3: 24, 4: 32, 8: 64}[lbits]


@dataclass(frozen=True)
class Layout:
    """How a codebook weight of shape (out_features, in_features) is held in memory."""

    out_features: int
    in_features: int
    bits: int  # of the codebook (1..8)
    tables: int  # number of tables: 1 (per tensor), out_features (per row), or out_features * groups per row

    def __post_init__(self):
        N, K, T = self.out_features, self.in_features, self.tables
        if N < 1 or K < 1 or T < 1:
            raise ValueError(f"codebook layout: shape ({N}, {K}) with {T} tables\n  expected: positive sizes")
        if T > 1 and (T % N or K % (T // N)):
            raise ValueError(f"codebook layout: {T} tables do not divide a ({N}, {K}) weight into equal groups of rows")
        layout_bits(self.bits)

    @property
    def lbits(self) -> int:
        return layout_bits(self.bits)

    @property
    def entries(self) -> int:
        return table_entries(self.bits)

    @property
    def group(self) -> int:
        """Weights of a row that share one table."""
        return self.in_features if self.tables == 1 else self.in_features // (self.tables // self.out_features)

    @property
    def table_stride(self) -> int:
        """Floats between the tables of consecutive rows (0: one table for the tensor)."""
        return 0 if self.tables == 1 else (self.tables // self.out_features) * self.entries

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.lbits, self.in_features)

    def check(self, indices: torch.Tensor, tables: torch.Tensor, what: str = "codebook layer") -> None:
        """Refuse buffers that do not hold this layout (the kernel trusts their sizes)."""
        want_i = (self.out_features, self.row_bytes)
        want_t = (self.tables, self.entries)
        if indices.dtype != torch.uint8 or tuple(indices.shape) != want_i or not indices.is_contiguous():
            raise ValueError(f"{what}: indices\n  expected: contiguous uint8 {want_i}\n"
                             f"  got: {indices.dtype} {tuple(indices.shape)}")
        if tables.dtype != torch.float32 or tuple(tables.shape) != want_t or not tables.is_contiguous():
            raise ValueError(f"{what}: tables\n  expected: contiguous float32 {want_t}\n"
                             f"  got: {tables.dtype} {tuple(tables.shape)}")
        if indices.device.type != "cpu" or tables.device.type != "cpu":
            raise ValueError(f"{what}: the codebook kernel runs on the CPU\n  got: {indices.device}, {tables.device}")


# ----------------------------------------------------------------------------- the C core


def _load_core():
    try:
        from weightshare.kernels import _codebook_core  # built by setup.py from _codebook.c
    except ImportError as exc:
        return None, f"the native kernel was not built ({exc}); reinstall with a C compiler (gcc or clang)"
    lib = ctypes.CDLL(_codebook_core.__file__)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ws_cb_isa.restype = i32
    lib.ws_cb_isa.argtypes = []
    lib.ws_cb_linear.restype = i32
    lib.ws_cb_linear.argtypes = [p, i64, i64, p, p, i64, i64, i32, i32, i64, i64, p, p, i64, i32, i32, i32, i32]
    lib.ws_cb_decode_rows.restype = i32
    lib.ws_cb_decode_rows.argtypes = [p, p, i64, i64, i32, i32, i64, i64, p, i64, p, i64, i32, i32]
    lib.ws_cb_from_stream.restype = i32
    lib.ws_cb_from_stream.argtypes = [p, i64, i32, i64, i64, i32, p]
    lib.ws_cb_to_labels.restype = None
    lib.ws_cb_to_labels.argtypes = [p, i32, i64, i64, p]
    lib.ws_cb_row_bytes.restype = i64
    lib.ws_cb_row_bytes.argtypes = [i32, i64]
    lib.ws_sparse_add.restype = None
    lib.ws_sparse_add.argtypes = [p, i64, i64, p, p, p, i64, p, i32]
    lib.ws_cb_set_spin.restype = None
    lib.ws_cb_set_spin.argtypes = [i32]
    lib.linear_g = _codebook_core.linear_g  # the per-layer call, without ctypes' argument conversion
    return lib, ""


_core, _core_missing = _load_core()
_CPU = _core.ws_cb_isa() if _core is not None else 0


def available() -> list[str]:
    """The paths this machine can run, best first (``torch`` always)."""
    out = []
    if _core is not None:
        if _CPU & 2:
            out.append("avx512")
        if _CPU & 1:
            out.append("avx2")
        out.append("portable")
    return out + ["torch"]


def bf16_supported() -> bool:
    """Whether ``compute="bf16"`` runs bf16 products here (AVX512_BF16); elsewhere it computes exact fp32."""
    return bool(_CPU & 4) and _core is not None


def amx_supported() -> bool:
    """Whether bf16 compute runs on AMX tiles here (Intel Sapphire Rapids and later, and the OS grants them).

    ``WEIGHTSHARE_NO_AMX=1`` keeps bf16 compute on AVX512_BF16 instructions instead."""
    return bool(_CPU & 8) and _core is not None


_cached: tuple[str | None, str] = (None, "")
_warned_missing = False


def isa() -> str:
    """The path the ops take now: ``WEIGHTSHARE_KERNEL`` if set (checked), else the best available."""
    global _cached, _warned_missing
    forced = os.environ.get(ENV, "")
    if forced == _cached[0]:
        return _cached[1]
    choice = forced.strip().lower() or "auto"
    have = available()
    if choice == "auto":
        chosen = have[0]
        if _core is None and not _warned_missing:
            log.warning("weightshare: %s; packed layers run on the slower pure-torch path", _core_missing)
            _warned_missing = True
    elif choice not in ISAS:
        raise ValueError(f"{ENV}={forced!r}\n  expected one of: auto, {', '.join(ISAS)}\n"
                         "  unset it to let weightshare choose")
    elif choice not in have:
        why = _core_missing if _core is None else f"this CPU has only: {', '.join(have)}"
        raise RuntimeError(f"{ENV}={forced!r}: that path cannot run here ({why})\n  unset it or choose one of: "
                           f"{', '.join(have)}")
    else:
        chosen = choice
    _cached = (forced, chosen)
    return chosen


def fused_max(path: str | None = None) -> int:
    """The largest number of input rows that takes the fused decode + FMA strategy on ``path``."""
    return _FUSED_MAX.get(path or isa(), 0)


def describe() -> str:
    """One line: which path this machine uses and what it does (for ``weightshare inspect``)."""
    path = isa()
    if path == "torch":
        why = f" ({_core_missing})" if _core is None else f" (forced by {ENV})"
        return f"pure-torch decode of {_DECODE_ROWS} rows at a time + F.linear{why}"
    forced = f", forced by {ENV}" if os.environ.get(ENV, "").strip().lower() not in ("", "auto") else ""
    if path == "portable":
        return f"portable C (no SIMD: decode a row, then dot products){forced}"
    if bf16_supported() and path == "avx512":
        bf16 = "on AMX tiles" if amx_supported() and not os.environ.get("WEIGHTSHARE_NO_AMX") else "on AVX512_BF16"
    else:
        bf16 = "not on this path (compute='bf16' runs exact fp32)"
    return (f"{path} (fused decode + FMA for M <= {fused_max(path)} input rows, decoded tile + GEMM above; "
            f"bf16 compute {bf16}; threads: {torch.get_num_threads()}){forced}")


# ----------------------------------------------------------------------------- layout conversion


def _encode_numpy(labels: np.ndarray, lbits: int) -> np.ndarray:
    """Labels (N, K) into the kernel's layout (N, row_bytes): the slow obvious version."""
    N, K = labels.shape
    nb = -(-K // 64)
    lab = np.zeros((N, nb * 64), dtype=np.uint8)
    lab[:, :K] = labels
    b = lab.reshape(N, nb, 64)
    if lbits == 4:
        s = b.reshape(N, nb, 2, 2, 16)  # block, sub-block, low/high half, j
        out = (s[:, :, :, 0] & 15) | (s[:, :, :, 1] << 4)
        return out.reshape(N, nb * 32)
    if lbits in (2, 3):
        t = b.reshape(N, nb, 4, 16)
        lo = np.zeros((N, nb, 16), dtype=np.uint8)
        for i in range(4):
            lo |= (t[:, :, i] & 3) << (2 * i)
        if lbits == 2:
            return lo.reshape(N, nb * 16)
        hi = np.packbits(((b >> 2) & 1).reshape(N, nb, 8, 8), axis=-1, bitorder="little").reshape(N, nb, 8)
        return np.concatenate([lo, hi], axis=-1).reshape(N, nb * 24)
    return lab


def encode_stream(stream: np.ndarray, bits: int, out_features: int, in_features: int) -> torch.Tensor:
    """The packed file's bit stream of a (out_features, in_features) codebook into the kernel's layout.

    ``stream``: uint8, at least ``ceil(N * K * bits / 8)`` bytes (checked).  Returns uint8 (N, row_bytes).
    """
    from weightshare.bitpack import unpack_bits

    N, K, lbits = out_features, in_features, layout_bits(bits)
    stream = np.ascontiguousarray(stream, dtype=np.uint8).reshape(-1)
    if stream.size < (N * K * bits + 7) // 8:
        raise ValueError(f"codebook indices: {stream.size} bytes hold fewer than {N} x {K} {bits}-bit indices")
    out = torch.empty((N, row_bytes(lbits, K)), dtype=torch.uint8, device=_CPU_DEVICE)
    if _core is not None:
        rc = _core.ws_cb_from_stream(stream.ctypes.data, stream.size, bits, N, K, lbits, out.data_ptr())
        if rc:
            raise ValueError(f"codebook indices: cannot convert ({rc})")
        return out
    labels = unpack_bits(stream, bits, N * K).reshape(N, K)
    out.numpy()[:] = _encode_numpy(labels, lbits)
    return out


def _labels_torch(indices: torch.Tensor, lbits: int, K: int) -> torch.Tensor:
    """The kernel's layout (n, row_bytes) back into labels (n, K), int64, with torch ops."""
    n = indices.shape[0]
    b = indices.view(n, -1, {2: 16, 3: 24, 4: 32, 8: 64}[lbits])
    if lbits == 4:
        s = b.view(n, -1, 2, 16)
        lab = torch.stack((s & 15, s >> 4), dim=3)  # block, sub-block, low/high half, j
    elif lbits in (2, 3):
        lo = b[..., :16]
        lab = torch.stack([(lo >> (2 * t)) & 3 for t in range(4)], dim=2)
        if lbits == 3:
            shifts = torch.arange(8, dtype=torch.uint8, device=_CPU_DEVICE)
            hi = (b[..., 16:, None] >> shifts) & 1  # (n, blocks, 8 bytes, 8 bits): bit i of the word
            lab = lab | (hi.reshape(n, -1, 4, 16) << 2)
    else:
        lab = b
    return lab.reshape(n, -1)[:, :K].long()


def labels_of(indices: torch.Tensor, layout: Layout) -> np.ndarray:
    """The kernel's layout back into labels, uint8 (out_features, in_features) (for saving)."""
    N, K = layout.out_features, layout.in_features
    if _core is not None:
        out = np.empty((N, K), dtype=np.uint8)
        _core.ws_cb_to_labels(indices.data_ptr(), layout.lbits, N, K, out.ctypes.data)
        return out
    return _labels_torch(indices, layout.lbits, K).to(torch.uint8).numpy()


def _decode_torch(indices: torch.Tensor, tables: torch.Tensor, layout: Layout, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of W decoded with torch ops, fp32 (len(rows), K)."""
    K = layout.in_features
    lab = _labels_torch(indices[rows], layout.lbits, K)
    if layout.tables == 1:
        return tables[0][lab]
    per_row = layout.tables // layout.out_features
    t = tables.view(layout.out_features, per_row, layout.entries)[rows]  # (n, groups, entries)
    return torch.gather(t, 2, lab.view(len(rows), per_row, layout.group)).view(len(rows), K)


# ----------------------------------------------------------------------------- the ops


def _layout_from(indices: torch.Tensor, tables: torch.Tensor, in_features: int, bits: int) -> Layout:
    layout = Layout(int(indices.shape[0]), int(in_features), int(bits), int(tables.shape[0]))
    layout.check(indices, tables)
    return layout


_LBITS = {b: layout_bits(b) for b in range(1, 9)}


def _geometry(indices, tables, in_features, bits) -> tuple[int, int, int, int, int]:
    """(N, lbits, entries, group, table_stride) of checked buffers: the kernel trusts their sizes.

    The common case is checked with a few integer comparisons (this runs on every call);
    anything unusual goes through ``Layout`` for its error message.
    """
    lb = _LBITS.get(bits)
    if (lb is not None and indices.dim() == 2 and tables.dim() == 2 and indices.dtype == torch.uint8
            and tables.dtype == torch.float32 and indices.is_contiguous() and tables.is_contiguous()
            and indices.device.type == "cpu" and tables.device.type == "cpu" and in_features >= 1):
        N, rb = indices.shape
        T, E = tables.shape
        K = in_features
        if N >= 1 and rb == -(-K // 64) * _BLOCK_BYTES[lb] and E == max(4, 1 << bits):
            if T == 1:
                return N, lb, E, K, 0
            if T % N == 0 and K % (T // N) == 0:
                return N, lb, E, K // (T // N), (T // N) * E
    layout = _layout_from(indices, tables, in_features, bits)  # raises, naming what does not fit
    return layout.out_features, layout.lbits, layout.entries, layout.group, layout.table_stride


_BLOCK_BYTES = {2: 16, 3: 24, 4: 32, 8: 64}


_lib = torch.library.Library("weightshare", "DEF")
_lib.define("codebook_linear(Tensor x, Tensor indices, Tensor tables, Tensor? bias, int in_features, int bits, "
            "int compute) -> Tensor")
_lib.define("codebook_rows(Tensor ids, Tensor indices, Tensor tables, int in_features, int bits) -> Tensor")


def _as_rows(x: torch.Tensor, K: int) -> torch.Tensor:
    """x (..., K) as the kernel reads it: contiguous fp32 rows (M, K)."""
    x2 = x.reshape(-1, K)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    return x2 if x2.is_contiguous() else x2.contiguous()


def _linear_impl(x, indices, tables, bias, in_features, bits, compute):
    N, lbits, entries, group, stride = _geometry(indices, tables, in_features, bits)
    K = in_features
    if x.shape[-1] != K:
        raise ValueError(f"codebook linear: input features\n  expected: {K}\n"
                         f"  got: {x.shape[-1]} (input shape {tuple(x.shape)})")
    lead = x.shape[:-1]
    out_dtype = x.dtype
    x2 = _as_rows(x, K)
    M = x2.shape[0]
    b = None
    if bias is not None:
        b = bias if bias.dtype == torch.float32 and bias.is_contiguous() else bias.float().contiguous()
        if b.shape != (N,):
            raise ValueError(f"codebook linear: bias\n  expected: shape ({N},)\n  got: {tuple(b.shape)}")
    if x2.device.type != "cpu" or (b is not None and b.device.type != "cpu"):
        raise ValueError(f"codebook linear: the codebook kernel runs on the CPU\n  got: input on {x2.device}"
                         + ("" if b is None else f", bias on {b.device}"))
    path = isa()
    y = torch.empty((M, N), dtype=torch.float32, device=_CPU_DEVICE)
    if path == "torch":
        layout = Layout(N, K, bits, tables.shape[0])
        for n0 in range(0, N, _DECODE_ROWS):
            rows = torch.arange(n0, min(N, n0 + _DECODE_ROWS), device=_CPU_DEVICE)
            w = _decode_torch(indices, tables, layout, rows)
            y[:, n0:n0 + len(rows)] = F.linear(x2, w, None if b is None else b[n0:n0 + len(rows)])
    elif M:
        rc = _core.ws_cb_linear(x2.data_ptr(), M, K, indices.data_ptr(), tables.data_ptr(), N, K, lbits, entries, group,
                                stride, None if b is None else b.data_ptr(), y.data_ptr(), N, _ISA_CODE[path],
                                int(compute), _FUSED_MAX.get(path, 0), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"codebook linear: the kernel refused its arguments (code {rc})")
    y = y.view(*lead, N)
    return y if out_dtype == torch.float32 else y.to(out_dtype)


class Plan:
    """The checked geometry of one packed layer, reused while its indices and tables are the same tensors.

    ``linear_eager`` needs no per-call validation of the buffers: the geometry was checked
    when the plan was made, and is made again whenever either tensor changes.
    """

    __slots__ = ("indices", "tables", "key", "geometry", "address", "n")

    def __init__(self):
        self.indices = self.tables = self.key = None

    def get(self, indices, tables, in_features, bits) -> tuple[int, int]:
        """(address of the geometry array, out_features), checked."""
        key = (indices.data_ptr(), tables.data_ptr(), indices.shape, tables.shape, indices.dtype, tables.dtype,
               in_features, bits)
        if indices is not self.indices or tables is not self.tables or key != self.key:
            N, lbits, entries, group, stride = _geometry(indices, tables, in_features, bits)  # devices too
            self.geometry = (ctypes.c_int64 * 8)(indices.data_ptr(), tables.data_ptr(), N, in_features, lbits, entries,
                                                 group, stride)
            self.address = ctypes.addressof(self.geometry)
            self.n, self.key, self.indices, self.tables = N, key, indices, tables
        return self.address, self.n


def linear_eager(plan: Plan, x, indices, tables, bias, in_features: int, bits: int, compute: str = "fp32"):
    """``linear`` for eager inference (no gradient to track, not being compiled): the kernel called directly,
    the layer's geometry from ``plan``.  Anything unusual goes through the registered op.

    This runs once per layer per forward pass, so it does as little as it can: an fp32, contiguous CPU input
    of any number of leading dimensions is read where it lies (about 8 us of Python and torch in all)."""
    path = isa()
    if x.dtype in (torch.bfloat16, torch.float16) and x.is_cpu and path != "torch":  # a model cast with .to(dtype)
        return linear_eager(plan, x.float(), indices, tables, bias, in_features, bits, compute).to(x.dtype)
    if (path == "torch" or x.dtype != torch.float32 or not x.is_contiguous() or not x.is_cpu
            or x.shape[-1] != in_features
            or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()
                                      or not bias.is_cpu))):
        return linear(x, indices, tables, bias, in_features, bits, compute)
    address, N = plan.get(indices, tables, in_features, bits)
    if bias is not None and bias.shape != (N,):
        return linear(x, indices, tables, bias, in_features, bits, compute)  # the op names the problem
    M = x.numel() // in_features
    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32, device=_CPU_DEVICE)
    if M:
        rc = _core.linear_g(address, x.data_ptr(), M, 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                            _ISA_CODE[path], COMPUTES.index(compute), _FUSED_MAX.get(path, 0), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"codebook linear: the kernel refused its arguments (code {rc})")
    return y


def _linear_fake(x, indices, tables, bias, in_features, bits, compute):
    return x.new_empty((*x.shape[:-1], indices.shape[0]))


def _rows_impl(ids, indices, tables, in_features, bits):
    layout = _layout_from(indices, tables, in_features, bits)
    N, K = layout.out_features, layout.in_features
    flat = ids.reshape(-1)
    if flat.device.type != "cpu":
        raise ValueError(f"codebook embedding: the codebook kernel runs on the CPU\n  got ids on {flat.device}")
    if flat.dtype != torch.int64:
        flat = flat.long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= N):
        raise IndexError(f"index out of range in self (codebook embedding of {N} rows; got ids "
                         f"{int(flat.min())}..{int(flat.max())})")
    path = isa()
    if path == "torch":
        out = _decode_torch(indices, tables, layout, flat)
    else:
        flat = flat.contiguous()
        out = torch.empty((flat.numel(), K), dtype=torch.float32, device=_CPU_DEVICE)
        rc = _core.ws_cb_decode_rows(indices.data_ptr(), tables.data_ptr(), N, K, layout.lbits, layout.entries,
                                     layout.group, layout.table_stride, flat.data_ptr(), flat.numel(), out.data_ptr(),
                                     K, _ISA_CODE[path], torch.get_num_threads())
        if rc:
            raise RuntimeError(f"codebook rows: the kernel refused its arguments (code {rc})")
    return out.view(*ids.shape, K)


def _rows_fake(ids, indices, tables, in_features, bits):
    return tables.new_empty((*ids.shape, in_features))


def _linear_setup_context(ctx, inputs, output):
    x, indices, tables, bias, in_features, bits, _ = inputs
    ctx.save_for_backward(indices, tables)
    ctx.geometry = (in_features, bits, x.dtype, x.shape)


def _linear_backward(ctx, grad):
    """dL/dx = dL/dy · W, W decoded a block of rows at a time (the tables themselves are frozen here)."""
    indices, tables = ctx.saved_tensors
    K, bits, dtype, shape = ctx.geometry
    N = indices.shape[0]
    g = grad.reshape(-1, N).float()
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.zeros(g.shape[0], K, device=_CPU_DEVICE)
        for n0 in range(0, N, _DECODE_ROWS):
            n1 = min(N, n0 + _DECODE_ROWS)
            grad_x += g[:, n0:n1] @ _rows_impl(torch.arange(n0, n1, device=_CPU_DEVICE), indices, tables, K, bits)
        grad_x = grad_x.view(shape).to(dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = g.sum(0)
    return grad_x, None, None, grad_bias, None, None, None


_lib.impl("codebook_linear", _linear_impl, "CPU")
_lib.impl("codebook_rows", _rows_impl, "CPU")
torch.library.register_fake("weightshare::codebook_linear", _linear_fake, lib=_lib)
torch.library.register_fake("weightshare::codebook_rows", _rows_fake, lib=_lib)
torch.library.register_autograd("weightshare::codebook_linear", _linear_backward, setup_context=_linear_setup_context,
                                lib=_lib)


def linear(x: torch.Tensor, indices: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None, in_features: int,
           bits: int, compute: str = "fp32") -> torch.Tensor:
    """y = x · Wᵀ + bias with W held as (indices, tables); x (..., K) fp32/bf16/fp16, y in x's dtype."""
    return torch.ops.weightshare.codebook_linear(x, indices, tables, bias, in_features, bits, COMPUTES.index(compute))


def embedding(ids: torch.Tensor, indices: torch.Tensor, tables: torch.Tensor, in_features: int,
              bits: int) -> torch.Tensor:
    """Rows ``ids`` of W decoded, fp32 (*ids.shape, K)."""
    return torch.ops.weightshare.codebook_rows(ids, indices, tables, in_features, bits)


def decode(indices: torch.Tensor, tables: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The whole weight, fp32 (out_features, in_features): for export and inspection, never the forward pass."""
    return embedding(torch.arange(layout.out_features, device=_CPU_DEVICE), indices, tables, layout.in_features,
                     layout.bits)


def sparse_add_(y: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                val: torch.Tensor) -> torch.Tensor:
    """``y += x · Sᵀ`` for the CSR matrix S (row pointer ``crow``, columns ``col``, int64; values ``val``, fp32):
    x (M, K), y (M, N); the native loop for fp32, contiguous, gradient-free inputs, torch's sparse product
    otherwise (the forced torch path, autograd: gradients reach x)."""
    M, K = x.shape
    N = y.shape[1]
    if (_core is not None and isa() != "torch" and x.dtype == y.dtype == torch.float32 and x.device.type == "cpu"
            and x.is_contiguous() and y.is_contiguous() and not (torch.is_grad_enabled() and
                                                                    (x.requires_grad or y.requires_grad))):
        _core.ws_sparse_add(x.data_ptr(), M, K, crow.data_ptr(), col.data_ptr(), val.data_ptr(), N, y.data_ptr(),
                            torch.get_num_threads())
        return y
    # built per call, not kept: a module holding a sparse tensor could not be deep-copied
    csr = torch.sparse_csr_tensor(crow, col, val, (N, K))
    product = torch.sparse.mm(csr, x.t().to(val.dtype)).t().to(y.dtype)
    return y + product if y.requires_grad else y.add_(product)  # out of place where autograd records it


def pad_tables(tables: torch.Tensor, bits: int) -> torch.Tensor:
    """Tables (T, 2**bits) as the kernel holds them: fp32, 1-bit tables padded to 4 entries."""
    t = tables.detach().to(torch.float32)
    if t.shape[1] < table_entries(bits):
        t = torch.cat([t, t[:, -1:].expand(-1, table_entries(bits) - t.shape[1])], dim=1)
    return t.contiguous()
