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
inputs' dtype.  ``set_compute(model, "bf16")`` lets the large-batch GEMMs multiply
in bf16 on CPUs with AVX512_BF16 (sums stay fp32).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from weightshare import kernels

__all__ = ["CodebookLinear", "CodebookEmbedding", "PackedModule", "set_compute"]

log = logging.getLogger(__name__)


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

    def __init__(self, indices: torch.Tensor, tables: torch.Tensor, layout: kernels.Layout, config, weight_dtype: torch.dtype,
                 transposed: bool = False):
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
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (a new tensor each time): for code that reads ``.weight``; the forward never does."""
        if self._placeholder:
            return torch.empty(self._dense_shape(), dtype=self.weight_dtype, device="meta")
        if not PackedModule._decode_warned:
            log.warning("%s.weight decodes the whole %s weight; the packed forward pass never does",
                        type(self).__name__, tuple(self._dense_shape()))
            PackedModule._decode_warned = True
        w = kernels.decode(self.indices, self.tables, self.layout).to(self.weight_dtype)
        return w.t() if self.transposed else w

    def _dense_shape(self) -> tuple[int, int]:
        n, k = self.layout.out_features, self.layout.in_features
        return (k, n) if self.transposed else (n, k)

    def extra_repr(self) -> str:
        c = self.config
        gran = c.granularity + (f"({c.group_size})" if c.group_size else "")
        return f"{self.layout.in_features}, {self.layout.out_features}, bits={c.bits}, {gran}"


class CodebookLinear(PackedModule):
    """``y = x · Wᵀ + b`` with W as codebook indices and tables (for ``nn.Linear`` and transformers' ``Conv1D``).

    ``x``: (..., in_features), fp32, bf16 or fp16; the output has x's dtype.
    """

    def __init__(self, indices, tables, layout, config, weight_dtype, bias: nn.Parameter | None = None,
                 transposed: bool = False, compute: str = "fp32"):
        super().__init__(indices, tables, layout, config, weight_dtype, transposed)
        self.in_features, self.out_features = layout.in_features, layout.out_features
        if bias is not None and tuple(bias.shape) != (layout.out_features,):
            raise ValueError(f"CodebookLinear: bias\n  expected: shape ({layout.out_features},)\n  got: {tuple(bias.shape)}")
        self.bias = bias
        self.compute = compute
        self._plan = kernels.Plan()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (x, self.indices, self.tables, self.bias, self.in_features, self.layout.bits, self.compute)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
                x.requires_grad or (self.bias is not None and self.bias.requires_grad))):
            return kernels.linear(*args)  # the registered op: a graph node, with its backward
        return kernels.linear_eager(self._plan, *args)  # the same kernel, without the dispatcher's per-call cost

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bias={self.bias is not None}" + (", compute=bf16" if self.compute == "bf16" else "")


class CodebookEmbedding(PackedModule):
    """An embedding table as codebook indices and tables; a lookup decodes only the rows it returns."""

    def __init__(self, indices, tables, layout, config, weight_dtype, padding_idx: int | None = None):
        super().__init__(indices, tables, layout, config, weight_dtype)
        self.num_embeddings, self.embedding_dim = layout.out_features, layout.in_features
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = kernels.embedding(ids, self.indices, self.tables, self.embedding_dim, self.layout.bits)
        return out if self.weight_dtype == torch.float32 else out.to(self.weight_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


def set_compute(model: nn.Module, compute: str) -> nn.Module:
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
