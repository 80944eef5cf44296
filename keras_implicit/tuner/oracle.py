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
POLICIES = ("quasi_newton", "line_search", "adam")
ARMIJO = 1e-4  # sufficient-decrease constant of the line searches
ALIGNED = 0.9  # cosine above which a gradient counts as pointing along a step
DECADE = math.log(10.0)  # one decade of a hyperparameter, in log units
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

    Step policies (all in log space, clipped to the bounds):

    - ``"quasi_newton"`` (default): a trust-region-like quasi-Newton search built to
      move fast far from the optimum. The first step goes ``first_step`` log units
      (Euclidean length; default one decade) down the gradient. Every accepted trial
      (sufficient decrease of the objective) adds the secant pair (change of log
      values, change of gradient) to an L-BFGS memory and the next step is the
      quasi-Newton step; with one hyperparameter this is the secant method on the
      derivative, which converges in a few trials. The L-BFGS recursion starts from
      one curvature per hyperparameter (from the newest pair that moved it), not one
      shared scale: penalties of very different curvature (a sharp l1 valley, a flat
      l2 slope) then each take their own Newton step. A step may be at most
      ``max_growth`` times longer than the last accepted one (largest change of a log
      hyperparameter; a longer step is shortened, its direction kept), and when the
      last pair shows no positive curvature (the gradient kept its sign and grew) the
      step grows by ``max_growth`` along the gradient instead. Only when the
      objective increases does it backtrack, to the minimizer of the cubic that
      matches the objective and its slope at both ends of the rejected step; the
      rejected step's secant pair is kept. Bounds: a hyperparameter at a bound and
      pushed out of it does not move; the others do, projected onto the bounds.
      Plateaus: when hyperparameters' derivatives become
      exactly zero on an accepted step (a penalty that switched off all of its
      features), the next trial moves only them back to their previous values,
      since a zero gradient cannot tell whether their minimum lay before the plateau;
      the backtracking rule then searches the segment if that probe is worse.
    - ``"line_search"`` (the behavior before ``quasi_newton`` existed; sparse-ho
      style): a step is kept when the objective decreased enough, else the step
      shrinks by quadratic interpolation and is tried again; accepted steps adapt
      by Barzilai-Borwein, within [1/10, 10] times the previous step.
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
        _check_settings(
            policy, learning_rate, patience, tol, gradient_tol, max_backtracks, min_step
        )
        _check_quasi_newton_settings(first_step, max_growth, memory)
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
        self.first_step = float(first_step)
        self.max_growth = float(max_growth)
        self.memory = memory
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
            "memory_s": [],  # quasi_newton: secant pairs, oldest first
            "memory_y": [],
            "next_theta": None,  # quasi_newton: the point to try next
            "log_objective": True,  # quasi_newton models log(objective) while > 0
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
        elif self.policy == "quasi_newton":
            target = np.asarray(chain["next_theta"])
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
        elif self.policy == "quasi_newton":
            self._quasi_newton_update(chain, theta_new, value, grad_new)
        elif chain["theta"] is None:
            self._accept(chain, theta_new, value, grad_new, first=True)
        else:
            self._line_search_update(chain, theta_new, value, grad_new)
        self._check_gradient(chain)

    def _track_progress(self, chain, value):
        # "best": the chain's best value; "reference": the value that later trials must
        # improve on by more than tol (relative) to reset the patience count.
        reference = chain.get("reference", chain["best"])
        if np.isfinite(value) and (chain["best"] is None or value < chain["best"]):
            chain["best"] = float(value)
        threshold = None if reference is None else reference - self.tol * abs(reference)
        if threshold is None or (np.isfinite(value) and value < threshold):
            chain["reference"] = float(value) if np.isfinite(value) else reference
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
        if self.policy == "quasi_newton" and chain["theta"] is not None:
            # Retry halfway between the last accepted point and the failed one.
            theta = np.asarray(chain["theta"])
            failed = np.asarray(chain["pending_theta"])
            chain["next_theta"] = [float(t) for t in theta + 0.5 * (failed - theta)]
        self._count_backtrack(chain)

    # -- quasi_newton ------------------------------------------------------------------
    def _bounds(self):
        tuned = self._tuned()
        return np.array([t[1] for t in tuned]), np.array([t[2] for t in tuned])

    def _model(self, chain, value, grad):
        """The objective modeled by quasi_newton: its logarithm while it is positive
        (criteria such as a validation MSE vary over orders of magnitude across
        penalties: secants and interpolations of log values fit them far better)."""
        if chain.get("log_objective", True) and value > 0.0:
            return math.log(value), np.asarray(grad) / value
        if chain.get("log_objective", True) and chain["theta"] is not None:
            chain["memory_s"], chain["memory_y"] = [], []  # built on the other scale
        chain["log_objective"] = False
        return float(value), np.asarray(grad)

    def _quasi_newton_update(self, chain, theta_new, raw_value, raw_grad):
        lo, hi = self._bounds()
        value, grad_new = self._model(chain, raw_value, raw_grad)
        if chain["theta"] is None:
            self._store_point(chain, theta_new, raw_value, raw_grad)
            chain["next_theta"] = self._quasi_newton_step(chain, grad_new, lo, hi, None)
            return
        theta = np.asarray(chain["theta"])
        previous, grad = self._model(chain, chain["value"], chain["grad"])
        s = theta_new - theta
        slope = float(grad @ s)  # < 0: the step went downhill
        if value <= previous + ARMIJO * slope:
            curved = self._remember(chain, s, grad_new - grad)
            end_slope = float(grad_new @ s)
            self._store_point(chain, theta_new, raw_value, raw_grad)
            if end_slope > 0.0 and _along(grad_new, s) >= ALIGNED:
                # Overshot along the step, and the gradient points back along it: the
                # minimum lies inside the step; the cubic through both ends (values and
                # slopes) locates it better than the secant. When the gradient also
                # points elsewhere, the quasi-Newton step below uses that information.
                fraction = _cubic_minimizer(previous, slope, value, end_slope)
                chain["next_theta"] = [float(t) for t in theta + fraction * s]
                return
            flat = (grad_new == 0.0) & (grad != 0.0) & (s != 0.0)
            if flat.any():
                # These hyperparameters went onto a plateau on this step (a Lasso
                # penalty that switched off all of its features): a zero derivative
                # cannot tell whether their minimum lay before the plateau's edge, and
                # no later gradient step would move them. Probe: the next trial moves
                # only them back to where their derivative was last measured; if that
                # is worse, the backtracking below searches the segment in between.
                chain["next_theta"] = [float(t) for t in np.where(flat, theta, theta_new)]
                return
            radius = self.max_growth * float(np.max(np.abs(s)))
            chain["next_theta"] = self._quasi_newton_step(chain, grad_new, lo, hi, radius, curved)
            return
        # The objective went up: backtrack along the step to the minimizer of the
        # cubic through the objective and its slope at both ends.
        # The pair (rejected step, gradient change) is still a valid secant about the
        # accepted point: keep its curvature for the steps after the backtrack.
        self._remember(chain, s, grad_new - grad)
        fraction = _cubic_minimizer(previous, slope, value, float(grad_new @ s))
        chain["next_theta"] = [float(t) for t in theta + fraction * s]
        self._count_backtrack(chain)

    def _remember(self, chain, s, y):
        """Adds the secant pair ``(s, y)`` to the memory if it shows positive
        curvature (else BFGS would lose positive definiteness); returns whether."""
        curved = float(s @ y) > 1e-12 * float(np.linalg.norm(s) * np.linalg.norm(y))
        if curved:
            chain["memory_s"] = [*chain["memory_s"], [float(v) for v in s]][-self.memory :]
            chain["memory_y"] = [*chain["memory_y"], [float(v) for v in y]][-self.memory :]
        return curved

    def _store_point(self, chain, theta, value, grad):
        chain["theta"] = [float(t) for t in theta]
        chain["value"] = float(value)
        chain["grad"] = [float(g) for g in grad]
        chain["backtracks"] = 0

    def _quasi_newton_step(self, chain, grad, lo, hi, radius, curved=False):
        """Next point from the accepted one (``grad``: the model's gradient there):
        the L-BFGS step, with one initial curvature per hyperparameter, scaled down
        (direction kept) until no log hyperparameter moves by more than ``radius``."""
        theta = np.asarray(chain["theta"])
        grad = _projected(theta, grad, lo, hi)
        blocked = grad == 0.0  # at a bound and pushed out of it (or flat)
        scale = float(np.max(np.abs(grad)))
        if scale == 0.0:
            return [float(t) for t in theta]  # stationary: the min_step test stops it
        if radius is None:  # first step
            if self.learning_rate is not None:
                return [float(t) for t in np.clip(theta - self.learning_rate * grad, lo, hi)]
            # Euclidean length: with several hyperparameters, moving the steepest one
            # by a whole decade overshot (often onto a plateau: see
            # _quasi_newton_update) and missed the target on grouped-penalty problems
            # that this rule solved in 5-7 trials.
            move = -grad * (self.first_step / float(np.linalg.norm(grad)))
            radius = self.first_step
        elif curved and chain["memory_s"]:
            memory_s, memory_y = chain["memory_s"], chain["memory_y"]
            inverse = _coordinate_inverse_curvature(memory_s, memory_y)
            # Hyperparameters no pair measured: the usual L-BFGS scale s.y / y.y.
            s, y = np.asarray(memory_s[-1]), np.asarray(memory_y[-1])
            inverse[np.isnan(inverse)] = float(s @ y) / float(y @ y)
            move = -_two_loop(grad, memory_s, memory_y, inverse)
            move[blocked] = 0.0
            if not float(move @ grad) < 0.0:  # not a descent direction: steepest
                move = -grad * (radius / scale)
        else:
            # No positive curvature along the last step: expand along the gradient.
            move = -grad * (radius / scale)
        length = float(np.max(np.abs(move)))
        if length > radius:
            move *= radius / length
        return [float(t) for t in np.clip(theta + move, lo, hi)]

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


