"""Counting shared models: virtual vs stored parameters, sharing ratio, bytes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from torch import nn
from torch.nn.utils import parametrize

from weightshare._table import table  # noqa: F401 - the one table helper, public here

__all__ = ["Report", "LayerReport", "report", "report_file", "table"]


@dataclass
class LayerReport:
    name: str  # tensor name as in the dense state_dict
    shape: tuple
    map: str  # dense | tie | a registered sharing map (codebook, ...)
    detail: str  # e.g. "4-bit per_channel"
    params_virtual: int  # weights the model computes with (each use of a tied tensor counts)
    params_stored: int  # floats actually stored (a tied tensor once; a codebook its tables)
    bytes_dense: int
    bytes_packed: int


@dataclass
class Report:
    params_virtual: int
    params_stored: int
    sharing_ratio: float  # params_virtual / params_stored
    bytes_dense: int  # every virtual parameter and persistent buffer at its dense dtype
    bytes_packed: int  # the same model in the packed format (indices at `bits` bits, tables, untouched tensors)
    bits_per_weight: float  # packed bits per virtual weight of the mapped (codebook, ...) tensors (dense bits if none)
    layers: list[LayerReport] = field(default_factory=list)
    # what the model holds now: every distinct tensor storage (packed modules' indices and tables too);
    # None where no model was built (report_file)
    bytes_in_memory: int | None = None

    def to_dict(self, layers: bool = True) -> dict:
        d = asdict(self)
        if not layers:
            d.pop("layers")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        lines = [
            f"params virtual   {self.params_virtual:>14,}",
            f"params stored    {self.params_stored:>14,}",
            f"sharing ratio    {self.sharing_ratio:>14.2f}x",
            f"bytes dense      {_size(self.bytes_dense)}",
            f"bytes packed     {_size(self.bytes_packed)}  "
            f"({self.bytes_dense / max(self.bytes_packed, 1):.2f}x smaller)",
            f"bits per weight  {self.bits_per_weight:>14.3f}",
        ]
        if self.bytes_in_memory is not None:
            lines.append(f"bytes in memory  {_size(self.bytes_in_memory)}  (what the loaded model holds)")
        if self.layers:
            w = max(len(layer.name) for layer in self.layers)
            lines.append("")
            lines.append(f"{'tensor':<{w}}  {'shape':<14} {'map':<9} {'detail':<20} "
                         f"{'virtual':>11} {'stored':>11} {'packed kB':>10}")
            for r in self.layers:
                shape = "x".join(map(str, r.shape))
                lines.append(
                    f"{r.name:<{w}}  {shape:<14} {r.map:<9} {r.detail:<20} {r.params_virtual:>11,} "
                    f"{r.params_stored:>11,} {r.bytes_packed / 1e3:>10.1f}"
                )
        return "\n".join(lines)


def _size(n: int) -> str:
    """Bytes in the unit that shows them (decimal, as the sizes --target-size takes): 11 characters and the unit."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:>11.2f} {unit}"
    return f"{n:>11,} B"


def report(model: nn.Module) -> Report:
    """Count a model as it computes (virtual) and as it is stored, with a per-tensor table."""
    from weightshare.hub import inner_model
    from weightshare.space import get_map, map_of, map_state, module_map
    from weightshare.training.base import TrainingCodebook

    model = inner_model(model)
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    seen: set[int] = set()
    layers: list[LayerReport] = []
    shared_weights = shared_bytes = 0
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if "parametrizations" in mod_name.split("."):
            continue
        prefix = mod_name + "." if mod_name else ""
        packed_map = module_map(module)
        if packed_map is not None:  # a packed module (CodebookLinear): its weight is the map's state
            d = packed_map.describe_module(module)
            key = id(module.indices)  # a tied LM head shares its embedding's indices: counted once
            first = key not in seen
            seen.add(key)
            numel = _prod(d["shape"])
            packed = d["bytes_packed"] if first else 0
            shared_weights += numel
            shared_bytes += packed
            layers.append(LayerReport(prefix + "weight", tuple(d["shape"]), packed_map.name, d["detail"], numel,
                                      d["params_stored"] if first else 0, d["bytes_dense"], packed))
        if parametrize.is_parametrized(module):
            for tname, plist in module.parametrizations.items():
                m = map_of(plist)
                if m is None and isinstance(plist[0], TrainingCodebook):  # a codebook until ws.freeze_
                    m, d = get_map("codebook"), plist[0].describe(plist.original)
                elif m is None:
                    continue
                else:
                    d = m.describe(plist, seen)
                state = map_state(prefix + tname, plist)
                if state is not None and state.stacked is not None:  # another map stores this one's state
                    inner = state.stacked
                    inner_map = map_of(inner)
                    d2 = inner_map.describe(inner, seen) if inner_map is not None else d
                    d = {**d, "params_stored": d2["params_stored"], "bytes_packed": d2["bytes_packed"],
                         "detail": f"{d['detail']} + {inner_map.name if inner_map else '?'} {d2['detail']}"}
                key = id(plist)  # one parametrization object per shared weight (never a computed tensor's id)
                first = key not in seen  # a parametrization shared by two modules counts once
                seen.add(key)
                numel = _prod(d["shape"])
                packed = d["bytes_packed"] if first else 0
                shared_weights += numel
                shared_bytes += packed
                layers.append(LayerReport(prefix + tname, tuple(d["shape"]), m.name, d["detail"], numel,
                                          d["params_stored"] if first else 0, d["bytes_dense"], packed))
        for pname, p in module._parameters.items():
            if p is None:
                continue
            first = id(p) not in seen
            seen.add(id(p))
            tied = uses.get(id(p), 1) > 1
            layers.append(LayerReport(prefix + pname, tuple(p.shape), "tie" if tied else "dense",
                                      f"shared x{uses[id(p)]}" if tied else "", p.numel(), p.numel() if first else 0,
                                      p.numel() * p.element_size(), p.numel() * p.element_size() if first else 0))
    buffer_bytes = sum(
        b.numel() * b.element_size()
        for m_name, m in model.named_modules()
        if "parametrizations" not in m_name.split(".")
        for n, b in m._buffers.items()
        if b is not None and n not in m._non_persistent_buffers_set
    )
    virtual = sum(r.params_virtual for r in layers)
    stored = sum(r.params_stored for r in layers)
    bytes_dense = sum(r.bytes_dense for r in layers) + buffer_bytes
    bytes_packed = sum(r.bytes_packed for r in layers) + buffer_bytes
    if shared_weights:
        bpw = 8 * shared_bytes / shared_weights
    else:
        bpw = 8 * sum(r.bytes_dense for r in layers) / max(virtual, 1)
    return Report(virtual, stored, virtual / max(stored, 1), bytes_dense, bytes_packed, bpw, layers, bytes_held(model))


