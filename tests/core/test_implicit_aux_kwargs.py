"""has_aux (jaxopt's semantics) and keyword arguments to custom_root / custom_fixed_point.

aux is fn's (or, for custom_*, the solver's) auxiliary output at the returned
solution, with gradients stopped, as in jaxopt; keyword arguments reach the solver and
fn and are not differentiated (jaxopt differentiates positional arguments only).
"""

import numpy as np
import pytest
import tensorflow as tf
from conftest import run_in_mode
from test_core_gradients import TIGHT, central_difference

import keras_implicit as ki

D = 3
_RNG = np.random.default_rng(11)
_W = _RNG.normal(size=(D, D))
W_NP = 0.5 * _W / np.linalg.norm(_W, 2)
W = tf.constant(W_NP)
X = _RNG.normal(size=D)


def _tanh_map_with_aux(z, x):
    pre = tf.linalg.matvec(W, z) + x
    return tf.tanh(pre), {"pre": pre, "norm": tf.norm(z)}


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_fixed_point_aux_is_fns_aux_at_the_solution_and_not_differentiated(mode):
    def solve(x):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            z, aux, stats = ki.fixed_point(
                _tanh_map_with_aux, tf.zeros_like(x), x, has_aux=True, return_stats=True, **TIGHT
            )
            loss = tf.reduce_sum(z)
        grad_aux = tape.gradient(aux["pre"], x, unconnected_gradients="zero")
        return z, aux, stats.converged, tape.gradient(loss, x), grad_aux

    z, aux, converged, grad, grad_aux = run_in_mode(solve, mode)(tf.constant(X))
    z = z.numpy()
    assert converged.numpy()
    np.testing.assert_allclose(z, np.tanh(W_NP @ z + X), atol=1e-12)
    np.testing.assert_allclose(aux["pre"].numpy(), W_NP @ z + X, atol=1e-12)
    np.testing.assert_allclose(aux["norm"].numpy(), np.linalg.norm(z), atol=1e-12)
    np.testing.assert_array_equal(grad_aux.numpy(), 0.0)  # aux carries no gradient

    def plain(x):
        return ki.fixed_point(
            lambda z, x: _tanh_map_with_aux(z, x)[0], tf.zeros(D, tf.float64), x, **TIGHT
        )

    reference = central_difference(lambda x: float(tf.reduce_sum(plain(tf.constant(x)))), X)
    np.testing.assert_allclose(grad.numpy(), reference, atol=1e-8)


def test_root_and_argmin_aux():
    def equations(y, x):
        return y + 0.3 * tf.tanh(tf.linalg.matvec(W, y)) - x, tf.reduce_sum(y)

    y, total = ki.root(equations, tf.zeros(D, tf.float64), tf.constant(X), has_aux=True, **TIGHT)
    np.testing.assert_allclose(total.numpy(), y.numpy().sum(), atol=1e-12)

    def objective(y, x):
        value = 0.5 * tf.reduce_sum(y**2) - tf.reduce_sum(x * y)
        return value, {"value": value}

    y, aux = ki.argmin(objective, tf.zeros(D, tf.float64), tf.constant(X), has_aux=True, **TIGHT)
    np.testing.assert_allclose(y.numpy(), X, atol=1e-10)  # minimizer of 0.5|y|^2 - x.y
    np.testing.assert_allclose(aux["value"].numpy(), -0.5 * X @ X, atol=1e-10)


def test_return_order_without_aux_is_unchanged():
    z, stats = ki.fixed_point(
        lambda z, x: _tanh_map_with_aux(z, x)[0], tf.zeros(D, tf.float64), X, return_stats=True
    )
    assert isinstance(stats, ki.solvers.SolverStats) and z.shape == (D,)


def test_has_aux_with_a_value_that_is_not_a_pair_is_refused():
    with pytest.raises(ValueError, match=r"must return a pair \(value, aux\). Received"):
        ki.fixed_point(lambda z, x: tf.tanh(z + x), tf.zeros(D, tf.float64), X, has_aux=True)


def _fixed_point_iterations(step, z, iterations):
    return tf.while_loop(lambda i, z: i < iterations, lambda i, z: (i + 1, step(z)), (0, z))[1]


def test_custom_fixed_point_aux_is_the_solvers():
    tanh_map = lambda z, x: _tanh_map_with_aux(z, x)[0]  # noqa: E731

    @ki.custom_fixed_point(tanh_map, has_aux=True, return_stats=True, tol=1e-10)
    def solver(z0, x):
        z = _fixed_point_iterations(lambda z: tanh_map(z, x), z0, 200)
        return z, {"steps": tf.constant(200), "z": z}

    x = tf.constant(X)
    with tf.GradientTape() as tape:
        tape.watch(x)
        z, aux, stats = solver(tf.zeros_like(x), x)
    assert int(aux["steps"]) == 200 and stats.converged.numpy()
    np.testing.assert_allclose(aux["z"].numpy(), z.numpy())
    assert tape.gradient(aux["z"], x) is None  # the solver's aux is not differentiated


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_custom_root_passes_keyword_arguments_to_solver_and_fn(mode):
    seen = {}

    def equations(y, x, *, scale, unused_flag):
        seen["fn"] = unused_flag
        return y + 0.3 * scale * tf.tanh(tf.linalg.matvec(W, y)) - x

    @ki.custom_root(equations, tol=1e-10, backward_tol=1e-12)
    def solver(y0, x, *, scale, unused_flag):
        seen["solver"] = unused_flag
        step = lambda y: x - 0.3 * scale * tf.tanh(tf.linalg.matvec(W, y))  # noqa: E731
        return _fixed_point_iterations(step, y0, 200)

    def solve(x, scale):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x, scale])
            y = solver(tf.zeros_like(x), x, scale=scale, unused_flag="yes")
            loss = tf.reduce_sum(y * tf.constant([1.0, -2.0, 0.5], tf.float64))
        return y, tape.gradient(loss, x), tape.gradient(loss, scale)

    scale = tf.constant(0.8, tf.float64)
    y, grad_x, grad_scale = run_in_mode(solve, mode)(tf.constant(X), scale)
    assert seen == {"fn": "yes", "solver": "yes"}
    assert grad_scale is None  # keyword arguments are not differentiated
    y = y.numpy()
    np.testing.assert_allclose(y + 0.3 * 0.8 * np.tanh(W_NP @ y), X, atol=1e-10)
    jac = np.eye(D) + 0.3 * 0.8 * (1 - np.tanh(W_NP @ y) ** 2)[:, None] * W_NP  # dF/dy
    np.testing.assert_allclose(grad_x.numpy(), np.linalg.solve(jac.T, [1.0, -2.0, 0.5]), atol=1e-9)
