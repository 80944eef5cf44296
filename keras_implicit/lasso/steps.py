"""Step policies for searches over log penalties (``theta = log(penalties)``).

One policy object drives one descent: ``propose()`` gives the next point to evaluate
(``None`` once the policy has stopped), ``observe(theta, value, grad)`` reports the
objective and its gradient with respect to ``theta`` there, and ``stop_reason`` says
why the descent ended. The first ``propose()`` returns the starting point; a caller
that has already evaluated it may ``observe`` it directly. ``get_state()`` returns a
JSON-serializable dict and ``set_state`` restores it, so a descent can be saved and
resumed (``ki.tuner.HypergradientOracle`` keeps one per chain in its saved state).

Policies (pure numpy, all moves projected onto ``[lower, upper]``):

- ``QuasiNewton``: L-BFGS steps on the logarithm of the objective (while it is
  positive), a plateau probe and cubic backtracking;
- ``LineSearch``: gradient steps with Barzilai-Borwein step sizes and an Armijo
  backtracking line search;
- ``Adam``: Adam, halving its learning rate whenever the objective goes up.

Every policy shares the stopping rules: no relative improvement above ``tol`` of the
best value for ``patience`` evaluations, a projected gradient norm at most
``gradient_tol * |value|``, more than ``max_backtracks`` consecutive rejected
evaluations, or a next move below ``min_step`` in every log penalty.
"""

from __future__ import annotations

import math

import numpy as np

from keras_implicit import _validation as V

ARMIJO = 1e-4  # sufficient-decrease constant of the line searches
ALIGNED = 0.9  # cosine above which a gradient counts as pointing along a step
DECADE = math.log(10.0)  # one decade of a penalty, in log units
CUBIC_LOW = 0.1  # shortest backtrack, as a fraction of the rejected step


