"""Implicit gradients against independent float64 references.

References: closed forms / dense numpy solves, central finite differences, unrolled
autodiff, scipy. Every forward solver and every linear solver meet every execution
mode (eager, tf.function, XLA) with a dynamic batch dimension.
"""

import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf
from conftest import MODES, run_in_mode

import keras_implicit as ki

FORWARD = ("anderson", "broyden", "fixed_point_iteration")
GENERAL_LINEAR = ("gmres", "bicgstab", "broyden", "neumann", "dense")
TIGHT = {"tol": 1e-12, "max_iter": 1000, "backward_tol": 1e-12, "backward_max_iter": 500}


def central_difference(fun, x, eps=1e-6):
    """d fun / d x for scalar fun and numpy x (float64), by central differences."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        grad[index] = (fun(x + step) - fun(x - step)) / (2 * eps)
    return grad


def dynamic_batch(fn, mode, *shapes):
    """Wraps fn in `mode` with unknown batch dimension for every [B, ...] input."""
    if mode == "eager":
        return fn
    signature = [tf.TensorSpec([None, *s], tf.float64) for s in shapes]
    return tf.function(fn, input_signature=signature, jit_compile=(mode == "xla"))


# ---------------------------------------------------------------- linear fixed point


@pytest.fixture(scope="module")
def linear_problem():
    rng = np.random.default_rng(1)
    d, p, batch = 6, 3, 4
    a = rng.normal(size=(d, d))
    a = 0.6 * a / np.linalg.norm(a, 2)
    b = rng.normal(size=(p, d))
    x = rng.normal(size=(batch, p))
    u = rng.normal(size=(batch, d))  # cotangent
    return a, b, x, u


# Pairwise coverage: each forward solver meets each linear solver and each mode.
PAIRS = [
    (f, linear, MODES[(i + j) % 3])
    for i, f in enumerate(FORWARD)
    for j, linear in enumerate(GENERAL_LINEAR)
]


@pytest.mark.parametrize("solver,linear_solver,mode", PAIRS)
def test_linear_fixed_point_matches_closed_form(linear_problem, solver, linear_solver, mode):
    a, b, x, u = linear_problem
    a_t, b_t, u_t = tf.constant(a), tf.constant(b), tf.constant(u)

    def loss_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            z = ki.fixed_point(
                lambda z, x: z @ a_t + x @ b_t,
                tf.zeros_like(x @ b_t),
                x,
                solver=solver,
                linear_solver=linear_solver,
                batch_dims=1,
                **TIGHT,
            )
            loss = tf.reduce_sum(z * u_t)
        return z, tape.gradient(loss, x)

    z, grad = dynamic_batch(loss_and_grad, mode, (3,))(tf.constant(x))
    # rows z = z A + x B  =>  z = x B (I - A)^{-1};  d<u, z>/dx = u (I - A)^{-T} B^T
    inverse = np.linalg.inv(np.eye(6) - a)
    np.testing.assert_allclose(z.numpy(), x @ b @ inverse, atol=1e-9)
    np.testing.assert_allclose(grad.numpy(), u @ inverse.T @ b.T, atol=1e-8)


# ------------------------------------------------- tanh contraction, captured variable


@pytest.fixture(scope="module")
def tanh_problem():
    rng = np.random.default_rng(2)
    d, p, batch = 5, 3, 3
    w = rng.normal(size=(d, d))
    w = 0.8 * w / np.linalg.norm(w, 2)
    v = rng.normal(size=(p, d))
    x = rng.normal(size=(batch, p))
    u = rng.normal(size=(batch, d))
    return w, v, x, u


def _tanh_solve(w_var, v, x, u, **kwargs):
    def cell(z, x):
        return tf.tanh(z @ w_var + x @ v)

    z0 = tf.zeros([tf.shape(x)[0], 5], tf.float64)
    z = ki.fixed_point(cell, z0, x, batch_dims=1, **{**TIGHT, **kwargs})
    return tf.reduce_sum(z * u)


def _unrolled_tanh(w, v, x, u, steps=400):
    w_t = tf.Variable(w)
    x_t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x_t)
        z = tf.zeros([x.shape[0], 5], tf.float64)
        for _ in range(steps):
            z = tf.tanh(z @ w_t + x_t @ tf.constant(v))
        loss = tf.reduce_sum(z * tf.constant(u))
    gx, gw = tape.gradient(loss, [x_t, w_t])
    return gx.numpy(), gw.numpy()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", FORWARD)
def test_tanh_gradients_to_args_and_variables_match_unrolled(tanh_problem, mode, solver):
    w, v, x, u = tanh_problem
    w_var = tf.Variable(w)
    v_t, u_t = tf.constant(v), tf.constant(u)
    linear_solver = {
        "anderson": "gmres",
        "broyden": "bicgstab",
        "fixed_point_iteration": "neumann",
    }[solver]

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = _tanh_solve(w_var, v_t, x, u_t, solver=solver, linear_solver=linear_solver)
        return tape.gradient(loss, [x, w_var])

    gx, gw = dynamic_batch(grads, mode, (3,))(tf.constant(x))
    rx, rw = _unrolled_tanh(w, v, x, u)
    np.testing.assert_allclose(gx.numpy(), rx, atol=1e-9)
    np.testing.assert_allclose(gw.numpy(), rw, atol=1e-9)


def test_tanh_gradients_match_finite_differences(tanh_problem):
    w, v, x, u = tanh_problem
    v_t, u_t = tf.constant(v), tf.constant(u)

    def loss_of_w(w_np):
        return float(_tanh_solve(tf.Variable(w_np), v_t, tf.constant(x), u_t))

    w_var = tf.Variable(w)
    with tf.GradientTape() as tape:
        loss = _tanh_solve(w_var, v_t, tf.constant(x), u_t)
    np.testing.assert_allclose(
        tape.gradient(loss, w_var).numpy(), central_difference(loss_of_w, w), rtol=1e-6, atol=1e-8
    )


def test_structured_state_tuple(tanh_problem):
    """z as a (tensor, tensor) tuple: gradients equal those of the packed problem."""
    w, v, x, u = tanh_problem
    w_t, v_t, x_t = tf.constant(w), tf.constant(v), tf.constant(x)

    def cell(z, x):
        full = tf.concat(z, axis=-1)
        out = tf.tanh(full @ w_t + x @ v_t)
        return out[:, :2], out[:, 2:]

    with tf.GradientTape() as tape:
        tape.watch(x_t)
        z0 = (tf.zeros([3, 2], tf.float64), tf.zeros([3, 3], tf.float64))
        z = ki.fixed_point(cell, z0, x_t, batch_dims=1, **TIGHT)
        loss = tf.reduce_sum(tf.concat(z, -1) * u)
    assert isinstance(z, tuple) and z[0].shape == (3, 2) and z[1].shape == (3, 3)
    rx, _ = _unrolled_tanh(w, v, x, u)
    np.testing.assert_allclose(tape.gradient(loss, x_t).numpy(), rx, atol=1e-9)


# ------------------------------------------------------ nonsmooth fixed point (ISTA)


@pytest.mark.parametrize("mode", MODES)
def test_soft_thresholding_fixed_point_matches_support_formula(mode):
    """Lasso as the fixed point of proximal gradient (nonsmooth): d beta / d y on the support."""
    rng = np.random.default_rng(3)
    n, p, lam = 20, 8, 0.1
    design = rng.normal(size=(n, p))
    truth = np.array([1.5, -2.0, 0, 0, 1.0, 0, 0, 0])
    y = design @ truth + 0.05 * rng.normal(size=n)
    step = 1.0 / np.linalg.norm(design, 2) ** 2 * n
    a_t = tf.constant(design)

    def ista_map(beta, y):
        grad = tf.linalg.matvec(a_t, tf.linalg.matvec(a_t, beta) - y, transpose_a=True) / n
        moved = beta - step * grad
        return tf.sign(moved) * tf.nn.relu(tf.abs(moved) - step * lam)

    cot = tf.constant(rng.normal(size=p))

    def grads(y):
        with tf.GradientTape() as tape:
            tape.watch(y)
            beta = ki.fixed_point(
                ista_map,
                tf.zeros([p], tf.float64),
                y,
                solver="fixed_point_iteration",
                linear_solver="gmres",
                tol=1e-13,
                max_iter=5000,
                backward_tol=1e-12,
            )
            loss = tf.reduce_sum(beta * cot)
        return beta, tape.gradient(loss, y)

    beta, gy = run_in_mode(grads, mode)(tf.constant(y))
    beta = beta.numpy()
    support = np.abs(beta) > 1e-10
    assert 0 < support.sum() < p
    xs = design[:, support]
    # on a fixed support beta_S = (X_S^T X_S)^{-1} (X_S^T y - n lam sign)
    expected = xs @ np.linalg.solve(xs.T @ xs, cot.numpy()[support])
    np.testing.assert_allclose(gy.numpy(), expected, atol=1e-8)


def test_relu_fixed_point_matches_finite_differences():
    rng = np.random.default_rng(4)
    d = 6
    w = rng.normal(size=(d, d))
    w = 0.5 * w / np.linalg.norm(w, 2)
    x0 = rng.normal(size=d)
    u = rng.normal(size=d)
    w_t = tf.constant(w)

    def solve(x):
        z = ki.fixed_point(
            lambda z, x: tf.nn.relu(tf.linalg.matvec(w_t, z) + x),
            tf.zeros([d], tf.float64),
            x,
            **TIGHT,
        )
        return tf.reduce_sum(z * u)

    x_t = tf.constant(x0)
    with tf.GradientTape() as tape:
        tape.watch(x_t)
        loss = solve(x_t)
    fd = central_difference(lambda x: float(solve(tf.constant(x))), x0)
    np.testing.assert_allclose(tape.gradient(loss, x_t).numpy(), fd, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------- root and argmin


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", ["broyden", "anderson"])
def test_nonlinear_root_matches_dense_solve(mode, solver):
    rng = np.random.default_rng(5)
    d = 5
    a = np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)
    a_t = tf.constant(a)
    x = rng.normal(size=(2, d))
    u = rng.normal(size=(2, d))

    def equations(y, x):  # A y + 0.2 sin(y) - x = 0
        return tf.linalg.matvec(a_t, y) + 0.2 * tf.sin(y) - x

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = ki.root(
                equations,
                tf.zeros_like(x),
                x,
                solver=solver,
                batch_dims=1,
                **{**TIGHT, "max_iter": 300},
            )
            loss = tf.reduce_sum(y * u)
        return y, tape.gradient(loss, x)

    y, gx = dynamic_batch(grads, mode, (d,))(tf.constant(x))
    y = y.numpy()
    np.testing.assert_allclose(y @ a.T + 0.2 * np.sin(y), x, atol=1e-10)
    for row in range(2):
        jac = a + np.diag(0.2 * np.cos(y[row]))  # dF/dy; dF/dx = -I
        np.testing.assert_allclose(gx.numpy()[row], np.linalg.solve(jac.T, u[row]), atol=1e-9)


@pytest.mark.parametrize(
    "linear_solver,mode",
    [("cg", "eager"), ("cg", "function"), ("cg", "xla"), ("gmres", "function"), ("dense", "eager")],
)
def test_ridge_argmin_matches_closed_form(mode, linear_solver):
    rng = np.random.default_rng(6)
    n, p = 15, 4
    design = rng.normal(size=(n, p))
    target = rng.normal(size=n)
    u = rng.normal(size=p)
    a_t = tf.constant(design)

    def objective(beta, lam, y):
        residual = tf.linalg.matvec(a_t, beta) - y
        return 0.5 * tf.reduce_sum(residual**2) + 0.5 * lam * tf.reduce_sum(beta**2)

    def grads(lam, y):
        with tf.GradientTape() as tape:
            tape.watch([lam, y])
            beta = ki.argmin(
                objective,
                tf.zeros([p], tf.float64),
                lam,
                y,
                linear_solver=linear_solver,
                tol=1e-11,
                max_iter=200,
                backward_tol=1e-12,
            )
            loss = tf.reduce_sum(beta * u)
        return (beta, *tape.gradient(loss, [lam, y]))

    lam = 0.7
    beta, g_lam, g_y = run_in_mode(grads, mode)(tf.constant(lam, tf.float64), tf.constant(target))
    hessian = design.T @ design + lam * np.eye(p)
    expected = np.linalg.solve(hessian, design.T @ target)
    np.testing.assert_allclose(beta.numpy(), expected, atol=1e-9)
    v = np.linalg.solve(hessian, u)
    np.testing.assert_allclose(g_lam.numpy(), -v @ expected, atol=1e-8)
    np.testing.assert_allclose(g_y.numpy(), design @ v, atol=1e-8)


def test_logistic_argmin_matches_scipy_and_finite_differences():
    rng = np.random.default_rng(7)
    n, p = 40, 3
    design = rng.normal(size=(n, p))
    labels = np.sign(design @ np.array([1.0, -1.0, 0.5]) + 0.5 * rng.normal(size=n))
    a_t, y_t = tf.constant(design), tf.constant(labels)

    def objective(beta, lam):
        margins = y_t * tf.linalg.matvec(a_t, beta)
        return tf.reduce_mean(tf.nn.softplus(-margins)) + 0.5 * lam * tf.reduce_sum(beta**2)

    def scipy_solution(lam):
        def f(beta):
            return np.mean(np.logaddexp(0, -labels * (design @ beta))) + 0.5 * lam * beta @ beta

        def grad(beta):
            sigma = 1 / (1 + np.exp(labels * (design @ beta)))
            return -design.T @ (labels * sigma) / n + lam * beta

        def hess(beta):
            sigma = 1 / (1 + np.exp(labels * (design @ beta)))
            return design.T @ (design * (sigma * (1 - sigma))[:, None]) / n + lam * np.eye(p)

        return scipy.optimize.minimize(
            f, np.zeros(p), jac=grad, hess=hess, method="trust-exact", options={"gtol": 1e-14}
        ).x

    lam0 = 0.05
    lam = tf.constant(lam0, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(lam)
        beta = ki.argmin(objective, tf.zeros([p], tf.float64), lam, tol=1e-11, backward_tol=1e-12)
        loss = tf.reduce_sum(beta)
    np.testing.assert_allclose(beta.numpy(), scipy_solution(lam0), atol=1e-6)
    eps = 1e-5
    fd = (scipy_solution(lam0 + eps).sum() - scipy_solution(lam0 - eps).sum()) / (2 * eps)
    np.testing.assert_allclose(float(tape.gradient(loss, lam)), fd, rtol=1e-4)


# ---------------------------------------------------------------- custom solvers


def test_custom_fixed_point_with_numpy_solver(tanh_problem):
    """A non-differentiable numpy solver behind tf.numpy_function gets exact gradients."""
    w, v, x, u = tanh_problem
    w_var = tf.Variable(w)
    v_t = tf.constant(v)

    def cell(z, x):
        return tf.tanh(z @ w_var + x @ v_t)

    def numpy_iterate(z0, x, w):
        z = z0
        for _ in range(300):
            z = np.tanh(z @ w + x @ v)
        return z

    @ki.custom_fixed_point(cell, linear_solver="gmres", tol=1e-12, backward_tol=1e-12)
    def solve(z0, x):
        return tf.numpy_function(numpy_iterate, [z0, x, w_var], tf.float64, stateful=False)

    x_t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x_t)
        z = solve(tf.zeros([3, 5], tf.float64), x_t)
        loss = tf.reduce_sum(z * u)
    gx, gw = tape.gradient(loss, [x_t, w_var])
    rx, rw = _unrolled_tanh(w, v, x, u)
    np.testing.assert_allclose(gx.numpy(), rx, atol=1e-9)
    np.testing.assert_allclose(gw.numpy(), rw, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_custom_root_with_bisection(mode):
    """Scalar root y^3 + y = x per element by bisection (no gradient through the loop)."""

    def equation(y, x):
        return y**3 + y - x

    @ki.custom_root(equation, linear_solver="dense", tol=1e-10, batch_dims=1)
    def bisection(y0, x):
        low, high = tf.fill(tf.shape(x), -10.0), tf.fill(tf.shape(x), 10.0)
        low, high = tf.cast(low, x.dtype), tf.cast(high, x.dtype)
        for _ in range(80):
            mid = 0.5 * (low + high)
            below = equation(mid, x) < 0
            low, high = tf.where(below, mid, low), tf.where(below, high, mid)
        return 0.5 * (low + high)

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = bisection(tf.zeros_like(x), x)
            loss = tf.reduce_sum(y)
        return y, tape.gradient(loss, x)

    x = np.array([[0.5], [2.0], [-3.0]])
    y, gx = dynamic_batch(grads, mode, (1,))(tf.constant(x))
    np.testing.assert_allclose(y.numpy() ** 3 + y.numpy(), x, atol=1e-9)
    np.testing.assert_allclose(gx.numpy(), 1 / (3 * y.numpy() ** 2 + 1), atol=1e-9)


def test_full_solver_matrix_is_covered():
    """Guards the pairwise design: every forward and linear solver appears in every mode."""
    assert {(f, m) for f, _, m in PAIRS} == {(f, m) for f in FORWARD for m in MODES}
    assert {(ls, m) for _, ls, m in PAIRS} == {(ls, m) for ls in GENERAL_LINEAR for m in MODES}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", FORWARD)
@pytest.mark.parametrize("linear_solver", GENERAL_LINEAR)
def test_full_matrix_tanh(tanh_problem, mode, solver, linear_solver):
    w, v, x, u = tanh_problem
    w_var = tf.Variable(w)

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = _tanh_solve(
                w_var, tf.constant(v), x, tf.constant(u), solver=solver, linear_solver=linear_solver
            )
        return tape.gradient(loss, [x, w_var])

    gx, gw = dynamic_batch(grads, mode, (3,))(tf.constant(x))
    rx, rw = _unrolled_tanh(w, v, x, u)
    np.testing.assert_allclose(gx.numpy(), rx, atol=1e-9)
    np.testing.assert_allclose(gw.numpy(), rw, atol=1e-9)


# ---------------------------------------------------------------- the default backward


def _jacobians(dim=12, seed=0):
    """Contractions in spectral radius whose adjoint systems are hard for Krylov solvers:
    nonsymmetric with ||J|| > 1 (here I - J^T has an indefinite symmetric part), and
    skewed rotations of radius 0.97 (complex eigenvalues near the unit circle)."""
    rng = np.random.default_rng(seed)
    random = rng.normal(size=(dim, dim))
    random *= 0.95 / np.abs(np.linalg.eigvals(random)).max()
    similarity = np.eye(dim) + 0.3 * rng.normal(size=(dim, dim))
    rotations = np.zeros((dim, dim))
    for k, angle in enumerate(np.linspace(0.1, 3.0, dim // 2)):
        c, s = 0.97 * np.cos(angle), 0.97 * np.sin(angle)
        rotations[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = [[c, -s], [s, c]]
    rotations = similarity @ rotations @ np.linalg.inv(similarity)
    return {"nonsymmetric": random, "rotations": rotations}


@pytest.mark.parametrize("kind", ["nonsymmetric", "rotations"])
def test_default_backward_solves_hard_adjoint_systems_under_xla(kind):
    """The default linear solver (BiCGStab) on adjoint systems whose symmetric part is
    indefinite or whose eigenvalues circle near 1 gives the dense-solve gradient."""
    jacobian = _jacobians()[kind]
    assert np.linalg.norm(jacobian, 2) > 1.0 > np.abs(np.linalg.eigvals(jacobian)).max()
    rng = np.random.default_rng(1)
    c, g = rng.normal(size=(2, 3, jacobian.shape[0]))
    j = tf.constant(jacobian)

    @tf.function(jit_compile=True)
    def gradient(c):
        with tf.GradientTape() as tape:
            tape.watch(c)
            z = ki.fixed_point(
                lambda z, c: tf.einsum("ij,bj->bi", j, z) + c,
                tf.zeros_like(c),
                c,
                solver="fixed_point_iteration",
                tol=1e-12,
                max_iter=2000,
                backward_tol=1e-10,
                batch_dims=1,
                on_failure="raise",
            )
            loss = tf.reduce_sum(z * g)
        return tape.gradient(loss, c)

    reference = np.linalg.solve(np.eye(len(jacobian)) - jacobian.T, g.T).T
    np.testing.assert_allclose(gradient(tf.constant(c)).numpy(), reference, rtol=1e-8, atol=1e-9)
