"""Forward mode: `tf.autodiff.ForwardAccumulator` through every entry point.

The implicit JVP solves (dF/dy) t_y = -(dF/dx) t_x (jaxopt's root_jvp). References, in
float64: the Jacobian built column by column from JVPs equals the one built row by row
from the implicit VJP (so JVP = VJP transposed), and central finite differences of
the solution.
"""

import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, run_in_mode
from test_core_gradients import TIGHT

import keras_implicit as ki

D = 3
_RNG = np.random.default_rng(7)
_W = _RNG.normal(size=(D, D))
W = tf.constant(0.5 * _W / np.linalg.norm(_W, 2))
A = tf.constant(np.eye(D) + 0.3 * _W @ _W.T)
X = _RNG.normal(size=D)
TIGHT_CUSTOM = {"tol": 1e-10, "backward_tol": 1e-12, "backward_max_iter": 500}


def _tanh_map(z, x):
    return tf.tanh(tf.linalg.matvec(W, z) + x)


def _root_fn(y, x):
    return y + 0.3 * tf.tanh(tf.linalg.matvec(W, y)) - x


def _objective(y, x):
    quadratic = 0.5 * tf.reduce_sum(y * tf.linalg.matvec(A, y))
    return quadratic - tf.reduce_sum(x * y) + 0.1 * tf.reduce_sum(tf.math.log(tf.cosh(y)))


def _iterate(step, z, iterations=300):
    return tf.while_loop(lambda i, z: i < iterations, lambda i, z: (i + 1, step(z)), (0, z))[1]


@ki.custom_fixed_point(_tanh_map, **TIGHT_CUSTOM)
def _custom_fixed_point_solver(z0, x):
    return _iterate(lambda z: _tanh_map(z, x), z0)


@ki.custom_root(_root_fn, **TIGHT_CUSTOM)
def _custom_root_solver(y0, x):
    return _iterate(lambda y: x - 0.3 * tf.tanh(tf.linalg.matvec(W, y)), y0)


ENTRY_POINTS = {
    "fixed_point": lambda x: ki.fixed_point(_tanh_map, tf.zeros_like(x), x, **TIGHT),
    "root": lambda x: ki.root(_root_fn, tf.zeros_like(x), x, **TIGHT),
    "argmin": lambda x: ki.argmin(_objective, tf.zeros_like(x), x, **TIGHT),
    "custom_fixed_point": lambda x: _custom_fixed_point_solver(tf.zeros_like(x), x),
    "custom_root": lambda x: _custom_root_solver(tf.zeros_like(x), x),
}


def _jacobian_by_jvp(solve, x):
    columns = []
    for i in range(D):
        with tf.autodiff.ForwardAccumulator(x, tf.one_hot(i, D, dtype=x.dtype)) as acc:
            y = solve(x)
        columns.append(acc.jvp(y))
    return tf.stack(columns, axis=1)


def _jacobian_by_vjp(solve, x):
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = solve(x)
    rows = [tape.gradient(y, x, output_gradients=tf.one_hot(i, D, dtype=x.dtype)) for i in range(D)]
    return tf.stack(rows, axis=0)


def _jacobian_by_differences(solve, x, eps=1e-6):
    columns = []
    for i in range(D):
        step = np.zeros(D)
        step[i] = eps
        up, down = solve(tf.constant(x + step)), solve(tf.constant(x - step))
        columns.append((up.numpy() - down.numpy()) / (2 * eps))
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_jvp_is_the_transposed_vjp_and_matches_differences(entry_point):
    solve = ENTRY_POINTS[entry_point]
    x = tf.constant(X)
    by_jvp = _jacobian_by_jvp(solve, x).numpy()
    np.testing.assert_allclose(by_jvp, _jacobian_by_vjp(solve, x).numpy(), atol=1e-10)
    np.testing.assert_allclose(by_jvp, _jacobian_by_differences(solve, X), atol=1e-7)


def _closed_form_jacobian(entry_point, y):
    """dy/dx = -(dF/dy)^{-1} dF/dx from the problems' formulas, at the solution y."""
    w, a = W.numpy(), A.numpy()
    if entry_point.endswith("fixed_point"):  # F = z - tanh(W z + x)
        slope = np.diag(1 - y**2)
        return np.linalg.solve(np.eye(D) - slope @ w, slope)
    if entry_point.endswith("root"):  # F = y + 0.3 tanh(W y) - x
        return np.linalg.inv(np.eye(D) + 0.3 * np.diag(1 - np.tanh(w @ y) ** 2) @ w)
    return np.linalg.inv(a + 0.1 * np.diag(1 - np.tanh(y) ** 2))  # argmin: F = grad f