def _along(vector, direction):
    """Cosine of the angle between two vectors (1 for a single hyperparameter)."""
    norms = float(np.linalg.norm(vector) * np.linalg.norm(direction))
    return float(vector @ direction) / norms if norms > 0.0 else 0.0


def _coordinate_inverse_curvature(memory_s, memory_y, share=0.25):
    """Per log hyperparameter, ``s_i / y_i`` of the newest secant pair that moved it by
    at least ``share`` of the pair's largest move and saw its derivative grow along
    the move (positive curvature); NaN where no pair did.

    The usual L-BFGS starting scale ``s.y / y.y`` is one number for all: with
    penalties of very different curvature (a sharp l1 valley, a nearly flat l2 slope)
    it makes the flat one crawl. Coupling between hyperparameters is left to the
    secant pairs of the two-loop recursion."""
    inverse = np.full(len(memory_s[-1]), np.nan)
    for s, y in zip(reversed(memory_s), reversed(memory_y), strict=True):
        s, y = np.asarray(s), np.asarray(y)
        moved = np.abs(s) >= share * float(np.max(np.abs(s)))
        usable = np.isnan(inverse) & moved & (s * y > 0.0)
        inverse[usable] = s[usable] / y[usable]
    return inverse


def _two_loop(grad, memory_s, memory_y, initial_inverse):
    """L-BFGS two-loop recursion: approximate inverse Hessian times ``grad``, from the
    diagonal ``initial_inverse``."""
    pairs = [(np.asarray(s), np.asarray(y)) for s, y in zip(memory_s, memory_y, strict=True)]
    q = grad.copy()
    alphas = []
    for s, y in reversed(pairs):
        rho = 1.0 / float(y @ s)
        alpha = rho * float(s @ q)
        q -= alpha * y
        alphas.append((rho, alpha))
    q *= initial_inverse
    for (s, y), (rho, alpha) in zip(pairs, reversed(alphas), strict=True):
        beta = rho * float(y @ q)
        q += (alpha - beta) * s
    return q


