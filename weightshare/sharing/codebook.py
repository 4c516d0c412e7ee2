"""Codebook: W[i] = C_g[a[i]] — weight clustering / palettization.

Each group g of consecutive weights (the whole tensor, one output row, or
``group_size`` inputs of a row) has a table C_g of 2**bits centroids, found by
exact 1-D k-means; every weight stores only its index a[i] into its table.
The map is linear in the tables, so dL/dC_g[k] is the sum of dL/dW over the
weights assigned to k and the tables train with any optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from weightshare._progress import progress
from weightshare.kmeans import kmeans1d, kmeans1d_rows
from weightshare.space import register_sharing

__all__ = ["CodebookConfig", "codebook", "codebook_model_", "tie_codebook", "SUPPORTED_MODULES"]

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
TABLE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SUPPORTED_MODULES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and kin): a linear layer whose weight is stored (in, out).

    Recognised by name, so that ``import weightshare`` does not import transformers.
    """
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def channel_layout(shape, transposed: bool) -> tuple[int, ...]:
    """The shape tables and labels are laid out in: rows are output channels (W^T for a transposed weight)."""
    return tuple(reversed(tuple(shape))) if transposed else tuple(shape)


@dataclass
class CodebookConfig:
    """Cluster weights into small per-group tables (palettization)."""

    bits: int = 4  # index width: each table has 2**bits centroids (1..8)
    granularity: str = "per_channel"  # per_tensor | per_channel (one table per output row) | per_group
    group_size: int | None = None  # per_group only: consecutive input weights of a row sharing one table
    table_dtype: str = "float16"  # tables are rounded to this dtype, so the packed file is exact
    version: int = 1  # bumped when the meaning of a field changes (stored in packed files)

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)) or not 1 <= self.bits <= 8:
            raise ValueError(f"CodebookConfig.bits must be an integer in 1..8\n  got: {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"CodebookConfig.granularity\n  expected one of: {GRANULARITIES}\n  got: {self.granularity!r}")
        if self.granularity == "per_group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1:
                raise ValueError(
                    f"CodebookConfig.group_size must be a positive integer for per_group\n  got: {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"CodebookConfig.group_size is only used with granularity='per_group'\n"
                f"  got: group_size={self.group_size} with granularity={self.granularity!r}"
            )
        if self.table_dtype not in TABLE_DTYPES:
            raise ValueError(f"CodebookConfig.table_dtype\n  expected one of: {sorted(TABLE_DTYPES)}\n  got: {self.table_dtype!r}")


def group_layout(shape: torch.Size | tuple, granularity: str, group_size: int | None, name: str = "weight") -> tuple[int, int]:
    """(number of groups, weights per group); groups are contiguous runs of the row-major weight.

    Rows are the first dimension (output channels of Linear/Conv, tokens of Embedding).
    """
    numel = int(np.prod(shape))
    if granularity == "per_tensor":
        return 1, numel
    rows, row_len = shape[0], numel // max(shape[0], 1)
    if granularity == "per_channel":
        return rows, row_len
    if row_len % group_size:
        raise ValueError(
            f"{name}: group_size must divide the row length\n"
            f"  expected: a divisor of {row_len} (shape {tuple(shape)})\n  got: group_size={group_size}\n"
            "  choose another group_size or exclude this tensor with filter_fn"
        )
    return rows * (row_len // group_size), group_size


class _Codebook(nn.Module):
    """Parametrization W = tables[g, labels[i]] with ``labels`` a uint8 buffer.

    ``right_inverse`` (run by ``register_parametrization``) clusters the dense
    weight, so the stored original is the (groups, 2**bits) table alone.
    With ``transposed`` (a weight stored (in, out)) tables and labels are laid
    out over W^T, so that rows are output channels as for ``nn.Linear``, and the
    module is handed a transposed view.
    """

    def __init__(self, shape, config: CodebookConfig, importance: torch.Tensor | None = None, init=None,
                 transposed: bool = False):
        super().__init__()
        self.shape = tuple(shape)  # as the module sees the weight
        self.transposed = bool(transposed)
        self.layout = channel_layout(self.shape, self.transposed)
        self.config = config
        self.n_groups, self.group_len = group_layout(self.layout, config.granularity, config.group_size)
        self.register_buffer("labels", torch.zeros(self.layout, dtype=torch.uint8))
        self._importance = importance
        self._init = init  # (tables, labels) from a packed file: skip clustering

    def forward(self, tables: torch.Tensor) -> torch.Tensor:
        index = self.labels.view(self.n_groups, self.group_len).long()
        w = torch.gather(tables, 1, index).view(self.layout)
        return w.t() if self.transposed else w

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # the tables are a parameter of the weight's own dtype: parametrize requires it,
        # and a half-precision model must keep computing in half precision
        if self._init is not None:
            tables, labels = self._init
            self._init = None
            self.labels.copy_(labels)
            return tables.to(weight.dtype)
        k = 1 << self.config.bits
        w, imp = weight.detach().float(), self._importance
        if self.transposed:
            w, imp = w.t(), None if imp is None else imp.t()
        w = w.reshape(self.n_groups, self.group_len)
        imp = None if imp is None else imp.reshape(self.n_groups, self.group_len)
        table_dtype = TABLE_DTYPES[self.config.table_dtype]
        if self.n_groups == 1 and table_dtype != torch.float32:
            # one big table: cluster the weights as the table dtype rounds them, which turns
            # millions of distinct fp32 values into a histogram of at most 65,536 bins
            centroids, labels = kmeans1d(w.to(table_dtype), k, weights=imp)
            centroids = np.concatenate([centroids, np.full(k - centroids.size, centroids[-1])])[None, :]
            labels = labels.reshape(1, -1)
        else:
            centroids, labels = kmeans1d_rows(w, k, weights=imp)
        tables = torch.from_numpy(centroids).to(table_dtype).to(weight.dtype)
        self.labels.copy_(torch.from_numpy(labels.astype(np.uint8)).view(self.layout))
        return tables


def _all_finite(t: torch.Tensor) -> bool:
    # numpy's isfinite is ~10x faster than torch's on CPU; bf16 has no numpy dtype
    t = t.detach().cpu()
    return bool(np.isfinite((t.float() if t.dtype == torch.bfloat16 else t).numpy()).all())


def _check_weight(name: str, weight: torch.Tensor, config: CodebookConfig, transposed: bool = False) -> None:
    if not _all_finite(weight):
        raise ValueError(f"{name}: weight contains NaN or inf\n  expected: finite values\n  fix the checkpoint first")
    group_layout(channel_layout(weight.shape, transposed), config.granularity, config.group_size, name)


def codebook(module: nn.Module, name: str = "weight", config: CodebookConfig | None = None,
             importance: torch.Tensor | None = None, init=None, fqn: str | None = None) -> nn.Module:
    """Replace ``module.<name>`` by a codebook parametrization and return ``module``.

    Args:
        config: bits, granularity and table dtype (default: 4-bit per_channel).
        importance: optional non-negative weight per element for data-aware
            clustering (minimise sum importance * (W - W_hat)**2).
        init: ``(tables, labels)`` to install as they are (used by ``ws.load``).
    """
    config = config or CodebookConfig()
    weight = getattr(module, name)
    transposed = name == "weight" and is_transposed_linear(module)
    _check_weight(fqn or name, weight, config, transposed)
    param = _Codebook(weight.shape, config, importance=importance, init=init, transposed=transposed)
    parametrize.register_parametrization(module, name, param, unsafe=True)
    return module


def tie_codebook(source: nn.Module, target: nn.Module, name: str = "weight") -> nn.Module:
    """Make ``target.<name>`` use the codebook of ``source.<name>``: one table, one set of labels.

    For weights that were one tensor before clustering (an LM head tied to its
    embedding): the tables stay a single parameter, so they are stored once and
    both uses' gradients add up in them, as they did in the tied dense weight.
    """
    plist = source.parametrizations[name]
    cb = plist[0]
    cb._init = (plist.original.detach(), cb.labels.clone())  # install as is: no second clustering
    parametrize.register_parametrization(target, name, cb, unsafe=True)
    target.parametrizations[name].original = plist.original
    return target


def select(model: nn.Module, filter_fn=None) -> list[tuple[str, nn.Module]]:
    """Modules whose ``weight`` a codebook applies to: Linear (and transformers' Conv1D), Embedding, Conv, not yet shared."""
    chosen = []
    for fqn, module in model.named_modules():
        supported = isinstance(module, SUPPORTED_MODULES) or is_transposed_linear(module)
        if not supported or parametrize.is_parametrized(module, "weight"):
            continue
        if filter_fn is not None and not filter_fn(module, fqn):
            continue
        chosen.append((fqn, module))
    return chosen


def codebook_model_(model: nn.Module, config: CodebookConfig, filter_fn=None,
                    importance: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Codebooks for every selected Linear/Embedding/Conv weight of ``model``, in place.

    ``importance`` maps a weight's name (``"encoder.layer.0.output.dense.weight"``)
    to non-negative per-element weights for data-aware clustering; weights not in
    it are clustered data-free.  Every tensor is checked before any is clustered,
    so a bad tensor leaves the model untouched.  A weight tied across modules
    (an LM head and its embedding) is clustered once, with the first owner's
    importance, and the other owners share that codebook.
    """
    importance = importance or {}
    chosen = select(model, filter_fn)
    owners: dict[int, list[nn.Module]] = {}
    first: list[tuple[str, nn.Module]] = []
    for fqn, module in chosen:
        _check_weight(f"{fqn}.weight", module.weight, config, is_transposed_linear(module))
        imp = importance.get(f"{fqn}.weight")
        if imp is not None and tuple(imp.shape) != tuple(module.weight.shape):
            raise ValueError(f"{fqn}.weight: importance shape\n  expected: {tuple(module.weight.shape)}\n  got: {tuple(imp.shape)}")
        group = owners.setdefault(id(module.weight), [])
        if not group:
            first.append((fqn, module))
        group.append(module)
    for fqn, module in progress(first, desc=f"codebook {config.bits}-bit {config.granularity}", unit="tensor"):
        tied = owners[id(module.weight)][1:]
        codebook(module, "weight", config, importance=importance.get(f"{fqn}.weight"), fqn=f"{fqn}.weight")
        for other in tied:
            tie_codebook(module, other)
    return model


@register_sharing(CodebookConfig)
def _apply(model: nn.Module, config: CodebookConfig, filter_fn) -> None:
    codebook_model_(model, config, filter_fn)
