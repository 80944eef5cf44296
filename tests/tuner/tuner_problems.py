"""Small deterministic problems and an independent grid reference for the tuner tests."""

import numpy as np


def regression_problem(n_samples=300, n_features=60, n_informative=8, noise=20.0, seed=0):
    """(x_train, y_train, x_val, y_val): half of the samples are held out."""
    from sklearn.datasets import make_regression

    x, y = make_regression(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=n_informative,
        noise=noise,
        random_state=seed,
    )
    half = n_samples // 2
    return x[:half], y[:half], x[half:], y[half:]


def classification_problem(n_samples=240, n_features=30, seed=0):
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=5,
        n_redundant=0,
        random_state=seed,
    )
    half = n_samples // 2
    return x[:half], y[:half], x[half:], y[half:]


def grid_best_mse(x, y, x_val, y_val, n_alphas=120, low=1e-4):
    """Best held-out MSE of scikit-learn's Lasso over a dense log grid (tight tolerance)."""
    from sklearn.linear_model import Lasso

    centered = x - x.mean(axis=0)
    alpha_max = np.max(np.abs(centered.T @ (y - y.mean()))) / x.shape[0]
    best = np.inf
    for alpha in alpha_max * np.geomspace(low, 1.0, n_alphas):
        model = Lasso(alpha=alpha, tol=1e-10, max_iter=100_000).fit(x, y)
        best = min(best, float(np.mean((model.predict(x_val) - y_val) ** 2)))
    return best


def grid_best_elasticnet_mse(x, y, x_val, y_val, n_per_axis=20, low=1e-4):
    """Best held-out MSE of scikit-learn's ElasticNet over a dense log grid of (l1, l2)
    in [low, 1] * alpha_max x [low, 1] * (mean feature variance), LassoTuner's bounds."""
    from sklearn.linear_model import ElasticNet

    centered = x - x.mean(axis=0)
    alpha_max = np.max(np.abs(centered.T @ (y - y.mean()))) / x.shape[0]
    variance = float(np.mean(np.var(x, axis=0)))
    best = np.inf
    for l1 in alpha_max * np.geomspace(low, 1.0, n_per_axis):
        for l2 in variance * np.geomspace(low, 1.0, n_per_axis):
            # scikit-learn: alpha * l1_ratio * |b|_1 + alpha * (1 - l1_ratio) / 2 * |b|^2
            model = ElasticNet(alpha=l1 + l2, l1_ratio=l1 / (l1 + l2), tol=1e-10, max_iter=100_000)
            model.fit(x, y)
            best = min(best, float(np.mean((model.predict(x_val) - y_val) ** 2)))
    return best
