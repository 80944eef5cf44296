"""Core entry points at their edges: unknown dimensions, best iterates, bad rows.

Unknown dimensions: every entry point (fixed_point, root, argmin, custom_fixed_point,
custom_root) in eager mode, in `tf.function` with None-shaped input signatures (with
and without `batch_dims`) and under XLA; values and gradients against a float64 numpy
solve and central finite differences of it.
"""

import warnings

import numpy as np
import pytest
import tensorflow as tf
from test_core_gradients import central_difference

import keras_implicit as ki

DIM, BATCH = 3, 2
ENTRY_POINTS = ("fixed_point", "root", "argmin", "custom_fixed_point", "custom_root")
TIGHT = {"tol": 1e-11, "backward_tol": 1e-12}


def _iterated_solver(step, iterations):
    """A user's solver for custom_fixed_point / custom_root: `iterations` steps of `step`."""

    def solver(y0, x, w):
        return tf.while_loop(
            lambda i, y: i < iterations, lambda i, y: (i + 1, step(y, x, w)), (0, y0)
        )[1]

    return solver


def _weights():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(DIM, DIM))
    w = 0.5 * w / np.linalg.norm(w, 2)
    x = rng.normal(size=(BATCH, DIM))
    cotangent = rng.normal(size=(BATCH, DIM))
    return w, x, cotangent


# Every entry point solves, per row, one of two equations in y (row vectors):
#   tanh:  y = tanh(y W + x)               (fixed_point, custom_fixed_point)
#   gradient: y + 0.5 tanh(y W_s) W_s = x, W_s = (W + W^T) / 2, the stationarity of
#          0.5 |y|^2 + 0.5 sum log cosh(y W_s) - x.y   (root, custom_root, argmin)
def _numpy_solution(kind, x, w):
    y = np.zeros_like(x)
    w_s = 0.5 * (w + w.T)
    for _ in range(400):
        y = np.tanh(y @ w + x) if kind == "tanh" else x - 0.5 * np.tanh(y @ w_s) @ w_s
    return y


_KIND = {
    "fixed_point": "tanh",
    "custom_fixed_point": "tanh",
    "root": "gradient",
    "custom_root": "gradient",
    "argmin": "gradient",
}


def _reference(kind, x, w, cotangent):
    y = _numpy_solution(kind, x, w)
    gx = central_difference(lambda x_: np.sum(_numpy_solution(kind, x_, w) * cotangent), x)
    gw = central_difference(lambda w_: np.sum(_numpy_solution(kind, x, w_) * cotangent), w)
    return y, gx, gw


def _solve(entry_point, x, w, batch_dims):
    """y*(x, w) through `entry_point`, written for unknown batch and event sizes."""

    def tanh_map(z, x, w):
        return tf.tanh(z @ w + x)

    def stationarity(y, x, w):
        w_s = 0.5 * (w + tf.transpose(w))
        return y + 0.5 * tf.tanh(y @ w_s) @ w_s - x

    y0 = tf.zeros_like(x)
    settings = {"batch_dims": batch_dims, "on_failure": "raise", **TIGHT}
    if entry_point == "fixed_point":
        return ki.fixed_point(tanh_map, y0, x, w, max_iter=200, **settings)
    if entry_point == "root":
        return ki.root(stationarity, y0, x, w, max_iter=200, **settings)
    if entry_point == "argmin":

        def objective(y, x, w):
            w_s = 0.5 * (w + tf.transpose(w))
            per_row = tf.reduce_sum(
                0.5 * y**2 + 0.5 * tf.math.log(tf.cosh(y @ w_s)) - x * y, axis=-1
            )
            return per_row if batch_dims else tf.reduce_sum(per_row)

        return ki.argmin(objective, y0, x, w, max_iter=200, **settings)

    if entry_point == "custom_fixed_point":
        solver = ki.custom_fixed_point(tanh_map, **settings)(_iterated_solver(tanh_map, 200))
    else:
        solver = ki.custom_root(stationarity, **settings)(
            _iterated_solver(lambda y, x, w: y - stationarity(y, x, w), 200)
        )
    return solver(y0, x, w)


def _value_and_grads(entry_point, batch_dims):
    def run(x, w, cotangent):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = _solve(entry_point, x, w, batch_dims)
            loss = tf.reduce_sum(y * cotangent)
        gx, gw = tape.gradient(loss, [x, w])
        return y, gx, gw

    return run


