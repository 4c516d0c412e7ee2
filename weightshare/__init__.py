"""weightshare: weight sharing for neural networks.

One idea: a small shared space θ is mapped to the weights a model uses
(tie, codebook, ...); see DESIGN.md.

Names are imported on first use (PEP 562), so ``import weightshare.cli`` does
not import torch: the CLI sets OpenMP's environment before torch loads.
"""

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
    if name in ("compress", "bench", "multitask", "merge"):
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
