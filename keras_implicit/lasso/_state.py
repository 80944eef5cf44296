"""What hypergradient evaluations keep: across calls (``HypergradientState``) and
within one call (``Evaluation``, which fits the inner problems a criterion needs).

A criterion names each inner problem it solves by a key (``"main"``, ``"shifted"``,
``("fold", k)``); the state keeps, per key, the converted training data, the last
solution (the next call's warm start) and the penalties it was computed at.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from keras_implicit.lasso import estimators as est

# A warm start returned unchanged at new penalties is refined to this fraction of the
# model's tolerance: nearby penalties would otherwise give identical criterion values,
# which a line search reads as "no decrease".
STALE_START_REFINEMENT = 1e-2
# The key under which a plain dict passed as ``state=`` holds its typed state.
DICT_KEY = "ki.lasso.state"


@dataclasses.dataclass
class Problem:
    """One inner problem of a criterion: converted data and its last solution."""

    data: est.Prepared | None = None
    solution: tuple | None = None  # (coef, intercept), the next warm start
    penalties: tuple | None = None  # (alphas, l2) of ``solution``


@dataclasses.dataclass
class HypergradientState:
    """Warm starts and converted data shared by the calls of a search.

    ``inputs`` is the (X, y, sample_weight) triple the cached data were converted
    from, with the converted arrays; calls with other arrays convert them again and
    drop the data (warm starts are kept, where their shapes fit).
    """

    inputs: tuple | None = None  # (X, y, sample_weight), then their checked versions
    problems: dict = dataclasses.field(default_factory=dict)
    latest: tuple | None = None  # the most recent solution of any problem
    folds: dict = dataclasses.field(default_factory=dict)  # CrossVal: k -> (fold, X, y, w)
    sure_design: object = None
    sure_model: object = None

    @classmethod
    def of(cls, state):
        """The typed state of ``state``: itself, the one a dict holds (created on first
        use), or a fresh one for ``None``."""
        if state is None:
            return cls()
        if isinstance(state, cls):
            return state
        if not isinstance(state, dict):
            raise ValueError(
                "`state` must be a dict (reused across calls) or None. "
                f"Received: state of type {type(state).__name__}"
            )
        typed = state.get(DICT_KEY)
        if typed is None:
            typed = state[DICT_KEY] = cls()
        return typed

    def problem(self, key) -> Problem:
        if key not in self.problems:
            self.problems[key] = Problem()
        return self.problems[key]

    def start_for(self, key, coef_shape):
        """Warm start of problem ``key``: its own last solution, else the latest
        solution of a sibling problem (the previous CV fold, SURE's unshifted problem)
        when its shape fits, else None."""
        start = self.problem(key).solution
        if start is None and self.latest is not None and self.latest[0].shape == coef_shape:
            start = self.latest
        return start

    def forget_data(self):
        """Drops what was converted from the previous inputs (warm starts are kept)."""
        for problem in self.problems.values():
            problem.data = None
        self.folds.clear()
        self.sure_design = None


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


@dataclasses.dataclass
class Evaluation:
    """How the inner problems of one hypergradient call are solved."""

    state: HypergradientState
    info: HypergradientInfo
    coef: object = None  # a user solution (single-fit criteria)
    intercept: object = None
    solver: object = None  # a user callable solver(model, X, y) -> (coef, intercept)
    linear_solver: str = "auto"
    cholesky_max: int = 2000
    used_override: bool = False

    def fit(self, model, X, y, key, sample_weight=None, allow_override=True):
        """Fits ``model`` (in place) on checked (X, y, sample_weight); returns the
        prepared data.

        Order of precedence: a solution passed by the user (``coef=``), a user
        solver callable, then the built-in solver warm-started from the state.
        """
        tic = time.perf_counter()
        problem = self.state.problem(key)
        if problem.data is None:
            problem.data = est.prepare(model, X, y, sample_weight)
        data = problem.data
        if self.coef is not None and allow_override:
            self.used_override = True
            est.set_solution(model, data, self.coef, self.intercept)
        elif self.solver is not None:
            weighted = {} if sample_weight is None else {"sample_weight": sample_weight}
            coef, intercept = self.solver(model, X, y, **weighted)
            est.set_solution(model, data, coef, intercept)
        else:
            self._fit_warm(model, data, key, problem)
        self.info.dual_gaps.append(float(np.max(model.dual_gap_)))
        self.info.converged.append(bool(np.all(model.converged_)))
        self.info.solve_seconds.append(time.perf_counter() - tic)
        return data

    def _fit_warm(self, model, data, key, problem):
        start = self.state.start_for(key, est.coef_shape(model, data))
        est.fit_prepared(model, data, start)
        penalties = model.penalty_vectors(data.design.p)
        previous = problem.penalties
        unchanged = np.all(np.asarray(model.n_iter_) == 0)
        if unchanged and previous is not None and not _same_penalties(previous, penalties):
            est.fit_prepared(model, data, start, tol=model.tol * STALE_START_REFINEMENT)
        problem.solution = self.state.latest = (np.array(model.coef_), model.intercept_)
        problem.penalties = penalties


def _same_penalties(a, b):
    return np.array_equal(a[0], b[0]) and a[1] == b[1]
