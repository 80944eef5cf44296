"""ki.solvers: each forward solver against numpy / scipy solutions; the shared registry."""

import ast
import pathlib

import keras
import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

import keras_implicit as ki
from keras_implicit import _validation

FIXED_POINT = ("fixed_point_iteration", "anderson", "broyden")


def _linear_contraction(seed, batch=4, dim=10, radius=0.8):
    """T(z) = J z + c per row (nonsymmetric J, ||J|| = radius); fixed point (I - J)^-1 c."""
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(batch, dim, dim))
    jac = radius * jac / np.linalg.norm(jac, 2, axis=(1, 2))[:, None, None]
    c = rng.normal(size=(batch, dim))
    solution = np.stack([scipy.linalg.solve(np.eye(dim) - j, v) for j, v in zip(jac, c)])
    j_t = tf.constant(jac)
    return (lambda z, c: tf.einsum("bij,bj->bi", j_t, z) + c), c, solution


@pytest.mark.parametrize("name", FIXED_POINT)
def test_fixed_point_solvers_match_a_dense_solve(name):
    fn, c, solution = _linear_contraction(0)
    c_t = tf.constant(c)
    solver = ki.solvers.get(name, tol=1e-11, max_iter=500)
    z, stats = solver.solve_fixed_point(lambda z: fn(z, c_t), tf.zeros_like(c_t))
    np.testing.assert_allclose(z.numpy(), solution, rtol=1e-8, atol=1e-9)
    assert stats.converged.numpy().all()
    np.testing.assert_array_less(stats.residual.numpy(), 1e-11)


@pytest.mark.parametrize("name", FIXED_POINT)
def test_rows_converge_independently(name):
    """A row started at its fixed point stops at once; a NaN row is
    reported and leaves the other rows exactly as solved without it."""
    fn, c, solution = _linear_contraction(1)
    z0 = np.zeros_like(c)
    z0[0] = solution[0]
    c[3, 0] = np.nan
    solver = ki.solvers.get(name, tol=1e-9, max_iter=300)
    z, stats = solver.solve_fixed_point(lambda z: fn(z, tf.constant(c)), tf.constant(z0))
    iterations = stats.iterations.numpy()
    # Broyden evaluates its start before iterating: a converged start takes 0 iterations
    assert iterations[0] == (0 if name == "broyden" else 1) and (iterations[1:3] > 5).all()
    np.testing.assert_array_equal(stats.converged.numpy(), [True, True, True, False])
    np.testing.assert_allclose(z.numpy()[:3], solution[:3], atol=1e-7)
    finite = c.copy()
    finite[3] = c[2]
    alone, _ = solver.solve_fixed_point(lambda z: fn(z, tf.constant(finite)), tf.constant(z0))
    np.testing.assert_array_equal(z.numpy()[:3], alone.numpy()[:3])


@pytest.mark.parametrize("every", [1, 3, 4])
@pytest.mark.parametrize("max_iter", [1, 2, 10, 11])
def test_check_every_evaluates_exactly_max_iter_times(every, max_iter):
    """tol=0: max_iter evaluations, the last one checked, so the answer is the iterate
    after max_iter - 1 plain steps, as with check_every=1."""
    w = np.array([[0.5, 0.1], [0.0, 0.3]])
    calls = []

    def fn(z):
        calls.append(1)
        return tf.tanh(z @ tf.constant(w) + 1.0)

    solver = ki.solvers.FixedPointIteration(tol=0.0, max_iter=max_iter, check_every=every)
    z, stats = solver.solve_fixed_point(fn, tf.zeros([2, 2], tf.float64))
    expected = np.zeros([2, 2])
    for _ in range(max_iter - 1):
        expected = np.tanh(expected @ w + 1.0)
    assert len(calls) == max_iter
    np.testing.assert_allclose(z.numpy(), expected, rtol=1e-15)
    np.testing.assert_array_equal(stats.iterations.numpy(), max_iter)


