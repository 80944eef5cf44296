"""The adjoint step of Lasso-type hypergradients: restricted linear systems.

On the support S of a fitted model, with ``K`` the restricted Hessian
(``Xc_S^T Xc_S / n + l2 I``, or ``[X_S, 1]^T D [X_S, 1] / n`` with
``D = sigma (1 - sigma)`` for the logistic loss) and ``g`` the gradient of the
criterion with respect to ``(coef_S, intercept)``, the adjoint ``v = K^{-1} g`` gives

    dC/d alphas_j = -v_j s_j  (j in S, 0 outside),     dC/d l2 = -v^T b_S.

Only the |S| x |S| system is solved: by Cholesky when |S| <= ``cholesky_max`` and by
matrix-free conjugate gradient (``ki.linalg.CG``, products with X_S and X_S^T)
otherwise; the p x p system is never formed.
"""

from __future__ import annotations

import warnings

import numpy as np
import tensorflow as tf

from keras_implicit import linalg
from keras_implicit.lasso import _solver
from keras_implicit.lasso import estimators as est
from keras_implicit.lasso._data import DTYPE

RCOND_THRESHOLD = 1e-12  # below this estimated reciprocal condition: ridge fallback
RIDGE_SCALE = 1e-8  # ridge added, relative to the mean diagonal of the system
CG_TOL = 1e-10  # relative residual of the conjugate-gradient solves


class EmptySupportWarning(UserWarning):
    """The solution is all zeros (penalty >= alpha_max): the hypergradient is zero.

    An outer loop should decrease the penalty (e.g. restart below ``alpha_max``)."""


class IllConditionedWarning(UserWarning):
    """The restricted system was (near) singular: a small ridge was added to solve it."""


def _cholesky_solve(H, rhs, info):
    """Solves H v = rhs; a ridge is added if H is (near) singular."""
    k = int(H.shape[0])
    L = tf.linalg.cholesky(H)
    diag = tf.linalg.diag_part(L).numpy()
    finite = np.all(np.isfinite(L.numpy()))
    rcond = (np.min(diag) / np.max(diag)) ** 2 if finite and np.max(diag) > 0 else 0.0
    ridge = 0.0
    if not finite or not rcond > RCOND_THRESHOLD:
        ridge = RIDGE_SCALE * max(float(tf.linalg.trace(H)) / k, 1e-300)
        H = H + ridge * tf.eye(k, dtype=DTYPE)
        L = tf.linalg.cholesky(H)
        message = (
            f"The restricted {k} x {k} system of the hypergradient is ill-conditioned "
            f"(estimated reciprocal condition {rcond:.1e}); solved with a ridge of "
            f"{ridge:.1e}. The support may contain (nearly) collinear features; the "
            "Lasso solution is then not unique and the hypergradient is one choice."
        )
        warnings.warn(message, IllConditionedWarning, stacklevel=7)
        info.messages.append(message)
    info.ridge.append(ridge)
    info.linear_solvers.append("cholesky")
    return tf.linalg.cholesky_solve(L, rhs[:, None])[:, 0]


_MATRIX = tf.TensorSpec([None, None], DTYPE)
_VECTOR = tf.TensorSpec([None], DTYPE)
_SCALAR = tf.TensorSpec([], DTYPE)
_cg_functions = {}


def _restricted_cg(max_iter):
    """``ki.linalg.CG`` on ``(block^T diag(w) block + shift I) v = rhs``, traced once
    per ``max_iter`` (a power of two): run eagerly, CG dispatches every small op of
    every iteration from Python, several times slower than the traced loop."""
    if max_iter not in _cg_functions:
        solver = linalg.CG(tol=CG_TOL, max_iter=max_iter)

        def solve(block, w, shift, rhs):
            def matvec(u):
                product = tf.linalg.matvec(block, w * tf.linalg.matvec(block, u), transpose_a=True)
                return product + shift * u

            v, stats = solver(matvec, rhs)
            return v, stats.converged

        _cg_functions[max_iter] = tf.function(
            solve, input_signature=[_MATRIX, _VECTOR, _SCALAR, _VECTOR], autograph=False
        )
    return _cg_functions[max_iter]


def _cg_solve(block, w, l2, rhs, info):
    """Matrix-free CG; on failure retries with a ridge and warns."""
    k = int(rhs.shape[0])
    solve = _restricted_cg(1 << (max(10 * k, 100) - 1).bit_length())
    v, converged = solve(block, w, tf.constant(l2, DTYPE), rhs)
    ridge = 0.0
    if not bool(converged):
        diag_mean = float(tf.reduce_sum(w[:, None] * block**2)) / k + l2
        ridge = RIDGE_SCALE * max(diag_mean, 1e-300)
        v, converged = solve(block, w, tf.constant(l2 + ridge, DTYPE), rhs)
        message = (
            f"Conjugate gradient on the restricted {k} x {k} system did not converge "
            f"(ill-conditioned); retried with a ridge of {ridge:.1e}"
            + ("." if bool(converged) else " and still did not reach the tolerance.")
        )
        warnings.warn(message, IllConditionedWarning, stacklevel=7)
        info.messages.append(message)
    info.ridge.append(ridge)
    info.linear_solvers.append("cg")
    return v


