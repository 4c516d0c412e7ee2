"""Shared parameter spaces: the registry of sharing maps, ``share_`` and ``materialize_``.

Every sharing map turns a small shared space θ into the weights a model uses
(see DESIGN.md section 1).  A map is one file in ``weightshare/sharing/`` that
defines a ``SharingMap`` subclass and registers one instance of it: how the map
applies to a model, and how its state becomes tensors plus a JSON entry of the
packed format and comes back.  ``pack.py`` and ``report.py`` ask this registry
and know no map by name, so adding a map edits nothing else.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from weightshare.errors import clip

__all__ = ["Parametrization", "SharingMap", "MapState", "register_map", "unregister_map", "get_map", "map_of",
           "map_state", "module_map", "share_", "materialize_", "config_from_dict", "config_to_dict", "dtype_name",
           "match_names", "share_parametrization_", "shared_parameter", "tied_groups", "unmeta_"]

FilterFn = Callable[[nn.Module, str], bool]
Put = Callable[[str, torch.Tensor], str]  # store a tensor under a key; returns the key it is stored under
Fetch = Callable[[str], torch.Tensor]  # read a stored tensor (checked); the same key gives the same tensor


class SharingMap:
    """One kind of sharing.  Subclass it in ``sharing/<name>.py`` and ``register_map`` an instance.

    Maps that install parametrizations (``torch.nn.utils.parametrize``) also
    implement the packed-format methods; a map that only makes tensors one and
    the same object (tie) needs none of them: the container stores aliases itself.

    A packed entry is a JSON object ``{"map": name, "shape": [...], "dtype": "float32", ...}``:
    ``shape`` and ``dtype`` are the weight the module sees, checked by the container;
    the other keys belong to the map, which checks them in ``check``.

    Maps stack: a map that declares ``state_name`` lets another map take over its
    parametrization's original (a codebook over hashed buckets).  It writes, claims and
    reads that state under ``state_key(name)`` (``put``, ``check``, ``fetch``) as any
    tensor of its own; where another map is stacked on it (``map_state``), the container
    writes that map's entry there instead, and ``ws.load`` decodes it for ``fetch`` and
    then installs that map on the original.
    """

    name: str = ""  # the "map" value in packed specs
    config: type | None = None  # the config dataclass ``share_`` dispatches on
    parametrizations: tuple[type, ...] = ()  # parametrization modules this map installs
    modules: tuple[type, ...] = ()  # packed modules ``ws.load`` builds for inference (none: the parametrized form runs)
    # writes packed entries of its own (False: plain ties only, which are the container's aliases)
    packable: bool = True
    state_name: str | None = None  # the trainable state another map may take over ("buckets"), or None: none may

    def state_key(self, name: str) -> str | None:
        """Where tensor ``name``'s state that another map may take over is stored (``fc.weight.__buckets``), or None."""
        return None if self.state_name is None else f"{name}.__{self.state_name}"

    def apply(self, model: nn.Module, config, filter_fn: FilterFn | None) -> None:
        raise NotImplementedError

    # ---- packed format -------------------------------------------------------------------
    def pack(self, name: str, plist: parametrize.ParametrizationList, put: Put) -> dict:
        """The entry of parametrized tensor ``name`` (without ``map``); its tensors go through ``put``."""
        raise NotImplementedError(f"the {self.name} map cannot be packed")

    def check(self, name: str, entry: dict, shape: tuple[int, ...], dtype: str) -> dict[str, tuple[set[str], tuple]]:
        """Validate the map's own fields of ``entry`` without reading any tensor.

        Returns the stored tensors the entry needs: ``{key: (allowed dtype names, shape)}``,
        which the container compares with the file's header before anything is read.
        Raises ``ValueError`` naming the field.
        """
        raise NotImplementedError

    def fits(self, module: nn.Module, attr: str, entry: dict) -> str | None:
        """A reason why ``module.<attr>`` cannot take this entry (beyond its shape), or None."""
        return None

    def install(self, module: nn.Module, attr: str, name: str, entry: dict, fetch: Fetch) -> None:
        """Put the map back on ``module.<attr>`` from a checked entry (the weight may be on the meta device)."""
        raise NotImplementedError

    def decode(self, name: str, entry: dict, fetch: Fetch) -> torch.Tensor:
        """The dense weight a checked entry stands for, in the entry's dtype."""
        raise NotImplementedError

    # ---- packed modules (maps with a native inference form) ------------------------------
    def build_module(self, owner: nn.Module, attr: str, name: str, entry: dict, fetch: Fetch) -> nn.Module | None:
        """A packed module to put in place of ``owner`` for entry ``name`` (its ``attr``), or None to keep
        the parametrized form.  Called after the owner's plain tensors (a bias) are installed."""
        return None

    def share_module(self, source: nn.Module, owner: nn.Module, attr: str) -> nn.Module | None:
        """A packed module for ``owner`` using the state of packed module ``source`` (a weight tied to
        the one ``source`` holds, an LM head and its embedding), or None if ``owner`` cannot take one."""
        return None

    def pack_module(self, name: str, module: nn.Module, put: Put) -> dict:
        """The entry (without ``map``) of the weight a packed module holds, as ``pack`` writes it."""
        raise NotImplementedError

    def describe_module(self, module: nn.Module) -> dict:
        """``describe`` for a packed module."""
        raise NotImplementedError

    def dense_module(self, module: nn.Module) -> nn.Module:
        """The plain module a packed module stands for (``nn.Linear`` with its weight decoded), for ``materialize_``."""
        raise NotImplementedError

    def describe(self, plist: parametrize.ParametrizationList, seen: set[int]) -> dict:
        """For ``ws.report``: ``detail`` (str), ``shape``, ``params_stored``, ``bytes_dense``, ``bytes_packed``.

        ``seen`` holds the ids of tensors already counted: a map whose state is
        shared by several tensors (a basis) counts it once and adds its id.
        """
        raise NotImplementedError


