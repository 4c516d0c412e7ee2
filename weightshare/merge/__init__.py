"""Many models, shared weights: merge methods (one file each), weight transfer, co-training.

Every module in this package is imported here, and importing a method's file
registers it in ``MERGE_METHODS`` (``registry.py``): adding a method is adding
one file.
"""

import importlib
import pkgutil

from weightshare.merge.registry import MERGE_METHODS, MergeMethod, get_method, register_merge

_SKIP = {"registry", "distributed"}  # distributed imports torch.distributed: loaded on use
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in _SKIP:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MERGE_METHODS", "MergeMethod", "get_method", "register_merge"]

from weightshare.merge.soup import greedy_soup, greedy_soup_trace, uniform_soup  # noqa: E402
from weightshare.merge.streaming import MergeError, merge, open_model  # noqa: E402
from weightshare.merge.transfer import TransferReport, transfer  # noqa: E402

__all__ += ["MergeError", "TransferReport", "greedy_soup", "greedy_soup_trace", "merge", "open_model", "transfer",
            "uniform_soup"]
