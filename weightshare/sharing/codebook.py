"""Codebook: W[i] = C_g[a[i]] — weight clustering / palettization.

Each group g of consecutive weights (the whole tensor, one output row, or
``group_size`` inputs of a row) has a table C_g of 2**bits centroids, found by
exact 1-D k-means; every weight stores only its index a[i] into its table.
The map is linear in the tables, so dL/dC_g[k] is the sum of dL/dW over the
weights assigned to k and the tables train with any optimizer.

Packed entry: ``{"map": "codebook", "shape", "dtype", "config": CodebookConfig,
"transposed"?: true, "outliers"?: count}`` with tensors ``<name>.__tables`` (groups, 2**bits) and
``<name>.__indices`` (the indices bit-packed at exactly ``bits`` bits each).  With
``outliers`` (dense-and-sparse), ``<name>.__outlier_index`` (int32/int64, strictly
increasing flat positions over the channel layout) and ``<name>.__outlier_values``
hold weights kept exact: they replace the table value at those positions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from weightshare import kernels
from weightshare._progress import progress
from weightshare.bitpack import pack_bits, packed_size, unpack_bits
from weightshare.errors import clip
from weightshare.hub import is_transposed_linear
from weightshare.kmeans import all_finite, kmeans1d, kmeans1d_rows
from weightshare.modules import CodebookEmbedding, CodebookLinear, Outliers
from weightshare.space import (
    MapState,
    Parametrization,
    SharingMap,
    config_from_dict,
    config_to_dict,
    dtype_name,
    map_of,
    map_state,
    register_map,
    share_parametrization_,
    unmeta_,
)

__all__ = ["CodebookConfig", "codebook_", "codebook_model_", "table_storage_dtype", "select", "warn_if_tables_dominate",
           "SUPPORTED_MODULES"]

log = logging.getLogger(__name__)

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
TRAIN_MODES = (None, "recluster", "dkm", "soft")  # weightshare/training/, one file each
TABLE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SUPPORTED_MODULES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DECODE_CHUNK = 1 << 18  # weights decoded per step at inference: bounds the int64 index temporary to 8 MB


def channel_layout(shape, transposed: bool) -> tuple[int, ...]:
    """The shape tables and labels are laid out in: rows are output channels (W^T for a transposed weight)."""
    return tuple(reversed(tuple(shape))) if transposed else tuple(shape)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass
class CodebookConfig:
    """Cluster weights into small per-group tables (palettization)."""

    bits: int = 4  # index width: each table has 2**bits centroids (1..8)
    granularity: str = "per_channel"  # per_tensor | per_channel (one table per output row) | per_group
    group_size: int | None = None  # per_group only: consecutive input weights of a row sharing one table
    table_dtype: str = "float16"  # tables are rounded to this dtype, so the packed file is exact
    version: int = 1  # bumped when the meaning of a field changes (stored in packed files)
    # training-time sharing (training/recluster.py); never stored: a packed model is frozen (ws.freeze_)
    train: str | None = field(default=None, metadata={"training": True})  # None | "recluster"
    recluster_every: int = field(default=100, metadata={"training": True})  # optimizer steps between re-clusterings
    recluster_until: int | None = field(default=None, metadata={"training": True})  # last step that re-clusters
    dkm_temperature: float = field(default=0.05, metadata={"training": True})  # DKM: of distances / group variance
    dkm_anneal: float = field(default=1.0, metadata={"training": True})  # DKM: temperature factor per step
    dkm_iters: int = field(default=3, metadata={"training": True})  # DKM: soft k-means iterations per forward
    soft_weight: float = field(default=1e-3, metadata={"training": True})  # soft sharing: its prior's loss weight

    def __post_init__(self):
        if not _is_int(self.bits) or not 1 <= self.bits <= 8:
            raise ValueError(f"CodebookConfig.bits must be an integer in 1..8\n  got: {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"CodebookConfig.granularity\n  expected one of: {GRANULARITIES}\n"
                             f"  got: {self.granularity!r}")
        if self.granularity == "per_group":
            if not _is_int(self.group_size) or self.group_size < 1:
                raise ValueError(
                    f"CodebookConfig.group_size must be a positive integer for per_group\n  got: {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"CodebookConfig.group_size is only used with granularity='per_group'\n"
                f"  got: group_size={self.group_size} with granularity={self.granularity!r}"
            )
        if self.table_dtype not in TABLE_DTYPES:
            raise ValueError(f"CodebookConfig.table_dtype\n  expected one of: {sorted(TABLE_DTYPES)}\n"
                             f"  got: {self.table_dtype!r}")
        if self.version != 1 or not _is_int(self.version):
            raise ValueError(f"CodebookConfig.version\n  expected: 1 (this release)\n  got: {self.version!r}")
        if self.train not in TRAIN_MODES:
            raise ValueError(f"CodebookConfig.train\n  expected one of: {TRAIN_MODES}\n  got: {self.train!r}")
        if not _is_int(self.recluster_every) or self.recluster_every < 1:
            raise ValueError("CodebookConfig.recluster_every\n  expected: a positive number of optimizer steps\n"
                             f"  got: {self.recluster_every!r}")
        if not (isinstance(self.dkm_temperature, (int, float)) and not isinstance(self.dkm_temperature, bool)
                and 0 < self.dkm_temperature < math.inf):
            raise ValueError("CodebookConfig.dkm_temperature\n  expected: a number > 0\n"
                             f"  got: {self.dkm_temperature!r}")
        if not (isinstance(self.dkm_anneal, (int, float)) and not isinstance(self.dkm_anneal, bool)
                and 0 < self.dkm_anneal <= 1):
            raise ValueError(f"CodebookConfig.dkm_anneal\n  expected: a factor in (0, 1]\n  got: {self.dkm_anneal!r}")
        if not (isinstance(self.soft_weight, (int, float)) and not isinstance(self.soft_weight, bool)
                and 0 < self.soft_weight < math.inf):
            raise ValueError(f"CodebookConfig.soft_weight\n  expected: a number > 0\n  got: {self.soft_weight!r}")
        if not _is_int(self.dkm_iters) or not 1 <= self.dkm_iters <= 100:
            raise ValueError(f"CodebookConfig.dkm_iters\n  expected: an integer in 1..100\n  got: {self.dkm_iters!r}")
        if self.recluster_until is not None and (not _is_int(self.recluster_until) or self.recluster_until < 0):
            raise ValueError("CodebookConfig.recluster_until\n  expected: a step number >= 0, or None (re-cluster "
                             f"for the whole run)\n  got: {self.recluster_until!r}")


def group_layout(shape: torch.Size | tuple, granularity: str, group_size: int | None,
                 name: str = "weight") -> tuple[int, int]:
    """(number of groups, weights per group); groups are contiguous runs of the row-major weight.

    Rows are the first dimension (output channels of Linear/Conv, tokens of Embedding).
    Python integers throughout: shapes may come from an untrusted file and must not overflow.
    """
    numel = math.prod(int(d) for d in shape)
    if granularity == "per_tensor":
        return 1, numel
    rows = int(shape[0]) if len(shape) else 1
    row_len = numel // max(rows, 1)
    if granularity == "per_channel":
        return rows, row_len
    if row_len % group_size:
        raise ValueError(f"{name}: group_size={group_size} does not divide its rows of {row_len} weights (shape "
                         f"{tuple(shape)}): choose a divisor of {row_len}, or give this tensor another granularity")
    return rows * (row_len // group_size), group_size


class CodebookParametrization(Parametrization):
    """Parametrization W = tables[g, labels[i]].

    ``right_inverse`` (run by ``register_parametrization``) clusters the dense
    weight, so the stored original is the (groups, 2**bits) table alone.  The
    labels live in the ``codes`` buffer: two to a byte when bits <= 4 (the
    packed file's own layout at 4 bits), one otherwise; ``labels`` unpacks them.
    With ``transposed`` (a weight stored (in, out)) tables and labels are laid
    out over W^T, so that rows are output channels as for ``nn.Linear``, and the
    module is handed a transposed view.
    """

    def __init__(self, shape, config: CodebookConfig, importance: torch.Tensor | None = None, init=None,
                 transposed: bool = False):
        super().__init__(None if init is None else init[0])  # tables from a packed file: no clustering
        self.shape = tuple(shape)  # as the module sees the weight
        self.transposed = bool(transposed)
        self.layout = channel_layout(self.shape, self.transposed)
        self.config = config
        self.n_groups, self.group_len = group_layout(self.layout, config.granularity, config.group_size)
        self.numel = self.n_groups * self.group_len
        self.nibbles = config.bits <= 4
        if init is not None and len(init) == 3:  # (tables, None, codes): codes in memory layout already
            codes = init[2]
        elif init is not None:
            codes = self._encode(init[1].reshape(-1))
        else:
            codes = torch.zeros((self.numel + 1) // 2 if self.nibbles else self.numel, dtype=torch.uint8, device="cpu")
        self.register_buffer("codes", codes)
        self._importance = importance
        self.outliers: Outliers | None = None

    def set_outliers(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the weights at flat ``index`` (over the layout, sorted) exact at ``values`` (frozen buffers)."""
        self.register_buffer("outlier_index", index.to(torch.int64).contiguous())
        self.register_buffer("outlier_values", values.detach().contiguous())
        self._outliers()

    def _outliers(self) -> Outliers | None:
        if "outlier_index" not in self._buffers:
            return None
        n = self.layout[0] if self.layout else 1
        o = self.outliers
        if o is None or o.index is not self.outlier_index or o.values is not self.outlier_values:
            o = self.outliers = Outliers(self.outlier_index, self.outlier_values, (n, self.numel // max(n, 1)))
        return o

    def _encode(self, labels: torch.Tensor) -> torch.Tensor:
        if not self.nibbles:
            return labels.contiguous()
        if labels.numel() % 2:
            labels = torch.cat([labels, labels.new_zeros(1)])
        pairs = labels.view(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)

    def _unpack(self, a: int, b: int) -> torch.Tensor:
        """Labels a..b-1 of the flat layout, as uint8."""
        if not self.nibbles:
            return self.codes[a:b]
        c = self.codes[a // 2 : (b + 1) // 2]
        out = torch.stack((c & 15, c >> 4), dim=-1).view(-1)
        return out[a % 2 : a % 2 + (b - a)]

    @property
    def labels(self) -> torch.Tensor:
        """Every weight's index into its table, shaped as the layout (uint8)."""
        return self._unpack(0, self.numel).view(self.layout)

    def forward(self, tables: torch.Tensor) -> torch.Tensor:
        o = self._outliers()
        if torch.is_grad_enabled() and tables.requires_grad:
            index = self.labels.view(self.n_groups, self.group_len).long()
            w = torch.gather(tables, 1, index).view(-1)
            if o is not None:  # out of place: the exact values carry no gradient to the tables
                w = w.index_put((o.index,), o.values.to(w.dtype))
            w = w.view(self.layout)
        else:
            w = self._decode(tables)
            if o is not None:
                w.view(-1)[o.index] = o.values.to(w.dtype)
        return w.t() if self.transposed else w

    def _decode(self, tables: torch.Tensor) -> torch.Tensor:
        """The same gather in bounded steps: at inference the int64 index never exists whole."""
        glen = self.group_len
        out = torch.empty(self.numel, dtype=tables.dtype, device=tables.device)
        if glen <= _DECODE_CHUNK:
            rows = max(1, _DECODE_CHUNK // max(glen, 1))
            for r in range(0, self.n_groups, rows):
                a, b = r * glen, min(self.n_groups, r + rows) * glen
                index = self._unpack(a, b).view(-1, glen).long()
                out[a:b] = torch.gather(tables[r : r + rows], 1, index).view(-1)
        else:  # one huge group (per_tensor): column chunks of it
            for g in range(self.n_groups):
                for c in range(0, glen, _DECODE_CHUNK):
                    a, b = g * glen + c, g * glen + min(glen, c + _DECODE_CHUNK)
                    out[a:b] = tables[g][self._unpack(a, b).long()]
        return out.view(self.layout)

    def initial(self, weight: torch.Tensor) -> torch.Tensor:
        k = 1 << self.config.bits
        w, imp = weight.detach(), self._importance
        if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):  # clustered as float32 values
            w = w.float()
        if self.transposed:
            w, imp = w.t(), None if imp is None else imp.t()
        w = w.reshape(self.n_groups, self.group_len)
        imp = None if imp is None else imp.reshape(self.n_groups, self.group_len)
        table_dtype = TABLE_DTYPES[self.config.table_dtype]
        if self.n_groups == 1 and table_dtype != torch.float32:
            # one big table: cluster the weights as the table dtype rounds them, which turns
            # millions of distinct fp32 values into a histogram of at most 65,536 bins
            centroids, labels = kmeans1d(w.float().to(table_dtype), k, weights=imp)
            centroids = np.concatenate([centroids, np.full(k - centroids.size, centroids[-1])])[None, :]
            labels = labels.reshape(1, -1)
        else:
            # rows go to float64 a span at a time inside: no float32 or float64 copy of the whole weight
            centroids, labels = kmeans1d_rows(w, k, weights=imp, label_dtype=np.uint8)
        tables = torch.from_numpy(centroids).to(table_dtype).to(weight.dtype)
        self.codes = self._encode(torch.from_numpy(labels.astype(np.uint8, copy=False)).reshape(-1))
        return tables


    def rows(self, tables: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``W[index]`` decoded for the requested rows only (an embedding lookup)."""
        row_len = self.numel // max(self.layout[0], 1)
        if not self.nibbles:
            labels = self.codes.view(-1, row_len)[index].long()  # (*, row_len)
        elif row_len % 2 == 0:  # whole bytes per row: gather the rows' bytes, then split them
            c = self.codes.view(-1, row_len // 2)[index]
            labels = torch.stack((c & 15, c >> 4), dim=-1).view(*index.shape, row_len).long()
        else:
            labels = self.labels[index].long()
        if self.config.granularity == "per_tensor":
            w = tables[0][labels]
        elif self.config.granularity == "per_channel":
            w = torch.gather(tables[index], -1, labels)
        else:
            per_row = self.layout[1] // self.config.group_size if len(self.layout) > 1 else 1
            t = tables.view(self.layout[0], per_row, -1)[index]  # (*, groups per row, 2**bits)
            w = torch.gather(t, -1, labels.view(*index.shape, per_row, self.config.group_size))
            w = w.view(*index.shape, -1)
        o = self._outliers()
        return w if o is None else o.lookup_(w, index)


class RowLookupEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose codebook (parametrized form) is looked up row by row at inference.

    Decoding a 30,000-token table to embed a batch of 32 sentences would cost
    more memory than the dense model; the rows a batch uses are a few hundred.
    Training (gradients on) and ``max_norm`` take the ordinary path, so the
    gradient semantics (``padding_idx``) are exactly ``nn.Embedding``'s.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if parametrize.is_parametrized(self, "weight") and self.max_norm is None:
            plist = self.parametrizations.weight
            p = plist[0]
            if len(plist) == 1 and isinstance(p, CodebookParametrization) and not p.transposed:
                if not torch.is_grad_enabled():
                    return p.rows(plist.original, input)
                if getattr(p, "trains_rows", False):  # training-time sharing that can compute rows alone (DKM)
                    out = p.rows(plist.original, input)
                    if self.padding_idx is None:
                        return out
                    return torch.where((input == self.padding_idx)[..., None], out.detach(), out)  # nn.Embedding's
        return super().forward(input)


def table_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tables of every codebook in ``model`` (a shared table once): what table fine-tuning trains."""
    seen, out = set(), []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for plist in module.parametrizations.values():
            # exact type: a re-clustering codebook's original is its latent weight, not tables
            if any(type(p) is CodebookParametrization for p in plist) and id(plist.original) not in seen:
                seen.add(id(plist.original))
                out.append(plist.original)
    return out


def _check_weight(name: str, weight: torch.Tensor, config: CodebookConfig, transposed: bool = False) -> None:
    if not all_finite(weight.detach().cpu()):
        raise ValueError(f"{name}: weight contains NaN or inf\n  expected: finite values\n  fix the checkpoint first")
    group_layout(channel_layout(weight.shape, transposed), config.granularity, config.group_size, name)


def codebook_(module: nn.Module, name: str = "weight", config: CodebookConfig | None = None,
             importance: torch.Tensor | None = None, init=None, fqn: str | None = None) -> nn.Module:
    """Replace ``module.<name>`` by a codebook parametrization and return ``module``.

    Args:
        config: bits, granularity and table dtype (default: 4-bit per_channel).
        importance: optional non-negative weight per element for data-aware
            clustering (minimise sum importance * (W - W_hat)**2).
        init: ``(tables, labels)`` to install as they are (used by ``ws.load``);
            the module's weight may then be on the meta device.
    """
    config = config or CodebookConfig()
    weight = getattr(module, name)
    transposed = name == "weight" and is_transposed_linear(module)
    if init is None:
        _check_weight(fqn or name, weight, config, transposed)
    else:
        unmeta_(module, name)
    if config.train is not None and init is None:
        if importance is not None:
            raise ValueError(f"{fqn or name}: train={config.train!r} clusters data-free (it takes no importance)")
        from weightshare.training.base import parametrization_for  # it imports this file: not at the top

        param = parametrization_for(config)(weight.shape, config, transposed=transposed)
    else:
        param = CodebookParametrization(weight.shape, config, importance=importance, init=init, transposed=transposed)
    if type(module) is nn.Embedding and name == "weight":  # exact class: subclasses may have their own forward
        module.__class__ = RowLookupEmbedding
    parametrize.register_parametrization(module, name, param, unsafe=True)
    return module


def select(model: nn.Module, filter_fn=None) -> list[tuple[str, nn.Module]]:
    """Modules whose ``weight`` a codebook applies to: Linear (and transformers' Conv1D), Embedding, Conv, not
    yet shared."""
    chosen = []
    for fqn, module in model.named_modules():
        supported = isinstance(module, SUPPORTED_MODULES) or is_transposed_linear(module)
        if not supported or parametrize.is_parametrized(module, "weight"):
            continue
        if filter_fn is not None and not filter_fn(module, fqn):
            continue
        chosen.append((fqn, module))
    return chosen


def warn_if_tables_dominate(shapes: list[tuple[tuple, bool]], config: CodebookConfig) -> None:
    """Warn when the tables cost more bits per weight than the indices (e.g. 4-bit groups of 32)."""
    weights = table_bits = 0
    for shape, transposed in shapes:
        groups, _ = group_layout(channel_layout(shape, transposed), config.granularity, config.group_size)
        weights += math.prod(shape)
        table_bits += groups * (1 << config.bits) * TABLE_DTYPES[config.table_dtype].itemsize * 8
    if not weights or table_bits <= weights * config.bits:
        return
    per_weight = table_bits / weights
    need = -(-(1 << config.bits) * TABLE_DTYPES[config.table_dtype].itemsize * 8 // config.bits)
    hint = (f"use --group-size {1 << max(need - 1, 0).bit_length()} or larger" if config.granularity == "per_group"
            else "use per_tensor, or fewer bits")
    log.warning("codebook %d-bit %s: the tables cost %.2f bits per weight on top of the %d-bit indices "
                "(%.2f bits per weight in all); %s", config.bits, config.granularity, per_weight, config.bits,
                per_weight + config.bits, hint)


def codebook_model_(model: nn.Module, config: CodebookConfig, filter_fn=None,
                    importance: dict[str, torch.Tensor] | None = None,
                    configs: dict[str, CodebookConfig] | None = None) -> nn.Module:
    """Codebooks for every selected Linear/Embedding/Conv weight of ``model``, in place.

    ``importance`` maps a weight's name (``"encoder.layer.0.output.dense.weight"``)
    to non-negative per-element weights for data-aware clustering; weights not in
    it are clustered data-free.  Every tensor is checked before any is clustered,
    so a bad tensor leaves the model untouched.  A weight tied across modules
    (an LM head and its embedding) is clustered once, with the first owner's
    importance, and the other owners share that codebook.  ``configs`` maps module names to
    their own config (mixed bits); a tied weight takes its first owner's.
    """
    importance = importance or {}
    configs = configs or {}
    states = _stackable_states(model, filter_fn)
    for name, state in states:  # checked with the plain weights, before anything changes
        original = state.plist.original
        if config.granularity == "per_channel" and original.dim() == 1:
            m = map_of(state.plist)
            raise ValueError(f"{name}: the shared space of its {m.name} map is a single row of {m.state_name}\n"
                             "  expected: granularity per_tensor or per_group")
        _check_weight(state.key, original, config)
    chosen = select(model, filter_fn)
    owners: dict[int, list[nn.Module]] = {}
    first: list[tuple[str, nn.Module]] = []
    for fqn, module in chosen:
        _check_weight(f"{fqn}.weight", module.weight, config, is_transposed_linear(module))
        imp = importance.get(f"{fqn}.weight")
        if imp is not None and tuple(imp.shape) != tuple(module.weight.shape):
            raise ValueError(f"{fqn}.weight: importance shape\n  expected: {tuple(module.weight.shape)}\n"
                             f"  got: {tuple(imp.shape)}")
        group = owners.setdefault(id(module.weight), [])
        if not group:
            first.append((fqn, module))
        group.append(module)
    _refuse_half_tied(model, owners, {id(m) for _, m in chosen}, dict((id(m), f) for f, m in first))
    warn_if_tables_dominate([(tuple(m.weight.shape), is_transposed_linear(m)) for _, m in first], config)
    for fqn, module in progress(first, desc=f"codebook {config.bits}-bit {config.granularity}", unit="tensor"):
        tied = owners[id(module.weight)][1:]
        codebook_(module, "weight", configs.get(fqn, config), importance=importance.get(f"{fqn}.weight"),
                 fqn=f"{fqn}.weight")
        for other in tied:
            share_parametrization_(module, other)
    for _, state in states:  # stacked: the codebook is over the other map's stored state
        codebook_(state.plist, "original", config, fqn=state.key)
    return model


def _refuse_half_tied(model: nn.Module, owners: dict, chosen: set[int], names: dict[int, str]) -> None:
    """A weight tied across modules is clustered in all of them or in none: clustering replaces the one
    tensor's contents with the tables, which a module left dense would then hold (a packed file that does not
    load)."""
    first = {id(group[0].weight): group[0] for group in owners.values()}
    for fqn, module in model.named_modules():
        w = module._parameters.get("weight")
        if w is not None and id(w) in first and id(module) not in chosen:
            other = names.get(id(first[id(w)]), "another layer")
            raise ValueError(f"{fqn}.weight is tied to {other}.weight, which is clustered\n  expected: all of its "
                             "owners clustered or all dense (list every one of them in a recipe's dense:)")


def _stackable_states(model: nn.Module, filter_fn=None) -> list[tuple[str, MapState]]:
    """(weight name, state) of the weights another map shares whose state that map lets another take over and
    is still a plain tensor, which a codebook compresses in turn (HashedNets' buckets: hash + codebook)."""
    out = []
    for fqn, module in model.named_modules():
        if "parametrizations" in fqn.split(".") or not parametrize.is_parametrized(module, "weight"):
            continue
        name = f"{fqn}.weight" if fqn else "weight"
        state = map_state(name, module.parametrizations["weight"])
        if state is None or state.stacked is not None:
            continue
        if filter_fn is not None and not filter_fn(module, fqn):
            continue
        out.append((name, state))
    return out


def table_storage_dtype(tables: torch.Tensor, config: CodebookConfig) -> torch.dtype:
    """The config's table dtype when it holds the tables exactly, else the tables' own dtype.

    Tables leave the config's grid when they are trained, or when the weight's own
    dtype is coarser (bf16 tables of a bf16 model need not be fp16 values).
    """
    dtype = TABLE_DTYPES[config.table_dtype]
    if not torch.equal(tables.to(dtype).to(tables.dtype), tables):
        return tables.dtype
    return dtype


_FLOATS = {"float16", "bfloat16", "float32"}


def _packed_kind(module: nn.Module, attr: str, transposed: bool) -> str | None:
    """Which packed module can stand for ``module.<attr>``: "linear", "embedding", or None (keep the parametrized
    form: other layers, subclasses with a forward of their own, an Embedding that renormalises rows)."""
    if attr != "weight":
        return None
    if transposed:
        return "linear" if is_transposed_linear(module) else None
    if type(module) is nn.Linear:
        return "linear"
    if type(module) in (nn.Embedding, RowLookupEmbedding) and module.max_norm is None:
        return "embedding"
    return None


def _table_storage(tables: torch.Tensor, config: CodebookConfig, weight_dtype: torch.dtype) -> torch.dtype:
    """The narrowest of (config's table dtype, the weight's dtype, fp32) that holds ``tables`` exactly."""
    for dtype in (TABLE_DTYPES[config.table_dtype], weight_dtype):
        if torch.equal(tables.to(dtype).to(tables.dtype), tables):
            return dtype
    return torch.float32


def outlier_index_dtype(numel: int) -> torch.dtype:
    """How a codebook's outlier positions are stored: int32 where every position fits."""
    return torch.int32 if numel <= 2**31 else torch.int64


def outlier_bytes(count: int, numel: int, config: CodebookConfig) -> int:
    """What ``count`` outliers of a ``numel``-weight codebook take in the file: a position and a table-dtype
    value each."""
    return count * (outlier_index_dtype(numel).itemsize + TABLE_DTYPES[config.table_dtype].itemsize)


def _outlier_tensors(name: str, index: torch.Tensor, values: torch.Tensor, numel: int, config: CodebookConfig,
                     put) -> int:
    """Write a codebook's outliers; the count for the entry."""
    put(f"{name}.__outlier_index", index.to(outlier_index_dtype(numel)).contiguous())
    put(f"{name}.__outlier_values", values.to(table_storage_dtype(values, config)).contiguous())
    return int(index.numel())


def _read_outliers(name: str, entry: dict, fetch, numel: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A file's outliers, validated (positions strictly increasing inside the weight, values finite)."""
    if not entry.get("outliers"):
        return None
    index, values = fetch(f"{name}.__outlier_index"), fetch(f"{name}.__outlier_values")
    Outliers.validate(name, index, values, numel)
    return index.to(torch.int64), values


def _outlier_bytes(outliers: Outliers | None, numel: int, config: CodebookConfig) -> int:
    if outliers is None:
        return 0
    values = table_storage_dtype(outliers.values, config).itemsize  # off the table grid: stored wider
    return outliers.index.numel() * (outlier_index_dtype(numel).itemsize + values)


class CodebookMap(SharingMap):
    name = "codebook"
    config = CodebookConfig
    parametrizations = (CodebookParametrization,)
    modules = (CodebookLinear, CodebookEmbedding)

    def build_module(self, owner, attr, name, entry, fetch):
        transposed = bool(entry.get("transposed"))
        kind = _packed_kind(owner, attr, transposed)
        if kind is None or len(entry["shape"]) != 2:
            return None
        config = config_from_dict(entry["config"])
        n, k = channel_layout(entry["shape"], transposed)
        groups, _ = group_layout((n, k), config.granularity, config.group_size, name)
        layout = kernels.Layout(n, k, config.bits, groups)
        indices = kernels.encode_stream(fetch(f"{name}.__indices").numpy(), config.bits, n, k)
        tables = kernels.pad_tables(fetch(f"{name}.__tables"), config.bits)
        dtype = getattr(torch, entry["dtype"])
        found = _read_outliers(name, entry, fetch, n * k)
        outliers = None if found is None else Outliers(found[0], found[1].float(), (n, k))
        if kind == "embedding":
            return CodebookEmbedding(indices, tables, layout, config, dtype, padding_idx=owner.padding_idx,
                                     outliers=outliers)
        return CodebookLinear(indices, tables, layout, config, dtype, bias=owner.bias, transposed=transposed,
                              outliers=outliers)

    def share_module(self, source, owner, attr):
        kind = _packed_kind(owner, attr, False)
        shape = (source.layout.out_features, source.layout.in_features)
        if kind is None or source.transposed or tuple(getattr(owner, attr).shape) != shape:
            return None
        args = (source.indices, source.tables, source.layout, source.config, source.weight_dtype)
        if kind == "embedding":
            return CodebookEmbedding(*args, padding_idx=owner.padding_idx, outliers=source.outliers)
        return CodebookLinear(*args, bias=owner.bias, outliers=source.outliers)

    def pack_module(self, name, module, put) -> dict:
        config, layout = module.config, module.layout
        tables = module.tables[:, : 1 << config.bits]  # 1-bit tables are padded to 4 entries in memory
        store = _table_storage(tables, config, module.weight_dtype)
        put(f"{name}.__tables", tables.to(store).contiguous())
        put(f"{name}.__indices", torch.from_numpy(pack_bits(kernels.labels_of(module.indices, layout), config.bits)))
        entry = {"shape": list(module._dense_shape()), "dtype": dtype_name(module.weight_dtype),
                 "config": config_to_dict(config)}
        if module.transposed:
            entry["transposed"] = True
        if module.outliers is not None:
            values = module.outliers.values.to(module.weight_dtype)
            entry["outliers"] = _outlier_tensors(name, module.outliers.index, values, layout.out_features
                                                 * layout.in_features, config, put)
        return entry

    def dense_module(self, module) -> nn.Module:
        w = module._decoded().to(module.weight_dtype)
        if isinstance(module, CodebookEmbedding):
            return nn.Embedding.from_pretrained(w, freeze=False, padding_idx=module.padding_idx)
        if module.transposed:  # only a transformers model has these
            from transformers.pytorch_utils import Conv1D

            plain = Conv1D(module.out_features, module.in_features)
            plain.weight = nn.Parameter(w.t().contiguous())
        else:
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight = nn.Parameter(w)
        plain.bias = module.bias
        return plain

    def describe_module(self, module) -> dict:
        config, layout = module.config, module.layout
        numel = layout.out_features * layout.in_features
        stored = layout.tables * (1 << config.bits)
        esize = _table_storage(module.tables[:, : 1 << config.bits], config, module.weight_dtype).itemsize
        detail = f"{config.bits}-bit {config.granularity}" + (f"({config.group_size})" if config.group_size else "")
        if module.outliers is not None:
            detail += f" + {module.outliers.index.numel()} outliers"
        return {"detail": detail + " (packed)", "shape": module._dense_shape(), "params_stored": stored,
                "bytes_dense": numel * module.weight_dtype.itemsize,
                "bytes_packed": (packed_size(numel, config.bits) + stored * esize
                                 + _outlier_bytes(module.outliers, numel, config))}

    def apply(self, model, config, filter_fn) -> None:
        codebook_model_(model, config, filter_fn)

    def pack(self, name, plist, put) -> dict:
        cb, tables = plist[0], plist.original.detach()
        store = table_storage_dtype(tables, cb.config)
        if store != TABLE_DTYPES[cb.config.table_dtype]:
            # trained tables: keeping them exact is the right thing and costs a few bytes a table,
            # nothing the user must act on (the report counts the wider tables)
            log.info("%s: tables moved off the %s grid (trained?): stored as %s to stay exact",
                     name, cb.config.table_dtype, dtype_name(store))
        put(f"{name}.__tables", tables.to(store).contiguous())
        # at 4 and 8 bits the codes the parametrization holds are the packed file's bit stream already
        bits = cb.config.bits
        indices = cb.codes if bits in (4, 8) else torch.from_numpy(pack_bits(cb.labels.numpy(), bits))
        put(f"{name}.__indices", indices)
        entry = {"shape": list(cb.shape), "dtype": dtype_name(tables.dtype), "config": config_to_dict(cb.config)}
        if cb.transposed:  # labels and tables over W^T (transformers' Conv1D); makes the file version 2
            entry["transposed"] = True
        o = cb._outliers()
        if o is not None:
            entry["outliers"] = _outlier_tensors(name, o.index, o.values.to(tables.dtype), cb.numel, cb.config, put)
        return entry

    def check(self, name, entry, shape, dtype):
        extra = set(entry) - {"map", "shape", "dtype", "config", "transposed", "outliers"}
        if extra or "config" not in entry:
            raise ValueError(clip(f"codebook entry keys\n  expected: config, optional transposed, outliers\n"
                                  f"  got: {sorted(entry)}"))
        if dtype not in _FLOATS:
            raise ValueError(f"codebook dtype\n  expected one of: {sorted(_FLOATS)}\n  got: {dtype!r}")
        transposed = entry.get("transposed", False)
        if transposed is not True and transposed is not False or (transposed and len(shape) != 2):
            raise ValueError(clip(f"bad 'transposed'\n  expected: true (2-D weights only) or absent\n"
                                  f"  got: {transposed!r} for shape {list(shape)}"))
        if not shape:
            raise ValueError("codebook of a 0-d tensor\n  expected: a weight with at least one dimension")
        config = config_from_dict(entry["config"])
        if not isinstance(config, CodebookConfig):
            raise ValueError(f"codebook config\n  expected: CodebookConfig\n  got: {type(config).__name__}")
        groups, _ = group_layout(channel_layout(shape, transposed), config.granularity, config.group_size, name)
        numel = math.prod(shape)
        needs = {f"{name}.__tables": (_FLOATS, (groups, 1 << config.bits)),
                 f"{name}.__indices": ({"uint8"}, (packed_size(numel, config.bits),))}
        if "outliers" in entry:
            count = entry["outliers"]
            if not _is_int(count) or not 1 <= count <= numel:
                raise ValueError(clip(f"{name}: bad 'outliers'\n  expected: a count of weights in 1..{numel}\n"
                                      f"  got: {count!r}"))
            needs[f"{name}.__outlier_index"] = ({"int32", "int64"}, (count,))
            needs[f"{name}.__outlier_values"] = (_FLOATS, (count,))
        return needs

    def fits(self, module, attr, entry):
        transposed = bool(entry.get("transposed"))
        if transposed != (attr == "weight" and is_transposed_linear(module)):
            layout = "over W^T" if transposed else "over W"
            return f"the file lays its codebook out {layout}, which does not fit the model's {type(module).__name__}"
        return None

    def _parts(self, name, entry, fetch):
        config = config_from_dict(entry["config"])
        layout = channel_layout(entry["shape"], bool(entry.get("transposed")))
        labels = unpack_bits(fetch(f"{name}.__indices").numpy(), config.bits, math.prod(layout))
        return config, fetch(f"{name}.__tables"), torch.from_numpy(labels).view(layout)

    def install(self, module, attr, name, entry, fetch) -> None:
        config = config_from_dict(entry["config"])
        if config.bits == 4:  # the file's bit stream is the in-memory nibble layout: no unpacking at all
            init = (fetch(f"{name}.__tables"), None, fetch(f"{name}.__indices"))
        else:
            _, tables, labels = self._parts(name, entry, fetch)
            init = (tables, labels)
        outliers = _read_outliers(name, entry, fetch, math.prod(entry["shape"]))
        codebook_(module, attr, config, init=init, fqn=name)
        if outliers is not None:
            getattr(module.parametrizations, attr)[0].set_outliers(outliers[0], outliers[1].to(init[0].dtype))

    def decode(self, name, entry, fetch) -> torch.Tensor:
        config, tables, labels = self._parts(name, entry, fetch)
        groups, glen = group_layout(labels.shape, config.granularity, config.group_size)
        w = torch.gather(tables.float(), 1, labels.view(groups, glen).long()).view(labels.shape)
        outliers = _read_outliers(name, entry, fetch, w.numel())
        if outliers is not None:
            w.view(-1)[outliers[0]] = outliers[1].float()
        if entry.get("transposed"):
            w = w.t().contiguous()
        return w.to(getattr(torch, entry["dtype"]))

    def describe(self, plist, seen) -> dict:
        cb, tables = plist[0], plist.original
        numel = math.prod(cb.shape)
        esize = table_storage_dtype(tables.detach(), cb.config).itemsize
        detail = (f"{cb.config.bits}-bit {cb.config.granularity}"
                  + (f"({cb.config.group_size})" if cb.config.group_size else ""))
        o = cb._outliers()
        if o is not None:
            detail += f" + {o.index.numel()} outliers"
        return {"detail": detail, "shape": cb.shape, "params_stored": tables.numel(),
                "bytes_dense": numel * tables.element_size(),
                "bytes_packed": (packed_size(numel, cb.config.bits) + tables.numel() * esize
                                 + _outlier_bytes(o, numel, cb.config))}


register_map(CodebookMap())
