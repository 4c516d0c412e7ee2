"""Shared feature spaces follow scikit-learn's conventions and pool the tasks' inputs."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics.pairwise import polynomial_kernel, rbf_kernel
from sklearn.pipeline import make_pipeline

from weightshare.features import KernelFeatureMap, SharedPCA


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return x / 16.0, y


def test_shared_pca_is_the_pca_of_the_pooled_tasks(digits):
    x, _ = digits
    tasks = [x[:600], x[600:1200], x[1200:]]
    shared = SharedPCA(n_components=10).fit(tasks)
    assert shared.n_tasks_ == 3 and shared.n_features_in_ == 64
    reference = PCA(n_components=10).fit(x)
    assert np.allclose(np.abs(shared.components_), np.abs(reference.components_), atol=1e-8)
    assert np.allclose(np.abs(shared.transform(x[:5])), np.abs(reference.transform(x[:5])), atol=1e-8)


@pytest.mark.parametrize("kernel,exact", [("rbf", lambda a: rbf_kernel(a, gamma=0.05)),
                                          ("polynomial", lambda a: polynomial_kernel(a, degree=2, gamma=0.05, coef0=1)),
                                          ("linear", lambda a: a @ a.T)])
def test_nystroem_with_every_row_as_landmark_reproduces_the_kernel(digits, kernel, exact):
    x = digits[0][:80]
    fm = KernelFeatureMap(kernel=kernel, n_components=80, gamma=0.05, degree=2, random_state=0).fit([x[:40], x[40:]])
    phi = fm.transform(x)
    assert np.allclose(phi @ phi.T, exact(x), atol=1e-6)


def test_random_fourier_features_approximate_the_rbf_kernel(digits):
    x = digits[0][:50]
    fm = KernelFeatureMap(method="random_fourier", n_components=4000, gamma=0.05, random_state=0).fit(x)
    phi = fm.transform(x)
    assert np.abs(phi @ phi.T - rbf_kernel(x, gamma=0.05)).max() < 0.1


def test_estimator_conventions_clone_and_pipeline(digits):
    x, y = digits
    for est in (SharedPCA(n_components=20), KernelFeatureMap(n_components=200, random_state=0)):
        assert est.fit(x) is est  # fit returns self
        twin = clone(est)
        assert twin.get_params() == est.get_params() and not hasattr(twin, "n_features_in_")
        model = make_pipeline(clone(est), LogisticRegression(max_iter=2000)).fit(x[:1400], y[:1400])
        assert model.score(x[1400:], y[1400:]) > 0.85  # one linear head on the shared features


@pytest.mark.parametrize("make,match", [
    (lambda: KernelFeatureMap(kernel="sigmoid"), "kernel"),
    (lambda: KernelFeatureMap(kernel="linear", method="random_fourier"), "rbf kernel only"),
    (lambda: KernelFeatureMap(method="exact"), "method"),
])
def test_bad_settings_are_named_at_fit(digits, make, match):
    with pytest.raises(ValueError, match=match):
        make().fit(digits[0][:20])


def test_tasks_with_different_columns_are_refused(digits):
    x = digits[0]
    with pytest.raises(ValueError, match="same number of columns"):
        SharedPCA(n_components=2).fit([x[:10], x[:10, :32]])
