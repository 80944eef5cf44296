"""ki.linalg: each backward linear solver against numpy / scipy dense solves."""

import ast
import pathlib

import keras
import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

import keras_implicit as ki
from keras_implicit import _validation

GENERAL = ("gmres", "bicgstab", "dense")  # nonsymmetric systems
ALL = ("cg", "gmres", "bicgstab", "neumann", "broyden", "dense")


def _operator(matrices):
    m = tf.constant(matrices)
    return lambda v: tf.einsum("bij,bj->bi", m, v)


def _adjoint_system(rng, batch, dim, radius=0.7):
    """A = I - J with ||J|| = radius: the fixed-point adjoint, nonsymmetric."""
    jac = rng.normal(size=(batch, dim, dim))
    jac = radius * jac / np.linalg.norm(jac, 2, axis=(1, 2))[:, None, None]
    return np.eye(dim) - jac


def _spd(rng, batch, dim, condition):
    """Symmetric positive definite matrices with the given condition number."""
    q, _ = np.linalg.qr(rng.normal(size=(batch, dim, dim)))
    eig = np.geomspace(1.0, condition, dim)
    return np.einsum("bij,j,bkj->bik", q, eig, q)


@pytest.mark.parametrize("name", ALL)
def test_linear_solvers_match_numpy(name):
    rng = np.random.default_rng(11)
    batch, dim = 3, 12
    matrix = _adjoint_system(rng, batch, dim)
    if name == "cg":
        matrix = matrix @ np.transpose(matrix, (0, 2, 1))
    b = rng.normal(size=(batch, dim))
    b[1] = 0.0  # a zero right-hand side converges at once to zero
    ridge = 0.1 if name != "neumann" else 0.0
    m_t = tf.constant(matrix)
    x, stats = ki.linalg.get(name, tol=1e-11, max_iter=400, ridge=ridge)(
        lambda v: tf.einsum("bij,bj->bi", m_t, v), tf.constant(b)
    )
    expected = np.linalg.solve(matrix + ridge * np.eye(dim), b[..., None])[..., 0]
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-8)
    assert stats.converged.numpy().all() and stats.iterations.numpy()[1] == (
        dim if name == "dense" else 0
    )


def test_linear_solver_reports_non_convergence_and_unbatched_input():
    matrix = tf.constant(np.diag(np.linspace(1, 100, 30)))
    b = tf.ones([30], tf.float64)
    x, stats = ki.linalg.solve_cg(lambda v: tf.linalg.matvec(matrix, v), b, tol=1e-12, max_iter=3)
    assert x.shape == (30,) and stats.iterations.numpy() == 3
    assert not stats.converged.numpy() and stats.residual.numpy() > 1e-12
    singular = tf.zeros([2, 2, 2], tf.float64)
    _, stats = ki.linalg.solve_dense(
        lambda v: tf.einsum("bij,bj->bi", singular, v), tf.ones([2, 2], tf.float64)
    )
    assert not stats.converged.numpy().any()


@pytest.mark.parametrize("name", ("cg", "gmres", "bicgstab", "dense"))
def test_symmetric_positive_definite(name):
    rng = np.random.default_rng(1)
    matrix = _spd(rng, 4, 10, condition=50.0)
    b = rng.normal(size=(4, 10))
    x, stats = ki.linalg.get(name, tol=1e-12, max_iter=200)(_operator(matrix), tf.constant(b))
    expected = np.stack([scipy.linalg.solve(m, v, assume_a="pos") for m, v in zip(matrix, b)])
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-8, atol=1e-10)
    assert stats.converged.numpy().all()
    np.testing.assert_array_less(stats.residual.numpy(), 1e-12)


@pytest.mark.parametrize("name", (*GENERAL, "neumann", "broyden"))
def test_nonsymmetric(name):
    rng = np.random.default_rng(2)
    matrix = _adjoint_system(rng, 3, 16, radius=0.6)
    b = rng.normal(size=(3, 16))
    x, stats = ki.linalg.get(name, tol=1e-11, max_iter=300)(_operator(matrix), tf.constant(b))
    expected = np.stack([scipy.linalg.solve(m, v) for m, v in zip(matrix, b)])
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-8, atol=1e-9)
    assert stats.converged.numpy().all()


