"""The TensorFlow inner solvers in eager, tf.function and XLA modes vs scikit-learn."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow.experimental.numpy as tnp
from conftest import run_in_mode
from lasso_reference import breast_cancer, diabetes, sklearn_solution

import keras_implicit.lasso as L
from keras_implicit.lasso import _kernels

F64 = tf.float64


def _lasso_inputs(alpha, l2=0.0):
    X, y = diabetes()
    X, y = X - X.mean(0), y - y.mean()
    n, p = X.shape
    H = X.T @ X / n + l2 * np.eye(p)
    args = (
        tf.constant(H),
        tf.constant(X.T @ y / n),
        tf.zeros(p, F64),
        tf.fill([p], tf.constant(alpha, F64)),
        tf.constant(y @ y / n, F64),
        tf.constant(l2, F64),
        tf.constant(1e-13 * (y @ y) / n, F64),
        tf.constant(100_000),
    )
    return X, y, args


def test_cd_quadratic_in_every_mode(mode):
    X, y, args = _lasso_inputs(0.1)
    beta, gap, epochs = run_in_mode(L.cd_quadratic, mode)(*args)
    coef, _ = sklearn_solution(L.Lasso(alpha=0.1, fit_intercept=False), X, y)
    np.testing.assert_allclose(beta.numpy(), coef, atol=1e-6 * np.abs(coef).max())
    assert float(gap) <= float(args[6])
    assert int(epochs) > 0


def test_cd_quadratic_elastic_net():
    X, y, args = _lasso_inputs(0.05, l2=0.2)
    beta, _, _ = run_in_mode(L.cd_quadratic, "function")(*args)
    model = L.ElasticNet(alpha_l1=0.05, alpha_l2=0.2, fit_intercept=False)
    coef, _ = sklearn_solution(model, X, y)
    np.testing.assert_allclose(beta.numpy(), coef, atol=1e-6 * np.abs(coef).max())


def test_logistic_prox_newton_in_every_mode(mode):
    # Small on purpose: eagerly, every coordinate step is a Python-level loop turn.
    X, y = breast_cancer(120)
    X = X[:, :3] if mode == "eager" else X[:, :8]
    n, p = X.shape
    A = np.hstack([X, np.ones((n, 1))])  # intercept = unpenalized column
    alphas = np.append(np.full(p, 0.02), 0.0)
    fn = run_in_mode(L.logistic_prox_newton, mode)
    beta, gap, steps = fn(
        tf.constant(A),
        tf.constant(2.0 * y - 1),
        tf.ones(n, F64),
        tf.constant(float(n), F64),
        tf.constant(alphas),
        tf.zeros(p + 1, F64),
        tf.constant(1e-13, F64),
        tf.constant(100),
    )
    coef, intercept = sklearn_solution(L.SparseLogisticRegression(alpha=0.02), X, y)
    np.testing.assert_allclose(beta.numpy()[:p], coef, atol=1e-6 * np.abs(coef).max())
    assert beta.numpy()[p] == pytest.approx(intercept, abs=1e-6)
    assert float(gap) <= 1e-13
    assert 0 < int(steps) < 100


def test_padding_columns_stay_zero():
    X, _y, args = _lasso_inputs(0.1)
    p = X.shape[1]
    H = np.zeros((16, 16))
    H[:p, :p] = args[0].numpy()
    c = np.zeros(16)
    c[:p] = args[1].numpy()
    padded = (
        tf.constant(H),
        tf.constant(c),
        tf.zeros(16, F64),
        tf.fill([16], tf.constant(0.1, F64)),
    )
    beta, _, _ = run_in_mode(L.cd_quadratic, "function")(*padded, *args[4:])
    ref, _, _ = L.cd_quadratic(*args)
    np.testing.assert_array_equal(beta.numpy()[p:], 0.0)
    np.testing.assert_allclose(beta.numpy()[:p], ref.numpy(), atol=1e-9)


def test_gap_formulas_agree_between_numpy_and_tensorflow():
    rng = np.random.default_rng(0)
    xtr, beta = rng.standard_normal(20), rng.standard_normal(20) * (rng.random(20) < 0.5)
    alphas = rng.uniform(0.1, 1.0, 20)
    numpy_gap = _kernels.quadratic_gap(xtr, 0.7, 1.3, beta, alphas, 0.2)
    tf_gap = _kernels.quadratic_gap(
        *(tf.constant(v, F64) for v in (xtr, 0.7, 1.3, beta, alphas, 0.2)), xp=tnp
    )
    np.testing.assert_allclose(np.array(numpy_gap), np.array([t.numpy() for t in tf_gap]))
    z, y = rng.standard_normal(30), np.sign(rng.standard_normal(30))
    numpy_gap = _kernels.logistic_gap(xtr, z, y, 1.0, 30.0, alphas, beta)
    tf_gap = _kernels.logistic_gap(
        *(tf.constant(v, F64) for v in (xtr, z, y, 1.0, 30.0, alphas, beta)), xp=tnp
    )
    np.testing.assert_allclose(np.array(numpy_gap), np.array([t.numpy() for t in tf_gap]))


def test_anderson_extrapolates_linear_sequences_exactly():
    # x_{k+1} = M x_k + b converges to x*; Anderson with enough memory recovers x*.
    rng = np.random.default_rng(0)
    M = np.diag([0.9, 0.5, -0.3, 0.1])
    b = rng.standard_normal(4)
    rows = [np.zeros(4)]
    for _ in range(5):
        rows.append(M @ rows[-1] + b)
    fixed_point = np.linalg.solve(np.eye(4) - M, b)
    rows = np.array(rows)
    # (up to the 1e-10 relative Tikhonov term of the 5 x 5 system)
    np.testing.assert_allclose(_kernels.anderson(rows), fixed_point, atol=1e-4)
    in_graph = run_in_mode(lambda r: _kernels.anderson(r, xp=tnp), "xla")(tf.constant(rows))
    np.testing.assert_allclose(in_graph.numpy(), fixed_point, atol=1e-4)


def test_soft_threshold():
    x = tf.constant([-2.0, -0.5, 0.0, 0.3, 4.0], F64)
    np.testing.assert_allclose(L.soft_threshold(x, 1.0).numpy(), [-1.0, 0.0, 0.0, 0.0, 3.0])


def test_size_bounded_epochs_ignore_the_padded_tail():
    # The driver pads working sets into one compiled width and passes the real size:
    # whatever the tail holds, the iterates on the real coordinates must be those of
    # the unpadded problem and the returned gradients must be H rows - c.
    _, _, args = _lasso_inputs(0.05)
    H, c = args[0].numpy(), args[1].numpy()
    p, width = H.shape[0], 16
    rng = np.random.default_rng(0)
    H_pad = rng.standard_normal((width, width))  # garbage outside the real block
    H_pad[:p, :p] = H
    inv_diag = np.zeros(width)
    inv_diag[:p] = 1.0 / np.diag(H)
    alphas = np.full(width, 0.05)
    grad_pad = rng.standard_normal(width)  # the tail of the gradient is never read
    grad_pad[:p] = -c
    # The driver's XLA kernel (one epoch per call) and the five-epoch in-graph version.
    kernel = tf.function(_kernels.cd_epoch, jit_compile=True, autograph=False)
    beta_t, grad_t = tf.zeros(width, F64), tf.constant(grad_pad)
    rows, grads = [beta_t.numpy()], [grad_pad]
    for _ in range(_kernels.ANDERSON_MEMORY):
        args = (tf.constant(alphas), tf.constant(inv_diag), tf.constant(p))
        beta_t, grad_t = kernel(tf.constant(H_pad), grad_t, beta_t, *args)
        rows.append(beta_t.numpy())
        grads.append(grad_t.numpy())
    rows, grads = np.array(rows), np.array(grads)
    in_graph = _kernels.cd_epochs_from_gradient(
        *(tf.constant(v) for v in (H_pad, grad_pad, np.zeros(width), alphas, inv_diag)),
        tf.constant(p),
    )
    np.testing.assert_allclose(in_graph[0].numpy(), rows, atol=1e-12)
    reference = _kernels.cd_epochs(*(tf.constant(v) for v in (H, c, np.zeros(p), alphas[:p])))
    np.testing.assert_allclose(rows[:, :p], reference.numpy(), atol=1e-12)
    np.testing.assert_array_equal(rows[:, p:], 0.0)
    np.testing.assert_allclose(grads[:, :p], rows[:, :p] @ H - c, atol=1e-10)


@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_padded_gram_solver_matches_sklearn(l2):
    from keras_implicit.lasso import _solver

    X, y = diabetes()
    X, y = X - X.mean(0), y - y.mean()
    n, p = X.shape
    yy = y @ y / n
    H = X.T @ X / n + l2 * np.eye(p)
    alphas = np.full(p, 0.2)
    beta, gap, epochs = _solver.solve_gram_problem(
        H, X.T @ y / n, np.zeros(p), alphas, yy, l2, 1e-13 * yy, 100_000, width=64
    )
    if l2:
        model = L.ElasticNet(alpha_l1=0.2, alpha_l2=l2, fit_intercept=False)
    else:
        model = L.Lasso(alpha=0.2, fit_intercept=False)
    coef, _ = sklearn_solution(model, X, y)
    np.testing.assert_allclose(beta, coef, atol=1e-6 * np.abs(coef).max())
    assert gap <= 1e-13 * yy and epochs > 0
    # The stopping decision holds for an independently computed gap (the solver carries
    # gradients between blocks but must recompute H beta before trusting the gap).
    exact = _kernels.gram_gap(H, X.T @ y / n, beta, alphas, yy, l2)
    assert float(exact) <= 1e-13 * yy


def _gram_problem(alpha, l2):
    X, y = diabetes()
    X, y = X - X.mean(0), y - y.mean()
    n, p = X.shape
    H = X.T @ X / n + l2 * np.eye(p)
    if l2:
        model = L.ElasticNet(alpha_l1=alpha, alpha_l2=l2, fit_intercept=False)
    else:
        model = L.Lasso(alpha=alpha, fit_intercept=False)
    coef, _ = sklearn_solution(model, X, y)
    return H, X.T @ y / n, np.full(p, alpha), coef


def _gram_objective(H, c, alphas, beta):
    return 0.5 * beta @ H @ beta - c @ beta + alphas @ np.abs(beta)


@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_sign_pattern_descent_solves_from_the_right_signs(l2):
    from keras_implicit.lasso import _solver

    H, c, alphas, coef = _gram_problem(0.2, l2)
    assert 0 < np.count_nonzero(coef) < coef.size  # a support that is not everything
    start = np.sign(coef) * np.random.default_rng(0).uniform(0.1, 10.0, coef.size)
    beta, hb, _ = _solver._sign_pattern_descent(H, c, alphas, start, H @ start)
    np.testing.assert_allclose(beta, coef, atol=1e-7 * np.abs(coef).max())
    np.testing.assert_allclose(hb, H @ beta, atol=1e-10)


def test_sign_pattern_descent_drops_wrong_signs_and_never_ascends():
    from keras_implicit.lasso import _solver

    H, c, alphas, coef = _gram_problem(0.2, 0.0)
    outside = np.flatnonzero(coef == 0)
    start = coef.copy()
    # Off-support coordinates pushed the wrong way: each raises the objective.
    start[outside] = -0.5 * np.sign(c[outside] - H[outside] @ coef + 1e-3)
    assert _gram_objective(H, c, alphas, start) > _gram_objective(H, c, alphas, coef)
    beta, hb, _ = _solver._sign_pattern_descent(H, c, alphas, start, H @ start)
    np.testing.assert_allclose(beta, coef, atol=1e-7 * np.abs(coef).max())
    np.testing.assert_allclose(hb, H @ beta, atol=1e-10)
    # A single step (budget 1) still descends, and zeroes the first crossing coordinate.
    one, _, steps = _solver._sign_pattern_descent(H, c, alphas, start, H @ start, max_steps=1)
    assert steps == 1
    assert _gram_objective(H, c, alphas, one) < _gram_objective(H, c, alphas, start)
    assert np.count_nonzero(one) < np.count_nonzero(start)


def test_working_set_holds_the_support_and_every_violator_under_the_cap():
    from keras_implicit.lasso import _solver

    rng = np.random.default_rng(0)
    p = 5000
    support = np.zeros(p, bool)
    support[rng.choice(p, 100, replace=False)] = True
    scores = rng.uniform(0.0, 0.9, p)
    violating = rng.choice(np.flatnonzero(~support), 250, replace=False)
    scores[violating] = rng.uniform(1.1, 3.0, 250)
    index = _solver._working_set(scores, support, previous=0)
    assert np.all(np.diff(index) > 0)
    chosen = np.zeros(p, bool)
    chosen[index] = True
    # Doubling alone would keep 200 columns; every violator fits (under 4 |S|).
    assert chosen[support].all() and chosen[violating].all()
    assert index.size == 350
    # From an empty support the working set starts small, however many violate.
    empty = np.zeros(p, bool)
    assert _solver._working_set(scores, empty, previous=0).size == _solver.MIN_WS_SIZE
    # Above the cap, the most violating features win.
    support[rng.choice(np.flatnonzero(~support), 200, replace=False)] = True
    scores[~support] = rng.uniform(1.1, 3.0, p - 300)
    index = _solver._working_set(scores, support, previous=0)
    assert index.size == _solver.MAX_UNCAPPED_WS
    assert np.isin(np.flatnonzero(support), index).all()
    kept = scores[np.setdiff1d(index, np.flatnonzero(support))]
    dropped = scores[np.setdiff1d(np.flatnonzero(~support), index)]
    assert kept.min() >= dropped.max()
