"""Outer criteria for hyperparameter selection, with gradients w.r.t. the solution.

Every criterion is a function of the fitted ``(coef, intercept)``; ``evaluate`` fits
the model(s) it needs through an ``Evaluation`` (``_state.py``) and returns the value
and ``(dC/d alphas, dC/d l2)`` obtained from the restricted adjoint systems
(``_adjoint.py``).

- ``HeldOutMSE(X_val, y_val)``:      mean((y_val - X_val b - b0)^2)
- ``HeldOutLogistic(X_val, y_val)``: mean(log(1 + exp(-y_val (X_val b + b0))))
- ``CrossVal(criterion, cv)``:       mean over K folds of the held-out criterion
- ``SURE(sigma)``:                   finite-difference Monte-Carlo SURE

Training sample weights (``hypergradient(..., sample_weight=w)``) weight the inner
problems; the held-out criteria take their own ``sample_weight`` (a weighted mean),
and ``CrossVal`` splits the training weights into the folds' training and held-out
weights. With several targets (y of shape (n, n_targets)) a criterion is the mean
over targets of its per-target value, and its hypergradient with respect to the
shared penalties is the sum over targets of the per-target contributions (each
target has its own support and restricted system).
"""

from __future__ import annotations

import numbers

import numpy as np
import tensorflow as tf

from keras_implicit import _validation as V
from keras_implicit.lasso import estimators as est
from keras_implicit.lasso._adjoint import penalty_gradient
from keras_implicit.lasso._data import (
    DTYPE,
    Design,
    as_design_input,
    as_sample_weight,
    as_target,
    as_targets,
    check_n_features,
    labels_to_pm1,
    take_rows,
)


class Criterion:
    """Base class of the outer criteria."""

    def _evaluate(self, model, X, y, sample_weight, evaluation):
        raise NotImplementedError


def evaluate(criterion, model, X, y, sample_weight, evaluation):
    """``(value, dC/d alphas, dC/d l2)`` of ``criterion`` for ``model`` trained on
    checked (X, y, sample_weight); the inner fits go through ``evaluation``."""
    return criterion._evaluate(model, X, y, sample_weight, evaluation)


def _predict(design, coef, intercept):
    """``X coef^T + intercept`` as numpy: (m,), or (m, targets) for a 2-D coef."""
    if np.ndim(coef) == 1:
        return design.matvec(coef).numpy() + intercept
    columns = [design.matvec(c).numpy() for c in coef]
    return np.stack(columns, axis=1) + np.asarray(intercept)


def _pull_back(design, d_mu):
    """Gradient w.r.t. (coef, intercept) of a criterion with gradient ``d_mu`` w.r.t.
    the predictions ``X coef^T + intercept``."""
    if d_mu.ndim == 1:
        return design.rmatvec(d_mu).numpy(), float(np.sum(d_mu))
    g_coef = np.stack([design.rmatvec(d).numpy() for d in d_mu.T])
    return g_coef, np.sum(d_mu, axis=0)


def _require_loss(criterion, model, loss):
    if est.loss_of(model) != loss:
        kind = "squared-loss" if loss == "squared" else "logistic"
        raise ValueError(
            f"{type(criterion).__name__} needs a {kind} model. Received: model={model!r}"
        )


class _HeldOut(Criterion):
    _loss = "squared"
    _as_target = staticmethod(as_targets)

    def __init__(self, X_val, y_val, sample_weight=None):
        X_val = as_design_input(X_val, name="X_val")
        self.X_val = X_val
        self.y_val = self._as_target(y_val, X_val.shape[0], name="y_val")
        self.sample_weight = as_sample_weight(sample_weight, X_val.shape[0])
        self._design = Design(X_val)
        w = np.ones(X_val.shape[0]) if self.sample_weight is None else self.sample_weight
        self._mean_weights = w / np.sum(w)  # the criterion is a weighted mean over rows

    def __repr__(self):
        return f"{type(self).__name__}(X_val: {self.X_val.shape}, y_val: {self.y_val.shape})"

    def value_and_gradient(self, model, classes=None):
        """Criterion at ``model``'s solution and its gradient w.r.t. (coef, intercept)."""
        raise NotImplementedError

    def _evaluate(self, model, X, y, sample_weight, evaluation, key="main", allow_override=True):
        _require_loss(self, model, self._loss)
        check_n_features(self.X_val, X.shape[1], name="X_val")
        if self.y_val.ndim != y.ndim or (y.ndim == 2 and self.y_val.shape[1] != y.shape[1]):
            raise ValueError(
                f"`y_val` must have as many targets as `y`. Received: y_val of shape "
                f"{self.y_val.shape}, y of shape {y.shape}"
            )
        data = evaluation.fit(model, X, y, key, sample_weight, allow_override)
        value, g_coef, g_intercept = self.value_and_gradient(model, data.classes)
        grad_alphas, grad_l2 = penalty_gradient(model, data, g_coef, g_intercept, evaluation)
        return value, grad_alphas, grad_l2


