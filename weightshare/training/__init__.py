"""Sharing that changes while the model trains, one file per way (``recluster.py``: codebooks re-clustered
as the weights move).  ``step_`` is the one hook a training loop calls after each optimizer step (the one
trainer calls it itself); ``freeze_`` turns training-time sharing into the ordinary maps ``ws.save`` packs."""

from weightshare.training.recluster import freeze_, step_, training_sharing

__all__ = ["freeze_", "step_", "training_sharing"]