# (mode, batch_dims, input signature of x and the cotangent): None marks an unknown size
CONFIGS = {
    "eager": ("eager", 1, None),
    "function-batch_dims0": ("function", 0, [None, DIM]),
    "function-batch_dims0-unknown-event": ("function", 0, [None, None]),
    "function-batch_dims1": ("function", 1, [None, DIM]),
    "function-batch_dims1-unknown-event": ("function", 1, [None, None]),
    "xla-batch_dims0": ("xla", 0, [None, DIM]),
    "xla-batch_dims0-unknown-event": ("xla", 0, [None, None]),
    "xla-batch_dims1": ("xla", 1, [None, DIM]),
    "xla-batch_dims1-unknown-event": ("xla", 1, [None, None]),
}
# The default suite runs one configuration per entry point (each unknown batch, most
# of them with batch_dims=0, the case that failed); the full matrix is marked slow.
QUICK = {
    "fixed_point": "function-batch_dims0",
    "root": "xla-batch_dims0",
    "argmin": "function-batch_dims0",
    "custom_fixed_point": "xla-batch_dims1-unknown-event",
    "custom_root": "function-batch_dims0-unknown-event",
}
MATRIX = [
    pytest.param(
        entry_point,
        config,
        id=f"{entry_point}-{config}",
        marks=() if QUICK[entry_point] == config else pytest.mark.slow,
    )
    for entry_point in ENTRY_POINTS
    for config in CONFIGS
]


def slow_unless(values, quick):
    """Parameters for `values`, those not in `quick` marked slow."""
    return [pytest.param(v, marks=() if v in quick else pytest.mark.slow) for v in values]


def _check_entry_point(entry_point, config):
    mode, batch_dims, shape = config
    w, x, cotangent = _weights()
    run = _value_and_grads(entry_point, batch_dims)
    if mode != "eager":
        signature = [
            tf.TensorSpec(shape, tf.float64),
            tf.TensorSpec([DIM, DIM], tf.float64),
            tf.TensorSpec(shape, tf.float64),
        ]
        run = tf.function(run, input_signature=signature, jit_compile=mode == "xla")
    y, gx, gw = run(tf.constant(x), tf.constant(w), tf.constant(cotangent))
    ry, rgx, rgw = _reference(_KIND[entry_point], x, w, cotangent)
    np.testing.assert_allclose(y.numpy(), ry, atol=1e-9)
    np.testing.assert_allclose(gx.numpy(), rgx, atol=1e-7)
    np.testing.assert_allclose(gw.numpy(), rgw, atol=1e-7)


@pytest.mark.parametrize("entry_point,config", MATRIX)
def test_entry_points_with_unknown_dimensions(entry_point, config):
    _check_entry_point(entry_point, CONFIGS[config])


# ------------------------------------------------------------ best iterate

FORWARD = ("broyden", "anderson", "fixed_point_iteration")