class StepPolicy:
    """Base of the step policies: bounds, shared stopping rules and saved state.

    Args:
      start: starting log penalties (clipped to the bounds).
      lower, upper: bounds on the log penalties (default unbounded).
      learning_rate: the first step's scale (see each policy).
      patience, tol: stop when the best value has not improved by more than ``tol``
        (relative) for ``patience`` evaluations.
      gradient_tol: stop when the projected gradient norm is at most
        ``gradient_tol * |value|``.
      max_backtracks: stop after this many consecutive rejected evaluations.
      min_step: stop when the next move changes every log penalty by less than this.
    """

    name = None
    # Attributes saved by get_state (arrays as lists of floats).
    _STATE = ("theta", "value", "grad", "backtracks", "n_iter", "accepted", "best")
    _STATE += ("reference", "stale", "stop_reason")

    def __init__(
        self,
        start,
        *,
        lower=None,
        upper=None,
        learning_rate=None,
        patience=5,
        tol=1e-4,
        gradient_tol=1e-6,
        max_backtracks=8,
        min_step=1e-3,
    ):
        start = np.asarray(start, dtype=np.float64).reshape(-1)
        self.lower = _bound(lower, -np.inf, start.size)
        self.upper = _bound(upper, np.inf, start.size)
        self.start = np.clip(start, self.lower, self.upper)
        self.learning_rate = learning_rate
        self.patience = patience
        self.tol = tol
        self.gradient_tol = gradient_tol
        self.max_backtracks = max_backtracks
        self.min_step = min_step
        self.theta = None  # the accepted point (Adam: the current point)
        self.value = None
        self.grad = None
        self.backtracks = 0  # consecutive rejected evaluations
        self.n_iter = 0  # accepted moves
        self.accepted = False  # whether the last observation was accepted
        self.best = None
        self.reference = None  # the value later evaluations must improve on by tol
        self.stale = 0
        self.stop_reason = None

    # -- the interface -------------------------------------------------------------
    def propose(self):
        """The next log penalties to evaluate, or None once the policy has stopped."""
        if self.stop_reason is not None:
            return None
        if self.theta is None:
            return self.start.copy()
        proposal = np.clip(self._target(), self.lower, self.upper)
        if float(np.max(np.abs(proposal - self.theta))) < self.min_step:
            self.stop_reason = (
                f"the next move is below min_step={self.min_step} in log space "
                "(converged, or pushing against a bound)"
            )
            return None
        return proposal

    def observe(self, theta, value, grad):
        """Takes the objective ``value`` and its gradient ``grad`` at ``theta``."""
        theta = np.asarray(theta, dtype=np.float64).reshape(-1)
        grad = np.asarray(grad, dtype=np.float64).reshape(-1)
        value = float(value)
        self._track_progress(value)
        if not math.isfinite(value) or not np.all(np.isfinite(grad)):
            self.fail(theta)
            return
        moved = self.theta is not None
        self.accepted = bool(self._update(theta, value, grad))
        self.n_iter += int(self.accepted and moved)
        self._check_gradient()

    def fail(self, theta):
        """Takes an evaluation at ``theta`` that gave no usable result."""
        self.accepted = False
        self._failed(np.asarray(theta, dtype=np.float64).reshape(-1))
        self._count_backtrack()

    def get_state(self) -> dict:
        """The descent's state as a JSON-serializable dict."""
        return {key: _to_json(getattr(self, key)) for key in self._STATE}

    def set_state(self, state: dict):
        """Restores a state from ``get_state``; returns ``self``."""
        for key in self._STATE:
            if key in state:
                value = state[key]
                setattr(
                    self, key, np.array(value, np.float64) if isinstance(value, list) else value
                )
        return self

    # -- for the policies ----------------------------------------------------------
    def _target(self):
        raise NotImplementedError

    def _update(self, theta, value, grad):
        """Consumes a finite evaluation; returns whether it was accepted."""
        raise NotImplementedError

    def _failed(self, theta):
        del theta

    def _store(self, theta, value, grad):
        self.theta, self.value, self.grad = theta.copy(), value, grad.copy()
        self.backtracks = 0

    def _projected_grad(self, grad=None):
        return _projected(self.theta, self.grad if grad is None else grad, self.lower, self.upper)

    def _count_backtrack(self):
        self.backtracks += 1
        if self.backtracks > self.max_backtracks:
            self.stop_reason = (
                f"line search found no decrease in max_backtracks={self.max_backtracks} "
                "tries (at a minimum or a kink)"
            )

    def _track_progress(self, value):
        finite = math.isfinite(value)
        reference = self.best if self.reference is None else self.reference
        if finite and (self.best is None or value < self.best):
            self.best = value
        threshold = None if reference is None else reference - self.tol * abs(reference)
        if threshold is None or (finite and value < threshold):
            self.reference = value if finite else reference
            self.stale = 0
        else:
            self.stale += 1
        if self.stale >= self.patience:
            self.stop_reason = (
                f"no relative improvement above tol={self.tol} for patience={self.patience} "
                "evaluations"
            )

    def _check_gradient(self):
        if self.stop_reason is not None or self.grad is None:
            return
        norm = float(np.linalg.norm(self._projected_grad()))
        if norm <= self.gradient_tol * max(abs(self.value), 1e-300):
            self.stop_reason = (
                f"projected gradient norm below gradient_tol={self.gradient_tol} "
                "(relative to the objective)"
            )