def report_file(path) -> Report:
    """The report of a packed directory from its file alone: no model is built, so no ``config.json`` is needed
    (``weightshare inspect`` on a plain ``nn.Module``'s packed file, or one without its config).

    Counts as ``report`` does, per stored entry: a tensor's virtual parameters are its shape's, an alias (a
    tied LM head) adds uses but stores nothing; a map's stored parameters are the floats of its own tensors
    (tables; a stacked map's too), its packed bytes every byte of them (indices, tables, outliers).  Unlike
    ``report``, persistent buffers count as dense tensors (the file does not tell them apart), and
    ``bytes_in_memory`` is None (no model is built).
    """
    from weightshare.io import DTYPES
    from weightshare.pack import PackedFile

    with PackedFile(path) as pf:
        def nbytes(key: str) -> int:
            dtype, shape = pf.infos[key]
            return _prod(shape) * DTYPES[dtype].itemsize

        def floats(key: str) -> int:
            dtype, shape = pf.infos[key]
            return _prod(shape) if DTYPES[dtype].is_floating_point else 0

        layers, shared_weights, shared_bytes = [], 0, 0
        for name, entry in pf.entries.items():
            target = pf.entries[entry["of"]] if entry["map"] == "alias" else entry
            shape, size = tuple(target["shape"]), DTYPES[target["dtype"]].itemsize
            numel = _prod(shape)
            if entry["map"] == "dense":
                layers.append(LayerReport(name, shape, "dense", "", numel, numel, numel * size, nbytes(name)))
                continue
            keys = pf.keys_of.get(name, set())
            stored, packed = sum(floats(k) for k in keys), sum(nbytes(k) for k in keys)
            if entry["map"] == "alias":
                detail, kind = f"tied to {entry['of']}", pf.entries[entry["of"]]["map"]
            else:
                detail, kind = _config_detail(entry.get("config") or {}), entry["map"]
            if kind != "dense":
                shared_weights += numel
                shared_bytes += packed
            layers.append(LayerReport(name, shape, kind, detail, numel, stored, numel * size, packed))
    virtual, stored = sum(r.params_virtual for r in layers), sum(r.params_stored for r in layers)
    bytes_dense = sum(r.bytes_dense for r in layers)
    bpw = 8 * shared_bytes / shared_weights if shared_weights else 8 * bytes_dense / max(virtual, 1)
    return Report(virtual, stored, virtual / max(stored, 1), bytes_dense, sum(r.bytes_packed for r in layers), bpw,
                  layers, None)


def _config_detail(config: dict) -> str:
    """A map's config in the report's words: "4-bit per_channel", "4-bit per_group(64)", else its fields."""
    if "bits" in config and "granularity" in config:
        group = f"({config['group_size']})" if config.get("group_size") else ""
        return f"{config['bits']}-bit {config['granularity']}{group}"
    return " ".join(f"{k}={v}" for k, v in config.items() if k not in ("type", "version") and v is not None)


def bytes_held(model: nn.Module) -> int:
    """Bytes of every distinct tensor storage the model holds: parameters, buffers (persistent or not),
    parametrization state and packed modules' indices and tables, each storage counted once; tensor
    subclasses (torchao's, quanto's quantized weights) through the plain tensors inside them."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    from weightshare.space import module_map

    storages: dict[int, int] = {}

    def add(t) -> None:
        if t is None or t.is_meta:
            return
        if is_traceable_wrapper_subclass(t):
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        st = t.untyped_storage()
        storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())

    for module in model.modules():
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            add(t)
        if module_map(module) is not None:
            add(module.indices)
            add(module.tables)
    return sum(storages.values())


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
