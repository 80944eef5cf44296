"""Outer criteria for hyperparameter selection, with gradients w.r.t. the solution.

Every criterion is a function of the fitted ``(coef, intercept)``; ``_evaluate`` fits
the model(s) it needs through the hypergradient context and returns the value and
``(dC/d alphas, dC/d l2)`` obtained from the restricted adjoint systems.

- ``HeldOutMSE(X_val, y_val)``:      mean((y_val - X_val b - b0)^2)
- ``HeldOutLogistic(X_val, y_val)``: mean(log(1 + exp(-y_val (X_val b + b0))))
- ``CrossVal(criterion, cv)``:       mean over K folds of the held-out criterion
- ``SURE(sigma)``:                   finite-difference Monte-Carlo SURE
"""

from __future__ import annotations

import numbers

import numpy as np
import tensorflow as tf

from keras_implicit import _validation as V
from keras_implicit.lasso import estimators as est
from keras_implicit.lasso._data import (
    DTYPE,
    Design,
    as_design_input,
    as_target,
    check_n_features,
    labels_to_pm1,
    take_rows,
)
from keras_implicit.lasso.hypergradient import penalty_gradient


class Criterion:
    """Base class of the outer criteria."""

    def _evaluate(self, model, X, y, context):
        raise NotImplementedError


def _require_loss(criterion, model, loss):
    if model._loss != loss:
        kind = "squared-loss" if loss == "squared" else "logistic"
        raise ValueError(
            f"{type(criterion).__name__} needs a {kind} model. Received: model={model!r}"
        )


class _HeldOut(Criterion):
    _loss = "squared"

    def __init__(self, X_val, y_val):
        X_val = as_design_input(X_val, name="X_val")
        self.X_val = X_val
        self.y_val = as_target(y_val, X_val.shape[0], name="y_val")
        self._design = Design(X_val)

    def __repr__(self):
        return f"{type(self).__name__}(X_val: {self.X_val.shape}, y_val: {self.y_val.shape})"

    def value_and_gradient(self, model, classes=None):
        """Criterion at ``model``'s solution and its gradient w.r.t. (coef, intercept)."""
        raise NotImplementedError

    def _evaluate(self, model, X, y, context, key="main", allow_override=True):
        _require_loss(self, model, self._loss)
        check_n_features(self.X_val, X.shape[1], name="X_val")
        data = context.fit(model, X, y, key, allow_override=allow_override)
        value, g_coef, g_intercept = self.value_and_gradient(model, data.classes)
        grad_alphas, grad_l2 = penalty_gradient(model, data, g_coef, g_intercept, context)
        return value, grad_alphas, grad_l2


class HeldOutMSE(_HeldOut):
    """Mean squared error ``mean((y_val - X_val coef - intercept)^2)`` on validation data."""

    def value_and_gradient(self, model, classes=None):
        m = self._design.n
        residual = tf.constant(self.y_val, DTYPE) - (
            self._design.matvec(model.coef_) + model.intercept_
        )
        value = float(tf.tensordot(residual, residual, 1)) / m
        g_coef = -2.0 * self._design.rmatvec(residual).numpy() / m
        g_intercept = -2.0 * float(tf.reduce_sum(residual)) / m
        return value, g_coef, g_intercept


class HeldOutLogistic(_HeldOut):
    """Mean logistic loss ``mean(log(1 + exp(-y_val (X_val coef + intercept))))``.

    Validation labels use the training classes (smaller label -> -1)."""

    _loss = "logistic"

    def value_and_gradient(self, model, classes=None):
        m = self._design.n
        y_pm, _ = labels_to_pm1(self.y_val, classes, name="y_val")
        y_pm = tf.constant(y_pm, DTYPE)
        z = self._design.matvec(model.coef_) + model.intercept_
        value = float(tf.reduce_sum(tf.math.softplus(-y_pm * z))) / m
        dz = -y_pm * tf.math.sigmoid(-y_pm * z) / m
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

    def _evaluate(self, model, X, y, context):
        held_out = HeldOutMSE if self.criterion == "mse" else HeldOutLogistic
        _require_loss(self, model, held_out._loss)
        values, grads_alphas, grads_l2 = [], [], []
        for k, (train, test) in enumerate(self.splits(X.shape[0])):
            key = ("fold", k)
            cached = context.state.get(("criterion", key))
            if cached is None:
                fold = held_out(take_rows(X, test), y[test])
                cached = (fold, take_rows(X, train), y[train])
                context.state[("criterion", key)] = cached
            fold, X_train, y_train = cached
            value, ga, gl = fold._evaluate(
                model, X_train, y_train, context, key=key, allow_override=False
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
    direction: ``dof = delta^T (mu(y + eps delta) - mu(y)) / eps``.

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

    def direction(self, n):
        """The Monte-Carlo direction ``delta`` and the step ``epsilon`` for n samples."""
        delta = np.random.default_rng(self.random_state).standard_normal(n)
        epsilon = self.epsilon if self.epsilon is not None else 2.0 * self.sigma / n**0.3
        return delta, epsilon

    def _evaluate(self, model, X, y, context):
        _require_loss(self, model, "squared")
        n = X.shape[0]
        delta, epsilon = self.direction(n)
        design = context.state.get("sure_design")
        if design is None:
            design = context.state["sure_design"] = Design(X)
        shifted_model = context.state.get("sure_model")
        if shifted_model is None or type(shifted_model) is not type(model):
            shifted_model = est.clone(model)
        shifted_model.set_params(**model.get_params())
        context.state["sure_model"] = shifted_model
        data = context.fit(model, X, y, "main", allow_override=False)
        shifted_data = context.fit(
            shifted_model, X, y + epsilon * delta, "shifted", allow_override=False
        )
        mu = (design.matvec(model.coef_) + model.intercept_).numpy()
        mu_shifted = (design.matvec(shifted_model.coef_) + shifted_model.intercept_).numpy()
        sigma2 = self.sigma**2
        dof = float(delta @ (mu_shifted - mu)) / epsilon
        residual = y - mu
        value = (float(residual @ residual) - n * sigma2 + 2.0 * sigma2 * dof) / n
        # d value / d mu and d value / d mu_shifted, then through mu = X coef + b0.
        d_mu = (-2.0 * residual - 2.0 * sigma2 / epsilon * delta) / n
        d_mu_shifted = (2.0 * sigma2 / epsilon * delta) / n
        ga1, gl1 = penalty_gradient(
            model, data, design.rmatvec(d_mu).numpy(), float(d_mu.sum()), context
        )
        ga2, gl2 = penalty_gradient(
            shifted_model,
            shifted_data,
            design.rmatvec(d_mu_shifted).numpy(),
            float(d_mu_shifted.sum()),
            context,
        )
        return value, ga1 + ga2, gl1 + gl2