class LineSearch(StepPolicy):
    """Gradient descent with Barzilai-Borwein steps and an Armijo line search.

    The first step is ``learning_rate`` (default ``1 / ||gradient||``: a move of
    length 1). A trial is accepted when the objective decreased enough; the next step
    is then the Barzilai-Borwein step of the last move (the secant estimate of the
    inverse curvature; twice the step where the objective was not convex along the
    move), kept within [1/10, 10] times the previous step. A rejected trial shrinks
    the step to the minimizer of the quadratic through the objective and its slope at
    the accepted point and the objective at the trial, within [1/10, 1/2] of it. No
    log penalty moves by more than ``max_move`` per trial: a long move towards small
    penalties is the costly mistake in a Lasso search (solves there are slowest).
    """

    name = "line_search"
    _STATE = (*StepPolicy._STATE, "step")

    def __init__(self, start, *, max_move=2.0, **kwargs):
        super().__init__(start, **kwargs)
        self.max_move = max_move
        self.step = None

    def _target(self):
        return self.theta - self.step * self._projected_grad()

    def _update(self, theta, value, grad):
        if self.theta is None:
            norm = float(np.linalg.norm(grad))
            self.step = self.learning_rate or (1.0 / norm if norm > 0 else 1.0)
            self._accept(theta, value, grad)
            return True
        slope = float(self.grad @ (theta - self.theta))  # < 0 downhill
        if value <= self.value + ARMIJO * slope:
            moved, grad_change = theta - self.theta, grad - self.grad
            curvature = float(moved @ grad_change)
            bb = float(moved @ moved) / curvature if curvature > 0 else 2.0 * self.step
            self.step = float(np.clip(bb, 0.1 * self.step, 10.0 * self.step))
            self._accept(theta, value, grad)
            return True
        curvature = value - self.value - slope
        factor = -slope / (2.0 * curvature) if curvature > 0 else 0.5
        self.step *= float(np.clip(factor, 0.1, 0.5))
        self._count_backtrack()
        return False

    def _accept(self, theta, value, grad):
        self._store(theta, value, grad)
        largest = float(np.max(np.abs(self._projected_grad())))
        if self.max_move is not None and largest > 0:
            self.step = min(self.step, self.max_move / largest)

    def _failed(self, theta):
        if self.step is not None:
            self.step *= 0.5