class HeldOutMSE(_HeldOut):
    """Mean squared error ``mean((y_val - X_val coef - intercept)^2)`` on validation data.

    Args:
      X_val: (m, n_features) validation data, dense or sparse.
      y_val: (m,) or (m, n_targets) validation targets (as many targets as the
        training y); with several targets the value is the mean over all entries.
      sample_weight: optional (m,) non-negative weights: the weighted mean over rows
        ``sum_i w_i ||y_val_i - pred_i||^2 / (n_targets sum_i w_i)`` (scikit-learn's
        ``mean_squared_error`` with ``sample_weight``).
    """

    def value_and_gradient(self, model, classes=None):
        residual = self.y_val - _predict(self._design, model.coef_, model.intercept_)
        weights = self._mean_weights if residual.ndim == 1 else self._mean_weights[:, None]
        scale = 1.0 if residual.ndim == 1 else 1.0 / residual.shape[1]
        value = scale * float(np.sum(weights * residual**2))
        g_coef, g_intercept = _pull_back(self._design, -2.0 * scale * weights * residual)
        return value, g_coef, g_intercept


class HeldOutLogistic(_HeldOut):
    """Mean logistic loss ``mean(log(1 + exp(-y_val (X_val coef + intercept))))``.

    Validation labels use the training classes (smaller label -> -1). An optional
    ``sample_weight`` (m,) makes it the weighted mean over rows."""

    _loss = "logistic"
    _as_target = staticmethod(as_target)

    def value_and_gradient(self, model, classes=None):
        y_pm, _ = labels_to_pm1(self.y_val, classes, name="y_val")
        y_pm = tf.constant(y_pm, DTYPE)
        weights = tf.constant(self._mean_weights, DTYPE)
        z = self._design.matvec(model.coef_) + model.intercept_
        value = float(tf.reduce_sum(weights * tf.math.softplus(-y_pm * z)))
        dz = -weights * y_pm * tf.math.sigmoid(-y_pm * z)
        return value, self._design.rmatvec(dz).numpy(), float(tf.reduce_sum(dz))


