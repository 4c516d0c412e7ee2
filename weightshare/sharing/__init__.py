"""Sharing maps, one file each; importing a map registers it with ``weightshare.space``."""

from weightshare.sharing.codebook import CodebookConfig, codebook
from weightshare.sharing.tie import TieConfig, tie

__all__ = ["CodebookConfig", "TieConfig", "codebook", "tie"]
