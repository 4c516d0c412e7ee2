"""Hash: W[i,j] = s(i,j) · θ[h(i,j) mod K] — HashedNets (Chen et al., 2015).

Every virtual weight of a layer is one of K shared buckets θ, picked by a hash
of (layer seed, row i, column j), with a hashed sign s = ±1 so that collisions
do not all add up.  Nothing per virtual weight is stored: the index and sign are
recomputed from the seed on every forward and backward pass (in C for float32
on the CPU, ``_hash.c``), so a hashed layer costs θ plus the one weight matrix it
computes with.  ``dL/dθ_k = Σ s(i,j) dL/dW[i,j]`` over the weights hashed to k.

With ``unit="kernel"`` a conv weight's (output, input) channel pair draws a
whole kh x kw kernel from a bank of K kernels: sharing across channel pairs,
the convolution's own kernel sharing across positions kept.

Two index functions: ``"xxhash"`` (XXH32 of the pair (i, j) with the layer
seed; see ``_hash.c`` for the exact bits) and ``"modular"``, the index ``(w0 + i·j) mod K`` of the seed
article (w0 = the layer seed).  Conv weights hash row = output channel, column
= the flattened (in, kh, kw) position.

Packed entry: ``{"map": "hash", "shape", "dtype", "buckets", "hash", "sign",
"seed"}`` and the tensor ``<name>.__buckets`` (θ): the file holds θ and the seed.
"""

from __future__ import annotations

import ctypes
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from weightshare._progress import progress
from weightshare.errors import clip
from weightshare.space import Parametrization, SharingMap, dtype_name, register_map, unmeta_

__all__ = ["HashConfig", "hash_", "hash_index", "xxh32_pair"]

HASHES = ("xxhash", "modular")
SUPPORTED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
_MAX_SIDE = 1 << 31  # rows, columns and buckets are 32-bit words of the key and the index
_INDEX_CHUNK = 1 << 20  # rows of the portable path are hashed this many weights at a time


def _load_core() -> ctypes.CDLL:
    from weightshare import _hash_core  # built by setup.py from _hash.c

    lib = ctypes.CDLL(_hash_core.__file__)
    i64, u32, cint, ptr = ctypes.c_int64, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p
    lib.ws_xxh32_pair.restype = u32
    lib.ws_xxh32_pair.argtypes = [u32, u32, u32]
    lib.ws_hash_index.restype = None
    lib.ws_hash_index.argtypes = [i64, i64, i64, u32, cint, cint, i64, i64, ptr, ptr]
    lib.ws_hash_expand_f32.restype = None
    lib.ws_hash_expand_f32.argtypes = [ptr, i64, i64, i64, i64, i64, u32, cint, cint, ptr]
    lib.ws_hash_scatter_f32.restype = None
    lib.ws_hash_scatter_f32.argtypes = [ptr, i64, i64, i64, i64, u32, cint, cint, ptr]
    return lib


_core = _load_core()


def xxh32_pair(i: int, j: int, seed: int) -> int:
    """XXH32 of the 8 bytes (i, j) as two little-endian uint32, with ``seed``: the hash the index uses."""
    return _core.ws_xxh32_pair(i, j, seed)


