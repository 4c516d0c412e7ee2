"""Post-training compression of Hugging Face model directories."""

from weightshare.compress.calibrate import importance_from_texts, read_texts
from weightshare.compress.cluster import compress, compress_model_, is_compressible

__all__ = ["compress", "compress_model_", "importance_from_texts", "is_compressible", "read_texts"]
