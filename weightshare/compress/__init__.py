"""Post-training compression of Hugging Face model directories."""

from weightshare.compress.cluster import compress, is_compressible

__all__ = ["compress", "is_compressible"]