@dataclass
class HashConfig:
    """Hash every selected weight into K buckets (HashedNets)."""

    compression: float | None = None  # stored / virtual weights, e.g. 1/8 (give this or buckets)
    buckets: int | None = None  # K per tensor, the same for every selected tensor
    hash: str = "xxhash"  # "xxhash" | "modular": (w0 + i*j) mod K
    sign: bool = True  # a hashed sign s(i,j) = ±1 per weight
    seed: int = 0  # with each tensor's name, gives the tensor's hash seed
    init: str = "sample"  # "sample": θ keeps the dense init's scale; "project": least squares fit of W
    unit: str = "weight"  # "weight": each weight hashed | "kernel": each conv kernel (kh x kw) drawn whole from a bank
    version: int = 1

    def __post_init__(self):
        if (self.compression is None) == (self.buckets is None):
            raise ValueError(f"HashConfig: give exactly one of compression and buckets\n"
                             f"  got: compression={self.compression!r}, buckets={self.buckets!r}")
        if self.compression is not None and (isinstance(self.compression, bool)
                                             or not isinstance(self.compression, (int, float))
                                             or not 0 < self.compression <= 1):
            raise ValueError(f"HashConfig.compression\n  expected: stored / virtual in (0, 1], e.g. 1/8\n"
                             f"  got: {self.compression!r}")
        if self.buckets is not None and (isinstance(self.buckets, bool) or not isinstance(self.buckets, int)
                                         or self.buckets < 1):
            raise ValueError(f"HashConfig.buckets\n  expected: a positive integer\n  got: {self.buckets!r}")
        if self.hash not in HASHES:
            raise ValueError(f"HashConfig.hash\n  expected one of: {HASHES}\n  got: {self.hash!r}")
        if not isinstance(self.sign, bool):
            raise ValueError(f"HashConfig.sign\n  expected: True or False\n  got: {self.sign!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 1 << 32:
            raise ValueError(f"HashConfig.seed\n  expected: an integer in [0, 2**32)\n  got: {self.seed!r}")
        if self.init not in ("sample", "project"):
            raise ValueError(f"HashConfig.init\n  expected: 'sample' or 'project'\n  got: {self.init!r}")
        if self.unit not in ("weight", "kernel"):
            raise ValueError(f"HashConfig.unit\n  expected: 'weight' or 'kernel'\n  got: {self.unit!r}")
        if self.version != 1 or isinstance(self.version, bool):
            raise ValueError(f"HashConfig.version\n  expected: 1\n  got: {self.version!r}")

    def buckets_for(self, numel: int, name: str, group: int = 1) -> int:
        """K: buckets of ``group`` values each (one value, or one kernel)."""
        k = self.buckets if self.buckets is not None else math.floor(numel * self.compression / group)
        if k * group >= _MAX_SIDE:
            raise ValueError(f"{name}: {k} buckets\n  expected: fewer than 2**31 values")
        if k < 1:
            raise ValueError(f"{name}: compression {self.compression} leaves no bucket for {numel} weights\n"
                             f"  expected: compression >= {group}/{numel}, or buckets=K")
        return k

    def group_for(self, weight: torch.Tensor) -> int:
        """Columns hashed as one unit: 1, or a conv kernel's kh*kw (a bank of kernels shared by channel pairs)."""
        return math.prod(weight.shape[2:]) if self.unit == "kernel" and weight.dim() > 2 else 1


def _layout(shape) -> tuple[int, int]:
    """(rows, columns) the hash sees: rows are the first dimension, columns the rest flattened."""
    rows = int(shape[0]) if len(shape) else 1
    return rows, math.prod(shape) // max(rows, 1)


def _index_rows(r0: int, r1: int, cols: int, buckets: int, seed: int, hash: str, sign: bool, group: int = 1):
    idx = np.empty((r1 - r0) * cols, np.int64)
    sgn = np.empty((r1 - r0) * cols, np.int8)
    _core.ws_hash_index(r0, r1, cols, seed, hash == "modular", sign, buckets, group, idx.ctypes.data, sgn.ctypes.data)
    return idx, sgn


def hash_index(shape, buckets: int, seed: int, hash: str = "xxhash", sign: bool = True, group: int = 1):
    """(index, sign) of every weight of a tensor of ``shape``: int64 and int8 arrays of that shape.

    For tests and reports; the layers never build them whole.
    """
    rows, cols = _layout(shape)
    idx, sgn = _index_rows(0, rows, cols, buckets, seed, hash, sign, group)
    return idx.reshape(shape), sgn.reshape(shape)


class _Expand(torch.autograd.Function):
    """W = s ⊙ θ[h] with h and s recomputed in both directions: nothing per weight is saved."""

    @staticmethod
    def forward(ctx, theta, p):
        ctx.p = p
        return p.expand(theta)

    @staticmethod
    def backward(ctx, grad):
        return ctx.p.scatter(grad), None


class _Hash(Parametrization):
    """Parametrization W = s(i,j) · θ[h(i,j)]; ``right_inverse`` turns a dense weight into θ."""

    def __init__(self, shape, buckets: int, seed: int, hash: str, sign: bool, init: str = "sample",
                 theta: torch.Tensor | None = None, group: int = 1):
        super().__init__(theta)  # θ from a packed file: installed as it is
        self.shape = tuple(shape)
        self.rows, self.cols = _layout(self.shape)
        self.buckets, self.seed, self.hash, self.sign, self.init = int(buckets), int(seed), hash, bool(sign), init
        self.group = int(group)  # θ holds buckets x group values

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return _Expand.apply(theta, self)

    def _fast(self, t: torch.Tensor) -> bool:
        return t.dtype == torch.float32 and t.device.type == "cpu"

    def _blocks(self, device, dtype):
        """(flat start, flat end, index, sign) for blocks of rows: the portable path's bounded temporaries."""
        step = max(1, _INDEX_CHUNK // max(self.cols, 1))
        for r0 in range(0, self.rows, step):
            r1 = min(self.rows, r0 + step)
            idx, sgn = _index_rows(r0, r1, self.cols, self.buckets, self.seed, self.hash, self.sign, self.group)
            yield (r0 * self.cols, r1 * self.cols, torch.from_numpy(idx).to(device),
                   torch.from_numpy(sgn).to(device, dtype))

    def expand(self, theta: torch.Tensor) -> torch.Tensor:
        theta = theta.contiguous()
        out = torch.empty(self.shape, dtype=theta.dtype, device=theta.device)
        if self._fast(theta):
            _core.ws_hash_expand_f32(theta.data_ptr(), self.buckets, self.group, 0, self.rows, self.cols, self.seed,
                                     self.hash == "modular", self.sign, out.data_ptr())
            return out
        flat = out.view(-1)
        for a, b, idx, sgn in self._blocks(theta.device, theta.dtype):
            flat[a:b] = theta[idx] * sgn
        return out

    def scatter(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        g = torch.zeros(self.buckets * self.group, dtype=grad.dtype, device=grad.device)
        if self._fast(grad):
            _core.ws_hash_scatter_f32(grad.data_ptr(), self.buckets, self.group, self.rows, self.cols, self.seed,
                                      self.hash == "modular", self.sign, g.data_ptr())
            return g
        flat = grad.reshape(-1)
        for a, b, idx, sgn in self._blocks(grad.device, grad.dtype):
            g.index_add_(0, idx, flat[a:b] * sgn)
        return g

    def initial(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().float()
        if self.init == "project":  # least squares: θ_k = mean of s·W over the weights hashed to k
            sums = self.scatter(w)
            counts = self.scatter_counts()
            theta = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
        else:  # a sample of the dense init keeps its scale (an average of many would shrink it)
            g = torch.Generator().manual_seed(self.seed)
            pick = torch.randint(0, w.numel(), (self.buckets * self.group,), generator=g)
            theta = w.reshape(-1)[pick]
        return theta.to(weight.dtype)

    def scatter_counts(self) -> torch.Tensor:
        counts = torch.zeros(self.buckets * self.group)
        for _, _, idx, _ in self._blocks("cpu", torch.float32):
            counts += torch.bincount(idx, minlength=self.buckets * self.group).float()
        return counts


def layer_seed(seed: int, name: str) -> int:
    """A tensor's hash seed: the config's seed mixed with the tensor's name, so layers hash differently."""
    return xxh32_pair(zlib.crc32(name.encode()), 0, seed)


def _check_weight(name: str, weight: torch.Tensor) -> None:
    rows, cols = _layout(weight.shape)
    if rows >= _MAX_SIDE or cols >= _MAX_SIDE:
        raise ValueError(f"{name}: too large to hash\n  expected: rows and columns below 2**31\n"
                         f"  got: {tuple(weight.shape)}")


def hash_(module: nn.Module, name: str = "weight", config: HashConfig | None = None, fqn: str | None = None,
          init: dict | None = None) -> nn.Module:
    """Replace ``module.<name>`` by a hashed parametrization and return ``module``.

    ``init`` (used by ``ws.load``): ``{"buckets", "group", "seed", "hash", "sign", "theta"}`` installed as they are.
    """
    weight = getattr(module, name)
    fqn = fqn or name
    if init is None:
        config = config or HashConfig(compression=1 / 8)
        _check_weight(fqn, weight)
        group = config.group_for(weight)
        param = _Hash(weight.shape, config.buckets_for(weight.numel(), fqn, group), layer_seed(config.seed, fqn),
                      config.hash, config.sign, config.init, group=group)
    else:
        unmeta_(module, name)
        param = _Hash(weight.shape, init["buckets"], init["seed"], init["hash"], init["sign"], theta=init["theta"],
                      group=init["group"])
    parametrize.register_parametrization(module, name, param, unsafe=True)
    return module


def hash_model_(model: nn.Module, config: HashConfig, filter_fn=None) -> nn.Module:
    """Hash the weight of every selected Linear / Conv / Embedding of ``model``, in place.

    Every tensor is checked (size, buckets) before any is changed.
    """
    chosen = []
    for fqn, module in model.named_modules():
        if not isinstance(module, SUPPORTED_MODULES) or parametrize.is_parametrized(module, "weight"):
            continue
        if filter_fn is not None and not filter_fn(module, fqn):
            continue
        name = f"{fqn}.weight" if fqn else "weight"
        _check_weight(name, module.weight)
        config.buckets_for(module.weight.numel(), name, config.group_for(module.weight))
        chosen.append((name, module))
    if not chosen:
        raise ValueError("hash: no Linear, Conv or Embedding weight selected\n  expected: at least one "
                         f"{'/'.join(c.__name__ for c in SUPPORTED_MODULES)} (check filter_fn)")
    for name, module in progress(chosen, desc=f"hash {config.hash}", unit="tensor"):
        hash_(module, "weight", config, fqn=name)
    return model


class HashMap(SharingMap):
    name = "hash"
    config = HashConfig
    parametrizations = (_Hash,)
    state_name = "buckets"  # θ, stored as <name>.__buckets: another map may take it over (a codebook clusters it)

    def apply(self, model, config, filter_fn) -> None:
        hash_model_(model, config, filter_fn)

    def pack(self, name, plist, put) -> dict:
        p, theta = plist[0], plist.original.detach()
        put(self.state_key(name), theta)  # a codebook over θ: the container writes its entry instead
        return {"shape": list(p.shape), "dtype": dtype_name(theta.dtype), "buckets": p.buckets, "group": p.group,
                "hash": p.hash, "sign": p.sign, "seed": p.seed}

    def check(self, name, entry, shape, dtype):
        if set(entry) != {"map", "shape", "dtype", "buckets", "group", "hash", "sign", "seed"}:
            raise ValueError(clip(f"hash entry keys\n  expected: buckets, group, hash, sign, seed\n"
                                  f"  got: {sorted(entry)}"))
        if dtype not in ("float16", "bfloat16", "float32", "float64"):
            raise ValueError(f"hash dtype\n  expected: a float dtype\n  got: {dtype!r}")
        k, seed = entry["buckets"], entry["seed"]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < _MAX_SIDE:
            raise ValueError(clip(f"buckets\n  expected: a positive integer\n  got: {k!r}"))
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 32:
            raise ValueError(clip(f"seed\n  expected: an integer in [0, 2**32)\n  got: {seed!r}"))
        if entry["hash"] not in HASHES or not isinstance(entry["sign"], bool):
            raise ValueError(clip(f"hash / sign\n  expected: one of {HASHES} / true or false\n"
                                  f"  got: {entry['hash']!r} / {entry['sign']!r}"))
        rows, cols = _layout(shape)
        if not shape or rows >= _MAX_SIDE or cols >= _MAX_SIDE:
            raise ValueError(f"shape {list(shape)}: rows and columns must be in [1, 2**31)")
        g = entry["group"]
        if (isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= max(cols, 1) or cols % g
                or k * g >= _MAX_SIDE):
            raise ValueError(clip(f"group\n  expected: a divisor of the {cols} columns\n  got: {g!r}"))
        return {self.state_key(name): ({dtype}, (k * g,))}

    def install(self, module, attr, name, entry, fetch) -> None:
        init = {"buckets": entry["buckets"], "group": entry["group"], "seed": entry["seed"], "hash": entry["hash"],
                "sign": entry["sign"], "theta": fetch(self.state_key(name))}
        hash_(module, attr, fqn=name, init=init)

    def decode(self, name, entry, fetch) -> torch.Tensor:
        p = _Hash(entry["shape"], entry["buckets"], entry["seed"], entry["hash"], entry["sign"], group=entry["group"])
        return p.expand(fetch(self.state_key(name)))

    def describe(self, plist, seen) -> dict:
        p, theta = plist[0], plist.original
        unit = "" if p.group == 1 else f" kernels of {p.group}"
        return {"detail": f"{p.hash} K={p.buckets}{unit}" + ("" if p.sign else " unsigned"), "shape": p.shape,
                "params_stored": theta.numel(), "bytes_dense": math.prod(p.shape) * theta.element_size(),
                "bytes_packed": theta.numel() * theta.element_size()}


register_map(HashMap())
