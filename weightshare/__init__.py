"""weightshare: weight sharing for neural networks.

One idea: a small shared space θ is mapped to the weights a model uses
(tie, codebook, ...); see DESIGN.md.
"""

from weightshare._progress import set_progress
from weightshare.kmeans import kmeans1d
from weightshare.pack import PackError, export, load, save
from weightshare.report import Report, report
from weightshare import compress
from weightshare.sharing import CodebookConfig, TieConfig
from weightshare.space import materialize_, share_

__all__ = [
    "CodebookConfig",
    "PackError",
    "Report",
    "TieConfig",
    "export",
    "kmeans1d",
    "load",
    "materialize_",
    "report",
    "save",
    "set_progress",
    "share_",
]
__version__ = "0.1.0"
