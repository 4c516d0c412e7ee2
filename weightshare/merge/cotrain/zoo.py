"""The built-in models and data a co-training config may name: ``model: cnn``, ``data: digits``.

A config names things, it never carries code: these tables are everything it can name.
A model is a class built as ``MODELS[name](width)``; a data set is a function
``DATA[name](parts, seed, test_size) -> ([(x, y)] * parts, (x_test, y_test))``.

The two models read each 8x8 digit as 8 rows of 8 pixels through the same kind of input
projection, an ``nn.Linear(8, width)`` applied to every row (= a Conv2d with kernel (1, 8));
the CNN then runs two 1-D convolutions over the rows, the GRU reads the rows in order; both
end in a ``tanh`` feature of size ``width`` and a ``Linear(width, 10)`` classifier head.  So
``{"proj.*": "proj.*", "head.*": "head.*"}`` is a subset both hold with the same shapes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["DATA", "MODELS", "DigitsCNN", "DigitsGRU", "digits_parts"]


class DigitsCNN(nn.Module):
    """Row projection (Linear(8, width) on each row), two Conv1d over the 8 rows, max-pool, tanh feature, head."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.proj = nn.Linear(8, width)
        self.conv1 = nn.Conv1d(width, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)
        self.fc = nn.Linear(width * 4, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = torch.relu(self.proj(x.view(-1, 8, 8))).transpose(1, 2)  # (batch, width, 8 rows)
        h = torch.relu(self.conv2(torch.relu(self.conv1(h))))
        h = nn.functional.max_pool1d(h, 2).flatten(1)
        return self.head(torch.tanh(self.fc(h)))


class DigitsGRU(nn.Module):
    """Row projection (Linear(8, width) on each row), a GRU over the 8 rows, its last state, head."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.proj = nn.Linear(8, width)
        self.gru = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        _, last = self.gru(torch.relu(self.proj(x.view(-1, 8, 8))))
        return self.head(last[-1])


def digits_parts(parts: int, seed: int, test_size: float = 0.25):
    """([(x, y)] * parts disjoint stratified parts of the training split, (x_test, y_test)) of scikit-learn's
    digits (1797 images, 64 pixels scaled to [0, 1]); the split and the parts are fixed by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedKFold, train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=test_size, stratify=y, random_state=seed)
    if parts == 1:
        pieces = [np.arange(len(ytr))]
    else:
        pieces = [b for _, b in StratifiedKFold(parts, shuffle=True, random_state=seed).split(xtr, ytr)]
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return [(f(xtr[i]), torch.tensor(ytr[i])) for i in pieces], (f(xte), torch.tensor(yte))


MODELS = {"cnn": DigitsCNN, "gru": DigitsGRU}
DATA = {"digits": digits_parts}