class QuasiNewton(StepPolicy):
    """A trust-region-like quasi-Newton search, built to move fast far from the optimum.

    The objective is modeled by its logarithm while it is positive (criteria such as
    a validation MSE vary over orders of magnitude across penalties: secants and
    interpolations of log values fit them far better). The first step goes
    ``first_step`` log units (Euclidean length; default one decade) down the gradient,
    or ``learning_rate`` times the gradient when that is given. Every accepted trial
    (sufficient decrease) adds the secant pair (change of log penalties, change of
    gradient) to an L-BFGS memory of ``memory`` pairs, and the next step is the
    quasi-Newton step; with one penalty this is the secant method on the derivative.
    The L-BFGS recursion starts from one curvature per penalty (from the newest pair
    that moved it), so penalties of very different curvature (a sharp l1 valley, a
    flat l2 slope) each take their own Newton step. A step is at most ``max_growth``
    times longer than the last accepted one that was no plateau probe (largest change
    of a log penalty; the direction is kept), and without positive curvature along
    the last step it grows by ``max_growth`` along the gradient. When the objective
    increases, the next trial backtracks to the minimizer of the cubic matching the
    objective and its slope at both ends of the rejected step.

    Plateau probe: when some derivatives become exactly zero on an accepted step (a
    penalty that switched off all of its features), a zero derivative cannot tell
    whether their minimum lay before the plateau's edge, and no gradient step would
    move them again; the next trial moves only them back to their previous values,
    and if that is worse, one backtrack tries the minimizer of the cubic along the
    probe before the regular quasi-Newton step follows.
    """

    name = "quasi_newton"
    _STATE = (*StepPolicy._STATE, "memory_s", "memory_y", "next_theta", "fallback")
    _STATE += ("reach", "log_objective")

    def __init__(self, start, *, first_step=DECADE, max_growth=3.0, memory=5, **kwargs):
        super().__init__(start, **kwargs)
        self.first_step = first_step
        self.max_growth = max_growth
        self.memory = memory
        self.memory_s = []  # secant pairs, oldest first
        self.memory_y = []
        self.next_theta = None
        self.fallback = None  # the quasi-Newton step to take if a plateau probe fails
        self.reach = None  # largest move of the last accepted step that was no probe
        self.log_objective = True

    def get_state(self) -> dict:
        state = super().get_state()
        state["memory_s"] = [_to_json(s) for s in self.memory_s]
        state["memory_y"] = [_to_json(y) for y in self.memory_y]
        return state

    def set_state(self, state: dict):
        super().set_state(state)
        self.memory_s = [np.asarray(s, np.float64) for s in state.get("memory_s", [])]
        self.memory_y = [np.asarray(y, np.float64) for y in state.get("memory_y", [])]
        return self

    def _target(self):
        return self.next_theta

    def _model(self, value, grad):
        """The modeled objective and gradient: of log(value) while value > 0."""
        if self.log_objective and value > 0.0:
            return math.log(value), grad / value
        if self.log_objective and self.theta is not None:
            self.memory_s, self.memory_y = [], []  # built on the other scale
        self.log_objective = False
        return value, grad

    def _update(self, theta, raw_value, raw_grad):
        value, grad_new = self._model(raw_value, raw_grad)
        if self.theta is None:
            self._store(theta, raw_value, raw_grad)
            self.next_theta = self._step(grad_new, None)
            return True
        previous, grad = self._model(self.value, self.grad)
        s = theta - self.theta
        slope = float(grad @ s)  # < 0: the step went downhill
        if value > previous + ARMIJO * slope:
            # The rejected pair is still a valid secant about the accepted point.
            self._remember(s, grad_new - grad)
            fraction = _cubic_minimizer(previous, slope, value, float(grad_new @ s))
            self.next_theta = self.theta + fraction * s
            if self.fallback is not None and (fraction <= CUBIC_LOW or self.backtracks):
                # A rejected probe gets one backtrack, unless the cubic puts the minimum
                # at the accepted point (the probe moves only flat penalties: its slope
                # there is zero and a segment search would crawl); then the regular
                # quasi-Newton step follows.
                self.next_theta, self.fallback = self.fallback, None
            self._count_backtrack()
            return False
        curved = self._remember(s, grad_new - grad)
        end_slope = float(grad_new @ s)
        start = self.theta
        self._store(theta, raw_value, raw_grad)
        if self.fallback is None or self.reach is None:  # not a probe: a step's length
            self.reach = float(np.max(np.abs(s)))
        radius = self.max_growth * self.reach
        self.fallback = None
        if end_slope > 0.0 and _along(grad_new, s) >= ALIGNED:
            # Overshot, and the gradient points back along the step: the cubic through
            # both ends locates the minimum inside it better than the secant.
            self.next_theta = start + _cubic_minimizer(previous, slope, value, end_slope) * s
        elif np.any(flat := (grad_new == 0.0) & (grad != 0.0) & (s != 0.0)):
            self.next_theta = np.where(flat, start, theta)  # the plateau probe
            self.fallback = self._step(grad_new, radius, curved)
        else:
            self.next_theta = self._step(grad_new, radius, curved)
        return True

    def _failed(self, theta):
        if self.theta is not None:  # retry halfway to the failed point
            self.next_theta = self.theta + 0.5 * (theta - self.theta)

    def _remember(self, s, y):
        """Adds the secant pair ``(s, y)`` if it shows positive curvature (else BFGS
        would lose positive definiteness); returns whether it did."""
        curved = float(s @ y) > 1e-12 * float(np.linalg.norm(s) * np.linalg.norm(y))
        if curved:
            self.memory_s = [*self.memory_s, s.copy()][-self.memory :]
            self.memory_y = [*self.memory_y, y.copy()][-self.memory :]
        return curved

    def _step(self, grad, radius, curved=False):
        """Next point from the accepted one (``grad``: the model's gradient there): the
        L-BFGS step, scaled down (direction kept) until no log penalty moves by more
        than ``radius``; the first step when ``radius`` is None."""
        theta = self.theta
        grad = self._projected_grad(grad)
        scale = float(np.max(np.abs(grad)))
        if scale == 0.0:
            return theta.copy()  # stationary: the min_step rule stops the descent
        if radius is None:
            if self.learning_rate is not None:
                return np.clip(theta - self.learning_rate * grad, self.lower, self.upper)
            # Euclidean length: moving the steepest of several penalties by a whole
            # decade overshoots, often onto a plateau.
            move = -grad * (self.first_step / float(np.linalg.norm(grad)))
            radius = self.first_step
        elif curved and self.memory_s:
            move = -_two_loop(grad, self.memory_s, self.memory_y, self._initial_inverse())
            move[grad == 0.0] = 0.0  # at a bound and pushed out of it (or flat)
            if not float(move @ grad) < 0.0:  # not a descent direction: steepest
                move = -grad * (radius / scale)
        else:
            move = -grad * (radius / scale)  # no positive curvature: expand
        length = float(np.max(np.abs(move)))
        if length > radius:
            move *= radius / length
        return np.clip(theta + move, self.lower, self.upper)

    def _initial_inverse(self):
        inverse = _coordinate_inverse_curvature(self.memory_s, self.memory_y)
        # Penalties that no pair measured: the usual L-BFGS scale s.y / y.y.
        s, y = self.memory_s[-1], self.memory_y[-1]
        inverse[np.isnan(inverse)] = float(s @ y) / float(y @ y)
        return inverse


