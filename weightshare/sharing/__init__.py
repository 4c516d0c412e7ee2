"""Sharing maps, one file each.

Every module in this package is imported here, and importing a map registers
it with ``weightshare.space``: adding a map is adding one file.  The config
classes of all maps are exported from here and from ``weightshare``.
"""

import importlib
import pkgutil

from weightshare.space import config_classes

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

globals().update(config_classes())
__all__ = sorted(config_classes())
