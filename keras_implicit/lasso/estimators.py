"""Lasso-type estimators with scikit-learn conventions and a TensorFlow inner solver.

Objectives (n samples; with ``fit_intercept=True`` the squared-loss models center X
and y exactly like scikit-learn, and the logistic model fits an unpenalized intercept):

- ``Lasso(alpha)``:            1/(2n) ||y - Xb||^2 + alpha ||b||_1
- ``ElasticNet(alpha_l1, alpha_l2)``:
                                1/(2n) ||y - Xb||^2 + alpha_l1 ||b||_1 + alpha_l2/2 ||b||^2
  (scikit-learn's ``ElasticNet(alpha, l1_ratio)`` is ``alpha_l1 = alpha * l1_ratio``,
  ``alpha_l2 = alpha * (1 - l1_ratio)``; each penalty is its own hyperparameter here so
  that hypergradients are taken with respect to each of them.)
- ``WeightedLasso(alphas)``:   1/(2n) ||y - Xb||^2 + sum_j alphas_j |b_j|
- ``SparseLogisticRegression(alpha)``:
                                1/n sum_i log(1 + exp(-y_i (x_i^T b + b0))) + alpha ||b||_1
  with labels in {-1, 1} or {0, 1} (any two labels: the smaller maps to -1). It matches
  scikit-learn's ``LogisticRegression(l1_ratio=1, C=1 / (n alpha), solver="saga")``.

Every model stops on its duality gap: ``gap <= tol * ||y - mean(y)||^2 / n`` for the
squared loss (scikit-learn's rule) and ``gap <= tol * log(2)`` for the logistic loss
(the objective at zero). Tolerances below ``10 * eps`` (2.2e-15, the rounding of
float64 gaps) are raised to it with a warning. ``dual_gap_`` reports the final gap of
the (1/n-normalized) objective above, ``n_iter_`` the number of working-set iterations.

Data are converted to float64 and ``coef_`` is float64 whatever the input dtype
(scikit-learn keeps float32). Arithmetic that overflows on the data raises a
ValueError (never a converged all-zero model).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import numpy as np
import scipy.sparse as sp

from keras_implicit import _validation as V
from keras_implicit.errors import ConvergenceWarning
from keras_implicit.lasso import _kernels, _solver
from keras_implicit.lasso._data import (
    Design,
    as_design_input,
    as_sample_weight,
    as_target,
    as_targets,
    check_n_features,
    is_real,
    labels_to_pm1,
    overflow_error,
)


@dataclasses.dataclass
class Prepared:
    """Training data converted once and reused by every fit on it (search, CV folds)."""

    design: Design  # weighted rows: diag(sqrt w) (X - mean) for the squared loss
    target: np.ndarray  # centered (weighted) y, (n,) or (n, targets); -1/+1 labels
    x_mean: np.ndarray  # zeros when nothing was centered
    y_mean: float | np.ndarray  # one per target
    classes: np.ndarray | None
    sample_weight: np.ndarray | None = None  # logistic loss: weights of the samples


def _linear_predict(X, coef, intercept):
    out = np.asarray(X @ coef.T)
    return (out.ravel() if coef.ndim == 1 else out) + intercept


def _normalized_weights(sample_weight, n):
    """scikit-learn's Lasso weights: rescaled to sum to n (the objective is a weighted
    average of the squared errors)."""
    return None if sample_weight is None else sample_weight * (n / np.sum(sample_weight))


class _LassoFamily:
    """Shared machinery: parameters, fitting, prediction, penalties as hyperparameters."""

    _loss = "squared"
    _penalty_params: tuple = ()

    # -- scikit-learn style parameters -------------------------------------------------
    @classmethod
    def _param_names(cls):
        signature = inspect.signature(cls.__init__)
        return [name for name in signature.parameters if name != "self"]

    def get_params(self, deep: bool = True) -> dict:
        del deep
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
        valid = self._param_names()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(
                    f"Invalid parameter {key!r} for {type(self).__name__}. "
                    f"Valid parameters: {valid}. Received: {key}={value!r}"
                )
            setattr(self, key, value)
        return self

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _validate_common(self):
        V.non_negative_float("tol", self.tol)
        if self.tol < _solver.TOL_FLOOR:
            warnings.warn(
                f"`tol={self.tol!r}` is below what float64 duality gaps resolve; "
                f"{type(self).__name__} stops at tol={_solver.TOL_FLOOR:.1e} instead. "
                f"Received: tol={self.tol!r}",
                UserWarning,
                stacklevel=3,
            )
        V.positive_int("max_iter", self.max_iter)
        for name in ("fit_intercept", "warm_start", "positive"):
            if hasattr(self, name) and not isinstance(getattr(self, name), bool | np.bool_):
                raise ValueError(
                    f"`{name}` must be a boolean. Received: {name}={getattr(self, name)!r}"
                )

    # -- penalties as hyperparameters --------------------------------------------------
    def penalty_vectors(self, n_features: int):
        """``(alphas, l2)``: per-feature l1 weights (length p) and the ridge strength.

        The penalties are not validated here: ``fit``, ``hypergradient`` and ``search``
        validate them once, on entry."""
        raise NotImplementedError

    def get_log_penalties(self) -> np.ndarray:
        """Log of the hyperparameters, the variables of hypergradient search."""
        raise NotImplementedError

    def set_log_penalties(self, log_penalties):
        raise NotImplementedError

    def log_penalty_gradient(self, grad_alphas: np.ndarray, grad_l2: float) -> np.ndarray:
        """Chain rule from d/d(alphas_j), d/d(l2) to d/d(log hyperparameters)."""
        raise NotImplementedError

    # -- data ---------------------------------------------------------------------------
    def _prepare(self, X, y, sample_weight=None) -> Prepared:
        X = as_design_input(X)
        convert = as_targets if self._loss == "squared" else as_target
        y = convert(y, X.shape[0])
        sample_weight = as_sample_weight(sample_weight, X.shape[0])
        return self._prepare_checked(X, y, sample_weight)

    def _prepare_checked(self, X, y, sample_weight=None) -> Prepared:
        n = X.shape[0]
        weights = _normalized_weights(sample_weight, n)
        root = None if weights is None else np.sqrt(weights)
        if root is not None and y.ndim == 2:
            root = root[:, None]
        if not self.fit_intercept:
            design = Design(X) if weights is None else Design.row_scaled(X, weights)
            target = y if root is None else root * y
            y_mean = 0.0 if y.ndim == 1 else np.zeros(y.shape[1])
            return Prepared(design, target, np.zeros(X.shape[1]), y_mean, None)
        with np.errstate(over="ignore", invalid="ignore"):
            design, x_mean = Design.centered(X, weights)
            y_mean = np.mean(y, axis=0) if weights is None else weights @ y / n
        if not (np.all(np.isfinite(x_mean)) and np.all(np.isfinite(y_mean))):
            raise overflow_error(
                "the mean of a column of X or of y (centering for fit_intercept=True)",
                Design(X),
                y,
            )
        y_mean = float(y_mean) if y.ndim == 1 else y_mean
        target = y - y_mean if root is None else root * (y - y_mean)
        return Prepared(design, target, x_mean, y_mean, None)

    # -- fitting --------------------------------------------------------------------------
    def fit(self, X, y, sample_weight=None):
        """Fits the model on dense or sparse X (numpy, scipy.sparse, tf.SparseTensor).

        Args:
          X: (n_samples, n_features) training data.
          y: (n_samples,) targets, or (n_samples, n_targets) for the squared-loss models:
            one independent problem per target (``coef_`` of shape (n_targets,
            n_features), as scikit-learn).
          sample_weight: optional (n_samples,) non-negative weights of the data-fit
            term. The squared-loss models rescale them to sum to n_samples, so that the
            data-fit term is the weighted average ``1/2 sum_i w_i r_i^2 / sum_i w_i``,
            as scikit-learn's Lasso and ElasticNet; the weighted mean centers the data.
        """
        self._validate_common()
        self._validate_penalties()
        data = self._prepare(X, y, sample_weight)
        start = self._warm_start_point(data) if self.warm_start else None
        self._fit_prepared(data, start)
        return self

    def _warm_start_point(self, data: Prepared):
        """``(coef, intercept)`` to start from with ``warm_start=True``, or None.

        As in scikit-learn, ``coef_`` alone is enough (e.g. set by hand, as a list or
        an integer array): the squared-loss models recompute the intercept from the
        centered data, the logistic model starts its intercept at ``intercept_`` if
        there is one and at 0 otherwise."""
        if getattr(self, "coef_", None) is None:
            return None
        coef = self._coef_array()
        shape = coef_shape(self, data)
        if coef.shape != shape:
            targets = f" and y has {shape[0]} targets" if len(shape) == 2 else ""
            raise ValueError(
                f"`warm_start=True` starts from `coef_`, which has {coef.size} entries, but "
                f"X has {data.design.p} features{targets}. Set `warm_start=False` or assign "
                "a `coef_` with one entry per feature (and target). Received: coef_ of "
                f"shape {np.shape(self.coef_)}"
            )
        if not np.all(np.isfinite(coef)):
            raise ValueError(
                "`warm_start=True` starts from `coef_`, which contains NaN or infinity. "
                "Set `warm_start=False` or assign a finite `coef_`."
            )
        intercept = getattr(self, "intercept_", None) if self.fit_intercept else None
        intercept = 0.0 if intercept is None else float(np.ravel(intercept)[0])
        if not np.isfinite(intercept):
            intercept = 0.0
        return coef, intercept

    def _coef_array(self) -> np.ndarray:
        """``coef_`` as a float64 array: (n_features,), or (n_targets, n_features)
        (it may have been assigned a list)."""
        try:
            coef = np.asarray(self.coef_, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"`coef_` must be a numeric array. Received: coef_={self.coef_!r}"
            ) from err
        if coef.ndim == 2 and coef.shape[0] == 1:  # scikit-learn's (1, n_features)
            coef = coef[0]
        if coef.ndim != 1 and not (coef.ndim == 2 and self._loss == "squared"):
            raise ValueError(
                "`coef_` must be 1-D (n_features,)"
                + (" or 2-D (n_targets, n_features)" if self._loss == "squared" else "")
                + f". Received: coef_ of shape {coef.shape}"
            )
        return coef

    def _fit_prepared(self, data: Prepared, start=None, tol=None):
        """Fits on prepared data, one problem per target; ``start = (coef, intercept)``
        warm-starts the solver; ``tol`` overrides ``self.tol`` for this fit."""
        alphas, l2 = self.penalty_vectors(data.design.p)
        targets = data.target.reshape(data.design.n, -1)
        starts = None
        if start is not None:
            starts = np.asarray(start[0], dtype=np.float64).reshape(targets.shape[1], -1)
        solutions = []
        for t in range(targets.shape[1]):
            solution = _solver.solve_quadratic(
                data.design,
                targets[:, t],
                alphas,
                l2,
                None if starts is None else starts[t],
                self.tol if tol is None else tol,
                self.max_iter,
                positive=bool(self.positive),
            )
            y_mean = np.ravel(data.y_mean)[t] if np.ndim(data.y_mean) else data.y_mean
            solution.intercept = y_mean - float(data.x_mean @ solution.coef)
            solutions.append(solution)
        self._store(solutions, data)
        return solutions[0] if data.target.ndim == 1 else solutions

    def _store(self, solutions, data: Prepared):
        single = data.target.ndim == 1
        coef = np.array([s.coef for s in solutions])
        intercept = np.array([float(s.intercept) for s in solutions])
        self.coef_ = coef[0] if single else coef
        if not self.fit_intercept:
            self.intercept_ = 0.0
        else:
            self.intercept_ = float(intercept[0]) if single else intercept
        gaps = np.array([float(s.gap) for s in solutions])
        self.dual_gap_ = float(gaps[0]) if single else gaps
        self.n_iter_ = int(solutions[0].n_iter) if single else [int(s.n_iter) for s in solutions]
        self.n_features_in_ = int(data.design.p)
        self.converged_ = all(bool(s.converged) for s in solutions)
        for t, solution in enumerate(solutions):
            if not solution.converged:
                where = "" if single else f" on target {t}"
                warnings.warn(
                    f"{type(self).__name__} did not converge{where}: duality gap "
                    f"{solution.gap:.3e} > tolerance {solution.tol:.3e} after "
                    f"{solution.n_iter} iterations (max_iter={self.max_iter}). Increase "
                    "`max_iter` or `tol`; hypergradients computed from this solution are "
                    "inexact (their error grows with the duality gap).",
                    ConvergenceWarning,
                    stacklevel=3,
                )

    # -- prediction -----------------------------------------------------------------------
    def _check_fitted(self, need_intercept=True):
        if getattr(self, "coef_", None) is None or (
            need_intercept and getattr(self, "intercept_", None) is None
        ):
            raise ValueError(
                f"This {type(self).__name__} is not fitted yet (it needs `coef_` and "
                "`intercept_`). Call `fit` first."
            )

    def _decision(self, X):
        self._check_fitted()
        coef = self._coef_array()
        X = as_design_input(X)
        check_n_features(X, coef.shape[-1])
        intercept = np.asarray(self.intercept_, dtype=np.float64)
        return _linear_predict(X, coef, intercept if coef.ndim == 2 else float(intercept))

    def predict(self, X) -> np.ndarray:
        """Linear predictions ``X coef_^T + intercept_``: (n,), or (n, n_targets)."""
        return self._decision(X)

    def score(self, X, y, sample_weight=None) -> float:
        """Coefficient of determination R^2 (as scikit-learn's regressors: weighted by
        ``sample_weight``, averaged uniformly over targets)."""
        pred = self.predict(X)
        y = as_targets(y, pred.shape[0]).reshape(pred.shape)
        w = as_sample_weight(sample_weight, pred.shape[0])
        w = np.ones(pred.shape[0]) if w is None else w
        y2, pred2 = y.reshape(y.shape[0], -1), pred.reshape(y.shape[0], -1)
        scores = []
        for t in range(y2.shape[1]):
            residual = w @ (y2[:, t] - pred2[:, t]) ** 2
            total = w @ (y2[:, t] - np.average(y2[:, t], weights=w)) ** 2
            if total == 0:
                scores.append(1.0 if residual == 0 else 0.0)
            else:
                scores.append(1.0 - residual / total)
        return float(np.mean(scores))

    @property
    def sparse_coef_(self):
        """``coef_`` as a (1, n_features) or (n_targets, n_features) scipy CSR matrix."""
        self._check_fitted(need_intercept=False)
        return sp.csr_matrix(np.atleast_2d(self._coef_array()))


def _check_penalty(name, value):
    """Positive finite penalty (they are optimized on a log scale)."""
    if not is_real(value) or not np.isfinite(value) or not value > 0:
        raise ValueError(
            f"`{name}` must be a positive finite number (penalties are tuned on a log "
            f"scale). Received: {name}={value!r}"
        )
    return float(value)


class Lasso(_LassoFamily):
    """``1/(2n) ||y - Xb||^2 + alpha ||b||_1``, same solution as scikit-learn's Lasso.

    Args:
      alpha: positive l1 strength.
      fit_intercept: center X and y (like scikit-learn) and recover the intercept.
      tol: stop when the duality gap <= ``tol * ||y - mean(y)||^2 / n``.
      max_iter: maximum number of working-set iterations (each one pass over the data
        plus an XLA coordinate-descent solve restricted to the working set).
      warm_start: start from the previous ``coef_``.
      positive: constrain the coefficients to be non-negative (scikit-learn's
        ``positive=True``); hypergradients are then restricted to the positive support.

    ``fit(X, y, sample_weight=None)`` accepts y of shape (n,) or (n, n_targets) (one
    problem per target) and sample weights, as scikit-learn's Lasso.

    Attributes: ``coef_`` ((n_features,) or (n_targets, n_features)), ``intercept_``,
    ``dual_gap_``, ``n_iter_`` (one per target for a 2-D y), ``converged_``.
    """

    _penalty_params = ("alpha",)

    def __init__(
        self,
        alpha=1.0,
        fit_intercept=True,
        tol=1e-4,
        max_iter=100,
        warm_start=False,
        positive=False,
    ):
        self.alpha = alpha
        self.fit_intercept = fit_intercept
        self.tol = tol
        self.max_iter = max_iter
        self.warm_start = warm_start
        self.positive = positive

    def _validate_penalties(self, tunable=False):
        del tunable
        _check_penalty("alpha", self.alpha)

    def penalty_vectors(self, n_features):
        return np.full(n_features, float(self.alpha)), 0.0

    def get_log_penalties(self):
        return np.array([np.log(_check_penalty("alpha", self.alpha))])

    def set_log_penalties(self, log_penalties):
        (value,) = np.asarray(log_penalties, dtype=np.float64).ravel()
        self.alpha = float(np.exp(value))
        return self

    def log_penalty_gradient(self, grad_alphas, grad_l2):
        return np.array([self.alpha * float(np.sum(grad_alphas))])


class ElasticNet(_LassoFamily):
    """``1/(2n) ||y - Xb||^2 + alpha_l1 ||b||_1 + alpha_l2/2 ||b||^2``.

    scikit-learn's ``ElasticNet(alpha, l1_ratio)`` is ``alpha_l1 = alpha * l1_ratio`` and
    ``alpha_l2 = alpha * (1 - l1_ratio)``; see ``from_sklearn_params`` and
    ``sklearn_params``. Both penalties are hyperparameters (gradient of length 2).

    ``alpha_l2 = 0`` (scikit-learn's ``l1_ratio=1``) fits the Lasso; such a model
    cannot be tuned on a log scale (``hypergradient`` and ``search`` refuse it: use
    ``Lasso``). ``alpha_l1`` must be positive: without an l1 penalty the problem is a
    ridge regression, for which these sparse solvers are the wrong tool.

    ``positive=True`` constrains the coefficients to be non-negative; ``fit`` accepts
    ``sample_weight`` and a 2-D y (one problem per target), as ``Lasso``.
    """

    _penalty_params = ("alpha_l1", "alpha_l2")

    def __init__(
        self,
        alpha_l1=1.0,
        alpha_l2=1.0,
        fit_intercept=True,
        tol=1e-4,
        max_iter=100,
        warm_start=False,
        positive=False,
    ):
        self.alpha_l1 = alpha_l1
        self.alpha_l2 = alpha_l2
        self.fit_intercept = fit_intercept
        self.tol = tol
        self.max_iter = max_iter
        self.warm_start = warm_start
        self.positive = positive

    @classmethod
    def from_sklearn_params(cls, alpha, l1_ratio, **kwargs):
        """Builds the model equal to scikit-learn's ``ElasticNet(alpha, l1_ratio)``.

        ``l1_ratio=1`` gives ``alpha_l2=0`` (the Lasso). ``l1_ratio=0`` (a pure ridge
        penalty, which scikit-learn documents as unreliable for its coordinate
        descent) is refused."""
        if not is_real(alpha) or not np.isfinite(alpha) or not alpha > 0:
            raise ValueError(f"`alpha` must be a positive finite number. Received: alpha={alpha!r}")
        if is_real(l1_ratio) and l1_ratio == 0:
            raise ValueError(
                "`l1_ratio=0` is a pure ridge penalty: ki.lasso models need an l1 "
                "penalty (alpha_l1 > 0). For a ridge regression use e.g. "
                "sklearn.linear_model.Ridge(alpha=alpha * n_samples). "
                f"Received: l1_ratio={l1_ratio!r}"
            )
        V.float_in_range("l1_ratio", l1_ratio, 0.0, 1.0, low_open=True)
        return cls(alpha_l1=alpha * l1_ratio, alpha_l2=alpha * (1.0 - l1_ratio), **kwargs)

    @property
    def sklearn_params(self) -> dict:
        """``{"alpha": ..., "l1_ratio": ...}`` of the equivalent scikit-learn model."""
        total = self.alpha_l1 + self.alpha_l2
        return {"alpha": total, "l1_ratio": self.alpha_l1 / total}

    def _validate_penalties(self, tunable=False):
        _check_penalty("alpha_l1", self.alpha_l1)
        value = self.alpha_l2
        if not is_real(value) or not np.isfinite(value) or not value >= 0:
            raise ValueError(
                "`alpha_l2` must be a non-negative finite number (0 fits the Lasso). "
                f"Received: alpha_l2={value!r}"
            )
        if tunable and value == 0:
            raise ValueError(
                "An ElasticNet with `alpha_l2=0` (scikit-learn's l1_ratio=1) is a Lasso: "
                "its ridge penalty has no logarithm, so it cannot be tuned on a log "
                "scale. Use ki.lasso.Lasso(alpha=alpha_l1) for hypergradients and "
                f"search, or a positive alpha_l2. Received: alpha_l2={value!r}"
            )

    def penalty_vectors(self, n_features):
        return np.full(n_features, float(self.alpha_l1)), float(self.alpha_l2)

    def get_log_penalties(self):
        self._validate_penalties(tunable=True)
        return np.log([float(self.alpha_l1), float(self.alpha_l2)])

    def set_log_penalties(self, log_penalties):
        values = np.exp(np.asarray(log_penalties, dtype=np.float64).ravel())
        self.alpha_l1, self.alpha_l2 = float(values[0]), float(values[1])
        return self

    def log_penalty_gradient(self, grad_alphas, grad_l2):
        return np.array(
            [self.alpha_l1 * float(np.sum(grad_alphas)), self.alpha_l2 * float(grad_l2)]
        )


class WeightedLasso(_LassoFamily):
    """``1/(2n) ||y - Xb||^2 + sum_j alphas_j |b_j|``: one penalty per feature.

    ``alphas`` is an array of length n_features (a scalar is broadcast at ``fit``;
    ``set_log_penalties`` then stores the full vector). Its hypergradient has one entry
    per feature; features outside the support get a zero gradient.

    ``positive=True`` constrains the coefficients to be non-negative; ``fit`` accepts
    ``sample_weight`` and a 2-D y (one problem per target), as ``Lasso``.
    """

    _penalty_params = ("alphas",)

    def __init__(
        self,
        alphas=1.0,
        fit_intercept=True,
        tol=1e-4,
        max_iter=100,
        warm_start=False,
        positive=False,
    ):
        self.alphas = alphas
        self.fit_intercept = fit_intercept
        self.tol = tol
        self.max_iter = max_iter
        self.warm_start = warm_start
        self.positive = positive

    def _alphas_array(self):
        values = (
            np.asarray(self.alphas, dtype=np.float64) if not isinstance(self.alphas, str) else None
        )
        if values is None or values.ndim > 1 or values.size == 0:
            raise ValueError(
                "`alphas` must be a positive number or a 1-D array of positive numbers. "
                f"Received: alphas={self.alphas!r}"
            )
        bad = ~(np.isfinite(values) & (values > 0))
        if np.any(bad):
            j = int(np.flatnonzero(bad.ravel())[0])
            where = "" if values.ndim == 0 else f"[{j}]"
            raise ValueError(
                "`alphas` must contain positive finite numbers (penalties are tuned on a "
                f"log scale). Received: alphas{where}={float(values.ravel()[j])!r}"
            )
        return values

    def _validate_penalties(self, tunable=False):
        del tunable
        self._alphas_array()

    def penalty_vectors(self, n_features):
        values = np.asarray(self.alphas, dtype=np.float64)
        if values.ndim == 0:
            return np.full(n_features, float(values)), 0.0
        if values.shape[0] != n_features:
            raise ValueError(
                f"`alphas` has {values.shape[0]} entries but X has {n_features} features."
            )
        return values.copy(), 0.0

    def get_log_penalties(self):
        return np.log(np.atleast_1d(self._alphas_array()))

    def set_log_penalties(self, log_penalties):
        self.alphas = np.exp(np.asarray(log_penalties, dtype=np.float64).ravel())
        return self

    def log_penalty_gradient(self, grad_alphas, grad_l2):
        alphas = self.penalty_vectors(grad_alphas.shape[0])[0]
        return alphas * grad_alphas


class SparseLogisticRegression(_LassoFamily):
    """``1/n sum_i log(1 + exp(-y_i (x_i^T b + b0))) + alpha ||b||_1``.

    Labels: any two values (e.g. {-1, 1} or {0, 1}); the smaller maps to -1. Same
    solution as scikit-learn's ``LogisticRegression(l1_ratio=1, C=1/(n alpha),
    solver="saga")`` (note that ``solver="liblinear"`` penalizes the intercept).
    Inner solver: working-set proximal Newton (XLA). ``tol``: gap <= tol log(2).

    ``fit(X, y, sample_weight=None)``: the weights multiply the samples' losses,
    ``1/n sum_i w_i log(1 + exp(...))``, as in scikit-learn's LogisticRegression (not
    rescaled). ``y`` has one target (binary labels).
    """

    _loss = "logistic"
    _penalty_params = ("alpha",)

    def __init__(self, alpha=1.0, fit_intercept=True, tol=1e-4, max_iter=100, warm_start=False):
        self.alpha = alpha
        self.fit_intercept = fit_intercept
        self.tol = tol
        self.max_iter = max_iter
        self.warm_start = warm_start

    _validate_penalties = Lasso._validate_penalties
    penalty_vectors = Lasso.penalty_vectors
    get_log_penalties = Lasso.get_log_penalties
    set_log_penalties = Lasso.set_log_penalties
    log_penalty_gradient = Lasso.log_penalty_gradient

    def _prepare_checked(self, X, y, sample_weight=None):
        if y.ndim != 1:
            raise ValueError(
                "`y` must be 1-D (n_samples,): SparseLogisticRegression fits one binary "
                f"target. Received shape {y.shape}."
            )
        y_pm, classes = labels_to_pm1(y)
        return Prepared(Design(X), y_pm, np.zeros(X.shape[1]), 0.0, classes, sample_weight)

    def _fit_prepared(self, data, start=None, tol=None):
        alphas, _ = self.penalty_vectors(data.design.p)
        coef0, intercept0 = (None, 0.0) if start is None else start
        solution = _solver.solve_logistic(
            data.design,
            data.target,
            alphas,
            self.fit_intercept,
            coef0,
            intercept0,
            self.tol if tol is None else tol,
            self.max_iter,
            sample_weight=data.sample_weight,
        )
        self.classes_ = data.classes
        self._store([solution], data)
        return solution

    def decision_function(self, X) -> np.ndarray:
        """``X coef_ + intercept_`` (positive means ``classes_[1]``)."""
        return self._decision(X)

    def predict_proba(self, X) -> np.ndarray:
        """(n, 2) probabilities of ``classes_[0]`` and ``classes_[1]``."""
        z = self.decision_function(X)
        positive = 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free sigmoid
        return np.stack([1.0 - positive, positive], axis=1)

    def predict(self, X) -> np.ndarray:
        return np.where(self.decision_function(X) > 0, self.classes_[1], self.classes_[0])

    def score(self, X, y, sample_weight=None) -> float:
        """Mean accuracy (weighted by ``sample_weight``)."""
        pred = self.predict(X)
        y = np.asarray(y).ravel()
        if y.shape[0] != pred.shape[0]:
            raise ValueError(
                f"`X` and `y` have mismatched numbers of samples: {pred.shape[0]} and {y.shape[0]}."
            )
        w = as_sample_weight(sample_weight, pred.shape[0])
        return float(np.average(pred == y, weights=w))


def clone(model):
    """A new unfitted model with the same parameters (arrays copied)."""
    params = {
        k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in model.get_params().items()
    }
    return type(model)(**params)


# -------------------------------------------------------------------------------------
# The interface the rest of ki.lasso uses (hypergradients, search, state)
# -------------------------------------------------------------------------------------
def check_model(model):
    """Validates ``model`` once, where ``hypergradient`` and ``search`` receive it:
    a ki.lasso estimator with valid settings and penalties that have a logarithm."""
    if not isinstance(model, _LassoFamily):
        raise ValueError(
            "`model` must be a ki.lasso estimator (Lasso, ElasticNet, WeightedLasso or "
            f"SparseLogisticRegression). Received: model={model!r}"
        )
    model._validate_common()
    model._validate_penalties(tunable=True)


def loss_of(model) -> str:
    """``"squared"`` or ``"logistic"``: the data-fit term of ``model``."""
    return model._loss


def prepare(model, X, y, sample_weight=None) -> Prepared:
    """Converts checked (X, y, sample_weight) once for every fit of ``model``'s kind."""
    return model._prepare_checked(X, y, sample_weight)


