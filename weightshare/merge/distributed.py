"""The README's name for co-training's sync (``weightshare.merge.distributed.CoTrainer``): it lives in
``weightshare.merge.cotrain.sync``, and ``weightshare.merge.cotrain`` exports it too."""

from weightshare.merge.cotrain.sync import CoTrainError, CoTrainer, OuterSGD, shared_names

__all__ = ["CoTrainError", "CoTrainer", "OuterSGD", "shared_names"]