class Parametrization(nn.Module):
    """Base of the maps' parametrizations: an original handed over ready-made is installed as it is.

    ``ws.load`` (the stored state) and joint initialisations (a basis fitted to a
    whole group) know the original before ``register_parametrization`` asks for
    it; otherwise ``initial`` computes it from the dense weight.
    """

    def __init__(self, original: torch.Tensor | None = None):
        super().__init__()
        self._original = original

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # in the weight's own dtype: parametrize requires it, and a half-precision model keeps computing in it
        if self._original is not None:
            original, self._original = self._original, None
            return original.to(weight.dtype)
        return self.initial(weight)

    def initial(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is built with its original")


_MAPS: dict[str, SharingMap] = {}
_BY_CONFIG: dict[type, SharingMap] = {}
_BY_PARAMETRIZATION: dict[type, SharingMap] = {}
_BY_MODULE: dict[type, SharingMap] = {}
_CONFIGS: dict[str, type] = {}


def register_map(m: SharingMap) -> SharingMap:
    """Register a sharing map instance (done once, at import of its file in ``sharing/``)."""
    if not m.name or m.name in ("dense", "alias"):
        raise ValueError(f"a sharing map needs a name other than 'dense' and 'alias'\n  got: {m.name!r}")
    state = m.state_name
    if state is not None and not (isinstance(state, str) and state.isascii() and state.isidentifier()):
        raise ValueError(f"{m.name}: state_name names a tensor of the packed file\n  expected: an identifier such as "
                         f"'buckets', or None\n  got: {m.state_name!r}")
    _MAPS[m.name] = m
    if m.config is not None:
        _BY_CONFIG[m.config] = m
        _CONFIGS[m.config.__name__] = m.config
    for cls in m.parametrizations:
        _BY_PARAMETRIZATION[cls] = m
    for cls in m.modules:
        _BY_MODULE[cls] = m
    return m


def get_map(name: str) -> SharingMap | None:
    """The map registered under ``name``, or None."""
    return _MAPS.get(name)


def map_names() -> list[str]:
    return sorted(_MAPS)


def unregister_map(name: str) -> None:
    """Forget the map registered under ``name`` and its config, parametrizations and modules (a plug-in's tests)."""
    m = _MAPS.pop(name, None)
    if m is None:
        raise ValueError(f"unregister_map: no sharing map named {name!r}\n  expected one of: {map_names()}")
    for registry in (_BY_CONFIG, _BY_PARAMETRIZATION, _BY_MODULE):
        for key in [key for key, value in registry.items() if value is m]:
            del registry[key]
    if m.config is not None and _CONFIGS.get(m.config.__name__) is m.config:
        del _CONFIGS[m.config.__name__]


def packable_maps() -> list[str]:
    """Names of the maps that write packed entries of their own."""
    return sorted(n for n, m in _MAPS.items() if m.packable)


def config_classes() -> dict[str, type]:
    """The config dataclass of every registered map, by class name (``HashConfig``, ...)."""
    return dict(_CONFIGS)


def map_of(plist: parametrize.ParametrizationList) -> SharingMap | None:
    """The map that installed a parametrization list, or None for one weightshare does not know."""
    # a map composed on this one's state (parametrize's own "parametrizations" child) is not a step of the list
    steps = [m for name, m in plist._modules.items() if name != "parametrizations"]
    if len(steps) != 1:
        return None
    return _BY_PARAMETRIZATION.get(type(steps[0]))


@dataclasses.dataclass(frozen=True)
class MapState:
    """A map's state that another map may take over: ``plist.original`` (hashed buckets a codebook clusters)."""

    key: str  # where the packed file holds it: ``SharingMap.state_key`` of the weight's name
    plist: parametrize.ParametrizationList  # the weight's parametrization: a map stacks by parametrizing "original"
    stacked: parametrize.ParametrizationList | None  # the list of the map stacked on it, or None while it is plain


def map_state(name: str, plist: parametrize.ParametrizationList) -> MapState | None:
    """The state of parametrized tensor ``name`` that another map may take over, or None if its map declares none.

    The one place stacking is found in a model: ``codebook`` clusters the states still plain,
    ``ws.save`` writes the stacked map's entry under ``key``, ``ws.report`` counts it in.
    """
    m = map_of(plist)
    key = None if m is None else m.state_key(name)
    if key is None:
        return None
    stacked = plist.parametrizations["original"] if parametrize.is_parametrized(plist, "original") else None
    return MapState(key, plist, stacked)


def module_map(module: nn.Module) -> SharingMap | None:
    """The map whose packed module ``module`` is (a ``CodebookLinear``), or None."""
    return _BY_MODULE.get(type(module))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``: dtypes as packed specs name them."""
    return str(dtype).removeprefix("torch.")


def unmeta_(module: nn.Module, attr: str) -> None:
    """Before a map is installed on a weight of a skeleton built on the meta device: an empty real
    placeholder, since parametrize keeps the original's device (the placeholder's storage is replaced)."""
    weight = module._parameters.get(attr)
    if weight is not None and weight.is_meta:
        module._parameters[attr] = nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=weight.requires_grad)


def shared_parameter(t: torch.Tensor, requires_grad: bool = True) -> nn.Parameter:
    """The one ``nn.Parameter`` for a stored tensor read by ``ws.load``.

    The packed container hands every entry that names a shared tensor (a basis,
    a tied weight with per-layer deltas) the same tensor object; this makes the
    same Parameter of it for each of them, so the sharing survives loading and
    the optimizer sees it once.
    """
    p = getattr(t, "_weightshare_parameter", None)
    if p is None:
        p = nn.Parameter(t, requires_grad=requires_grad)
        t._weightshare_parameter = p
    return p


def config_from_dict(d: dict):
    """Rebuild a config dataclass from ``{"type": name, ...fields}`` (as stored in packed files).

    Every field must be present and no other: a packed file is untrusted input.
    """
    if not isinstance(d, dict):
        raise ValueError(clip(f"sharing config\n  expected: a JSON object\n  got: {d!r}"))
    d = dict(d)
    name = d.pop("type", None)
    if not isinstance(name, str) or name not in _CONFIGS:
        raise ValueError(clip(f"unknown sharing config\n  expected one of: {sorted(_CONFIGS)}\n  got: {name!r}"))
    cls = _CONFIGS[name]
    fields = {f.name for f in _stored_fields(cls)}
    if set(d) != fields:
        raise ValueError(clip(f"{name}: fields\n  expected: {sorted(fields)}\n  got: {sorted(map(str, d))}"))
    return cls(**d)


def _stored_fields(cls) -> list:
    """A config's fields that packed files hold: not the training-time ones (``metadata={"training": True}``),
    since a packed model is frozen."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("training")]


