"""weightshare: weight sharing for neural networks.

One idea: a small shared space θ is mapped to the weights a model uses
(tie, codebook, ...); see DESIGN.md.

Names are imported on first use (PEP 562), so ``import weightshare.cli`` does
not import torch: the CLI sets OpenMP's environment before torch loads.
"""

import importlib.abc
import importlib.util
import sys
import types
from importlib import import_module
from importlib.metadata import version as _version

__version__ = _version("weightshare")  # the installed metadata, as `weightshare --version` prints

_EXPORTS = {
    "PackError": "weightshare.pack",
    "Report": "weightshare.report",
    "export": "weightshare.load",
    "kmeans1d": "weightshare.kmeans",
    "load": "weightshare.load",
    "materialize_": "weightshare.space",
    "merge": "weightshare.merge",
    "transfer": "weightshare.merge",
    "greedy_soup": "weightshare.merge",
    "report": "weightshare.report",
    "save": "weightshare.pack",
    "set_progress": "weightshare._progress",
    "share_": "weightshare.space",
    "step_": "weightshare.training",
    "freeze_": "weightshare.training",
}
# the config class of every map in weightshare/sharing/ (CodebookConfig, HashConfig, ...) is exported too,
# found in the registry: adding a map edits nothing here


def __getattr__(name: str):
    if name == "__all__":
        return sorted([*_EXPORTS, *import_module("weightshare.sharing").__all__])
    if name in _EXPORTS or name.endswith("Config"):
        sharing = import_module("weightshare.sharing")  # importing the maps registers them
        value = getattr(import_module(_EXPORTS[name]), name) if name in _EXPORTS else getattr(sharing, name, None)
        if value is not None:
            globals()[name] = value
            return value
    if name in ("compress", "multitask", "merge", "training"):  # not bench: the library never imports a benchmark
        return import_module(f"weightshare.{name}")
    raise AttributeError(f"module 'weightshare' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__getattr__("__all__")))


class _Package(types.ModuleType):
    """Keeps ``ws.report`` the function when the submodule ``weightshare.report`` is imported.

    Importing a submodule sets it as an attribute of its package; where a public
    name is also a module's name, the package keeps the module's namesake instead.
    """

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType) and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


# transformers' from_pretrained loads packed directories once weightshare's quantizer is registered
# with it (weightshare/hf_quantizer.py).  Registering imports transformers and torch, which
# `import weightshare` must not do (the CLI sets OpenMP's environment first): it happens when
# transformers' quantizer registry is imported, or now if it already was.
_REGISTRY = "transformers.quantizers.auto"


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when transformers' quantizer registry is imported, runs weightshare's registration
    after it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _REGISTRY:
            return None
        sys.meta_path.remove(self)  # once, and so that find_spec below asks the real finders
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        import_module("weightshare.hf_quantizer")


if _REGISTRY in sys.modules:
    import_module("weightshare.hf_quantizer")
else:
    sys.meta_path.insert(0, _RegisterWithTransformers())