def _float32_tanh_problem():
    """A float32 fixed point on which tol=1e-12 is out of reach (roundoff ~1e-8)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(10, 10))
    w = tf.constant(0.9 * w / np.linalg.norm(w, 2), tf.float32)
    x = tf.constant(rng.normal(size=(4, 10)), tf.float32)
    return lambda z: tf.tanh(z @ w + x), x


def _residuals(fn, z):
    """||fn(z) - z|| / (1 + ||z||) per row, evaluated in float32, reduced in float64."""
    step = (fn(tf.constant(z)).numpy() - z).astype(np.float64)
    return np.linalg.norm(step, axis=-1) / (1 + np.linalg.norm(z.astype(np.float64), axis=-1))


@pytest.mark.parametrize("name", FORWARD)
def test_forward_solvers_return_their_best_iterate(name):
    fn, x = _float32_tanh_problem()
    evaluated = []

    def recording(z):  # eager: called once per evaluated iterate
        evaluated.append(z.numpy())
        return fn(z)

    solver = ki.solvers.get(name, tol=1e-12, max_iter=60)
    z, stats = solver.solve_fixed_point(recording, tf.zeros_like(x))
    seen = np.stack([_residuals(fn, e) for e in evaluated])  # [evaluations, rows]
    best = seen.min(axis=0)
    np.testing.assert_allclose(stats.residual.numpy(), best, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(_residuals(fn, z.numpy()), best, rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(stats.converged.numpy(), best <= 1e-12)
    if name == "broyden":
        # the case this guards: past roundoff, rank-one updates of noise throw a row far
        # from its best (this problem: from 1e-8 to 0.5 at the last iterate)
        assert (seen[-1] > 1e4 * best).any()


def test_lbfgs_returns_its_best_iterate():
    """Against TFP's own L-BFGS run for k = 0..K iterations on Rosenbrock rows."""
    import tensorflow_probability as tfp

    def value_and_gradient(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            a, b = v[:, :-1], v[:, 1:]
            value = tf.reduce_sum(100.0 * (b - a**2) ** 2 + (1.0 - a) ** 2, axis=-1)
        return value, tape.gradient(value, v)

    x0 = tf.constant([[-1.2, 1.0, -0.5], [0.5, -1.5, 2.0]], tf.float64)
    settings = {"num_correction_pairs": 10, "x_tolerance": 0.0, "f_relative_tolerance": 0.0}

    @tf.function
    def run(k):
        result = tfp.optimizer.lbfgs_minimize(
            value_and_gradient, x0, max_iterations=k, tolerance=1e-13, **settings
        )
        return result.objective_gradient, result.position

    residual = []
    for k in range(9):
        grad, pos = (t.numpy() for t in run(tf.constant(k)))
        residual.append(np.linalg.norm(grad, axis=-1) / (1 + np.linalg.norm(pos, axis=-1)))
    residual = np.array(residual)
    best = residual.min(axis=0)
    assert (residual[-1] > 5 * best).any()  # the gradient norm is not monotone here
    solver = ki.solvers.LBFGS(tol=1e-12, max_iter=8)
    x, stats = solver.minimize(value_and_gradient, x0)
    np.testing.assert_allclose(stats.residual.numpy(), best, rtol=1e-6)
    _, grad = value_and_gradient(x)
    true = np.linalg.norm(grad.numpy(), axis=-1) / (1 + np.linalg.norm(x.numpy(), axis=-1))
    np.testing.assert_allclose(true, best, rtol=1e-6)


@pytest.mark.parametrize("jit", slow_unless([False, True], [False]), ids=["function", "xla"])
def test_best_iterate_in_compiled_loops(jit):
    """Compiled, the returned row is still the best seen: its residual is the reported one."""
    fn, x = _float32_tanh_problem()
    solve = tf.function(
        lambda z0: ki.solvers.Broyden(tol=1e-12, max_iter=60).solve_fixed_point(fn, z0),
        jit_compile=jit,
    )
    z, stats = solve(tf.zeros_like(x))
    reported = stats.residual.numpy()
    assert (reported < 1e-7).all()
    # evaluated eagerly the map rounds differently from the compiled loop (XLA fuses)
    np.testing.assert_allclose(_residuals(fn, z.numpy()), reported, atol=1e-7)


# ------------------------------------------------------------ bad rows, bad settings


def _solve_rows(entry_point, x, w, broken, **options):
    """y*(x, w) per row (batch_dims=1); rows where `broken` is 1 get a map with no
    solution: z + 1 + sin(z)^2 has no fixed point, y^2 + 1 no root, -sum(y) no minimum."""
    keep = 1.0 - broken

    def tanh_map(z, x, w):
        return keep * tf.tanh(z @ w + x) + broken * (z + 1.0 + tf.sin(z) ** 2)

    def stationarity(y, x, w):
        w_s = 0.5 * (w + tf.transpose(w))
        return keep * (y + 0.5 * tf.tanh(y @ w_s) @ w_s - x) + broken * (y**2 + 1.0)

    def objective(y, x, w):
        w_s = 0.5 * (w + tf.transpose(w))
        good = 0.5 * y**2 + 0.5 * tf.math.log(tf.cosh(y @ w_s)) - x * y
        return tf.reduce_sum(keep * good - broken * y, axis=-1)

    y0 = tf.zeros_like(x)
    settings = {"batch_dims": 1, "return_stats": True, **TIGHT, **options}
    if entry_point == "fixed_point":
        return ki.fixed_point(tanh_map, y0, x, w, max_iter=100, **settings)
    if entry_point == "root":
        return ki.root(stationarity, y0, x, w, max_iter=100, **settings)
    if entry_point == "argmin":
        return ki.argmin(objective, y0, x, w, max_iter=100, **settings)

    if entry_point == "custom_fixed_point":
        return ki.custom_fixed_point(tanh_map, **settings)(_iterated_solver(tanh_map, 100))(
            y0, x, w
        )
    step = lambda y, x, w: y - stationarity(y, x, w)  # noqa: E731
    return ki.custom_root(stationarity, **settings)(_iterated_solver(step, 100))(y0, x, w)


def _rows_and_grads(entry_point, x, w, broken, cotangent, **options):
    """Solution, stats, d loss / d x and d loss / d w, loss = sum(y * cotangent)."""
    x, w = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([x, w])
        y, stats = _solve_rows(entry_point, x, w, tf.constant(broken), **options)
        loss = tf.reduce_sum(y * cotangent)
    gx, gw = tape.gradient(loss, [x, w])
    return y.numpy(), stats, gx.numpy(), gw.numpy()


def _good_rows_reference(entry_point, x, w, cotangent, good):
    y, _, gx, gw = _rows_and_grads(
        entry_point, x[good], w, np.zeros([len(good), 1]), cotangent[good]
    )
    return y, gx, gw


@pytest.mark.parametrize(
    "entry_point", slow_unless(ENTRY_POINTS, ["fixed_point", "root", "custom_root"])
)
def test_non_convergent_row_is_reported_and_isolated(entry_point):
    w, x, _ = _weights()
    x = np.concatenate([x, x[:1] + 0.3])  # rows 0, 2 good, row 1 has no solution
    broken = np.array([[0.0], [1.0], [0.0]])
    good = [0, 2]
    cotangent = np.random.default_rng(1).normal(size=x.shape)
    cotangent[1] = 0.0  # the loss reads the good rows only
    with pytest.warns(ki.ConvergenceWarning, match="forward solve did not converge for 1 of 3"):
        y, stats, gx, gw = _rows_and_grads(entry_point, x, w, broken, cotangent)
    np.testing.assert_array_equal(stats.converged.numpy(), [True, False, True])
    ry, rgx, rgw = _good_rows_reference(entry_point, x, w, cotangent, good)
    np.testing.assert_allclose(y[good], ry, atol=1e-10)
    np.testing.assert_allclose(gx[good], rgx, atol=1e-9)
    np.testing.assert_allclose(gw, rgw, atol=1e-9)


@pytest.mark.parametrize(
    "entry_point", slow_unless(ENTRY_POINTS, ["root", "argmin", "custom_fixed_point"])
)
def test_nan_and_inf_rows_are_reported_and_isolated(entry_point):
    w, x, _ = _weights()
    x = np.concatenate([x, x + 0.5])  # 4 rows
    x[1, 0], x[2, 2] = np.nan, np.inf
    good = [0, 3]
    cotangent = np.random.default_rng(1).normal(size=x.shape)
    # tanh(z W + x) saturates at x = inf and keeps a finite fixed point; the
    # stationarity equations have no solution there
    inf_solvable = _KIND[entry_point] == "tanh"
    failed = 1 if inf_solvable else 2
    with pytest.warns(ki.ConvergenceWarning, match=f"did not converge for {failed} of 4"):
        y, stats, gx, gw = _rows_and_grads(entry_point, x, w, np.zeros([4, 1]), cotangent)
    np.testing.assert_array_equal(stats.converged.numpy(), [True, False, inf_solvable, True])
    ry, rgx, rgw = _good_rows_reference(entry_point, x, w, cotangent, good)
    np.testing.assert_allclose(y[good], ry, atol=1e-10)
    np.testing.assert_allclose(gx[good], rgx, atol=1e-9)
    # rows with non-finite inputs send no gradient (0 * inf would poison the sum over rows)
    np.testing.assert_allclose(gw, rgw, atol=1e-9)
    np.testing.assert_array_equal(gx[[1, 2]], 0.0)


def test_tolerance_below_the_dtype_is_floored_and_said_once():
    """float32, tol=1e-10: floored to 2 eps (said once), met, gradients still right."""
    _, x = _float32_tanh_problem()
    x64 = tf.cast(x, tf.float64)

    def solve(x, dtype):
        rng = np.random.default_rng(0)
        w = rng.normal(size=(10, 10))
        w = tf.constant(0.9 * w / np.linalg.norm(w, 2), dtype)
        with tf.GradientTape() as tape:
            tape.watch(x)
            z, stats = ki.fixed_point(
                lambda z, x: tf.tanh(z @ w + x),
                tf.zeros_like(x),
                x,
                solver="broyden",
                tol=1e-10,
                backward_tol=1e-12,
                batch_dims=1,
                return_stats=True,
            )
            loss = tf.reduce_sum(z)
        return z.numpy(), stats, tape.gradient(loss, x).numpy()

    with pytest.warns(ki.ConvergenceWarning) as record:
        z, stats, grad = solve(x, tf.float32)
    messages = [str(r.message) for r in record]
    eps2 = 2 * np.finfo(np.float32).eps
    assert any("tol=1e-10 is below what a solve in float32 can reach" in m for m in messages)
    assert any("backward_tol=1e-12 is below" in m for m in messages)
    assert not any("did not converge" in m for m in messages)
    assert stats.converged.numpy().all() and (stats.residual.numpy() <= eps2).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve(x, tf.float32)  # said once per process and setting
    z64, _, grad64 = solve(x64, tf.float64)  # float64: 1e-10 is above its floor
    np.testing.assert_allclose(z, z64, atol=1e-6)
    np.testing.assert_allclose(grad, grad64, rtol=1e-4, atol=1e-5)
