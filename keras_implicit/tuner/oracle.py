"""A keras-tuner Oracle that descends the objective with hypergradients.

Naming convention (what a Tuner must report for every completed trial):

- the objective (by default ``"val_criterion"``, minimized), and
- for every tuned hyperparameter ``name``, the metric ``"hypergradient/<name>"``:
  the derivative of the objective with respect to ``log(value)``.

Every tuned hyperparameter must be a ``Float`` with ``sampling="log"``; the oracle
works on ``theta = log(value)`` and clips it to ``[log(min_value), log(max_value)]``.
``Fixed`` hyperparameters are passed through unchanged.

Each Tuner (``tuner_id``) runs its own descent chain: a single process has one
chain; in distributed tuning every worker descends from a different starting point
and ``get_best_trials`` ranks the trials of all chains, so the best one is kept.
"""

from __future__ import annotations

import math

import keras_tuner
import numpy as np
from keras_tuner.engine import hyperparameters as hp_types
from keras_tuner.src.engine.oracle import Display, synchronized
from keras_tuner.src.engine.trial import TrialStatus

GRADIENT_PREFIX = "hypergradient/"
DEFAULT_OBJECTIVE = "val_criterion"
POLICIES = ("line_search", "adam")
ARMIJO = 1e-4  # sufficient-decrease constant of the line search
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

    Args:
      objective: objective to minimize. Defaults to ``"val_criterion"``.
      max_trials: total number of trials (all chains together).
      policy: ``"line_search"`` (sparse-ho style: a step is kept when the objective
        decreased enough, else the step shrinks by quadratic interpolation and is
        tried again; accepted steps adapt by Barzilai-Borwein) or ``"adam"``.
      learning_rate: first step of the line search (in log units per unit
        gradient; default ``1 / ||gradient||``, i.e. a move of length 1 in log
        space), or the initial Adam learning rate (default 0.2, halved whenever
        the objective increases).
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
        policy="line_search",
        learning_rate=None,
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
        _check_settings(
            policy, learning_rate, patience, tol, gradient_tol, max_backtracks, min_step
        )
        if max_trials is not None and (not isinstance(max_trials, int) or max_trials < 1):
            raise ValueError(
                "`max_trials` must be a positive integer or None. "
                f"Received: max_trials={max_trials!r}"
            )
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
        self.policy = policy
        self.learning_rate = learning_rate
        self.patience = patience
        self.tol = tol
        self.gradient_tol = gradient_tol
        self.max_backtracks = max_backtracks
        self.min_step = float(min_step)
        self.initial_points = list(initial_points or [])
        self._chains = {}  # tuner_id -> chain state (JSON-serializable dict)
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
        if chain["stop_reason"] is not None:
            return {"status": TrialStatus.STOPPED, "values": None}
        if chain["pending_id"] is not None:
            # The chain's last trial has not ended (e.g. it is being retried).
            return {"status": TrialStatus.IDLE, "values": None}
        theta = self._propose(chain, tuned)
        if theta is None:
            return {"status": TrialStatus.STOPPED, "values": None}
        chain["pending_id"] = trial_id
        chain["pending_theta"] = theta
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
            if stored.status == TrialStatus.COMPLETED:
                value, grad = self._read_result(stored)
                self._consume(chain, value, grad)
            elif stored.status == TrialStatus.FAILED:
                self._consume_failure(chain)
            else:
                return  # INVALID: it is queued for a retry, the chain waits for it
            chain["pending_id"] = None
            chain["pending_theta"] = None
            self.save()

    def get_state(self):
        state = super().get_state()
        state["hypergradient_chains"] = self._chains
        return state

    def set_state(self, state):
        super().set_state(state)
        self._chains = state.get("hypergradient_chains", {})

    # -- chains ------------------------------------------------------------------------
    def chain_summary(self) -> dict:
        """``{tuner_id: {"best_value", "n_trials", "stop_reason"}}`` of every chain."""
        return {
            tuner_id: {
                "best_value": chain["best"],
                "n_trials": chain["n_results"],
                "stop_reason": chain["stop_reason"],
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
        return {
            "start": self._start_point(len(self._chains), tuned),
            "theta": None,  # accepted point (line search) or current point (Adam)
            "value": None,
            "grad": None,
            "step": None,
            "backtracks": 0,
            "best": None,
            "stale": 0,
            "n_results": 0,
            "adam_m": None,
            "adam_v": None,
            "adam_t": 0,
            "adam_lr": None,
            "pending_id": None,
            "pending_theta": None,
            "stop_reason": None,
        }

    def _values(self, theta, tuned):
        values = dict(self.hyperparameters.values)  # Fixed values and defaults
        for (name, _, _), t in zip(tuned, theta, strict=True):
            values[name] = float(math.exp(t))
        return values

    def _read_result(self, trial):
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

    def _propose(self, chain, tuned):
        """Next point of the chain in log space, or None (chain stopped)."""
        lo = np.array([t[1] for t in tuned])
        hi = np.array([t[2] for t in tuned])
        if chain["theta"] is None:
            return list(np.clip(np.asarray(chain["start"]), lo, hi))
        theta = np.asarray(chain["theta"])
        if self.policy == "adam":
            target = theta - self._adam_direction(chain)
        else:
            grad = _projected(theta, np.asarray(chain["grad"]), lo, hi)
            target = theta - chain["step"] * grad
        proposal = np.clip(target, lo, hi)
        if np.max(np.abs(proposal - theta)) < self.min_step:
            chain["stop_reason"] = (
                f"the next move is below min_step={self.min_step} in log space "
                "(converged, or pushing against a bound)"
            )
            return None
        return [float(t) for t in proposal]

    def _adam_direction(self, chain):
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        t = chain["adam_t"]
        m_hat = np.asarray(chain["adam_m"]) / (1 - beta1**t)
        v_hat = np.asarray(chain["adam_v"]) / (1 - beta2**t)
        return chain["adam_lr"] * m_hat / (np.sqrt(v_hat) + eps)

    def _consume(self, chain, value, grad):
        """Updates the chain with the objective and gradient at its pending point."""
        theta_new = np.asarray(chain["pending_theta"])
        grad_new = np.asarray(grad)
        chain["n_results"] += 1
        self._track_progress(chain, value)
        if not np.isfinite(value) or not np.all(np.isfinite(grad_new)):
            self._consume_failure(chain)
            return
        if self.policy == "adam":
            self._adam_update(chain, theta_new, value, grad_new)
        elif chain["theta"] is None:
            self._accept(chain, theta_new, value, grad_new, first=True)
        else:
            self._line_search_update(chain, theta_new, value, grad_new)
        self._check_gradient(chain)

    def _track_progress(self, chain, value):
        best = chain["best"]
        if best is None or (np.isfinite(value) and value < best - self.tol * abs(best)):
            chain["best"] = float(value) if np.isfinite(value) else best
            chain["stale"] = 0
        else:
            chain["stale"] += 1
        if chain["stale"] >= self.patience:
            chain["stop_reason"] = (
                f"no relative improvement above tol={self.tol} for patience={self.patience} trials"
            )

    def _accept(self, chain, theta, value, grad, first=False):
        if first:
            norm = float(np.linalg.norm(grad))
            chain["step"] = self.learning_rate or (1.0 / norm if norm > 0 else 1.0)
        else:
            # Barzilai-Borwein step from the last two accepted points: a secant
            # estimate of the inverse curvature, kept within [step/10, 10 step].
            d_theta = theta - np.asarray(chain["theta"])
            d_grad = grad - np.asarray(chain["grad"])
            curvature = float(d_theta @ d_grad)
            step = chain["step"]
            bb = float(d_theta @ d_theta) / curvature if curvature > 0 else 2.0 * step
            chain["step"] = float(np.clip(bb, 0.1 * step, 10.0 * step))
        chain["theta"] = [float(t) for t in theta]
        chain["value"] = float(value)
        chain["grad"] = [float(g) for g in grad]
        chain["backtracks"] = 0

    def _line_search_update(self, chain, theta_new, value, grad_new):
        theta = np.asarray(chain["theta"])
        slope = float(np.asarray(chain["grad"]) @ (theta_new - theta))  # < 0 downhill
        if value <= chain["value"] + ARMIJO * slope:
            self._accept(chain, theta_new, value, grad_new)
            return
        # Rejected: minimize the quadratic through f(0), f'(0) and f(step) instead of
        # halving blindly (saves trials), within [0.1, 0.5] of the step.
        curvature = value - chain["value"] - slope
        factor = -slope / (2.0 * curvature) if curvature > 0 else 0.5
        chain["step"] *= float(np.clip(factor, 0.1, 0.5))
        self._count_backtrack(chain)

    def _consume_failure(self, chain):
        if chain["step"] is not None:
            chain["step"] *= 0.5
        self._count_backtrack(chain)

    def _count_backtrack(self, chain):
        chain["backtracks"] += 1
        if chain["backtracks"] > self.max_backtracks:
            chain["stop_reason"] = (
                f"line search found no decrease in max_backtracks={self.max_backtracks} "
                "tries (at a minimum or a kink)"
            )

    def _adam_update(self, chain, theta, value, grad):
        beta1, beta2 = 0.9, 0.999
        m = np.zeros_like(grad) if chain["adam_m"] is None else np.asarray(chain["adam_m"])
        v = np.zeros_like(grad) if chain["adam_v"] is None else np.asarray(chain["adam_v"])
        chain["adam_m"] = [float(x) for x in beta1 * m + (1 - beta1) * grad]
        chain["adam_v"] = [float(x) for x in beta2 * v + (1 - beta2) * grad**2]
        chain["adam_t"] += 1
        if chain["adam_lr"] is None:
            chain["adam_lr"] = self.learning_rate or 0.2
        elif value > chain["value"]:
            # Constant-rate Adam circles the minimum; halving the rate whenever the
            # objective goes up lets it settle.
            chain["adam_lr"] *= 0.5
        chain["theta"] = [float(t) for t in theta]
        chain["value"] = float(value)
        chain["grad"] = [float(g) for g in grad]

    def _check_gradient(self, chain):
        if chain["stop_reason"] is not None or chain["grad"] is None:
            return
        tuned = self._tuned()
        lo = np.array([t[1] for t in tuned])
        hi = np.array([t[2] for t in tuned])
        grad = _projected(np.asarray(chain["theta"]), np.asarray(chain["grad"]), lo, hi)
        if float(np.linalg.norm(grad)) <= self.gradient_tol * max(abs(chain["value"]), 1e-300):
            chain["stop_reason"] = (
                f"projected gradient norm below gradient_tol={self.gradient_tol} "
                "(relative to the objective)"
            )


def _projected(theta, grad, lo, hi):
    """Zeroes the gradient components that would push a point out of its bounds."""
    grad = grad.copy()
    grad[(theta <= lo) & (grad > 0)] = 0.0
    grad[(theta >= hi) & (grad < 0)] = 0.0
    return grad


def _van_der_corput(index):
    fraction, denominator = 0.0, 1.0
    while index:
        denominator *= 2.0
        index, bit = divmod(index, 2)
        fraction += bit / denominator
    return fraction


def _check_settings(policy, learning_rate, patience, tol, gradient_tol, max_backtracks, min_step):
    if policy not in POLICIES:
        raise ValueError(f"`policy` must be one of {POLICIES}. Received: policy={policy!r}")
    if learning_rate is not None and not (
        isinstance(learning_rate, int | float)
        and learning_rate > 0
        and math.isfinite(learning_rate)
    ):
        raise ValueError(
            "`learning_rate` must be a positive number or None. "
            f"Received: learning_rate={learning_rate!r}"
        )
    for name, value in (("patience", patience), ("max_backtracks", max_backtracks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    for name, value in (("tol", tol), ("gradient_tol", gradient_tol), ("min_step", min_step)):
        if not isinstance(value, int | float) or not value >= 0:
            raise ValueError(f"`{name}` must be a non-negative number. Received: {name}={value!r}")
