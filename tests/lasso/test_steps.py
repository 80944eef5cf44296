"""The step policies on their own: smooth functions of log penalties with known minimizers."""

import json

import numpy as np
import pytest

from keras_implicit.lasso import steps

TARGET = np.log([0.3, 20.0])  # minimizer of the 2-D test functions
SCALES = np.array([1.0, 4.0])


def quadratic(theta):
    """1 + a quadratic in log space: value and gradient."""
    delta = theta - TARGET[: theta.size]
    scales = SCALES[: theta.size]
    return 1.0 + 0.5 * float(scales @ delta**2), scales * delta


def run(policy, function, max_evals=100):
    """Drives ``policy`` on ``function``; returns the evaluated points."""
    points = []
    while len(points) < max_evals:
        theta = policy.propose()
        if theta is None:
            break
        points.append(theta)
        policy.observe(theta, *function(theta))
    return np.array(points)


POLICIES = ["quasi_newton", "line_search", "adam"]
BUDGET = {"quasi_newton": 25, "line_search": 40, "adam": 200}


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("dim", [1, 2])
def test_policy_converges_to_the_minimizer(name, dim):
    start = np.log([5.0, 0.1])[:dim]
    policy = steps.make_policy(name, start, patience=20)
    points = run(policy, quadratic, BUDGET[name])
    assert points.shape[1] == dim
    np.testing.assert_array_equal(points[0], start)
    values = [quadratic(p)[0] for p in points]
    best = points[int(np.argmin(values))]
    if name == "adam":  # from 61 (2-D) or 4.96 (1-D) at the start to 1.0
        assert min(values) < 1.1
    else:
        np.testing.assert_allclose(best, TARGET[:dim], atol=0.01)
    assert policy.stop_reason is not None
    assert policy.best == pytest.approx(min(values))
    assert 0 < policy.n_iter <= len(points) - 1


@pytest.mark.parametrize("name", POLICIES)
def test_policy_respects_bounds_and_stops_at_the_bound(name):
    # The minimizer in b (log 20) lies above the upper bound log 5.
    lower, upper = np.log([1e-3, 1e-2]), np.log([10.0, 5.0])
    start = np.log([5.0, 0.1])
    policy = steps.make_policy(name, start, lower=lower, upper=upper, patience=20)
    points = run(policy, quadratic, BUDGET[name])
    assert np.all(points >= lower) and np.all(points <= upper)
    values = [quadratic(p)[0] for p in points]
    best = points[int(np.argmin(values))]
    assert best[1] == pytest.approx(upper[1], abs=1e-3)
    if name == "adam":  # the best point of the box: 1 + 2 log(5 / 20)^2 = 4.84
        assert min(values) < 1.05 * quadratic(np.array([TARGET[0], upper[1]]))[0]
    else:
        assert best[0] == pytest.approx(TARGET[0], abs=0.01)


def test_start_is_clipped_to_the_bounds():
    policy = steps.LineSearch([5.0], lower=[-1.0], upper=[1.0])
    np.testing.assert_array_equal(policy.propose(), [1.0])


def test_quasi_newton_secant_is_exact_on_a_one_dimensional_log_quadratic():
    # exp(quadratic): the policy models log(value), a quadratic, so the secant step
    # from the first two points lands on the minimizer.
    def function(theta):
        delta = theta - TARGET[:1]
        value = float(np.exp(0.5 * delta @ delta))
        return value, delta * value

    points = run(steps.QuasiNewton(np.log([5.0])), function, 3)
    assert points[1][0] == pytest.approx(np.log(0.5), rel=1e-12)  # one decade down
    assert points[2][0] == pytest.approx(TARGET[0], abs=1e-9)


def test_quasi_newton_probes_back_from_a_plateau():
    # b is flat above log(0.5) (a penalty that switched off all of its features); its
    # minimizer log(0.3) lies before the plateau's edge.
    edge = np.log(0.5)

    def function(theta):
        clipped = min(theta[1], edge)
        delta = np.array([theta[0] - TARGET[0], clipped - np.log(0.3)])
        grad = np.array([delta[0], 4.0 * delta[1] if theta[1] < edge else 0.0])
        return 1.0 + 0.5 * delta[0] ** 2 + 2.0 * delta[1] ** 2, grad

    policy = steps.QuasiNewton(np.log([5.0, 0.1]), patience=20)
    points = run(policy, function, 25)
    assert points[1][1] > edge
    np.testing.assert_array_equal(points[2], [points[1][0], points[0][1]])  # the probe
    best = min(points, key=lambda p: function(p)[0])
    np.testing.assert_allclose(best, [TARGET[0], np.log(0.3)], atol=0.05)


