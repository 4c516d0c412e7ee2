"""Multi-task weighting methods, one file each, behind one interface (``base.py``).

Every module in this package is imported here, and a method registers itself in
``METHODS`` when its module is imported: adding a method is adding one file.

* a gradient aggregator is a function ``fn(G, **params) -> d`` from the per-task gradients
  of the shared parameters, ``G`` (tasks, params), to one update direction (params,);
* a loss weighting method is a ``LossWeighting`` subclass: ``fit`` asks it for the total
  loss at each step (``weights(step)`` or ``total_loss(step)``) and tells it each epoch's
  mean losses (``on_epoch_end``); its ``nn.Parameter`` attributes train with the model.

``solvers.py`` holds the linear algebra the aggregators share (Gram matrix, min-norm point).
A method outside this package registers the same way, when its module is imported::

    @register_method("first_task_only", "loss", "an example: train on task 0 alone")
    class FirstTaskOnly(LossWeighting):
        def weights(self, step):
            return torch.eye(self.num_tasks)[0]
"""

import importlib
import pkgutil

from weightshare.multitask.weighting.base import KINDS, METHODS, LossWeighting, Method, Step, aggregate, register_method

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["KINDS", "METHODS", "LossWeighting", "Method", "Step", "aggregate", "register_method"]