@pytest.mark.parametrize("name", ("cg", "gmres", "bicgstab"))
def test_singular_consistent_system_gives_the_minimum_norm_solution(name):
    """A singular PSD A with b in its range: Krylov iterates from 0 stay in range(A)."""
    rng = np.random.default_rng(3)
    dim, rank = 10, 6
    basis, _ = np.linalg.qr(rng.normal(size=(2, dim, dim)))
    eig = np.concatenate([np.linspace(1.0, 4.0, rank), np.zeros(dim - rank)])
    matrix = np.einsum("bij,j,bkj->bik", basis, eig, basis)
    b = np.einsum("bij,bj->bi", matrix, rng.normal(size=(2, dim)))  # consistent
    x, stats = ki.linalg.get(name, tol=1e-10, max_iter=200)(_operator(matrix), tf.constant(b))
    expected = np.stack([scipy.linalg.lstsq(m, v)[0] for m, v in zip(matrix, b)])
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-8)
    assert stats.converged.numpy().all()


@pytest.mark.parametrize("name", ("cg", "gmres", "bicgstab", "dense"))
def test_ill_conditioned(name):
    """Condition 1e6 in float64: the true residual reaches tol (1e-9: past it CG's
    recursive residual drifts from the true one), the error stays within cond * tol."""
    rng = np.random.default_rng(4)
    matrix = _spd(rng, 2, 12, condition=1e6)
    b = rng.normal(size=(2, 12))
    solver = ki.linalg.get(name, tol=1e-9, max_iter=600)
    x, stats = solver(_operator(matrix), tf.constant(b))
    expected = np.linalg.solve(matrix, b[..., None])[..., 0]
    assert stats.converged.numpy().all()
    error = np.linalg.norm(x.numpy() - expected, axis=-1) / np.linalg.norm(expected, axis=-1)
    np.testing.assert_array_less(stats.residual.numpy(), 1e-9)
    np.testing.assert_array_less(error, 1e6 * 1e-9)


@pytest.mark.parametrize("name", ("cg", "gmres", "bicgstab", "neumann", "broyden"))
def test_rows_converge_independently(name):
    """An identity row converges in one step; a harder row needs more; a NaN row is
    reported and leaves the others exactly as solved alone."""
    rng = np.random.default_rng(5)
    dim = 8
    hard = _adjoint_system(rng, 1, dim, radius=0.5)[0]
    if name == "cg":
        hard = hard @ hard.T
    matrix = np.stack([np.eye(dim), hard, hard])
    b = rng.normal(size=(3, dim))
    b[2, 0] = np.nan
    solver = ki.linalg.get(name, tol=1e-10, max_iter=200)
    x, stats = solver(_operator(matrix), tf.constant(b))
    iterations = stats.iterations.numpy()
    assert iterations[0] == 1 and iterations[1] > 1
    np.testing.assert_array_equal(stats.converged.numpy(), [True, True, False])
    alone, _ = solver(_operator(matrix[:2]), tf.constant(b[:2]))
    np.testing.assert_array_equal(x.numpy()[:2], alone.numpy())
    np.testing.assert_allclose(x.numpy()[0], b[0], atol=1e-12)
    np.testing.assert_allclose(x.numpy()[1], np.linalg.solve(hard, b[1]), atol=1e-8)


@pytest.mark.parametrize(
    "name", ["bicgstab", *(pytest.param(n, marks=pytest.mark.slow) for n in ("gmres", "dense"))]
)
def test_compiled_float32(name):
    """Under XLA in float32, against the float64 dense solve."""
    rng = np.random.default_rng(6)
    matrix = _adjoint_system(rng, 4, 20, radius=0.8)
    b = rng.normal(size=(4, 20))
    solver = ki.linalg.get(name, tol=1e-5, max_iter=100)
    op = _operator(matrix.astype(np.float32))
    solve = tf.function(lambda v: solver(op, v), jit_compile=True)
    x, stats = solve(tf.constant(b, tf.float32))
    expected = np.linalg.solve(matrix, b[..., None])[..., 0]
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-3, atol=1e-4)
    assert stats.converged.numpy().all()