def test_quasi_newton_takes_the_regular_step_when_the_probe_fails():
    # b's minimum is the plateau above the edge, so the probe back is worse. The
    # value on the plateau varies slightly where the reported derivative is zero (as
    # with inexact inner solves): a search along the probe's segment would shrink
    # until the min_step rule stopped the descent with a far from its minimizer.
    edge = np.log(0.5)

    def function(theta):
        below = min(theta[1] - edge, 0.0)
        value = 1.0 + 0.5 * (theta[0] - TARGET[0]) ** 2 + 2.0 * below**2
        if theta[1] > edge:
            value -= 1e-3 * theta[1]
        return value, np.array([theta[0] - TARGET[0], 4.0 * below])

    policy = steps.QuasiNewton(np.log([5.0, 0.1]), patience=20)
    points = run(policy, function, 30)
    assert points[1][1] > edge and points[2][1] == points[0][1]  # stepped over, probed
    best = min(points, key=lambda p: function(p)[0])
    assert best[0] == pytest.approx(TARGET[0], abs=0.01)
    assert best[1] > edge
    assert len(points) <= 10


def test_line_search_moves_at_most_max_move():
    policy = steps.LineSearch([0.0], max_move=0.5, learning_rate=10.0)
    points = run(policy, lambda t: (float(0.5 * (t[0] - 3.0) ** 2), t - 3.0), 40)
    moves = np.abs(np.diff(points[:, 0]))
    assert moves.max() <= 0.5 + 1e-12
    assert points[-1][0] == pytest.approx(3.0, abs=0.01)


def test_stop_reasons():
    # At the minimizer: the gradient test stops before any move.
    policy = steps.QuasiNewton(TARGET.copy())
    run(policy, quadratic)
    assert "gradient_tol" in policy.stop_reason
    # Every trial after the start fails: max_backtracks consecutive rejections.
    policy = steps.LineSearch([0.0], max_backtracks=3, patience=100)
    policy.observe([0.0], 1.0, [1.0])
    for _ in range(4):
        policy.fail(policy.propose())
    assert "max_backtracks=3" in policy.stop_reason
    assert policy.propose() is None
    # No improvement for `patience` evaluations.
    policy = steps.Adam([0.0], patience=2)
    for value in (1.0, 1.0, 1.0):
        policy.observe(policy.propose(), value, [1.0])
    assert "patience=2" in policy.stop_reason
    # A next move below min_step.
    policy = steps.LineSearch([0.0], min_step=1.0, learning_rate=0.1)
    policy.observe([0.0], 1.0, [1.0])
    assert policy.propose() is None
    assert "min_step=1.0" in policy.stop_reason


def test_non_finite_evaluation_is_a_failure():
    policy = steps.QuasiNewton([0.0, 0.0], patience=10)
    policy.observe([0.0, 0.0], *quadratic(np.zeros(2)))
    trial = policy.propose()
    policy.observe(trial, float("nan"), [0.0, 0.0])
    assert not policy.accepted and policy.backtracks == 1
    np.testing.assert_allclose(policy.propose(), 0.5 * trial)  # retried halfway


@pytest.mark.parametrize("name", POLICIES)
def test_state_round_trips_through_json(name):
    policy = steps.make_policy(name, np.log([5.0, 0.1]), patience=20)
    run(policy, quadratic, 6)
    state = json.loads(json.dumps(policy.get_state()))
    resumed = steps.make_policy(name, np.log([5.0, 0.1]), patience=20).set_state(state)
    assert resumed.get_state() == policy.get_state()
    expected = run(policy, quadratic, 10)
    got = run(resumed, quadratic, 10)
    assert len(expected) > 0
    np.testing.assert_array_equal(got, expected)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="Received: optimizer='sgd'"):
        steps.make_policy("sgd", [0.0])


def test_cubic_minimizer_matches_the_interpolating_cubic():
    # A cubic with a local minimizer inside (0.1, 0.9): compare with numpy's roots.
    coefficients = np.array([2.0, -1.0, -0.8, 3.0])  # 2 t^3 - t^2 - 0.8 t + 3
    poly = np.poly1d(coefficients)
    slope = poly.deriv()
    roots = [r.real for r in slope.roots if abs(r.imag) < 1e-12 and poly.deriv(2)(r.real) > 0]
    (expected,) = roots
    got = steps._cubic_minimizer(poly(0.0), slope(0.0), poly(1.0), slope(1.0))
    assert got == pytest.approx(expected, rel=1e-10)


def test_coordinate_inverse_curvature_takes_the_newest_pair_per_coordinate():
    memory_s = [[1.0, 1.0, 0.0], [2.0, 0.1, -1.0]]
    memory_y = [[4.0, 0.5, 1.0], [1.0, 5.0, 3.0]]
    got = steps._coordinate_inverse_curvature(memory_s, memory_y)
    # a: newest pair, 2 / 1. b: the newest pair barely moved it (0.1 < 0.25 * 2), the
    # older one measured 1 / 0.5. c: the newest pair shows negative curvature, the
    # older one did not move it: unmeasured.
    np.testing.assert_allclose(got[:2], [2.0, 2.0])
    assert np.isnan(got[2])
