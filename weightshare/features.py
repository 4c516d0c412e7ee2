"""Shared feature spaces: one PCA or kernel map fitted on the pooled inputs of all tasks.

The seed article's "shared feature space": instead of a projection per task,
every task's inputs are mapped through one map learned from all of them, and
each task fits only a linear head on top.  Both estimators follow
scikit-learn's conventions (``fit`` returns self, fitted attributes end in
``_``, they work in ``Pipeline`` and ``clone``) and wrap scikit-learn's own
``PCA``, ``Nystroem`` and ``RBFSampler``.  ``fit`` takes one array, or a list
of per-task arrays (same columns) that it pools.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.kernel_approximation import Nystroem, RBFSampler
from sklearn.utils.validation import check_is_fitted

__all__ = ["SharedPCA", "KernelFeatureMap", "pool"]

KERNELS = ("rbf", "linear", "polynomial")


def pool(X) -> tuple[np.ndarray, int]:
    """(rows of all tasks stacked, number of tasks): a list/tuple of per-task arrays, or one array."""
    if isinstance(X, (list, tuple)) and X and all(hasattr(x, "shape") and len(x.shape) == 2 for x in X):
        widths = {x.shape[1] for x in X}
        if len(widths) != 1:
            raise ValueError("pooled tasks\n  expected: the same number of columns in every task\n"
                             f"  got: {sorted(widths)}")
        if any(x.shape[0] == 0 for x in X):
            raise ValueError("pooled tasks\n  expected: at least one row per task")
        return np.vstack([np.asarray(x, dtype=float) for x in X]), len(X)
    return np.asarray(X, dtype=float), 1


class SharedPCA(TransformerMixin, BaseEstimator):
    """PCA fitted on the pooled inputs of all tasks: one shared linear feature space."""

    def __init__(self, n_components=None, whiten: bool = False, random_state=None):
        self.n_components = n_components
        self.whiten = whiten
        self.random_state = random_state

    def fit(self, X, y=None):
        data, tasks = pool(X)
        self.pca_ = PCA(n_components=self.n_components, whiten=self.whiten, random_state=self.random_state).fit(data)
        self.components_ = self.pca_.components_
        self.explained_variance_ratio_ = self.pca_.explained_variance_ratio_
        self.n_features_in_ = data.shape[1]
        self.n_tasks_ = tasks
        return self

    def transform(self, X):
        check_is_fitted(self, "pca_")
        return self.pca_.transform(np.asarray(X, dtype=float))


class KernelFeatureMap(TransformerMixin, BaseEstimator):
    """An explicit kernel feature map fitted on the pooled inputs of all tasks.

    ``kernel``: ``"rbf"``, ``"linear"`` or ``"polynomial"``; ``method``: ``"nystroem"``
    (a low-rank map from landmark rows, any kernel) or ``"random_fourier"`` (random
    Fourier features, rbf only).  Inner products of the features approximate the kernel.
    """

    def __init__(self, kernel: str = "rbf", n_components: int = 100, gamma=None, degree: int = 3,
                 coef0: float = 1.0, method: str = "nystroem", random_state=None):
        self.kernel = kernel
        self.n_components = n_components
        self.gamma = gamma
        self.degree = degree
        self.coef0 = coef0
        self.method = method
        self.random_state = random_state

    def fit(self, X, y=None):
        if self.kernel not in KERNELS:
            raise ValueError(f"KernelFeatureMap.kernel\n  expected one of: {KERNELS}\n  got: {self.kernel!r}")
        if self.method not in ("nystroem", "random_fourier"):
            raise ValueError("KernelFeatureMap.method\n  expected: 'nystroem' or 'random_fourier'\n"
                             f"  got: {self.method!r}")
        if self.method == "random_fourier" and self.kernel != "rbf":
            raise ValueError(f"random Fourier features approximate the rbf kernel only\n  got: kernel={self.kernel!r}")
        data, tasks = pool(X)
        if self.method == "random_fourier":
            gamma = 1.0 / data.shape[1] if self.gamma is None else self.gamma
            self.map_ = RBFSampler(gamma=gamma, n_components=self.n_components, random_state=self.random_state)
        else:
            kernel = {"rbf": "rbf", "linear": "linear", "polynomial": "poly"}[self.kernel]
            params = {"degree": self.degree, "coef0": self.coef0} if kernel == "poly" else {}
            self.map_ = Nystroem(kernel=kernel, gamma=self.gamma, kernel_params=None,
                                 n_components=min(self.n_components, data.shape[0]),
                                 random_state=self.random_state, **params)
        self.map_.fit(data)
        self.n_features_in_ = data.shape[1]
        self.n_tasks_ = tasks
        return self

    def transform(self, X):
        check_is_fitted(self, "map_")
        return self.map_.transform(np.asarray(X, dtype=float))
