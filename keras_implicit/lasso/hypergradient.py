"""Hypergradients of a criterion with respect to the (log) penalties of a Lasso-type model.

For the Lasso-type problems here the solution map is nonsmooth, but on a neighbourhood
where the support S and the signs s_S do not change it is given by the optimality
conditions restricted to S (a special case of the nonsmooth implicit function theorem
of Bolte et al., NeurIPS 2021, applied to the proximal-gradient fixed point):

    squared loss:  (Xc_S^T Xc_S / n + l2 I) b_S = Xc_S^T yc / n - alphas_S * s_S
    logistic:      grad_S f(b, b0) + alphas_S * s_S = 0,  d f / d b0 = 0

Differentiating, with ``K`` the restricted Hessian (``Xc_S^T Xc_S / n + l2 I``, or
``[X_S, 1]^T D [X_S, 1] / n`` with ``D = sigma (1 - sigma)`` for the logistic loss) and
``g`` the gradient of the criterion restricted to S (plus intercept), the adjoint
``v = K^{-1} g`` gives

    dC/d alphas_j = -v_j s_j  (j in S, 0 outside),     dC/d l2 = -v^T b_S,

and the model maps those to d/d(log hyperparameters). Only the |S| x |S| system is
solved: by Cholesky when |S| <= ``cholesky_max`` and by matrix-free conjugate gradient
(products with X_S and X_S^T) otherwise; the p x p system is never formed.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np
import tensorflow as tf

from keras_implicit import _validation as V
from keras_implicit.errors import ConvergenceWarning
from keras_implicit.lasso import _solver
from keras_implicit.lasso import estimators as est
from keras_implicit.lasso._data import DTYPE, as_design_input, as_target

RCOND_THRESHOLD = 1e-12  # below this estimated reciprocal condition: ridge fallback
RIDGE_SCALE = 1e-8  # ridge added, relative to the mean diagonal of the system
STALE_START_REFINEMENT = 1e-2  # tolerance factor when a warm start is returned unchanged


class EmptySupportWarning(UserWarning):
    """The solution is all zeros (penalty >= alpha_max): the hypergradient is zero.

    An outer loop should decrease the penalty (e.g. restart below ``alpha_max``)."""


class IllConditionedWarning(UserWarning):
    """The restricted system was (near) singular: a small ridge was added to solve it."""


@dataclasses.dataclass
class HypergradientInfo:
    """Diagnostics of one hypergradient evaluation (one entry per inner solve)."""

    support_sizes: list = dataclasses.field(default_factory=list)
    dual_gaps: list = dataclasses.field(default_factory=list)
    converged: list = dataclasses.field(default_factory=list)
    ridge: list = dataclasses.field(default_factory=list)
    linear_solvers: list = dataclasses.field(default_factory=list)
    empty_support: bool = False
    messages: list = dataclasses.field(default_factory=list)
    # Wall time of each inner fit (data conversion included, or the duality gap of a
    # given solution) and of the whole call; the rest is the differentiation itself.
    solve_seconds: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def differentiation_seconds(self) -> float:
        """Time spent outside the inner fits: restricted systems and criterion."""
        return max(self.seconds - sum(self.solve_seconds), 0.0)


class _Context:
    """How inner problems are solved during one hypergradient evaluation."""

    def __init__(self, coef, intercept, solver, state, linear_solver, cholesky_max, info):
        self.coef = coef
        self.intercept = intercept
        self.solver = solver
        self.state = state if state is not None else {}
        self.linear_solver = linear_solver
        self.cholesky_max = cholesky_max
        self.info = info
        self.used_override = False

    def fit(self, model, X, y, key, allow_override=True):
        """Fits ``model`` (in place) on (X, y); returns the prepared data.

        Order of precedence: a solution passed by the user (``coef=``), a user
        solver callable, then the built-in solver warm-started from the last solution
        stored under ``key`` in the search state (or, for a first solve, from the
        latest solution of any problem in that state, e.g. the previous CV fold).
        """
        tic = time.perf_counter()
        data_key = ("data", key)
        data = self.state.get(data_key)
        if data is None:
            data = model._prepare_checked(X, y)
            self.state[data_key] = data
        if self.coef is not None and allow_override:
            self.used_override = True
            self._set_solution(model, data, self.coef, self.intercept)
        elif self.solver is not None:
            coef, intercept = self.solver(model, X, y)
            self._set_solution(model, data, coef, intercept)
        else:
            start = self.state.get(("solution", key))
            if start is None:
                # First solve of this problem (e.g. the next CV fold, or SURE's shifted
                # problem): the latest solution of a sibling problem is a much better
                # start than zero (CV folds share most of their samples).
                latest = self.state.get(("solution", "latest"))
                if latest is not None and latest[0].shape == (data.design.p,):
                    start = latest
            model._fit_prepared(data, start)
            penalties = np.array(model.get_log_penalties(), dtype=np.float64)
            previous = self.state.get(("penalties", key))
            if model.n_iter_ == 0 and previous is not None and np.any(previous != penalties):
                # The solution at other penalties already met the tolerance at these:
                # returned as is, nearby penalties would give identical criterion
                # values, which a line search reads as "no decrease".
                model._fit_prepared(data, start, tol=model.tol * STALE_START_REFINEMENT)
            solution = (model.coef_.copy(), model.intercept_)
            self.state[("solution", key)] = self.state[("solution", "latest")] = solution
            self.state[("penalties", key)] = penalties
        self.info.dual_gaps.append(float(model.dual_gap_))
        self.info.converged.append(bool(model.converged_))
        self.info.solve_seconds.append(time.perf_counter() - tic)
        return data

    def _set_solution(self, model, data, coef, intercept):
        coef = np.asarray(coef, dtype=np.float64).ravel()
        if coef.shape != (data.design.p,):
            raise ValueError(
                f"`coef` must have one entry per feature ({data.design.p}). "
                f"Received shape {np.shape(coef)}."
            )
        if not np.all(np.isfinite(coef)):
            raise ValueError("`coef` contains NaN or infinity.")
        if intercept is None:
            if model._loss == "logistic" and model.fit_intercept:
                raise ValueError(
                    "`intercept` is required with `coef` for SparseLogisticRegression "
                    "with fit_intercept=True."
                )
            intercept = data.y_mean - float(data.x_mean @ coef)
        intercept = float(np.ravel(intercept)[0]) if model.fit_intercept else 0.0
        model.coef_, model.intercept_ = coef, intercept
        model.n_features_in_ = data.design.p
        if model._loss == "logistic":
            model.classes_ = data.classes
        gap, tol = external_gap(model, data)
        model.dual_gap_, model.n_iter_ = gap, 0
        model.converged_ = gap <= tol
        if not model.converged_:
            warnings.warn(
                f"The supplied solution is not optimal for {model!r}: duality gap "
                f"{gap:.3e} > tolerance {tol:.3e}. The hypergradient error grows with "
                "the duality gap.",
                ConvergenceWarning,
                stacklevel=4,
            )


def external_gap(model, data):
    """Duality gap (and the model's tolerance) of ``model.coef_`` on prepared data."""
    from keras_implicit.lasso import _kernels

    design, n = data.design, data.design.n
    alphas, l2 = model.penalty_vectors(design.p)
    coef = model.coef_
    if model._loss == "squared":
        y = data.target
        r = y - design.matvec(coef).numpy()
        xtr = design.rmatvec(r).numpy() / n
        gap, _ = _kernels.quadratic_gap(xtr, y @ r / n, r @ r / n, coef, alphas, l2)
        return float(gap), max(model.tol, _solver.TOL_FLOOR) * float(y @ y) / n
    y = data.target
    z = design.matvec(coef).numpy() + model.intercept_
    prob = 0.5 * (1.0 + np.tanh(-0.5 * y * z))
    xtr = design.rmatvec(y * prob).numpy() / n
    gap, _ = _kernels.logistic_gap(xtr, z, y, 1.0, n, alphas, coef)
    gap = float(gap)
    if model.fit_intercept:
        g0 = float(y @ prob) / n
        gap += g0 * g0 / (2.0 * max(float(np.sum(prob * (1 - prob))) / n, 1e-300))
    return gap, max(model.tol, _solver.TOL_FLOOR) * np.log(2.0)


# ---------------------------------------------------------------------------------
# Restricted linear systems
# ---------------------------------------------------------------------------------
def _cholesky_solve(H, rhs, info):
    """Solves H v = rhs; a ridge is added if H is (near) singular."""
    k = int(H.shape[0])
    L = tf.linalg.cholesky(H)
    diag = tf.linalg.diag_part(L).numpy()
    finite = np.all(np.isfinite(L.numpy()))
    rcond = (np.min(diag) / np.max(diag)) ** 2 if finite and np.max(diag) > 0 else 0.0
    ridge = 0.0
    if not finite or not rcond > RCOND_THRESHOLD:
        ridge = RIDGE_SCALE * max(float(tf.linalg.trace(H)) / k, 1e-300)
        H = H + ridge * tf.eye(k, dtype=DTYPE)
        L = tf.linalg.cholesky(H)
        message = (
            f"The restricted {k} x {k} system of the hypergradient is ill-conditioned "
            f"(estimated reciprocal condition {rcond:.1e}); solved with a ridge of "
            f"{ridge:.1e}. The support may contain (nearly) collinear features; the "
            "Lasso solution is then not unique and the hypergradient is one choice."
        )
        warnings.warn(message, IllConditionedWarning, stacklevel=5)
        info.messages.append(message)
    info.ridge.append(ridge)
    info.linear_solvers.append("cholesky")
    return tf.linalg.cholesky_solve(L, rhs[:, None])[:, 0]


def _conjugate_gradient(matvec, rhs, tol, max_iter):
    x = tf.zeros_like(rhs)
    r = rhs
    d = r
    rs = float(tf.tensordot(r, r, 1))
    target = tol * tol * rs
    for it in range(max_iter):
        if rs <= target:
            return x, True, it
        Ad = matvec(d)
        step = rs / float(tf.tensordot(d, Ad, 1))
        x = x + step * d
        r = r - step * Ad
        rs_new = float(tf.tensordot(r, r, 1))
        d = r + (rs_new / rs) * d
        rs = rs_new
    return x, rs <= target, max_iter


def _cg_solve(matvec, diag_mean, rhs, k, info, tol=1e-10):
    """Matrix-free CG; on failure retries with a ridge and warns."""
    max_iter = max(10 * k, 100)
    v, ok, _ = _conjugate_gradient(matvec, rhs, tol, max_iter)
    ridge = 0.0
    if not ok:
        ridge = RIDGE_SCALE * max(diag_mean, 1e-300)
        v, ok, _ = _conjugate_gradient(lambda u: matvec(u) + ridge * u, rhs, tol, max_iter)
        message = (
            f"Conjugate gradient on the restricted {k} x {k} system did not converge "
            f"(ill-conditioned); retried with a ridge of {ridge:.1e}"
            + ("." if ok else " and still did not reach the tolerance.")
        )
        warnings.warn(message, IllConditionedWarning, stacklevel=5)
        info.messages.append(message)
    info.ridge.append(ridge)
    info.linear_solvers.append("cg")
    return v


def _solve_restricted(block, weights, l2, rhs, context, gram=None):
    """Solves ``(block^T diag(weights) block + l2 I) v = rhs`` (weights None: 1/n).

    ``block`` is a callable returning the dense (n, k) block (built only if needed);
    ``gram``, if given, is ``block^T block / n`` (the solver's cached Gram block).
    """
    k = int(rhs.shape[0])
    rhs = tf.constant(rhs, DTYPE)
    use_cg = context.linear_solver == "cg" or (
        context.linear_solver == "auto" and k > context.cholesky_max
    )
    if not use_cg and gram is not None:
        H = tf.constant(gram + l2 * np.eye(k), DTYPE)
        return _cholesky_solve(H, rhs, context.info).numpy()
    block = block()
    n = int(block.shape[0])
    w = tf.fill([n], tf.constant(1.0 / n, DTYPE)) if weights is None else weights
    if not use_cg:
        H = tf.matmul(block, w[:, None] * block, transpose_a=True)
        H = H + l2 * tf.eye(k, dtype=DTYPE)
        return _cholesky_solve(H, rhs, context.info).numpy()

    def matvec(u):
        return tf.linalg.matvec(block, w * tf.linalg.matvec(block, u), transpose_a=True) + l2 * u

    diag_mean = float(tf.reduce_sum(w[:, None] * block**2)) / k + l2
    return _cg_solve(matvec, diag_mean, rhs, k, context.info).numpy()


def _empty_support(model, context):
    message = (
        f"The solution of {model!r} is all zeros (the penalty is at or above alpha_max): "
        "the hypergradient is 0. Decrease the penalty (e.g. start the search below "
        "ki.lasso.alpha_max(X, y))."
    )
    warnings.warn(message, EmptySupportWarning, stacklevel=5)
    context.info.empty_support = True
    context.info.messages.append(message)


def penalty_gradient(model, data, g_coef, g_intercept, context):
    """Adjoint step: ``(dC/d alphas (p,), dC/d l2)`` from the criterion gradient
    with respect to ``(coef_, intercept_)`` of the fitted ``model``."""
    coef = model.coef_
    p = coef.shape[0]
    _, l2 = model.penalty_vectors(p)
    support = np.flatnonzero(coef)
    context.info.support_sizes.append(int(support.size))
    grad_alphas = np.zeros(p)
    if support.size == 0:
        _empty_support(model, context)
        return grad_alphas, 0.0
    coef_s = coef[support]
    design = data.design
    if model._loss == "squared":
        # intercept = y_mean - x_mean^T coef: chain its gradient into the coefficients.
        rhs = g_coef[support] - g_intercept * data.x_mean[support]
        gram = _solver.cached_gram(design, support)  # the inner solver's Gram block
        v = _solve_restricted(lambda: design.columns(support), None, l2, rhs, context, gram)
    else:
        z = design.matvec(coef) + model.intercept_
        prob = tf.math.sigmoid(-tf.constant(data.target, DTYPE) * z)
        weights = prob * (1.0 - prob) / design.n
        rhs = g_coef[support]

        def block():
            columns = design.columns(support)
            if model.fit_intercept:
                columns = tf.concat([columns, tf.ones([design.n, 1], DTYPE)], axis=1)
            return columns

        if model.fit_intercept:
            rhs = np.append(rhs, g_intercept)
        v = _solve_restricted(block, weights, 0.0, rhs, context)[: support.size]
    grad_alphas[support] = -v * np.sign(coef_s)
    return grad_alphas, float(-v @ coef_s) if l2 > 0 else 0.0  # unused without a ridge


# ---------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------
def _check_model(model):
    if not isinstance(model, est._LassoFamily):
        raise ValueError(
            "`model` must be a ki.lasso estimator (Lasso, ElasticNet, WeightedLasso or "
            f"SparseLogisticRegression). Received: model={model!r}"
        )
    model._validate_common()
    model._validate_penalties()
    model.get_log_penalties()  # refuses penalties without a logarithm (alpha_l2=0)


def _checked_inputs(X, y, state):
    """``as_design_input`` / ``as_target``, once per (X, y) pair of a state.

    A state already reuses the data converted from the first (X, y) it saw, so a
    search's repeated calls with the same arrays skip the finite-value scan too (6 ms
    per call at 500 x 20000)."""
    if state is not None:
        seen = state.get("checked_inputs")
        if seen is not None and seen[0] is X and seen[1] is y:
            return seen[2], seen[3]
    X_checked = as_design_input(X)
    y_checked = as_target(y, X_checked.shape[0])
    if state is not None:
        state["checked_inputs"] = (X, y, X_checked, y_checked)
    return X_checked, y_checked


def hypergradient(
    model,
    criterion,
    X,
    y,
    *,
    coef=None,
    intercept=None,
    solver=None,
    linear_solver="auto",
    cholesky_max=2000,
    return_info=False,
    state=None,
):
    """Criterion value and its gradient with respect to the log hyperparameters.

    Args:
      model: a ``ki.lasso`` estimator carrying its penalties (``Lasso(alpha)``, ...).
        It is fitted in place on (X, y) (on the last fold for ``CrossVal``).
      criterion: ``HeldOutMSE``, ``HeldOutLogistic``, ``CrossVal`` or ``SURE``.
      X, y: training data (all the data for ``CrossVal``); dense or sparse X.
      coef, intercept: a solution computed by any external solver for the model
        fitted on (X, y) (single-fit criteria only). ``intercept`` defaults to
        ``mean(y) - mean(X) coef`` for the squared loss.
      solver: optional callable ``solver(model, X, y) -> (coef, intercept)`` used for
        every inner problem (e.g. scikit-learn), instead of the built-in solver.
      linear_solver: ``"auto"`` (Cholesky up to ``cholesky_max`` support size, else
        CG), ``"cholesky"`` or ``"cg"``.
      return_info: also return a ``HypergradientInfo``.
      state: a dict reused across calls to warm-start the inner solves and reuse the
        converted data (``search`` passes one). A warm start that already meets the
        model's ``tol`` at the new penalties is refined to ``tol / 100``, so that
        nearby penalties do not return the previous solution unchanged.

    Returns:
      ``(value, gradient)`` with ``gradient`` a 1-D numpy array with one entry per
      hyperparameter (1 for Lasso and SparseLogisticRegression, 2 for ElasticNet,
      n_features for WeightedLasso); ``(value, gradient, info)`` with ``return_info``.
    """
    from keras_implicit.lasso.criteria import Criterion

    _check_model(model)
    if not isinstance(criterion, Criterion):
        raise ValueError(
            "`criterion` must be a ki.lasso criterion (HeldOutMSE, HeldOutLogistic, "
            f"CrossVal, SURE). Received: criterion={criterion!r}"
        )
    V.one_of("linear_solver", linear_solver, ("auto", "cholesky", "cg"))
    V.non_negative_int("cholesky_max", cholesky_max)
    if solver is not None and not callable(solver):
        raise ValueError(f"`solver` must be callable. Received: solver={solver!r}")
    tic = time.perf_counter()
    X, y = _checked_inputs(X, y, state)
    info = HypergradientInfo()
    context = _Context(coef, intercept, solver, state, linear_solver, cholesky_max, info)
    value, grad_alphas, grad_l2 = criterion._evaluate(model, X, y, context)
    if coef is not None and not context.used_override:
        raise ValueError(
            f"`coef` can only be given for single-fit criteria; {type(criterion).__name__} "
            "solves several inner problems. Pass `solver=` instead."
        )
    gradient = np.asarray(model.log_penalty_gradient(grad_alphas, grad_l2), dtype=np.float64)
    if not (np.isfinite(value) and np.all(np.isfinite(gradient))):
        # The inner fits check their own arithmetic; this is the criterion's (e.g.
        # validation data or a supplied solution too large for float64).
        raise ValueError(
            f"The criterion or its hypergradient is not finite (value {value!r}, gradient "
            f"{gradient.tolist() if gradient.size <= 4 else 'with non-finite entries'}): "
            "float64 arithmetic overflowed on this data. Rescale X, y and the "
            "validation data (e.g. standardize the columns) before tuning."
        )
    info.seconds = time.perf_counter() - tic
    if return_info:
        return float(value), gradient, info
    return float(value), gradient