def config_to_dict(config) -> dict:
    return {"type": type(config).__name__, **{f.name: getattr(config, f.name) for f in _stored_fields(config)}}


def share_(model: nn.Module, config, filter_fn: FilterFn | None = None) -> nn.Module:
    """Apply one sharing map to ``model`` in place and return it.

    Args:
        model: any ``nn.Module``.
        config: a sharing config dataclass (``TieConfig``, ``CodebookConfig``, ...).
        filter_fn: optional ``(module, fully_qualified_name) -> bool`` choosing
            which modules the map applies to (maps that pick tensors by name ignore it).
    """
    m = _BY_CONFIG.get(type(config))
    if m is None:
        raise ValueError(
            "share_: no sharing map registered for this config\n"
            f"  expected one of: {sorted(c.__name__ for c in _BY_CONFIG)}\n"
            f"  got: {type(config).__name__}"
        )
    m.apply(model, config, filter_fn)
    return model


def materialize_(model: nn.Module) -> nn.Module:
    """Bake every shared weight into an ordinary, independent tensor, in place.

    Parametrized weights become plain parameters holding their current value;
    tied parameters get one copy per place they are used.
    """
    # packed modules (CodebookLinear) become the plain modules they stand for, each with its own weight
    for name, module in list(model.named_modules(remove_duplicate=False)):
        m = module_map(module)
        if m is not None and name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m.dense_module(module))
    # every value first: a parametrization shared by two modules (tied, then clustered) must still decode
    # for the second after the first is removed, and torch's leave_parametrized writes into the shared original
    modules = [m for m in model.modules() if parametrize.is_parametrized(m)]
    values = {}
    with torch.no_grad():
        for module in modules:
            for name in module.parametrizations.keys():
                plist = module.parametrizations[name]
                grad = plist.original.requires_grad if hasattr(plist, "original") else True
                values[(id(module), name)] = (getattr(module, name).detach().clone(), grad)
    for module in modules:
        for name in list(module.parametrizations.keys()):
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            value, grad = values[(id(module), name)]
            module._buffers.pop(name, None)  # a composed map's original comes back as a computed tensor
            module._parameters[name] = nn.Parameter(value, requires_grad=grad)
    seen: set[int] = set()
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) in seen:
                module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            else:
                seen.add(id(p))
    return model


