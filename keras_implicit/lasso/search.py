"""First-order search of Lasso-type hyperparameters on a log scale (no keras-tuner).

Two optimizers on ``theta = log(penalties)``:
- ``"line_search"``: gradient descent with a backtracking (Armijo) line search, the
  approach sparse-ho found robust for these nonsmooth, piecewise-smooth criteria. Each
  iteration first tries the Barzilai-Borwein step of the last move (the secant of the
  hypergradient; the previous step doubled where the criterion was not convex along
  the move) and halves it after each rejected trial. No log penalty moves by more than
  ``MAX_LOG_MOVE`` per trial, and the search stops once trials would move the
  penalties by less than ``MIN_LOG_MOVE``. On a 5-fold CV search at p=5000 this
  reached 1% of LassoCV's best in 3 evaluations instead of 6 (doubling the step after
  each success overshot twice, once to a penalty 5x too small whose solves alone took
  3 s), and ended after 8 evaluations instead of 22;
- ``"adam"``: Adam with a fixed learning rate in log space.

Every criterion evaluation warm-starts the inner solves from the previous solution
(per fold for ``CrossVal``) and reuses the converted data and Gram blocks.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import keras
import numpy as np

from keras_implicit import _validation as V
from keras_implicit.lasso import estimators as est
from keras_implicit.lasso._data import as_design_input, as_target
from keras_implicit.lasso.hypergradient import (
    EmptySupportWarning,
    _check_model,
    hypergradient,
)

MAX_EMPTY_RESTARTS = 20
MAX_LOG_MOVE = 2.0  # largest change of a log penalty per line-search trial (x7.4)
MIN_LOG_MOVE = 1e-3  # a 0.1% change of a penalty: below what the inner tolerance resolves


@dataclasses.dataclass
class SearchResult:
    """Outcome of ``search``.

    Attributes:
      best_model: a new model with the best penalties, fitted on all of (X, y).
      best_penalties: the best hyperparameters (not their logs), 1-D array.
      best_value: the criterion at ``best_penalties``.
      trace: one dict per criterion evaluation with ``iteration``, ``criterion``,
        ``penalties``, ``grad_norm``, ``time`` (seconds for that evaluation),
        ``solve_time`` (the part spent in inner solves; the rest is the
        hypergradient), ``elapsed`` (seconds since the start), ``accepted`` and
        ``support_size``.
      n_iter: number of optimizer iterations.
      stop_reason: why the search stopped.
      messages: warnings raised by the hypergradient (empty support, ridge fallback).
    """

    best_model: object
    best_penalties: np.ndarray
    best_value: float
    trace: list
    n_iter: int
    stop_reason: str
    messages: list

    def history(self, key: str) -> np.ndarray:
        """``np.array([entry[key] for entry in trace])``, e.g. ``history("criterion")``."""
        return np.array([entry[key] for entry in self.trace])


class _Oracle:
    """Criterion value and gradient at log penalties, with trace and warm starts."""

    def __init__(self, model, criterion, X, y, hg_kwargs):
        self.model = model
        self.criterion = criterion
        self.X, self.y = X, y
        self.hg_kwargs = hg_kwargs
        self.state = {}
        self.trace = []
        self.messages = []
        self.warned = set()
        self.start = time.perf_counter()
        self.best = (np.inf, None)

    def __call__(self, theta, iteration):
        self.model.set_log_penalties(theta)
        tic = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value, grad, info = hypergradient(
                self.model,
                self.criterion,
                self.X,
                self.y,
                state=self.state,
                return_info=True,
                **self.hg_kwargs,
            )
        for w in caught:
            if issubclass(w.category, EmptySupportWarning):
                continue  # reported through `empty`, and handled by the search
            self.messages.append(str(w.message))
            if w.category not in self.warned:  # surface each kind once, not per step
                self.warned.add(w.category)
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        now = time.perf_counter()
        grad_norm = float(np.linalg.norm(grad))
        self.trace.append(
            {
                "iteration": iteration,
                "criterion": float(value),
                "penalties": np.exp(theta),
                "grad_norm": grad_norm,
                "time": now - tic,
                "elapsed": now - self.start,
                "accepted": True,
                "support_size": int(np.mean(info.support_sizes)) if info.support_sizes else 0,
                "solve_time": float(sum(info.solve_seconds)),
            }
        )
        if value < self.best[0]:
            self.best = (float(value), np.array(theta, dtype=np.float64))
        return float(value), grad, info.empty_support


def _start_below_alpha_max(oracle, theta):
    """Halves the penalties while the solution is empty (gradient identically zero)."""
    value, grad, empty = oracle(theta, 0)
    restarts = 0
    while empty and restarts < MAX_EMPTY_RESTARTS:
        theta = theta - np.log(2.0)
        restarts += 1
        value, grad, empty = oracle(theta, 0)
    if restarts:
        oracle.messages.append(
            f"The starting penalties gave an all-zero solution (penalty >= alpha_max); "
            f"they were halved {restarts} time(s) before the search started."
        )
    return theta, value, grad, empty


def _line_search(oracle, theta, value, grad, opts, progbar):
    step = opts["learning_rate"] or 1.0 / max(float(np.linalg.norm(grad)), 1e-300)
    best_history = [value]
    for it in range(1, opts["max_iter"] + 1):
        sq_norm = float(grad @ grad)
        if sq_norm == 0.0 or not np.isfinite(sq_norm):
            return it - 1, "zero gradient"
        largest = float(np.max(np.abs(grad)))
        # A long move towards small penalties is the costly mistake (solves there are
        # the slowest), so no log penalty moves by more than MAX_LOG_MOVE per trial.
        step = min(step, MAX_LOG_MOVE / largest)
        accepted = False
        for _ in range(opts["max_backtracks"]):
            if step * largest < MIN_LOG_MOVE:
                return it - 1, "line search steps fell below the penalty resolution"
            trial = theta - step * grad
            trial_value, trial_grad, _ = oracle(trial, it)
            if trial_value <= value - 1e-4 * step * sq_norm:
                accepted = True
                break
            oracle.trace[-1]["accepted"] = False
            step *= 0.5
        if not accepted:
            return it - 1, "line search found no decrease (at a minimum or a kink)"
        moved, grad_change = trial - theta, trial_grad - grad
        theta, value, grad = trial, trial_value, trial_grad
        curvature = float(moved @ grad_change)
        # Barzilai-Borwein: the step of the secant model along the last move (in one
        # dimension the secant root of the derivative); doubling where the criterion
        # is not convex along it.
        step = float(moved @ moved) / curvature if curvature > 0 else 2.0 * step
        best_history.append(min(best_history[-1], value))
        progbar.update(it, [("criterion", value), ("grad_norm", float(np.linalg.norm(grad)))])
        if _stalled(best_history, opts):
            return it, "no relative improvement above tol for `patience` iterations"
    return opts["max_iter"], "max_iter reached"


def _adam(oracle, theta, value, grad, opts, progbar):
    lr = opts["learning_rate"] or 0.2
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    best_history = [value]
    for it in range(1, opts["max_iter"] + 1):
        if not np.any(grad) or not np.all(np.isfinite(grad)):
            return it - 1, "zero gradient"
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad**2
        m_hat = m / (1 - beta1**it)
        v_hat = v / (1 - beta2**it)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
        value, grad, _ = oracle(theta, it)
        best_history.append(min(best_history[-1], value))
        progbar.update(it, [("criterion", value), ("grad_norm", float(np.linalg.norm(grad)))])
        if _stalled(best_history, opts):
            return it, "no relative improvement above tol for `patience` iterations"
    return opts["max_iter"], "max_iter reached"


def _stalled(best_history, opts):
    patience = opts["patience"]
    if len(best_history) <= patience:
        return False
    old, new = best_history[-patience - 1], best_history[-1]
    return old - new <= opts["tol"] * abs(old)


def search(
    model,
    criterion,
    X,
    y,
    *,
    optimizer="line_search",
    max_iter=50,
    learning_rate=None,
    tol=1e-4,
    patience=5,
    max_backtracks=8,
    refit=True,
    verbose=1,
    **hypergradient_kwargs,
):
    """Minimizes ``criterion`` over the log penalties of ``model`` by hypergradients.

    Args:
      model: a ``ki.lasso`` estimator; its penalties are the starting point (a good
        default is ``alpha_max(X, y) / 10``). It is not modified.
      criterion: ``HeldOutMSE``, ``HeldOutLogistic``, ``CrossVal`` or ``SURE``.
      X, y: training data (all the data for ``CrossVal``).
      optimizer: ``"line_search"`` or ``"adam"``.
      max_iter: maximum optimizer iterations.
      learning_rate: initial step in log space (line search: default
        ``1 / ||gradient||``, a unit move, then Barzilai-Borwein steps; Adam: default
        0.2).
      tol, patience: early stopping when the best criterion improved by less than
        ``tol`` (relative) over the last ``patience`` iterations.
      max_backtracks: line-search halvings before giving up.
      refit: fit ``best_model`` on (X, y) with the best penalties.
      verbose: 1 shows a ``keras.utils.Progbar``, 0 is silent.
      **hypergradient_kwargs: ``solver``, ``linear_solver``, ``cholesky_max`` passed
        to ``hypergradient``.

    Returns:
      A ``SearchResult`` (best model and penalties, trace, stop reason).
    """
    _check_model(model)
    V.one_of("optimizer", optimizer, ("line_search", "adam"))
    opts = {
        "max_iter": V.positive_int("max_iter", max_iter),
        "learning_rate": None
        if learning_rate is None
        else V.positive_float("learning_rate", learning_rate),
        "tol": V.non_negative_float("tol", tol),
        "patience": V.positive_int("patience", patience),
        "max_backtracks": V.positive_int("max_backtracks", max_backtracks),
    }
    allowed = {"solver", "linear_solver", "cholesky_max"}
    unknown = set(hypergradient_kwargs) - allowed
    if unknown:
        raise ValueError(
            f"Unknown arguments {sorted(unknown)}; `search` forwards only {sorted(allowed)} "
            "to `hypergradient`."
        )
    X = as_design_input(X)
    y = as_target(y, X.shape[0])
    working = est.clone(model)
    if isinstance(working, est.WeightedLasso) and np.ndim(working.alphas) == 0:
        working.alphas = np.full(X.shape[1], float(working.alphas))  # one per feature
    oracle = _Oracle(working, criterion, X, y, hypergradient_kwargs)
    progbar = keras.utils.Progbar(
        opts["max_iter"], verbose=verbose, stateful_metrics=["criterion", "grad_norm"]
    )
    theta = np.array(working.get_log_penalties(), dtype=np.float64)
    theta, value, grad, empty = _start_below_alpha_max(oracle, theta)
    if empty:
        n_iter, reason = 0, "empty support at every tried penalty"
    elif optimizer == "line_search":
        n_iter, reason = _line_search(oracle, theta, value, grad, opts, progbar)
    else:
        n_iter, reason = _adam(oracle, theta, value, grad, opts, progbar)
    if verbose:
        progbar.update(opts["max_iter"], finalize=True)
    best_value, best_theta = oracle.best
    best_model = est.clone(working).set_log_penalties(best_theta)
    if refit:
        _refit(best_model, oracle.state, X, y)
    return SearchResult(
        best_model=best_model,
        best_penalties=np.exp(best_theta),
        best_value=best_value,
        trace=oracle.trace,
        n_iter=n_iter,
        stop_reason=reason,
        messages=oracle.messages,
    )


def _refit(model, state, X, y):
    """Fits ``model`` on (X, y), reusing what the search already has: the converted
    data when the criterion trained on (X, y) itself (key "main"; cross-validation
    trains on folds), and the latest solution as the warm start (a refit from zero
    costs several times a warm solve). The penalties were validated when the search
    evaluated them."""
    data = state.get(("data", "main"))
    if data is None:
        data = model._prepare(X, y)
    start = state.get(("solution", "latest"))
    if start is not None and start[0].shape != (data.design.p,):
        start = None
    model._fit_prepared(data, start)


def alpha_max(X, y, fit_intercept=True, loss="squared"):
    """Smallest penalty with an all-zero solution: ``max_j |Xc_j^T r0| / n``.

    ``r0`` is the residual (squared loss) or the negative loss gradient (logistic)
    at the all-zero solution with the optimal intercept.
    """
    from keras_implicit.lasso._data import Design, labels_to_pm1

    V.one_of("loss", loss, ("squared", "logistic"))
    X = as_design_input(X)
    y = as_target(y, X.shape[0])
    n = X.shape[0]
    if loss == "squared":
        design = Design.centered(X)[0] if fit_intercept else Design(X)
        r = y - y.mean() if fit_intercept else y
        return float(np.max(np.abs(design.rmatvec(r).numpy()))) / n
    y_pm, _ = labels_to_pm1(y)
    if fit_intercept:
        positive = float(np.mean(y_pm > 0))
        b0 = np.log(positive / (1.0 - positive))
    else:
        b0 = 0.0
    prob = 1.0 / (1.0 + np.exp(y_pm * b0))
    return float(np.max(np.abs(Design(X).rmatvec(y_pm * prob).numpy()))) / n