def test_check_every_judges_convergence_at_checks_only():
    """Rows converge at checked evaluations 1, k + 1, 2k + 1, ...; the returned iterate
    is the best checked one and its residual the reported one."""
    fn, c, solution = _linear_contraction(4, radius=0.5)
    c_t = tf.constant(c)
    every = 4
    solver = ki.solvers.FixedPointIteration(tol=1e-9, max_iter=200, check_every=every)
    solve = tf.function(lambda z0: solver.solve_fixed_point(lambda z: fn(z, c_t), z0))
    z0 = np.zeros_like(c)
    z0[0] = solution[0]
    z, stats = solve(tf.constant(z0))
    iterations = stats.iterations.numpy()
    assert iterations[0] == 1 and ((iterations - 1) % every == 0).all()
    assert stats.converged.numpy().all()
    step = fn(z, c_t).numpy() - z.numpy()
    true = np.linalg.norm(step, axis=-1) / (1 + np.linalg.norm(z.numpy(), axis=-1))
    np.testing.assert_allclose(stats.residual.numpy(), true, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(z.numpy(), solution, atol=1e-8)
    with pytest.raises(ValueError, match="Received: check_every=0"):
        ki.solvers.FixedPointIteration(check_every=0)


def test_broyden_solves_a_nonsymmetric_root_problem():
    rng = np.random.default_rng(2)
    a = np.eye(12) + 0.3 * rng.normal(size=(3, 12, 12)) / np.sqrt(12)
    b = rng.normal(size=(3, 12))
    a_t, b_t = tf.constant(a), tf.constant(b)
    y, stats = ki.solvers.Broyden(tol=1e-11, max_iter=200).solve_root(
        lambda y: tf.einsum("bij,bj->bi", a_t, y) - b_t, tf.zeros_like(b_t)
    )
    expected = np.stack([scipy.linalg.solve(m, v) for m, v in zip(a, b)])
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-8, atol=1e-9)
    assert stats.converged.numpy().all()


def test_lbfgs_minimizes_a_quadratic():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(2, 8, 8)))
    hessian = np.einsum("bij,j,bkj->bik", q, np.linspace(1.0, 20.0, 8), q)
    g = rng.normal(size=(2, 8))
    h_t, g_t = tf.constant(hessian), tf.constant(g)

    def value_and_gradient(x):
        hx = tf.einsum("bij,bj->bi", h_t, x)
        return tf.reduce_sum(0.5 * x * hx - g_t * x, -1), hx - g_t

    x, stats = ki.solvers.LBFGS(tol=1e-10, max_iter=200).minimize(
        value_and_gradient, tf.zeros_like(g_t)
    )
    expected = np.stack([scipy.linalg.solve(m, v, assume_a="pos") for m, v in zip(hessian, g)])
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-7, atol=1e-8)
    assert stats.converged.numpy().all()


@pytest.mark.parametrize(
    "solver",
    [
        ki.solvers.Anderson(memory=3, beta=0.5, tol=1e-7),
        ki.solvers.Broyden(memory=7),
        ki.solvers.FixedPointIteration(damping=0.5, max_iter=20),
        ki.solvers.FixedPointIteration(check_every=4),
        ki.solvers.LBFGS(memory=4),
        ki.linalg.GMRES(restart=5, ridge=1e-3),
        ki.linalg.CG(tol=1e-9),
        ki.linalg.BiCGStab(),
        ki.linalg.Neumann(max_iter=5),
        ki.linalg.Broyden(memory=3),
        ki.linalg.Dense(),
    ],
)
def test_solvers_serialize(solver):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(solver))
    assert type(restored) is type(solver)
    assert restored.get_config() == solver.get_config()


def test_get_accepts_names_objects_and_overrides():
    anderson = ki.solvers.get("anderson", tol=1e-3)
    assert isinstance(anderson, ki.solvers.Anderson) and anderson.tol == 1e-3
    custom = ki.solvers.Anderson(memory=9)
    overridden = ki.solvers.get(custom, max_iter=7)
    assert overridden.memory == 9 and overridden.max_iter == 7 and custom.max_iter == 100
    assert ki.solvers.get(custom) is custom
    assert isinstance(ki.linalg.get("GMRES"), ki.linalg.GMRES)
    config = keras.saving.serialize_keras_object(ki.linalg.GMRES(restart=4))
    assert ki.linalg.get(config).restart == 4
    with pytest.raises(ValueError, match="Received: memory=0"):
        ki.solvers.Anderson(memory=0)
    with pytest.raises(ValueError, match="Received: damping=1.5"):
        ki.solvers.FixedPointIteration(damping=1.5)