def fit_prepared(model, data: Prepared, start=None, tol=None):
    """Fits ``model`` in place on prepared data; ``start = (coef, intercept)``
    warm-starts the solver and ``tol`` overrides ``model.tol`` for this fit."""
    return model._fit_prepared(data, start, tol)


def coef_shape(model, data: Prepared) -> tuple:
    """Shape of ``coef_`` for ``model`` fitted on ``data``."""
    del model
    if data.target.ndim == 2:
        return (data.target.shape[1], data.design.p)
    return (data.design.p,)


def set_solution(model, data: Prepared, coef, intercept):
    """Stores a solution computed elsewhere on ``model`` (fitted on ``data``), with
    its duality gap; warns when the gap exceeds the model's tolerance."""
    shape = coef_shape(model, data)
    coef = np.asarray(coef, dtype=np.float64)
    coef = coef.ravel() if len(shape) == 1 else coef.reshape(-1, data.design.p)
    if coef.shape != shape:
        raise ValueError(
            f"`coef` must have one entry per feature ({data.design.p})"
            + (f" and target ({shape[0]})" if len(shape) == 2 else "")
            + f". Received shape {np.shape(coef)}."
        )
    if not np.all(np.isfinite(coef)):
        raise ValueError("`coef` contains NaN or infinity.")
    if intercept is None:
        if model._loss == "logistic" and model.fit_intercept:
            raise ValueError(
                "`intercept` is required with `coef` for SparseLogisticRegression "
                "with fit_intercept=True."
            )
        intercept = data.y_mean - coef @ data.x_mean
    intercept = np.asarray(intercept, dtype=np.float64).ravel()
    if not model.fit_intercept:
        intercept = np.zeros_like(intercept)
    model.coef_ = coef
    model.intercept_ = float(intercept[0]) if len(shape) == 1 else intercept
    model.n_features_in_ = data.design.p
    if model._loss == "logistic":
        model.classes_ = data.classes
    gaps, tol = _solution_gap(model, data)
    model.dual_gap_ = float(gaps[0]) if len(shape) == 1 else gaps
    model.n_iter_ = 0 if len(shape) == 1 else [0] * shape[0]
    model.converged_ = bool(np.all(gaps <= tol))
    if not model.converged_:
        warnings.warn(
            f"The supplied solution is not optimal for {model!r}: duality gap "
            f"{np.max(gaps):.3e} > tolerance {tol[np.argmax(gaps - tol)]:.3e}. The "
            "hypergradient error grows with the duality gap.",
            ConvergenceWarning,
            stacklevel=5,
        )