class Adam(StepPolicy):
    """Adam on the log penalties (learning rate ``learning_rate``, default 0.2),
    halving the rate whenever the objective goes up: at a constant rate Adam circles
    the minimum. Every evaluation is accepted."""

    name = "adam"
    _STATE = (*StepPolicy._STATE, "m", "v", "t", "lr")
    BETA1, BETA2, EPSILON = 0.9, 0.999, 1e-8

    def __init__(self, start, **kwargs):
        super().__init__(start, **kwargs)
        self.m = self.v = self.lr = None
        self.t = 0

    def _target(self):
        m_hat = self.m / (1 - self.BETA1**self.t)
        v_hat = self.v / (1 - self.BETA2**self.t)
        return self.theta - self.lr * m_hat / (np.sqrt(v_hat) + self.EPSILON)

    def _update(self, theta, value, grad):
        m = np.zeros_like(grad) if self.m is None else self.m
        v = np.zeros_like(grad) if self.v is None else self.v
        self.m = self.BETA1 * m + (1 - self.BETA1) * grad
        self.v = self.BETA2 * v + (1 - self.BETA2) * grad**2
        self.t += 1
        if self.lr is None:
            self.lr = self.learning_rate or 0.2
        elif value > self.value:
            self.lr *= 0.5
        self._store(theta, value, grad)
        return True


POLICIES = {cls.name: cls for cls in (QuasiNewton, LineSearch, Adam)}


def make_policy(name, start, **settings) -> StepPolicy:
    """The policy called ``name`` (``"quasi_newton"``, ``"line_search"``, ``"adam"``)
    started at ``start``; ``settings`` go to its constructor."""
    return POLICIES[V.one_of("optimizer", name, tuple(POLICIES))](start, **settings)


def _bound(value, default, size):
    if value is None:
        return np.full(size, default)
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (size,)).copy()


def _to_json(value):
    if isinstance(value, np.ndarray):
        return [float(v) for v in value]
    if isinstance(value, np.floating | np.integer | np.bool_):
        return value.item()
    return value


def _projected(theta, grad, lo, hi):
    """Zeroes the gradient components that would push a point out of its bounds."""
    grad = np.array(grad, dtype=np.float64)
    grad[(theta <= lo) & (grad > 0)] = 0.0
    grad[(theta >= hi) & (grad < 0)] = 0.0
    return grad


def _along(vector, direction):
    """Cosine of the angle between two vectors (1 for a single penalty)."""
    norms = float(np.linalg.norm(vector) * np.linalg.norm(direction))
    return float(vector @ direction) / norms if norms > 0.0 else 0.0


def _coordinate_inverse_curvature(memory_s, memory_y, share=0.25):
    """Per log penalty, ``s_i / y_i`` of the newest secant pair that moved it by at
    least ``share`` of the pair's largest move and saw its derivative grow along the
    move (positive curvature); NaN where no pair did.

    The usual L-BFGS starting scale ``s.y / y.y`` is one number for all: with
    penalties of very different curvature it makes the flat one crawl. Coupling
    between penalties is left to the secant pairs of the two-loop recursion."""
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
    q = np.array(grad, dtype=np.float64)
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


def _cubic_minimizer(f0, slope0, f1, slope1, low=CUBIC_LOW, high=0.9):
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