def _slow_unless(cases, fast):
    """`cases` for parametrize, those not in `fast` marked slow."""
    return [
        case
        if case in fast
        else pytest.param(*(case if isinstance(case, tuple) else (case,)), marks=pytest.mark.slow)
        for case in cases
    ]


GRAPH_CASES = [(name, mode) for name in ENTRY_POINTS for mode in ("function", "xla")]


@pytest.mark.parametrize(
    "entry_point,mode",
    _slow_unless(GRAPH_CASES, [("fixed_point", "function"), ("custom_root", "xla")]),
)
def test_jvp_in_graphs_and_under_xla(entry_point, mode):
    solve = ENTRY_POINTS[entry_point]

    def jvp(x, tangent):
        with tf.autodiff.ForwardAccumulator(x, tangent) as acc:
            y = solve(x)
        return y, acc.jvp(y)

    tangent = np.array([0.3, -1.0, 2.0])
    y, result = run_in_mode(jvp, mode)(tf.constant(X), tf.constant(tangent))
    reference = _closed_form_jacobian(entry_point, y.numpy()) @ tangent
    np.testing.assert_allclose(result.numpy(), reference, atol=1e-9)


V = tf.Variable(W)
V_TANGENT = tf.constant(_RNG.normal(size=(D, D)))


def _gradient_map(z, x):
    """0.5 * d/dz [sum tanh(V z) * x] + 0.1 x, through a tape of fn's own."""
    with tf.GradientTape() as tape:
        tape.watch(z)
        energy = tf.reduce_sum(tf.tanh(tf.linalg.matvec(V, z)) * x)
    return 0.5 * tape.gradient(energy, z) + 0.1 * x


def _solve_gradient_map(x):
    return ki.fixed_point(_gradient_map, tf.zeros_like(x), x, **TIGHT)


@pytest.mark.parametrize("mode", _slow_unless(MODES, ["eager", "function"]))
def test_fn_with_its_own_tape_and_a_variable_tangent(mode):
    def jvp(x, x_tangent):
        with tf.autodiff.ForwardAccumulator([x, V], [x_tangent, V_TANGENT]) as acc:
            z = _solve_gradient_map(x)
        return acc.jvp(z)

    x_tangent = np.array([1.0, -0.5, 0.25])
    eps, start = 1e-6, V.numpy()
    ends = []
    for sign in (1.0, -1.0):
        V.assign(start + sign * eps * V_TANGENT.numpy())
        ends.append(_solve_gradient_map(tf.constant(X + sign * eps * x_tangent)).numpy())
    V.assign(start)
    reference = (ends[0] - ends[1]) / (2 * eps)
    result = run_in_mode(jvp, mode)(tf.constant(X), tf.constant(x_tangent))
    np.testing.assert_allclose(result.numpy(), reference, atol=1e-7)


def test_accumulator_around_a_tf_function():
    solve = tf.function(ENTRY_POINTS["root"])
    x, tangent = tf.constant(X), tf.constant([0.3, -1.0, 2.0], tf.float64)
    with tf.autodiff.ForwardAccumulator(x, tangent) as acc:
        y = solve(x)
    reference = _closed_form_jacobian("root", y.numpy()) @ tangent.numpy()
    np.testing.assert_allclose(acc.jvp(y).numpy(), reference, atol=1e-9)


def test_a_failed_tangent_solve_is_reported_as_such():
    x = tf.constant(X)
    with (
        tf.autodiff.ForwardAccumulator(x, tf.ones_like(x)) as acc,
        pytest.warns(ki.ConvergenceWarning) as record,
    ):
        z = ki.fixed_point(
            _tanh_map, tf.zeros_like(x), x, linear_solver="neumann", backward_max_iter=1
        )
    messages = [str(r.message) for r in record]
    assert any("tangent linear solve (neumann) did not converge" in m for m in messages)
    assert not any("backward" in m for m in messages)
    assert acc.jvp(z) is not None
