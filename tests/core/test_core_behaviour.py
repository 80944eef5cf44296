"""Failure policies, bad inputs, per-row isolation, precision, statistics."""

import warnings

import numpy as np
import pytest
import tensorflow as tf

import keras_implicit as ki


def _problem(seed=0, batch=3, dim=4, scale=0.8):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(dim, dim))
    w = tf.constant(scale * w / np.linalg.norm(w, 2))
    x = tf.constant(rng.normal(size=(batch, dim)))
    return (lambda z, x: tf.tanh(z @ w + x)), x


def _grad(fn, x, **kwargs):
    with tf.GradientTape() as tape:
        tape.watch(x)
        z = ki.fixed_point(fn, tf.zeros_like(x), x, batch_dims=1, **kwargs)
        loss = tf.reduce_sum(z)
    return z, tape.gradient(loss, x)


# ------------------------------------------------------------------ failure policy


def test_forward_failure_eager_policies():
    fn, x = _problem()
    with pytest.warns(ki.ConvergenceWarning, match="forward solve did not converge for 3 of 3"):
        ki.fixed_point(fn, tf.zeros_like(x), x, batch_dims=1, max_iter=2, tol=1e-12)
    with pytest.raises(ki.ConvergenceError, match="after 2 iterations"):
        ki.fixed_point(
            fn, tf.zeros_like(x), x, batch_dims=1, max_iter=2, tol=1e-12, on_failure="raise"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ki.fixed_point(
            fn, tf.zeros_like(x), x, batch_dims=1, max_iter=2, tol=1e-12, on_failure="ignore"
        )


def test_backward_failure_eager_policies():
    fn, x = _problem()
    settings = {
        "tol": 1e-12,
        "max_iter": 200,
        "backward_tol": 1e-14,
        "backward_max_iter": 1,
        "linear_solver": "neumann",
    }
    with pytest.warns(ki.ConvergenceWarning, match="backward linear solve \\(neumann\\)"):
        _grad(fn, x, **settings)
    with pytest.raises(ki.ConvergenceError, match="backward linear solve"):
        _grad(fn, x, on_failure="raise", **settings)


def test_failure_policies_in_tf_function(capfd):
    fn, x = _problem()

    @tf.function
    def warn(x):
        return _grad(fn, x, max_iter=2, tol=1e-12)

    _, g = warn(x)
    assert np.isfinite(g.numpy()).all()
    assert (
        "ConvergenceWarning: fixed_point: forward solve did not converge" in capfd.readouterr().err
    )

    @tf.function
    def strict(x):
        return _grad(fn, x, max_iter=2, tol=1e-12, on_failure="raise")

    with pytest.raises(tf.errors.InvalidArgumentError, match="forward solve did not converge"):
        strict(x)

    @tf.function
    def healthy(x):
        return _grad(fn, x, tol=1e-10, max_iter=200)

    healthy(x)
    assert "ConvergenceWarning" not in capfd.readouterr().err


def test_failure_policies_under_xla():
    """XLA cannot print or raise: stats carry the outcome; 'raise' turns failed rows to NaN."""
    ki._policy._warned_xla.clear()  # the notice is once per process
    fn, x = _problem(batch=3)
    # row 0 is easy (x = 0 gives z* = 0 at once); rows 1, 2 need many iterations
    x = tf.concat([tf.zeros_like(x[:1]), x[1:]], 0)

    def solve(x, policy):
        return ki.fixed_point(
            fn,
            tf.zeros_like(x),
            x,
            batch_dims=1,
            max_iter=3,
            tol=1e-12,
            on_failure=policy,
            return_stats=True,
        )

    with pytest.warns(ki.ConvergenceWarning, match="XLA"):
        z, stats = tf.function(lambda x: solve(x, "raise"), jit_compile=True)(x)
    np.testing.assert_array_equal(stats.converged.numpy(), [True, False, False])
    assert np.isfinite(z.numpy()[0]).all() and np.isnan(z.numpy()[1:]).all()

    z, stats = tf.function(lambda x: solve(x, "warn"), jit_compile=True)(x)
    np.testing.assert_array_equal(stats.converged.numpy(), [True, False, False])
    assert np.isfinite(z.numpy()).all()


def test_nan_row_does_not_corrupt_the_batch():
    fn, x = _problem(batch=4)
    bad = tf.tensor_scatter_nd_update(x, [[2, 0]], [np.nan])
    settings = {"tol": 1e-10, "max_iter": 200, "backward_tol": 1e-10}
    with pytest.warns(ki.ConvergenceWarning, match="did not converge for 1 of 4"):
        z_bad, g_bad = _grad(fn, bad, **settings)
    z_ok, g_ok = _grad(fn, x, **settings)
    keep = [0, 1, 3]
    np.testing.assert_allclose(z_bad.numpy()[keep], z_ok.numpy()[keep], atol=1e-9)
    np.testing.assert_allclose(g_bad.numpy()[keep], g_ok.numpy()[keep], atol=1e-8)
    _, stats = ki.fixed_point(
        fn,
        tf.zeros_like(bad),
        bad,
        batch_dims=1,
        return_stats=True,
        on_failure="ignore",
        **settings,
    )
    np.testing.assert_array_equal(stats.converged.numpy(), [True, True, False, True])
    assert np.isnan(stats.residual.numpy()[2])
    np.testing.assert_array_equal(g_bad.numpy()[2], 0.0)  # the broken row sends no gradient


def test_converged_rows_stop_iterating():
    fn, x = _problem(batch=2)
    x = tf.concat([tf.zeros_like(x[:1]), x[1:]], 0)
    _, stats = ki.fixed_point(
        fn,
        tf.zeros_like(x),
        x,
        batch_dims=1,
        tol=1e-10,
        solver="fixed_point_iteration",
        max_iter=500,
        return_stats=True,
    )
    iterations = stats.iterations.numpy()
    assert iterations[0] == 1 and iterations[1] > 10
    assert stats.residual.shape == (2,) and stats.converged.numpy().all()


# --------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors():
    fn, x = _problem()
    z0 = tf.zeros_like(x)
    with pytest.raises(ValueError, match="expected \\(4,\\), received \\(2,\\)"):
        ki.fixed_point(lambda z, x: z[:, :2], z0, x, batch_dims=1)
    with pytest.raises(ValueError, match="must return float64 values.*Received dtype: float32"):
        ki.fixed_point(lambda z, x: tf.cast(z, tf.float32), z0, x, batch_dims=1)
    with pytest.raises(ValueError, match="structure of its first argument"):
        ki.fixed_point(lambda z, x: (z, z), z0, x, batch_dims=1)
    with pytest.raises(ValueError, match="Received: solver='newton'"):
        ki.fixed_point(fn, z0, x, solver="newton")
    with pytest.raises(ValueError, match="Received: linear_solver='lu'"):
        ki.fixed_point(fn, z0, x, linear_solver="lu")
    with pytest.raises(ValueError, match="Received: tol=-1"):
        ki.fixed_point(fn, z0, x, tol=-1)
    with pytest.raises(ValueError, match="Received: max_iter=0"):
        ki.fixed_point(fn, z0, x, max_iter=0)
    with pytest.raises(ValueError, match="Received: on_failure='loud'"):
        ki.fixed_point(fn, z0, x, on_failure="loud")
    with pytest.raises(ValueError, match="Received: batch_dims=-1"):
        ki.fixed_point(fn, z0, x, batch_dims=-1)
    with pytest.raises(ValueError, match="floating point"):
        ki.fixed_point(fn, tf.zeros([3, 4], tf.int32), x)
    with pytest.raises(ValueError, match="must return a scalar"):
        ki.argmin(lambda b: b**2, tf.zeros([3], tf.float64))
    with pytest.raises(ValueError, match="cannot solve a general root"):
        ki.root(fn, z0, x, solver="lbfgs")
    with pytest.raises(ValueError, match="Received: backward_ridge=-0.5|Received: ridge=-0.5"):
        ki.fixed_point(fn, z0, x, backward_ridge=-0.5)


# ------------------------------------------------------- precision, stats, callbacks


def test_half_precision_is_solved_in_float32():
    _, x64 = _problem()
    w = np.random.default_rng(0).normal(size=(4, 4))
    w = (0.8 * w / np.linalg.norm(w, 2)).astype(np.float16)

    def fn(z, x):
        return tf.tanh(z @ tf.constant(w) + x)

    x16 = tf.cast(x64, tf.float16)
    with tf.GradientTape() as tape:
        tape.watch(x16)
        z = ki.fixed_point(fn, tf.zeros_like(x16), x16, batch_dims=1, tol=1e-5)
        loss = tf.reduce_sum(tf.cast(z, tf.float32))
    assert z.dtype == tf.float16
    grad = tape.gradient(loss, x16)
    assert grad.dtype == tf.float16

    x32 = tf.cast(x16, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x32)
        z32 = ki.fixed_point(
            lambda z, x: tf.tanh(z @ tf.constant(w, tf.float32) + x),
            tf.zeros_like(x32),
            x32,
            batch_dims=1,
            tol=1e-6,
        )
        loss32 = tf.reduce_sum(z32)
    # the half-precision solve stops at its floor: residual <= 2 * eps16 * (1 + ||z||)
    floor = 2 * 2.0**-10 * (1 + np.linalg.norm(z32.numpy(), axis=-1, keepdims=True))
    assert (np.abs(z.numpy() - z32.numpy()) <= 2 * floor).all()
    np.testing.assert_allclose(grad.numpy(), tape.gradient(loss32, x32).numpy(), atol=2e-2)


def test_stats_shapes_and_backward_callback():
    fn, x = _problem()
    received = []
    with tf.GradientTape() as tape:
        tape.watch(x)
        z, stats = ki.fixed_point(
            fn,
            tf.zeros_like(x),
            x,
            batch_dims=1,
            return_stats=True,
            backward_callback=received.append,
        )
        loss = tf.reduce_sum(z)
    tape.gradient(loss, x)
    assert stats.iterations.shape == (3,) and stats.iterations.dtype == tf.int32
    assert (stats.residual.numpy() <= 1e-5).all()
    (back,) = received
    assert back.converged.numpy().all() and (back.iterations.numpy() > 0).all()

    _, stats = ki.fixed_point(fn, tf.zeros_like(x[:1]), x[:1], return_stats=True)
    assert stats.iterations.shape == () and stats.converged.shape == ()


def test_backward_callback_assigns_variables_in_compiled_training_step():
    fn, x = _problem()
    iterations = tf.Variable(tf.zeros([3], tf.int32))

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            z = ki.fixed_point(
                fn,
                tf.zeros_like(x),
                x,
                batch_dims=1,
                backward_callback=lambda s: iterations.assign(s.iterations),
            )
            loss = tf.reduce_sum(z)
        return tape.gradient(loss, x)

    step(x)
    assert (iterations.numpy() > 0).all()


def test_custom_solver_stats_report_unknown_iterations():
    fn, x = _problem()

    @ki.custom_fixed_point(fn, batch_dims=1, return_stats=True)
    def solve(z0, x):
        z = z0
        for _ in range(100):
            z = fn(z, x)
        return z

    _, stats = solve(tf.zeros_like(x), x)
    np.testing.assert_array_equal(stats.iterations.numpy(), -1)
    assert stats.converged.numpy().all()


def test_custom_fixed_point_reports_the_backward_under_its_own_policy():
    """on_failure="ignore" with backward_on_failure="raise": a solver that returns a
    rough point passes silently, a gradient solve that cannot converge raises."""
    matrix = np.random.default_rng(3).normal(size=(6, 6))
    w = tf.constant(0.5 * matrix / np.linalg.norm(matrix, 2))

    def fn(z, x):
        return tf.linalg.matvec(w, z) + x

    x = tf.constant(np.linspace(-1.0, 1.0, 6))
    rough = ki.custom_fixed_point(fn, on_failure="ignore", backward_on_failure="raise")

    @rough
    def solve(z0, x):
        return z0  # far from the fixed point: not reported

    assert np.allclose(solve(tf.zeros(6, tf.float64), x).numpy(), 0.0)

    strict = ki.custom_fixed_point(
        fn,
        backward_max_iter=1,
        backward_tol=1e-14,
        on_failure="ignore",
        backward_on_failure="raise",
    )(lambda z0, x: z0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(strict(tf.zeros(6, tf.float64), x))
    with pytest.raises(ki.errors.ConvergenceError, match="backward linear solve"):
        tape.gradient(loss, x)
    with pytest.raises(ValueError, match="backward_on_failure"):
        ki.custom_fixed_point(fn, backward_on_failure="loud")