def share_parametrization_(source: nn.Module, target: nn.Module, name: str = "weight") -> nn.Module:
    """Make ``target.<name>`` use ``source.<name>``'s parametrization: one shared state, one gradient sum.

    For weights that were one tensor before they were shared (an LM head tied to
    its embedding): the parametrization list, and so its original tensors, is a
    single module used in both places.
    """
    plist = source.parametrizations[name]
    if parametrize.is_parametrized(target, name):
        raise ValueError(f"share_parametrization_: {type(target).__name__}.{name} is already parametrized")
    # a placeholder registration makes parametrize install its property on target; then the
    # placeholder list is replaced by source's (the placeholder's original is dropped with it)
    current = getattr(target, name)
    if isinstance(current, nn.Parameter):
        target._parameters[name] = nn.Parameter(torch.empty(0, dtype=current.dtype),
                                                requires_grad=current.requires_grad)
    parametrize.register_parametrization(target, name, nn.Identity(), unsafe=True)
    target.parametrizations[name] = plist
    return target


def match_names(names, patterns) -> list[str]:
    """Names matching any of the exact names or glob patterns, in model order."""
    return [n for n in names if any(n == p or fnmatch.fnmatchcase(n, p) for p in patterns)]


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one and the same tensor (length >= 2)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]
