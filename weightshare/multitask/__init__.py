"""Training with shared parameters: the one training loop every benchmark that trains reuses."""

from weightshare.multitask.trainer import TrainConfig, TrainResult, error_rate, make_optimizer, train

__all__ = ["TrainConfig", "TrainResult", "error_rate", "make_optimizer", "train"]