@pytest.mark.parametrize(
    "solver",
    [
        ki.linalg.GMRES(restart=5, ridge=1e-3),
        ki.linalg.CG(tol=1e-9),
        ki.linalg.BiCGStab(max_iter=7),
        ki.linalg.BiCGStab(fallback_restart=10),
        ki.linalg.Neumann(max_iter=5),
        ki.linalg.Broyden(memory=3),
        ki.linalg.Dense(),
    ],
)
def test_get_and_serialize_round_trip(solver):
    config = keras.saving.serialize_keras_object(solver)
    restored = ki.linalg.get(config)
    assert type(restored) is type(solver) and restored.get_config() == solver.get_config()
    assert ki.linalg.get(solver) is solver
    by_name = ki.linalg.get(solver.name.upper(), **solver.get_config())
    assert type(by_name) is type(solver) and by_name.get_config() == solver.get_config()
    assert repr(solver).startswith(f"{type(solver).__name__}(tol=")
    assert ki.linalg.get(solver, max_iter=3).max_iter == 3 and solver.max_iter != 3


def test_get_rejects_unknown_and_foreign_objects():
    with pytest.raises(ValueError, match="Received: linear_solver='lu'"):
        ki.linalg.get("lu")
    with pytest.raises(ValueError, match="does not describe"):
        ki.linalg.get(ki.solvers.serialize(ki.solvers.Anderson()))
    with pytest.raises(ValueError, match="Received: linear_solver=3"):
        ki.linalg.get(3)
    with pytest.raises(ValueError, match="Received: restart=0"):
        ki.linalg.solve_gmres(lambda v: v, tf.ones([1, 2]), restart=0)
    with pytest.raises(ValueError, match="Received: tol=-1"):
        ki.linalg.CG(tol=-1)
    with pytest.raises(ValueError, match=r"shape \[D\] or \[B, D\]. Received shape: \(1, 2, 3\)"):
        ki.linalg.BiCGStab()(lambda v: v, tf.ones([1, 2, 3]))


def test_settings_are_validated_once_per_solver_not_per_solve(monkeypatch):
    solver = ki.linalg.GMRES(tol=1e-6)
    calls = []
    for check in ("non_negative_float", "positive_int"):
        original = getattr(_validation, check)
        monkeypatch.setattr(
            _validation, check, lambda *a, _f=original: calls.append(a[0]) or _f(*a)
        )
    x, _ = solver(lambda v: 2.0 * v, tf.ones([2, 3], tf.float64))
    np.testing.assert_allclose(x.numpy(), 0.5)
    assert calls == []


def test_linalg_does_not_import_the_forward_solvers():
    source = pathlib.Path(ki.linalg.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    assert not any("solvers" in name for name in imported), imported


def test_bicgstab_falls_back_to_gmres_where_it_breaks_down():
    """On a skew-symmetric A, r0 . A r0 = 0 stops BiCGStab at once; GMRES solves it.
    The fallback touches only the failed row: the other row is BiCGStab's own answer."""
    rng = np.random.default_rng(7)
    half = rng.normal(size=(6, 6))
    skew = half - half.T + 0.0
    matrix = np.stack([skew, np.eye(6) + 0.1 * half])
    b = rng.normal(size=(2, 6))
    op = _operator(matrix)
    plain_x, plain = ki.linalg.BiCGStab(tol=1e-10)(op, tf.constant(b))
    assert not plain.converged.numpy()[0] and plain.converged.numpy()[1]
    solver = ki.linalg.BiCGStab(tol=1e-10, fallback_restart=10)
    x, stats = solver(op, tf.constant(b))
    assert stats.converged.numpy().all()
    expected = np.linalg.solve(matrix, b[..., None])[..., 0]
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-8, atol=1e-9)
    np.testing.assert_array_equal(x.numpy()[1], plain_x.numpy()[1])
    assert stats.iterations.numpy()[0] > plain.iterations.numpy()[0]
    compiled = tf.function(lambda v: solver(op, v), jit_compile=True)
    np.testing.assert_allclose(compiled(tf.constant(b))[0].numpy(), expected, atol=1e-8)
