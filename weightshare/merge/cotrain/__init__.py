"""Co-training: N processes, each with its own model, optimizer and data, average a shared subset of weights.

One file per part, in the order a run meets them:

- ``config.py``: the YAML config, its defaults, and every check that needs no process
  (``read_config``, ``parse_config``, ``check``);
- ``data.py``: the data a config names: the built-in ``digits`` or a labelled .jsonl / .csv / .npz file,
  each row checked, and the stratified splits (one part per worker, one test split);
- ``zoo.py``: the models a config may name: the built-in ``cnn`` / ``gru``, or a model directory read as a
  ``TextClassifier`` (transformers, sentence-transformers or packed);
- ``launcher.py``: ``launch(config, nproc)``, torchrun on this machine (``weightshare cotrain CONFIG``);
- ``worker.py``: one process's runs under torchrun (``torchrun -m weightshare.cotrain CONFIG``);
- ``sync.py``: ``CoTrainer``, the shared subset of one worker's model and its syncs over torch.distributed.
"""

from weightshare.merge.cotrain.config import CoTrainConfig, WorkerSpec, check, parse_config, read_config
from weightshare.merge.cotrain.launcher import launch
from weightshare.merge.cotrain.sync import CoTrainer, CoTrainError, OuterSGD, shared_names
from weightshare.merge.cotrain.worker import main, run

__all__ = ["CoTrainConfig", "CoTrainError", "CoTrainer", "OuterSGD", "WorkerSpec", "check", "launch", "main",
           "parse_config", "read_config", "run", "shared_names"]
