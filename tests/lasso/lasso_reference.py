"""Independent references for the Lasso tests: scikit-learn solutions at tight
tolerance, central finite differences of criteria, small datasets."""

import warnings

import numpy as np
from sklearn import linear_model as lm
from sklearn.datasets import load_breast_cancer, load_diabetes

import keras_implicit.lasso as L

SK_TOL = 1e-13
SK_MAX_ITER = 1_000_000


def diabetes():
    return load_diabetes(return_X_y=True)


def breast_cancer(n=None):
    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    return (X, y) if n is None else (X[:n], y[:n])


def ar1_design(n, p, rho=0.6, k=10, noise=0.5, seed=0):
    """AR(1)-correlated Gaussian design with a k-sparse truth."""
    rng = np.random.default_rng(seed)
    X = np.empty((n, p))
    X[:, 0] = rng.standard_normal(n)
    for j in range(1, p):
        X[:, j] = rho * X[:, j - 1] + np.sqrt(1 - rho**2) * rng.standard_normal(n)
    beta = np.zeros(p)
    beta[rng.choice(p, k, replace=False)] = rng.choice([-1.0, 1.0], k) * rng.uniform(1, 2, k)
    y = X @ beta + noise * rng.standard_normal(n)
    return X, y, beta


def sklearn_solution(model, X, y, sample_weight=None):
    """(coef, intercept) of the scikit-learn model with the same objective (with the
    model's ``positive``, the sample weights and a 2-D y passed through)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fi = model.fit_intercept
        options = {"fit_intercept": fi, "tol": SK_TOL, "max_iter": SK_MAX_ITER}
        if hasattr(model, "positive"):
            options["positive"] = model.positive
        if isinstance(model, L.Lasso):
            sk = lm.Lasso(alpha=model.alpha, **options)
            sk.fit(X, y, sample_weight=sample_weight)
            return sk.coef_.copy(), _intercept(sk)
        if isinstance(model, L.ElasticNet):
            sk = lm.ElasticNet(**model.sklearn_params, **options)
            sk.fit(X, y, sample_weight=sample_weight)
            return sk.coef_.copy(), _intercept(sk)
        if isinstance(model, L.WeightedLasso):
            # sum_j w_j |b_j| = a sum_j |c_j| with c_j = (w_j / a) b_j: rescale columns.
            n_features = X.shape[1]
            w = model.penalty_vectors(n_features)[0]
            a = float(np.mean(w))
            scale = a / w
            sk = lm.Lasso(alpha=a, **options)
            sk.fit(X * scale, y, sample_weight=sample_weight)
            return sk.coef_ * scale, _intercept(sk)
        if isinstance(model, L.SparseLogisticRegression):
            n = X.shape[0]
            C = 1.0 / (n * model.alpha)
            if fi:  # liblinear would penalize the intercept
                sk = lm.LogisticRegression(
                    l1_ratio=1.0, C=C, solver="saga", tol=1e-14, max_iter=SK_MAX_ITER
                )
            else:
                # liblinear shuffles coordinates with a seed drawn from numpy's global
                # RNG, which depends on the tests run before; for some seeds it does
                # not reach tol=1e-14 and runs to max_iter (minutes): fix the seed.
                sk = lm.LogisticRegression(
                    l1_ratio=1.0,
                    C=C,
                    solver="liblinear",
                    fit_intercept=False,
                    tol=1e-14,
                    max_iter=SK_MAX_ITER,
                    random_state=0,
                )
            sk.fit(X, y, sample_weight=sample_weight)
            return sk.coef_[0].copy(), float(np.ravel(sk.intercept_)[0]) if fi else 0.0
    raise TypeError(model)


def _intercept(sk):
    return float(sk.intercept_) if np.ndim(sk.intercept_) == 0 else np.array(sk.intercept_)


def criterion_from_sklearn(model, criterion, X, y, sample_weight=None):
    """Criterion value with every inner problem solved by scikit-learn."""
    value, _ = L.hypergradient(
        model, criterion, X, y, sample_weight=sample_weight, solver=sklearn_solution
    )
    return value


def finite_difference(model, criterion, X, y, h=1e-5, sample_weight=None):
    """Central differences of the criterion in the log penalties (scikit-learn solves)."""
    theta = model.get_log_penalties()
    grad = np.zeros_like(theta)
    for i in range(theta.size):
        values = []
        for sign in (1.0, -1.0):
            shifted = theta.copy()
            shifted[i] += sign * h
            m = L.clone(model).set_log_penalties(shifted)
            values.append(criterion_from_sklearn(m, criterion, X, y, sample_weight))
        grad[i] = (values[0] - values[1]) / (2 * h)
    return grad


def logistic_design(n=300, p=20, seed=1):
    """Mildly correlated design with {0, 1} labels from a sparse logistic model (an
    easy problem for saga, which is the unpenalized-intercept reference)."""
    X, _, beta = ar1_design(n, p, rho=0.3, k=5, seed=seed)
    rng = np.random.default_rng(seed)
    logits = 0.5 * X @ beta + 0.7
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(float)
    return X, y