@pytest.mark.parametrize("alias", ["fixed_point", "picard", "FIXED_POINT_ITERATION"])
def test_aliases_and_round_trip_through_get(alias):
    solver = ki.solvers.get(alias, tol=1e-4, damping=0.5)
    assert isinstance(solver, ki.solvers.FixedPointIteration) and solver.damping == 0.5
    restored = ki.solvers.get(ki.solvers.serialize(solver))
    assert restored.get_config() == solver.get_config()
    assert repr(restored) == repr(solver)
    with pytest.raises(ValueError, match="Received: solver='newton'"):
        ki.solvers.get("newton")
    with pytest.raises(ValueError, match="does not describe"):
        ki.solvers.get(keras.saving.serialize_keras_object(ki.linalg.CG()))


def test_settings_are_validated_once_per_solver_not_per_solve(monkeypatch):
    solver = ki.solvers.Anderson(tol=1e-8)
    calls = []
    for check in ("non_negative_float", "positive_int", "float_in_range"):
        original = getattr(_validation, check)
        monkeypatch.setattr(
            _validation, check, lambda *a, _f=original, **k: calls.append(a[0]) or _f(*a, **k)
        )
    z, _ = solver.solve_fixed_point(lambda z: 0.5 * z + 1.0, tf.zeros([2, 3], tf.float64))
    np.testing.assert_allclose(z.numpy(), 2.0, rtol=1e-7)
    assert calls == []


