"""The support-restricted hypergradient equals the generic implicit-differentiation
core (``ki.custom_fixed_point``) applied to the proximal-gradient map

    beta -> soft_threshold(beta - step * grad f(beta), step * alphas),

whose fixed points are the Lasso solutions (the conservative Jacobian of the
soft-thresholding is 1 inside the support, 0 outside)."""

import numpy as np
import pytest
import tensorflow as tf
from lasso_reference import diabetes, sklearn_solution

import keras_implicit.lasso as L

ki = pytest.importorskip("keras_implicit")
if not hasattr(ki, "custom_fixed_point"):  # the core lands in keras_implicit.implicit
    pytest.skip("keras_implicit.custom_fixed_point is not available", allow_module_level=True)

F64 = tf.float64


def _generic_hypergradient(X, y, X_val, y_val, alphas, coef):
    """d HeldOutMSE / d log(alphas) through ki.custom_fixed_point (intercept fitted)."""
    n = X.shape[0]
    x_mean, y_mean = X.mean(0), y.mean()
    Xc = tf.constant(X - x_mean)
    yc = tf.constant(y - y_mean)
    step = 1.0 / np.linalg.eigvalsh((X - x_mean).T @ (X - x_mean) / n).max()

    def prox_grad_map(beta, log_alphas):
        grad = tf.linalg.matvec(Xc, tf.linalg.matvec(Xc, beta) - yc, transpose_a=True) / n
        return L.soft_threshold(beta - step * grad, step * tf.exp(log_alphas))

    @ki.custom_fixed_point(prox_grad_map, linear_solver="gmres", backward_tol=1e-12)
    def solve(beta0, log_alphas):
        del beta0, log_alphas  # the solution comes from scikit-learn
        return tf.constant(coef)

    log_alphas = tf.constant(np.log(alphas))
    with tf.GradientTape() as tape:
        tape.watch(log_alphas)
        beta = solve(tf.zeros(X.shape[1], F64), log_alphas)
        prediction = tf.linalg.matvec(tf.constant(X_val - x_mean), beta) + y_mean
        value = tf.reduce_mean((tf.constant(y_val) - prediction) ** 2)
    return value.numpy(), tape.gradient(value, log_alphas).numpy()


@pytest.mark.parametrize("weighted", [False, True])
def test_restricted_hypergradient_equals_custom_fixed_point(weighted):
    X, y = diabetes()
    X, y, X_val, y_val = X[:300], y[:300], X[300:], y[300:]
    if weighted:
        model = L.WeightedLasso(alphas=np.random.default_rng(0).uniform(0.2, 1.0, 10))
        alphas = model.alphas
    else:
        model = L.Lasso(alpha=0.5)
        alphas = np.full(10, 0.5)
    coef, intercept = sklearn_solution(model, X, y)
    value, grad = L.hypergradient(
        model, L.HeldOutMSE(X_val, y_val), X, y, coef=coef, intercept=intercept
    )
    generic_value, generic_grad = _generic_hypergradient(X, y, X_val, y_val, alphas, coef)
    assert value == pytest.approx(generic_value, rel=1e-10)
    if not weighted:  # one shared alpha: the gradient is the sum over features
        generic_grad = np.array([generic_grad.sum()])
    np.testing.assert_allclose(grad, generic_grad, rtol=1e-6, atol=1e-8 * np.abs(grad).max())