def kfold_indices(n_samples, n_splits, shuffle=False, random_state=None):
    """(train, test) index pairs of K contiguous folds (scikit-learn's KFold layout:
    the first ``n % K`` folds have one extra sample)."""
    order = np.arange(n_samples)
    if shuffle:
        np.random.default_rng(random_state).shuffle(order)
    sizes = np.full(n_splits, n_samples // n_splits)
    sizes[: n_samples % n_splits] += 1
    stops = np.cumsum(sizes)
    folds = []
    for stop, size in zip(stops, sizes):
        test = order[stop - size : stop]
        mask = np.ones(n_samples, dtype=bool)
        mask[test] = False
        folds.append((order[mask], test))
    return folds


class CrossVal(Criterion):
    """K-fold cross-validation of a held-out criterion.

    Args:
      criterion: ``"mse"`` (squared-loss models) or ``"logistic"``.
      cv: number of folds (contiguous folds as scikit-learn's ``KFold``), or an
        iterable of ``(train_indices, test_indices)`` pairs.
      shuffle, random_state: shuffle samples before splitting (integer folds only).

    The value is the mean of the fold criteria, the gradient the mean of their
    gradients; each fold keeps its own warm start during ``search``.
    """

    def __init__(self, criterion="mse", cv=5, shuffle=False, random_state=None):
        V.one_of("criterion", criterion, ("mse", "logistic"))
        if isinstance(cv, numbers.Integral) and not isinstance(cv, bool):
            if cv < 2:
                raise ValueError(f"`cv` must be at least 2 folds. Received: cv={cv!r}")
            self._splits = None
        else:
            try:
                self._splits = [(np.asarray(tr), np.asarray(te)) for tr, te in cv]
            except (TypeError, ValueError) as err:
                raise ValueError(
                    "`cv` must be an integer >= 2 or an iterable of (train, test) index "
                    f"pairs. Received: cv={cv!r}"
                ) from err
            if len(self._splits) < 1:
                raise ValueError(f"`cv` has no splits. Received: cv={cv!r}")
        self.criterion = criterion
        self.cv = cv
        self.shuffle = shuffle
        self.random_state = random_state

    def __repr__(self):
        return f"CrossVal(criterion={self.criterion!r}, cv={self.cv!r})"

    def splits(self, n_samples):
        if self._splits is not None:
            for train, test in self._splits:
                if train.size == 0 or test.size == 0 or max(train.max(), test.max()) >= n_samples:
                    raise ValueError(
                        "`cv` splits must be non-empty index arrays below the number of "
                        f"samples ({n_samples})."
                    )
            return self._splits
        n_splits = int(self.cv)
        if n_splits > n_samples:
            raise ValueError(
                f"`cv={n_splits}` folds need at least as many samples; received {n_samples}."
            )
        return kfold_indices(n_samples, n_splits, self.shuffle, self.random_state)

    def _evaluate(self, model, X, y, sample_weight, evaluation):
        held_out = HeldOutMSE if self.criterion == "mse" else HeldOutLogistic
        _require_loss(self, model, held_out._loss)
        values, grads_alphas, grads_l2 = [], [], []
        w = sample_weight
        for k, (train, test) in enumerate(self.splits(X.shape[0])):
            key = ("fold", k)
            cached = evaluation.state.folds.get(k)
            if cached is None:
                fold = held_out(take_rows(X, test), y[test], None if w is None else w[test])
                X_train, y_train = take_rows(X, train), y[train]
                w_train = None if w is None else w[train]
                cached = evaluation.state.folds[k] = (fold, X_train, y_train, w_train)
            fold, X_train, y_train, w_train = cached
            value, ga, gl = fold._evaluate(
                model, X_train, y_train, w_train, evaluation, key=key, allow_override=False
            )
            values.append(value)
            grads_alphas.append(ga)
            grads_l2.append(gl)
        return float(np.mean(values)), np.mean(grads_alphas, axis=0), float(np.mean(grads_l2))


class SURE(Criterion):
    """Finite-difference Monte-Carlo SURE (Deledalle, Vaiter, Fadili & Peyré, 2014).

    For y = X b_true + noise with known noise level ``sigma`` and predictions
    ``mu(y) = X coef(y) + intercept(y)``, Stein's unbiased estimate of the
    per-sample prediction risk ``E ||mu(y) - X b_true||^2 / n`` is

        SURE = (||y - mu(y)||^2 - n sigma^2 + 2 sigma^2 dof) / n,

    with the degrees of freedom estimated by one finite difference in a random
    direction: ``dof = delta^T (mu(y + eps delta) - mu(y)) / eps``. With several
    targets (y of shape (n, T), independent noise of level ``sigma`` on every entry)
    n is replaced by n T: the per-entry risk, whose hypergradient sums the targets'
    contributions. Not defined with sample weights (``hypergradient`` refuses them).

    Args:
      sigma: noise standard deviation (> 0).
      epsilon: finite-difference step; default ``2 sigma / n^0.3`` (Deledalle et al.).
      random_state: seed of the Gaussian direction ``delta`` (default 0, so that the
        criterion is a deterministic function of the penalties).
    """

    def __init__(self, sigma, epsilon=None, random_state=0):
        self.sigma = V.positive_float("sigma", sigma)
        self.epsilon = None if epsilon is None else V.positive_float("epsilon", epsilon)
        for name, value in (("sigma", self.sigma), ("epsilon", self.epsilon)):
            if value is not None and not np.isfinite(value):
                raise ValueError(f"`{name}` must be finite. Received: {name}={value!r}")
        self.random_state = random_state

    def __repr__(self):
        return f"SURE(sigma={self.sigma!r}, epsilon={self.epsilon!r})"

    def direction(self, n, n_targets=None):
        """The Monte-Carlo direction ``delta`` ((n,) or (n, n_targets)) and the step
        ``epsilon`` for n samples."""
        shape = n if n_targets is None else (n, n_targets)
        delta = np.random.default_rng(self.random_state).standard_normal(shape)
        epsilon = self.epsilon if self.epsilon is not None else 2.0 * self.sigma / n**0.3
        return delta, epsilon

    def _evaluate(self, model, X, y, sample_weight, evaluation):
        _require_loss(self, model, "squared")
        if sample_weight is not None:
            raise ValueError(
                "SURE estimates the risk of unweighted least squares under i.i.d. noise; "
                "it is not defined with sample weights. Use HeldOutMSE or CrossVal. "
                "Received: sample_weight of shape "
                f"{np.shape(sample_weight)}"
            )
        n = X.shape[0]
        delta, epsilon = self.direction(n, None if y.ndim == 1 else y.shape[1])
        state = evaluation.state
        if state.sure_design is None:
            state.sure_design = Design(X)
        design = state.sure_design
        if state.sure_model is None or type(state.sure_model) is not type(model):
            state.sure_model = est.clone(model)
        shifted_model = state.sure_model.set_params(**model.get_params())
        data = evaluation.fit(model, X, y, "main", allow_override=False)
        shifted_data = evaluation.fit(
            shifted_model, X, y + epsilon * delta, "shifted", allow_override=False
        )
        mu = _predict(design, model.coef_, model.intercept_)
        mu_shifted = _predict(design, shifted_model.coef_, shifted_model.intercept_)
        size, sigma2 = y.size, self.sigma**2
        dof = float(np.sum(delta * (mu_shifted - mu))) / epsilon
        residual = y - mu
        value = (float(np.sum(residual**2)) - size * sigma2 + 2.0 * sigma2 * dof) / size
        # d value / d mu and d value / d mu_shifted, then through mu = X coef + b0.
        d_mu = (-2.0 * residual - 2.0 * sigma2 / epsilon * delta) / size
        d_mu_shifted = (2.0 * sigma2 / epsilon * delta) / size
        ga1, gl1 = penalty_gradient(model, data, *_pull_back(design, d_mu), evaluation)
        ga2, gl2 = penalty_gradient(
            shifted_model, shifted_data, *_pull_back(design, d_mu_shifted), evaluation
        )
        return value, ga1 + ga2, gl1 + gl2