def test_solvers_do_not_import_the_linear_solvers():
    source = pathlib.Path(ki.solvers.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    assert not any("linalg" in name for name in imported), imported


def _anderson_numpy(jac, c, z0, steps, memory, beta, ridge):
    """Anderson type II row by row, from the textbook normal equations: the iterates
    evaluated, in order ([steps, B, D])."""
    evaluated = []
    for j, v, z in zip(jac, c, z0):
        xs, fs, row = [], [], []
        for _ in range(steps):
            row.append(z)
            tz = j @ z + v
            xs, fs = [*xs, z][-memory:], [*fs, tz][-memory:]
            g = np.array(fs) - np.array(xs)
            gram = g @ g.T
            gram += (ridge * gram.diagonal().max() + 1e-30) * np.eye(len(xs))
            weights = np.linalg.solve(gram, np.ones(len(xs)))
            alpha = weights / weights.sum()
            z = beta * alpha @ np.array(fs) + (1 - beta) * alpha @ np.array(xs)
        evaluated.append(row)
    return np.swapaxes(np.array(evaluated), 0, 1)


def _broyden_numpy(jac, c, y0, steps, memory):
    """Limited-memory good Broyden on y - T(y) = 0 row by row, H = I + sum u_i v_i^T over
    a circular buffer: the points evaluated, in order ([steps + 1, B, D])."""
    evaluated = []
    for j, v, y in zip(jac, c, y0):
        us, vs = np.zeros((memory, y.size)), np.zeros((memory, y.size))
        f = y - (j @ y + v)
        row = [y]
        for k in range(steps):
            s = -(f + us.T @ (vs @ f))
            y = y + s
            f_new = y - (j @ y + v)
            row.append(y)
            d = f_new - f
            h_d = d + us.T @ (vs @ d)
            if s @ h_d != 0:  # H += (s - H d) (H^T s)^T / (s^T H d)
                us[k % memory], vs[k % memory] = (s - h_d) / (s @ h_d), s + vs.T @ (us @ s)
            f = f_new
        evaluated.append(row)
    return np.swapaxes(np.array(evaluated), 0, 1)


def _best_of(evaluated, residual_fn):
    """Per row, the evaluated point with the lowest residual, and that residual."""
    residuals = np.stack([residual_fn(e) for e in evaluated])
    first = residuals.argmin(axis=0)
    return evaluated[first, np.arange(evaluated.shape[1])], residuals.min(axis=0)


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
@pytest.mark.parametrize(
    "solver",
    [
        ki.solvers.Anderson(tol=0.0, max_iter=9, memory=3),
        ki.solvers.Anderson(tol=0.0, max_iter=7, memory=4, beta=0.6, ridge=1e-3),
        ki.solvers.Broyden(tol=0.0, max_iter=8, memory=3),
    ],
    ids=["anderson", "anderson-beta-ridge", "broyden"],
)
def test_accelerated_solvers_match_a_numpy_implementation(solver, mode):
    """tol=0: max_iter steps; the answer is the best evaluated point of the numpy run
    (histories wrap around: more steps than memory)."""
    fn, c, _ = _linear_contraction(5, batch=3, dim=6, radius=0.9)
    jac = np.stack([fn(tf.one_hot([i] * 3, 6, dtype=tf.float64), 0.0).numpy() for i in range(6)])
    jac = np.transpose(jac, (1, 2, 0))  # [B, D, D]: column i is J e_i
    z0 = np.random.default_rng(6).normal(size=c.shape)
    c_t = tf.constant(c)

    def solve(z):
        return solver.solve_fixed_point(lambda z: fn(z, c_t), z)

    if mode != "eager":
        solve = tf.function(solve, jit_compile=mode == "xla")
    z, stats = solve(tf.constant(z0))
    if isinstance(solver, ki.solvers.Broyden):
        evaluated = _broyden_numpy(jac, c, z0, solver.max_iter, solver.memory)
    else:
        evaluated = _anderson_numpy(
            jac, c, z0, solver.max_iter, solver.memory, solver.beta, solver.ridge
        )

    def residual(e):
        step = np.einsum("bij,bj->bi", jac, e) + c - e
        return np.linalg.norm(step, axis=-1) / (1 + np.linalg.norm(e, axis=-1))

    best, best_residual = _best_of(evaluated, residual)
    assert residual(evaluated[-1]).max() > 1e-6  # still far from the fixed point: informative
    np.testing.assert_allclose(z.numpy(), best, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(stats.residual.numpy(), best_residual, rtol=1e-8)
    np.testing.assert_array_equal(stats.iterations.numpy(), solver.max_iter)


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_a_hard_row_leaves_the_others_unchanged_under_xla(name):
    """Compiled: rows solved next to a slow row (radius 0.99) equal the same rows solved
    next to an easy one, and match the dense solve."""
    fn, c, solution = _linear_contraction(7, batch=3, radius=0.6)
    hard_fn, hard_c, hard_solution = _linear_contraction(8, batch=3, radius=0.99)
    solver = ki.solvers.get(name, tol=1e-10, max_iter=300)

    def run(mix):
        mix_t, c_t, hard_t = tf.constant(mix), tf.constant(c), tf.constant(hard_c)

        def both(z):
            return tf.where(mix_t[:, None], hard_fn(z, hard_t), fn(z, c_t))

        return tf.function(solver.solve_fixed_point, jit_compile=True)(both, tf.zeros_like(c_t))

    z_hard, stats_hard = run(np.array([False, False, True]))
    z_easy, stats_easy = run(np.array([False, False, False]))
    np.testing.assert_array_equal(z_hard.numpy()[:2], z_easy.numpy()[:2])
    np.testing.assert_array_equal(stats_hard.iterations.numpy()[:2], stats_easy.iterations[:2])
    assert stats_hard.iterations.numpy()[2] > stats_hard.iterations.numpy()[:2].max()
    np.testing.assert_allclose(z_hard.numpy()[2], hard_solution[2], atol=1e-7)
    np.testing.assert_allclose(z_easy.numpy(), solution, atol=1e-8)


@pytest.mark.parametrize("shape", [(1, 65536), (1, 4099), (1, 5000), (3, 8192)])
def test_row_norm_of_one_long_row_matches_numpy(shape):
    """The block-summed norm of one long row (and the plain path elsewhere)."""
    from keras_implicit._structure import row_norm

    x = np.random.default_rng(9).normal(size=shape).astype(np.float32)
    expected = np.linalg.norm(x.astype(np.float64), axis=-1)
    for fn in (row_norm, tf.function(row_norm, jit_compile=True)):
        np.testing.assert_allclose(fn(tf.constant(x)).numpy(), expected, rtol=1e-5)