def _solution_gap(model, data: Prepared):
    """Duality gaps of ``model.coef_`` on prepared data and the model's absolute
    tolerances (one per target)."""
    design, n = data.design, data.design.n
    alphas, l2 = model.penalty_vectors(design.p)
    if model._loss == "squared":
        targets = data.target.reshape(n, -1)
        coefs = np.reshape(model.coef_, (targets.shape[1], -1))
        positive = bool(model.positive)
        gaps = []
        for y, coef in zip(targets.T, coefs):
            r = y - design.matvec(coef).numpy()
            xtr = design.rmatvec(r).numpy() / n
            gap, _ = _kernels.quadratic_gap(
                xtr, y @ r / n, r @ r / n, coef, alphas, l2, positive=positive
            )
            gaps.append(float(gap))
        yy = np.sum(targets**2, axis=0) / n
        return np.array(gaps), max(model.tol, _solver.TOL_FLOOR) * yy
    y, coef = data.target, model.coef_
    w = np.ones(n) if data.sample_weight is None else data.sample_weight
    z = design.matvec(coef).numpy() + model.intercept_
    prob = 0.5 * (1.0 + np.tanh(-0.5 * y * z))
    xtr = design.rmatvec(w * y * prob).numpy() / n
    gap = float(_kernels.logistic_gap(xtr, z, y, w, n, alphas, coef)[0])
    if model.fit_intercept:
        g0 = float((w * y) @ prob) / n
        gap += g0 * g0 / (2.0 * max(float(np.sum(w * prob * (1 - prob))) / n, 1e-300))
    return np.array([gap]), np.array([max(model.tol, _solver.TOL_FLOOR) * np.log(2.0)])
