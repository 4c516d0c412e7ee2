"""The merge methods, one file each: importing this package imports every file in it, and each
file registers its method in ``MERGE_METHODS`` (``weightshare/merge/registry.py``).  Adding a
method is adding one file here; files whose names start with ``_`` are not methods.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