def _cubic_minimizer(f0, slope0, f1, slope1, low=0.1, high=0.9):
    """Minimizer in ``[low, high]`` of the cubic with values ``f0, f1`` and slopes
    ``slope0, slope1`` at 0 and 1 (Nocedal & Wright eq. 3.59); quadratic fallback."""
    z = slope0 + slope1 - 3.0 * (f1 - f0)
    discriminant = z * z - slope0 * slope1
    t = math.nan
    if discriminant >= 0.0:
        w = math.sqrt(discriminant)
        denominator = slope1 - slope0 + 2.0 * w
        if denominator != 0.0:
            t = 1.0 - (slope1 + w - z) / denominator
    if not math.isfinite(t):
        curvature = f1 - f0 - slope0
        t = -slope0 / (2.0 * curvature) if curvature > 0 else 0.5
        high = min(high, 0.5)
    return float(np.clip(t, low, high)) if math.isfinite(t) else 0.5


def _van_der_corput(index):
    fraction, denominator = 0.0, 1.0
    while index:
        denominator *= 2.0
        index, bit = divmod(index, 2)
        fraction += bit / denominator
    return fraction


def _check_quasi_newton_settings(first_step, max_growth, memory):
    if not isinstance(first_step, int | float) or not 0 < first_step < math.inf:
        raise ValueError(
            f"`first_step` must be a positive number. Received: first_step={first_step!r}"
        )
    if not isinstance(max_growth, int | float) or not 1 < max_growth < math.inf:
        raise ValueError(
            f"`max_growth` must be a number above 1. Received: max_growth={max_growth!r}"
        )
    if not isinstance(memory, int) or isinstance(memory, bool) or memory < 1:
        raise ValueError(f"`memory` must be a positive integer. Received: memory={memory!r}")


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
