"""ki.diagnostics against dense numpy references, including checks that must fail."""

import numpy as np
import pytest
import tensorflow as tf

import keras_implicit as ki


def _tanh_problem(scale=0.7, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(dim, dim))
    w = scale * w / np.linalg.norm(w, 2)
    x = rng.normal(size=dim)
    return w, x


def test_check_gradients_passes_on_correct_gradients():
    w, x = _tanh_problem()
    w_var = tf.Variable(w)

    def cell(z, x):
        return tf.tanh(tf.linalg.matvec(w_var, z) + x)

    check = ki.diagnostics.check_gradients(
        cell,
        tf.zeros(5, tf.float64),
        tf.constant(x),
        variables=[w_var],
        tol=1e-12,
        max_iter=300,
        backward_tol=1e-12,
    )
    assert check.ok and check.relative_error < 1e-7
    assert check.implicit.shape == (3,) and np.abs(check.finite_difference).min() > 0


def test_check_gradients_detects_a_wrong_implicit_map():
    """A solver that returns the fixed point of another map than `fn` gets wrong gradients."""
    w, x = _tanh_problem()
    w_t = tf.constant(w)

    def cell(z, x):
        return tf.tanh(tf.linalg.matvec(w_t, z) + x)

    def solve_with(step_map):
        # the forward check must let the mismatch pass; a tight backward solve keeps the
        # right map's gradient error far below the 1e-6 asserted
        @ki.custom_fixed_point(cell, tol=10.0, backward_tol=1e-10)
        def solver(z0, x):
            z = z0
            for _ in range(200):
                z = step_map(z, x)
            return z

        return solver

    wrong = solve_with(lambda z, x: tf.tanh(tf.linalg.matvec(w_t, z) + 2.0 * x))
    check = ki.diagnostics.check_gradients(
        None, tf.zeros(5, tf.float64), tf.constant(x), solve=wrong
    )
    assert not check.ok and check.relative_error > 0.1
    right = ki.diagnostics.check_gradients(
        None, tf.zeros(5, tf.float64), tf.constant(x), solve=solve_with(cell)
    )
    assert right.ok and right.relative_error < 1e-6


def test_check_gradients_flags_disagreement():
    """rtol below what finite differences can reach must report failure, not pass."""
    w, x = _tanh_problem()

    def cell(z, x):
        return tf.tanh(tf.linalg.matvec(tf.constant(w), z) + x)

    check = ki.diagnostics.check_gradients(
        cell,
        tf.zeros(5, tf.float64),
        tf.constant(x),
        tol=1e-4,
        max_iter=300,
        rtol=1e-12,
        on_failure="ignore",
    )
    assert not check.ok and check.relative_error > 1e-12


def test_invertibility_and_spectral_radius_match_numpy():
    w, x = _tanh_problem(scale=0.9)
    w_t = tf.constant(w)

    def cell(z, x):
        return tf.tanh(tf.linalg.matvec(w_t, z) + x)

    z = ki.fixed_point(cell, tf.zeros(5, tf.float64), tf.constant(x), tol=1e-12, max_iter=500)
    jac = np.diag(1 - np.tanh(w @ z.numpy() + x) ** 2) @ w
    np.testing.assert_allclose(
        ki.diagnostics.jacobian(cell, z, tf.constant(x)), np.eye(5) - jac, atol=1e-12
    )
    report = ki.diagnostics.check_invertibility(cell, z, tf.constant(x))
    sv = np.linalg.svd(np.eye(5) - jac, compute_uv=False)
    assert report.invertible
    np.testing.assert_allclose(report.smallest_singular_value, sv[-1], rtol=1e-10)
    np.testing.assert_allclose(report.condition_number, sv[0] / sv[-1], rtol=1e-10)
    radius = np.abs(np.linalg.eigvals(jac)).max()
    np.testing.assert_allclose(report.spectral_radius, radius, rtol=1e-10)
    np.testing.assert_allclose(
        ki.diagnostics.spectral_radius(cell, z, tf.constant(x)), radius, rtol=1e-3
    )


def test_invertibility_flags_singular_systems_per_row():
    # rows 0: healthy contraction; row 1: J has eigenvalue 1 (I - J singular)
    w = tf.constant(np.array([[[0.5, 0.0], [0.0, 0.3]], [[1.0, 0.0], [0.0, 0.2]]]))

    def linear(z, x):
        return tf.einsum("bij,bj->bi", w, z) + x

    z = tf.constant([[0.0, 0.0], [0.0, 0.0]], tf.float64)
    x = tf.zeros([2, 2], tf.float64)
    report = ki.diagnostics.check_invertibility(linear, z, x, batch_dims=1)
    assert not report.invertible and report.smallest_singular_value < 1e-12
    assert "singular" in report.message and "backward_ridge" in report.message
    radii = ki.diagnostics.spectral_radius(linear, z, x, batch_dims=1)
    np.testing.assert_allclose(radii, [0.5, 1.0], rtol=1e-6)


def test_diagnostics_bad_inputs():
    with pytest.raises(ValueError, match="Received: kind='solve'"):
        ki.diagnostics.check_invertibility(lambda z: z, tf.zeros(2), kind="solve")
    with pytest.raises(ValueError, match="needs floating-point"):
        ki.diagnostics.check_gradients(lambda z: z, tf.zeros(2, tf.float64))
