"""A keras-tuner Oracle that descends the objective with hypergradients.

Naming convention (what a Tuner must report for every completed trial):

- the objective (by default ``"val_criterion"``, minimized), and
- for every tuned hyperparameter ``name``, the metric ``"hypergradient/<name>"``:
  the derivative of the objective with respect to ``log(value)``.

Every tuned hyperparameter must be a ``Float`` with ``sampling="log"``; the oracle
works on ``theta = log(value)`` and clips it to ``[log(min_value), log(max_value)]``.
``Fixed`` hyperparameters are passed through unchanged.

The steps are chosen by a policy of ``keras_implicit.lasso.steps`` (the same objects
``ki.lasso.search`` drives); the oracle keeps the keras-tuner bookkeeping. Each Tuner
(``tuner_id``) runs its own descent chain: a single process has one
chain; in distributed tuning every worker descends from a different starting point
and ``get_best_trials`` ranks the trials of all chains, so the best one is kept.
"""

from __future__ import annotations

import contextlib
import math

import keras_tuner
import numpy as np
from keras_tuner.engine import hyperparameters as hp_types
from keras_tuner.src.engine.oracle import Display, synchronized
from keras_tuner.src.engine.trial import TrialStatus

from keras_implicit import _validation as V
from keras_implicit.lasso import steps

GRADIENT_PREFIX = "hypergradient/"
DEFAULT_OBJECTIVE = "val_criterion"
POLICIES = tuple(steps.POLICIES)
DECADE = steps.DECADE  # one decade of a hyperparameter, in log units
MAX_TABLE_ROWS = 10  # above this many hyperparameters the display summarizes them


def gradient_metric(name: str) -> str:
    """Metric name under which a Tuner reports d objective / d log(``name``)."""
    return GRADIENT_PREFIX + name


def summarize_values(values: dict) -> list[tuple[str, str]]:
    """``(label, text)`` rows describing hyperparameter values, compact when many."""
    numbers = {k: v for k, v in values.items() if isinstance(v, int | float)}
    if len(values) <= MAX_TABLE_ROWS or len(numbers) < len(values):
        return [(str(k), f"{v:.5g}" if k in numbers else str(v)) for k, v in values.items()]
    array = np.array(list(numbers.values()), dtype=np.float64)
    return [
        ("count", str(array.size)),
        ("min", f"{array.min():.5g}"),
        ("median", f"{np.median(array):.5g}"),
        ("max", f"{array.max():.5g}"),
    ]


class _CompactDisplay(Display):
    """keras-tuner's progress display, summarizing long hyperparameter lists."""

    def show_hyperparameter_table(self, trial):
        values = trial.hyperparameters.values
        if len(values) <= MAX_TABLE_ROWS:
            return super().show_hyperparameter_table(trial)
        rows = summarize_values(values)
        print(f"{len(values)} hyperparameters (summary of their values)")
        for label, text in rows:
            print(f"{text:{self.col_width}}|{label}")