def _solve_restricted(block, weights, l2, rhs, evaluation, gram=None):
    """Solves ``(block^T diag(weights) block + l2 I) v = rhs`` (weights None: 1/n).

    ``block`` is a callable returning the dense (n, k) block (built only if needed);
    ``gram``, if given, is ``block^T block / n`` (the solver's cached Gram block).
    """
    k = int(rhs.shape[0])
    rhs = tf.constant(rhs, DTYPE)
    use_cg = evaluation.linear_solver == "cg" or (
        evaluation.linear_solver == "auto" and k > evaluation.cholesky_max
    )
    if not use_cg and gram is not None:
        H = tf.constant(gram + l2 * np.eye(k), DTYPE)
        return _cholesky_solve(H, rhs, evaluation.info).numpy()
    block = block()
    n = int(block.shape[0])
    w = tf.fill([n], tf.constant(1.0 / n, DTYPE)) if weights is None else weights
    if not use_cg:
        H = tf.matmul(block, w[:, None] * block, transpose_a=True)
        H = H + l2 * tf.eye(k, dtype=DTYPE)
        return _cholesky_solve(H, rhs, evaluation.info).numpy()

    return _cg_solve(block, w, l2, rhs, evaluation.info).numpy()


def _empty_support(model, evaluation):
    message = (
        f"The solution of {model!r} is all zeros (the penalty is at or above alpha_max): "
        "the hypergradient is 0. Decrease the penalty (e.g. start the search below "
        "ki.lasso.alpha_max(X, y))."
    )
    warnings.warn(message, EmptySupportWarning, stacklevel=6)
    evaluation.info.empty_support = True
    evaluation.info.messages.append(message)


def penalty_gradient(model, data, g_coef, g_intercept, evaluation):
    """Adjoint step: ``(dC/d alphas (p,), dC/d l2)`` from the criterion gradient
    with respect to ``(coef_, intercept_)`` of the fitted ``model``.

    With several targets (``coef_`` of shape (T, p)) each target has its own support
    and restricted system; their contributions to the shared penalties add up."""
    coef = model.coef_
    if coef.ndim == 1:
        grad = _target_gradient(model, data, coef, g_coef, g_intercept, evaluation)
    else:
        intercepts = np.ravel(g_intercept)
        parts = [
            _target_gradient(model, data, coef[t], g_coef[t], intercepts[t], evaluation)
            for t in range(coef.shape[0])
        ]
        supported = [part for part in parts if part is not None]
        grad = None
        if supported:
            grad = (sum(part[0] for part in supported), sum(part[1] for part in supported))
    if grad is None:
        _empty_support(model, evaluation)
        return np.zeros(coef.shape[-1]), 0.0
    return grad


def _target_gradient(model, data, coef, g_coef, g_intercept, evaluation):
    """``penalty_gradient`` of one target, or None when its support is empty."""
    p = coef.shape[0]
    _, l2 = model.penalty_vectors(p)
    support = np.flatnonzero(coef)
    evaluation.info.support_sizes.append(int(support.size))
    if support.size == 0:
        return None
    coef_s = coef[support]
    design = data.design
    if est.loss_of(model) == "squared":
        # intercept = y_mean - x_mean^T coef: chain its gradient into the coefficients.
        rhs = g_coef[support] - g_intercept * data.x_mean[support]
        gram = _solver.cached_gram(design, support)  # the inner solver's Gram block
        v = _solve_restricted(lambda: design.columns(support), None, l2, rhs, evaluation, gram)
    else:
        z = design.matvec(coef) + model.intercept_
        prob = tf.math.sigmoid(-tf.constant(data.target, DTYPE) * z)
        weights = prob * (1.0 - prob) / design.n
        if data.sample_weight is not None:
            weights = weights * tf.constant(data.sample_weight, DTYPE)
        rhs = g_coef[support]

        def block():
            columns = design.columns(support)
            if model.fit_intercept:
                columns = tf.concat([columns, tf.ones([design.n, 1], DTYPE)], axis=1)
            return columns

        if model.fit_intercept:
            rhs = np.append(rhs, g_intercept)
        v = _solve_restricted(block, weights, 0.0, rhs, evaluation)[: support.size]
    grad_alphas = np.zeros(p)
    grad_alphas[support] = -v * np.sign(coef_s)
    return grad_alphas, float(-v @ coef_s) if l2 > 0 else 0.0  # unused without a ridge
