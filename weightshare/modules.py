"""Packed modules: layers that hold codebook indices and tables only, and run on the native kernel.

``ws.load(path)`` builds these in place of ``nn.Linear``, transformers' ``Conv1D``
and ``nn.Embedding`` whose weight is a codebook: no fp32 copy of such a weight
exists at any point, the forward pass decodes inside the GEMM
(``weightshare.kernels``), and an embedding decodes only the rows it looks up.
The tables are frozen buffers: gradients reach a packed layer's input and bias
(adapters on a frozen model), and ``ws.load(path, trainable=True)`` gives the
parametrized form whose tables train.

``model.to(torch.bfloat16)`` rounds the tables to bf16 (as it would round dense
weights) and keeps computing in fp32 on the rounded values; the outputs take the
inputs' dtype.  ``set_compute_(model, "bf16")`` lets the large-batch GEMMs multiply
in bf16 on CPUs with AVX512_BF16 (sums stay fp32).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from weightshare import kernels

__all__ = ["CodebookLinear", "CodebookEmbedding", "Outliers", "PackedModule", "set_compute_"]

log = logging.getLogger(__name__)


class Outliers:
    """Weights kept exact beside a codebook (dense-and-sparse): sorted flat positions over the
    (out_features, in_features) layout and their values.

    ``index`` is int64, strictly increasing, in ``[0, n·k)`` (``validate`` checks a file's);
    ``crow`` is the CSR row pointer, so that a row's outliers are ``crow[r]:crow[r+1]``.
    """

    def __init__(self, index: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]):
        self.shape = (int(shape[0]), int(shape[1]))
        self.index = index.to(torch.int64)
        self.values = values
        k = self.shape[1]
        self.rows, self.cols = self.index // k, self.index % k
        self.crow = torch.searchsorted(self.rows, torch.arange(self.shape[0] + 1))

    @staticmethod
    def validate(name: str, index: torch.Tensor, values: torch.Tensor, numel: int) -> None:
        """A file's outliers: positions strictly increasing inside the weight, values finite."""
        if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= numel
                              or (index.numel() > 1 and not bool((index[1:] > index[:-1]).all()))):
            raise ValueError(f"{name}: outlier positions\n  expected: strictly increasing, in [0, {numel})")
        if not bool(torch.isfinite(values.float()).all()):
            raise ValueError(f"{name}: outlier values hold NaN or inf")

    def to(self, fn) -> "Outliers":
        return Outliers(fn(self.index), fn(self.values), self.shape)

    def set_(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` (n, k) with the outliers' exact values written in."""
        w.view(-1)[self.index] = self.values.to(w.dtype)
        return w

    def in_rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For flat row ids: (position in ids, column, outlier number) of every outlier on those rows."""
        start = self.crow[ids]
        count = self.crow[ids + 1] - start
        which = torch.repeat_interleave(torch.arange(ids.numel()), count)
        first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        number = start[which] + torch.arange(which.numel()) - first
        return which, self.cols[number], number

    def lookup_(self, out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the weight, decoded into ``out`` (*ids.shape, k): the exact values written in."""
        flat = ids.reshape(-1)
        which, col, number = self.in_rows(flat)
        out.view(-1, self.shape[1])[which, col] = self.values[number].to(out.dtype)
        return out


class PackedModule(nn.Module):
    """Indices and tables of one codebook weight, in the kernel's layout (plain tensor attributes).

    ``config`` is the ``CodebookConfig`` of the packed entry, ``weight_dtype`` the
    dtype of the weight it stands for, ``transposed`` whether that weight was
    stored (in, out) (transformers' ``Conv1D``); all three come back in ``ws.save``.
    """

    _decode_warned = False
    # while transformers' from_pretrained runs (weightshare's quantizer sets it), .weight is a meta placeholder:
    # models' _init_weights read children's weights, and nothing of a packed model needs initialising
    _placeholder = False

    def __init__(self, indices: torch.Tensor, tables: torch.Tensor, layout: kernels.Layout, config,
                 weight_dtype: torch.dtype, transposed: bool = False, outliers: Outliers | None = None):
        super().__init__()
        layout.check(indices, tables, type(self).__name__)
        if not bool(torch.isfinite(tables).all()):  # 0 x inf in the padded tail of a block would be NaN
            raise ValueError(f"{type(self).__name__}: tables hold NaN or inf")
        self.layout = layout
        self.config = config
        self.weight_dtype = weight_dtype
        self.transposed = bool(transposed)
        # Plain tensor attributes, not buffers: a state_dict has no codebook in it (ws.save writes them), and
        # transformers' from_pretrained, which re-creates every non-persistent buffer after loading, leaves them be.
        self.indices = indices
        self.tables = tables
        self.outliers = outliers  # exact weights beside the codebook, or None

    def _apply(self, fn, recurse=True):
        # what .to() / .half() do to buffers; .to(dtype) rounds the tables as it would round dense weights,
        # and the kernel reads them as fp32
        super()._apply(fn, recurse)
        self.indices = fn(self.indices)
        tables = fn(self.tables)
        if tables.dtype != torch.float32:
            self.weight_dtype = tables.dtype
            tables = tables.float()
        self.tables = tables
        if self.outliers is not None:
            self.outliers = self.outliers.to(fn)  # fn converts only floating tensors' dtype, moves every tensor
            self.outliers.values = self.outliers.values.float()
            self._outliers_changed()
        return self

    def _outliers_changed(self) -> None:
        pass

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (a new tensor each time): for code that reads ``.weight``; the forward never does."""
        if self._placeholder:
            return torch.empty(self._dense_shape(), dtype=self.weight_dtype, device="meta")
        if not PackedModule._decode_warned:
            log.warning("%s.weight decodes the whole %s weight; the packed forward pass never does",
                        type(self).__name__, tuple(self._dense_shape()))
            PackedModule._decode_warned = True
        w = self._decoded().to(self.weight_dtype)
        return w.t() if self.transposed else w

    def _decoded(self) -> torch.Tensor:
        """The whole weight in the (out, in) layout, fp32, outliers included."""
        w = kernels.decode(self.indices, self.tables, self.layout)
        return w if self.outliers is None else self.outliers.set_(w)

    def _dense_shape(self) -> tuple[int, int]:
        n, k = self.layout.out_features, self.layout.in_features
        return (k, n) if self.transposed else (n, k)

    def extra_repr(self) -> str:
        c = self.config
        gran = c.granularity + (f"({c.group_size})" if c.group_size else "")
        extra = f", outliers={self.outliers.index.numel()}" if self.outliers is not None else ""
        return f"{self.layout.in_features}, {self.layout.out_features}, bits={c.bits}, {gran}{extra}"


class CodebookLinear(PackedModule):
    """``y = x · Wᵀ + b`` with W as codebook indices and tables (for ``nn.Linear`` and transformers' ``Conv1D``).

    ``x``: (..., in_features), fp32, bf16 or fp16; the output has x's dtype.
    """

    def __init__(self, indices, tables, layout, config, weight_dtype, bias: nn.Parameter | None = None,
                 transposed: bool = False, compute: str = "fp32", outliers: Outliers | None = None):
        super().__init__(indices, tables, layout, config, weight_dtype, transposed, outliers)
        self.in_features, self.out_features = layout.in_features, layout.out_features
        if bias is not None and tuple(bias.shape) != (layout.out_features,):
            raise ValueError(f"CodebookLinear: bias\n  expected: shape ({layout.out_features},)\n"
                             f"  got: {tuple(bias.shape)}")
        self.bias = bias
        self.compute = compute
        self._plan = kernels.Plan()
        self._outliers_changed()

    def _outliers_changed(self) -> None:
        # y = x·(W_codebook + S)ᵀ: S, the outliers' corrections to the table values (_delta), is a CSR matrix whose
        # product is a sparse add after the kernel (a few thousand multiply-adds per row of x at 0.5 %)
        self._delta = None
        o = self.outliers
        if o is not None:
            table_values = kernels.embedding(o.rows, self.indices, self.tables, self.in_features, self.layout.bits)
            delta = o.values.float() - table_values.gather(1, o.cols[:, None]).squeeze(1)
            self._delta = delta.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (x, self.indices, self.tables, self.bias, self.in_features, self.layout.bits, self.compute)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
                x.requires_grad or (self.bias is not None and self.bias.requires_grad))):
            y = kernels.linear(*args)  # the registered op: a graph node, with its backward
        else:
            y = kernels.linear_eager(self._plan, *args)  # the same kernel, without the dispatcher's per-call cost
        if self._delta is None:
            return y
        o = self.outliers
        out = kernels.sparse_add_(y.reshape(-1, self.out_features), x.reshape(-1, self.in_features), o.crow, o.cols,
                                  self._delta)
        return out.view(y.shape)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", bias={self.bias is not None}"
                + (", compute=bf16" if self.compute == "bf16" else ""))


class CodebookEmbedding(PackedModule):
    """An embedding table as codebook indices and tables; a lookup decodes only the rows it returns."""

    def __init__(self, indices, tables, layout, config, weight_dtype, padding_idx: int | None = None,
                 outliers: Outliers | None = None):
        super().__init__(indices, tables, layout, config, weight_dtype, outliers=outliers)
        self.num_embeddings, self.embedding_dim = layout.out_features, layout.in_features
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = kernels.embedding(ids, self.indices, self.tables, self.embedding_dim, self.layout.bits)
        if self.outliers is not None:
            out = self.outliers.lookup_(out, ids)
        return out if self.weight_dtype == torch.float32 else out.to(self.weight_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


def set_compute_(model: nn.Module, compute: str) -> nn.Module:
    """Set how every packed Linear of ``model`` multiplies: ``"fp32"`` (exact, the default) or ``"bf16"``.

    bf16 rounds inputs and weights to bf16 inside the large-batch GEMMs and sums in
    fp32 (oneDNN's bf16 level of error); it is faster only on CPUs with AVX512_BF16
    (``weightshare inspect`` says), elsewhere the kernel computes exact fp32.
    """
    if compute not in kernels.COMPUTES:
        raise ValueError(f"compute\n  expected one of: {', '.join(kernels.COMPUTES)}\n  got: {compute!r}")
    for m in model.modules():
        if isinstance(m, CodebookLinear):
            m.compute = compute
    return model