class HypergradientOracle(keras_tuner.Oracle):
    """Proposes each trial by a gradient step from the last completed trial.

    Step policies (``keras_implicit.lasso.steps``; all in log space, projected onto
    the bounds):

    - ``"quasi_newton"`` (default): L-BFGS steps on the logarithm of the objective,
      one curvature per hyperparameter, a first step of ``first_step`` log units down
      the gradient, steps at most ``max_growth`` times longer than the last accepted
      one, cubic backtracking when the objective increases, and a probe back from
      plateaus (hyperparameters whose derivative became exactly zero, e.g. a penalty
      that switched off all of its features). A failed trial is retried halfway.
    - ``"line_search"`` (sparse-ho style): a step is kept when the objective decreased
      enough, else it shrinks by quadratic interpolation and is tried again; accepted
      steps adapt by Barzilai-Borwein, within [1/10, 10] times the previous step.
    - ``"adam"``: Adam on the log hyperparameters, halving the learning rate
      whenever the objective increases.

    Args:
      objective: objective to minimize. Defaults to ``"val_criterion"``.
      max_trials: total number of trials (all chains together).
      policy: ``"quasi_newton"``, ``"line_search"`` or ``"adam"`` (see above).
      learning_rate: first step of ``quasi_newton`` and ``line_search`` in log units
        per unit gradient (for ``quasi_newton`` it replaces ``first_step``; the
        ``line_search`` default is ``1 / ||gradient||``, i.e. a move of length 1 in
        log space), or the initial Adam learning rate (default 0.2).
      first_step: ``quasi_newton`` only: length of the first step (Euclidean, in
        log units). Default ``log(10)``: one decade.
      max_growth: ``quasi_newton`` only: bound on the ratio of a step's length to
        the last accepted step's length (> 1).
      memory: ``quasi_newton`` only: number of secant pairs kept (L-BFGS memory).
      patience: stop a chain when its best objective has not improved by more than
        ``tol`` (relative) for this many trials.
      tol: relative improvement counted by ``patience``.
      gradient_tol: stop a chain when the projected gradient norm is at most
        ``gradient_tol * |objective|``.
      max_backtracks: stop a chain after this many consecutive rejected steps.
      min_step: stop a chain when its next move changes every log hyperparameter
        by less than this (1e-3: values change by less than 0.1%).
      initial_points: optional list of ``{name: value}`` starting points, one per
        chain (the k-th Tuner to ask gets the k-th); missing chains start spread
        over the log range; the first defaults to the hyperparameter defaults.
      hyperparameters, allow_new_entries, tune_new_entries, seed,
      max_retries_per_trial, max_consecutive_failed_trials: as ``keras_tuner.Oracle``.
    """

    def __init__(
        self,
        objective=DEFAULT_OBJECTIVE,
        max_trials=25,
        policy="quasi_newton",
        learning_rate=None,
        first_step=DECADE,
        max_growth=3.0,
        memory=5,
        patience=5,
        tol=1e-4,
        gradient_tol=1e-6,
        max_backtracks=8,
        min_step=1e-3,
        initial_points=None,
        hyperparameters=None,
        allow_new_entries=True,
        tune_new_entries=True,
        seed=None,
        max_retries_per_trial=0,
        max_consecutive_failed_trials=3,
    ):
        self.policy = V.one_of("policy", policy, POLICIES)
        self._settings = _policy_settings(
            policy,
            learning_rate=learning_rate,
            first_step=first_step,
            max_growth=max_growth,
            memory=memory,
            patience=patience,
            tol=tol,
            gradient_tol=gradient_tol,
            max_backtracks=max_backtracks,
            min_step=min_step,
        )
        if max_trials is not None:
            V.positive_int("max_trials", max_trials)
        if isinstance(objective, str):
            # Names such as "val_criterion" have no inferable direction: minimize.
            objective = keras_tuner.Objective(objective, direction="min")
        super().__init__(
            objective=objective,
            max_trials=max_trials,
            hyperparameters=hyperparameters,
            allow_new_entries=allow_new_entries,
            tune_new_entries=tune_new_entries,
            seed=seed,
            max_retries_per_trial=max_retries_per_trial,
            max_consecutive_failed_trials=max_consecutive_failed_trials,
        )
        if self.objective.direction != "min":
            raise ValueError(
                "HypergradientOracle minimizes its objective; report a quantity to "
                f"minimize. Received: objective={self.objective!r}"
            )
        self.learning_rate = learning_rate
        self.first_step = float(first_step)
        self.max_growth = float(max_growth)
        self.memory = memory
        self.patience = patience
        self.tol = tol
        self.gradient_tol = gradient_tol
        self.max_backtracks = max_backtracks
        self.min_step = float(min_step)
        self.initial_points = list(initial_points or [])
        # tuner_id -> {"start", "n_results", "pending_id", "pending_theta", "policy"}
        # (JSON-serializable; "policy" is the step policy's state).
        self._chains = {}
        self._requesting_tuner = None
        self._display = _CompactDisplay(oracle=self)

    # -- the search space ------------------------------------------------------------
    def _tuned(self):
        """``[(name, log_lo, log_hi)]`` of the tuned hyperparameters; validates them."""
        tuned = []
        for hp in self.hyperparameters.space:
            if isinstance(hp, hp_types.Fixed):
                continue
            is_log_float = isinstance(hp, hp_types.Float) and hp.sampling == "log"
            if not is_log_float:
                raise ValueError(
                    "HypergradientOracle tunes only Float hyperparameters with "
                    "sampling='log' (it descends in log space); use hp.Fixed for the "
                    f"others. Received: {hp!r}"
                )
            tuned.append((hp.name, math.log(hp.min_value), math.log(hp.max_value)))
        return tuned

    def update_space(self, hyperparameters):
        super().update_space(hyperparameters)
        self._tuned()  # fail early, at the first build, on a non-log hyperparameter

    # -- keras-tuner hooks ------------------------------------------------------------
    @synchronized
    def create_trial(self, tuner_id):
        # populate_space() is not told who asks; each Tuner owns one descent chain.
        self._requesting_tuner = tuner_id
        return super().create_trial(tuner_id)

    def populate_space(self, trial_id):
        tuned = self._tuned()
        if not tuned:
            raise ValueError(
                "HypergradientOracle found no hyperparameter to tune: declare at least "
                "one hp.Float(..., sampling='log')."
            )
        tuner_id = self._requesting_tuner or "tuner0"
        chain = self._chains.get(tuner_id)
        if chain is None:
            chain = self._chains[tuner_id] = self._new_chain(tuned)
        if chain["pending_id"] is not None and chain["policy"]["stop_reason"] is None:
            # The chain's last trial has not ended (e.g. it is being retried).
            return {"status": TrialStatus.IDLE, "values": None}
        with self._policy(chain, tuned) as policy:
            theta = policy.propose()
        if theta is None:
            return {"status": TrialStatus.STOPPED, "values": None}
        chain["pending_id"] = trial_id
        chain["pending_theta"] = [float(t) for t in theta]
        return {"status": TrialStatus.RUNNING, "values": self._values(theta, tuned)}

    @synchronized
    def update_trial(self, trial_id, metrics, step=0):
        if self.objective.name in metrics:
            names = [name for name, _, _ in self._tuned()]
            missing = [gradient_metric(n) for n in names if gradient_metric(n) not in metrics]
            if missing:
                # Fatal: without a gradient the oracle cannot propose the next trial.
                raise keras_tuner.errors.FatalValueError(
                    "HypergradientOracle needs the hypergradient of the objective with "
                    "respect to each log hyperparameter, reported as a trial metric "
                    f"named 'hypergradient/<name>'. Missing: {missing}. Received "
                    f"metrics: {sorted(metrics)}"
                )
        return super().update_trial(trial_id, metrics, step=step)

    @synchronized
    def end_trial(self, trial):
        super().end_trial(trial)
        stored = self.trials[trial.trial_id]
        for chain in self._chains.values():
            if chain["pending_id"] != trial.trial_id:
                continue
            if stored.status not in (TrialStatus.COMPLETED, TrialStatus.FAILED):
                return  # INVALID: it is queued for a retry, the chain waits for it
            with self._policy(chain, self._tuned()) as policy:
                if stored.status == TrialStatus.COMPLETED:
                    chain["n_results"] += 1
                    policy.observe(chain["pending_theta"], *self._read_result(stored))
                else:
                    policy.fail(chain["pending_theta"])
            chain["pending_id"] = None
            chain["pending_theta"] = None
            self.save()

    def get_state(self):
        state = super().get_state()
        state["hypergradient_chains"] = self._chains
        return state

    def set_state(self, state):
        super().set_state(state)
        chains = state.get("hypergradient_chains", {})
        self._chains = {tuner_id: _nested_chain(chain) for tuner_id, chain in chains.items()}

    # -- chains ------------------------------------------------------------------------
    def chain_summary(self) -> dict:
        """``{tuner_id: {"best_value", "n_trials", "stop_reason"}}`` of every chain."""
        return {
            tuner_id: {
                "best_value": chain["policy"]["best"],
                "n_trials": chain["n_results"],
                "stop_reason": chain["policy"]["stop_reason"],
            }
            for tuner_id, chain in self._chains.items()
        }

    def _start_point(self, index, tuned):
        if index < len(self.initial_points):
            point = self.initial_points[index]
            return [float(np.clip(math.log(point[name]), lo, hi)) for name, lo, hi in tuned]
        if index == 0:
            defaults = self.hyperparameters.values
            return [
                float(np.clip(math.log(defaults.get(name, math.exp(lo))), lo, hi))
                for name, lo, hi in tuned
            ]
        # Spread further chains over the log box (van der Corput fractions 1/2, 1/4, ...).
        fraction = _van_der_corput(index)
        return [lo + fraction * (hi - lo) for _, lo, hi in tuned]

    def _new_chain(self, tuned):
        start = self._start_point(len(self._chains), tuned)
        return {
            "start": start,
            "n_results": 0,
            "pending_id": None,
            "pending_theta": None,
            "policy": self._make_policy(start, tuned).get_state(),
        }

    def _make_policy(self, start, tuned):
        lower = [lo for _, lo, _ in tuned]
        upper = [hi for _, _, hi in tuned]
        return steps.make_policy(self.policy, start, lower=lower, upper=upper, **self._settings)

    @contextlib.contextmanager
    def _policy(self, chain, tuned):
        """The chain's step policy, its state written back to the chain on exit."""
        policy = self._make_policy(chain["start"], tuned).set_state(chain["policy"])
        yield policy
        chain["policy"] = policy.get_state()

    def _values(self, theta, tuned):
        values = dict(self.hyperparameters.values)  # Fixed values and defaults
        for (name, _, _), t in zip(tuned, theta, strict=True):
            values[name] = float(math.exp(t))
        return values

    def _read_result(self, trial):
        """``(objective, [d objective / d log value])`` of a completed trial."""
        metrics = trial.metrics
        names = [name for name, _, _ in self._tuned()]
        missing = [gradient_metric(n) for n in names if not metrics.exists(gradient_metric(n))]
        if missing or not metrics.exists(self.objective.name):
            raise ValueError(
                f"Trial {trial.trial_id} completed without the metrics the "
                f"HypergradientOracle needs: '{self.objective.name}' and "
                f"'hypergradient/<name>' for every tuned hyperparameter. Missing: "
                f"{missing or [self.objective.name]}"
            )
        value = float(metrics.get_last_value(self.objective.name))
        grad = [float(metrics.get_last_value(gradient_metric(n))) for n in names]
        return value, grad


