"""Many models, shared weights: merge methods (``methods/``, one file each), the streaming merge,
mergekit configs, weight transfer and model soups.

Importing this package registers every method in ``MERGE_METHODS`` (``registry.py``), by
importing every file of ``methods/``: adding a method is adding one file there.
Co-training (``distributed.py``) imports torch.distributed and is imported on use.
"""

import weightshare.merge.methods  # noqa: F401  (registers every method)
from weightshare.merge.registry import MERGE_METHODS, MergeMethod, get_method, register_merge
from weightshare.merge.soup import greedy_soup, greedy_soup_trace, uniform_soup
from weightshare.merge.streaming import MergeError, merge, open_model
from weightshare.merge.transfer import TransferReport, transfer

__all__ = ["MERGE_METHODS", "MergeError", "MergeMethod", "TransferReport", "get_method", "greedy_soup",
           "greedy_soup_trace", "merge", "open_model", "register_merge", "transfer", "uniform_soup"]
