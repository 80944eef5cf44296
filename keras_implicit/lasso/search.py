"""First-order search of Lasso-type hyperparameters on a log scale (no keras-tuner).

``search`` evaluates the criterion and its hypergradient at ``theta = log(penalties)``
and lets a step policy of ``keras_implicit.lasso.steps`` choose the next point: a
Barzilai-Borwein line search (the default), quasi-Newton or Adam. Every criterion
evaluation warm-starts the inner solves from the previous solution (per fold for
``CrossVal``) and reuses the converted data and Gram blocks.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import keras
import numpy as np

from keras_implicit import _validation as V
from keras_implicit.lasso import estimators as est
from keras_implicit.lasso import steps
from keras_implicit.lasso._data import as_design_input, as_target
from keras_implicit.lasso._state import HypergradientState
from keras_implicit.lasso.hypergradient import EmptySupportWarning, hypergradient

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
        self.state = HypergradientState()
        self.trace = []
        self.messages = []
        self.warned = set()
        self.start = time.perf_counter()
        self.best = (np.inf, None)
        self.best_solution = None  # (coef, intercept) at the best penalties

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
            coef = getattr(self.model, "coef_", None)  # hypergradient fits the model
            if coef is not None:
                self.best_solution = (np.array(coef), float(self.model.intercept_))
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


def _descend(policy, oracle, theta, value, grad, max_iter, progbar):
    """Runs ``policy`` from the evaluated point ``theta`` for at most ``max_iter``
    accepted moves; returns ``(n_iter, stop_reason)``."""
    policy.observe(theta, value, grad)
    while policy.stop_reason is None and policy.n_iter < max_iter:
        trial = policy.propose()
        if trial is None:
            break
        value, grad, _ = oracle(trial, policy.n_iter + 1)
        policy.observe(trial, value, grad)
        oracle.trace[-1]["accepted"] = policy.accepted
        if policy.accepted:
            metrics = [("criterion", value), ("grad_norm", float(np.linalg.norm(grad)))]
            progbar.update(policy.n_iter, metrics)
    return policy.n_iter, policy.stop_reason or "max_iter reached"


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
      optimizer: the step policy (``keras_implicit.lasso.steps``):
        ``"line_search"`` (Barzilai-Borwein steps with an Armijo line search; no log
        penalty moves by more than ``MAX_LOG_MOVE`` per trial), ``"quasi_newton"``
        (L-BFGS steps on the log of the criterion, a first step of one decade, a
        probe back from plateaus where a penalty switched all of its features off;
        fewer evaluations on one or two penalties) or ``"adam"``.
      max_iter: maximum number of accepted moves.
      learning_rate: the first step in log space per unit gradient (quasi-Newton:
        default a move of length log(10); line search: default ``1 / ||gradient||``,
        a unit move), or Adam's initial learning rate (default 0.2, halved whenever
        the criterion goes up).
      tol, patience: early stopping when the best criterion improved by less than
        ``tol`` (relative) over the last ``patience`` evaluations. Every optimizer
        also stops when its next move changes each log penalty by less than
        ``MIN_LOG_MOVE``.
      max_backtracks: consecutive rejected trials before giving up.
      refit: fit ``best_model`` on (X, y) with the best penalties.
      verbose: 1 shows a ``keras.utils.Progbar``, 0 is silent.
      **hypergradient_kwargs: ``solver``, ``linear_solver``, ``cholesky_max`` passed
        to ``hypergradient``.

    Returns:
      A ``SearchResult`` (best model and penalties, trace, stop reason).
    """
    est.check_model(model)
    V.one_of("optimizer", optimizer, tuple(steps.POLICIES))
    max_iter = V.positive_int("max_iter", max_iter)
    settings = {
        "learning_rate": None
        if learning_rate is None
        else V.positive_finite_float("learning_rate", learning_rate),
        "tol": V.non_negative_float("tol", tol),
        "patience": V.positive_int("patience", patience),
        "max_backtracks": V.positive_int("max_backtracks", max_backtracks),
        "min_step": MIN_LOG_MOVE,
    }
    if optimizer == "line_search":
        settings["max_move"] = MAX_LOG_MOVE
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
        max_iter, verbose=verbose, stateful_metrics=["criterion", "grad_norm"]
    )
    theta = np.array(working.get_log_penalties(), dtype=np.float64)
    theta, value, grad, empty = _start_below_alpha_max(oracle, theta)
    if empty:
        n_iter, reason = 0, "empty support at every tried penalty"
    else:
        policy = steps.make_policy(optimizer, theta, **settings)
        n_iter, reason = _descend(policy, oracle, theta, value, grad, max_iter, progbar)
    if verbose:
        progbar.update(max_iter, finalize=True)
    best_value, best_theta = oracle.best
    best_model = est.clone(working).set_log_penalties(best_theta)
    if refit:
        _refit(best_model, oracle.state, X, y, oracle.best_solution)
    return SearchResult(
        best_model=best_model,
        best_penalties=np.exp(best_theta),
        best_value=best_value,
        trace=oracle.trace,
        n_iter=n_iter,
        stop_reason=reason,
        messages=oracle.messages,
    )


def _refit(model, state, X, y, start):
    """Fits ``model`` on (X, y), reusing what the search already has: the converted
    data when the criterion trained on (X, y) itself (key "main"; cross-validation
    trains on folds), and ``start``, the solution at the best penalties (on the last
    fold for cross-validation), as the warm start, refined to ``tol / 100``: a
    solution to ``tol`` is less accurate than what a fit from zero returns (it ends
    with an exact solve on its support). The penalties were validated when the
    search evaluated them."""
    main = state.problems.get("main")
    data = est.prepare(model, X, y) if main is None or main.data is None else main.data
    if start is not None and start[0].shape != est.coef_shape(model, data):
        start = None
    est.fit_prepared(model, data, start, tol=None if start is None else model.tol / 100)


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