_BOOKKEEPING = ("start", "n_results", "pending_id", "pending_theta")
_ADAM_KEYS = {"adam_m": "m", "adam_v": "v", "adam_t": "t", "adam_lr": "lr"}


def _nested_chain(chain):
    """A saved chain as ``{bookkeeping..., "policy": policy state}``; a chain saved
    flat, with the policy state beside the bookkeeping keys, is split."""
    if "policy" in chain:
        return chain
    policy = {_ADAM_KEYS.get(k, k): v for k, v in chain.items() if k not in _BOOKKEEPING}
    nested = {key: chain.get(key) for key in _BOOKKEEPING}
    nested["n_results"] = nested["n_results"] or 0
    nested["policy"] = policy
    return nested


def _policy_settings(policy, **kwargs):
    """Validated constructor settings of the step policy called ``policy``."""
    learning_rate = kwargs["learning_rate"]
    settings = {
        "learning_rate": None
        if learning_rate is None
        else V.positive_finite_float("learning_rate", learning_rate),
        "patience": V.positive_int("patience", kwargs["patience"]),
        "tol": V.non_negative_float("tol", kwargs["tol"]),
        "gradient_tol": V.non_negative_float("gradient_tol", kwargs["gradient_tol"]),
        "max_backtracks": V.positive_int("max_backtracks", kwargs["max_backtracks"]),
        "min_step": V.non_negative_float("min_step", kwargs["min_step"]),
    }
    quasi_newton = {
        "first_step": V.positive_finite_float("first_step", kwargs["first_step"]),
        "max_growth": V.finite_float_above("max_growth", kwargs["max_growth"], 1.0),
        "memory": V.positive_int("memory", kwargs["memory"]),
    }
    if policy == "quasi_newton":
        settings.update(quasi_newton)
    elif policy == "line_search":
        settings["max_move"] = None
    return settings


def _van_der_corput(index):
    fraction, denominator = 0.0, 1.0
    while index:
        denominator *= 2.0
        index, bit = divmod(index, 2)
        fraction += bit / denominator
    return fraction
