"""Projections onto the transport polytope and the Birkhoff polytope (Euclidean and KL).

The transport polytope U(a, b) = {T >= 0 : T 1 = a, T^T 1 = b} (a: row marginals,
b: column marginals, sum(a) = sum(b)); the Birkhoff polytope is U(1, 1), the doubly
stochastic matrices.

Both projections are written with one potential alpha per row ("semi-dual"): given
alpha, each column has a closed form,

* Euclidean, argmin ||T - X||^2: column j is the projection of X_:j + alpha onto the
  simplex of mass b_j (`projection_simplex`);
* KL, argmin KL(T || exp(X)) = sum T (log T - X) - T: column j is
  b_j softmax(X_:j + alpha) (the Gibbs kernel exp(X) scaled by Sinkhorn potentials),

and alpha is the root of F(alpha) = T(alpha) 1 - a + mean(alpha) 1: the rows hold
their marginals and the potential, defined up to a constant, has mean 0. The
Euclidean root comes from a few sweeps of block coordinate ascent on the dual, then
a semismooth Newton method on F (the gradient of the concave semi-dual;
Levenberg-Marquardt damping and a backtracking line search on ||F||), the KL root
from Sinkhorn iterations in the log domain. Gradients: the implicit function theorem on F through
`keras_implicit.custom_root` (a symmetric positive definite system, solved by CG),
then autodiff of the closed-form columns.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_implicit import _validation
from keras_implicit.implicit import custom_root
from keras_implicit.ops import _common as c
from keras_implicit.ops.simplex import _simplex_solve, projection_simplex

__all__ = ["projection_birkhoff", "projection_transport"]

_DIVERGENCES = ("euclidean", "kl")
# candidate step sizes of the line search
_STEPS = 0.5 ** np.arange(10)
# block coordinate ascent sweeps before the Newton iterations
_ASCENT_SWEEPS = 10


def _columns(alpha, x, b, divergence, differentiable=True):
    """T(alpha): the closed-form columns, (B, m, n) from alpha (B, m), x, b (B, n)."""
    shifted = x + alpha[:, :, tf.newaxis]
    if divergence == "kl":
        return tf.nn.softmax(shifted, axis=-2) * b[:, tf.newaxis, :]
    cols = tf.linalg.matrix_transpose(shifted)
    if differentiable:
        proj = projection_simplex(cols, b)
    else:
        proj = _simplex_solve(cols, b[:, :, tf.newaxis])
    return tf.linalg.matrix_transpose(proj)


def _residual(alpha, x, a, b, divergence, differentiable=True):
    t = _columns(alpha, x, b, divergence, differentiable)
    mean = tf.reduce_mean(alpha, axis=-1, keepdims=True)
    return tf.reduce_sum(t, axis=-1) - a + mean, t


def _newton_direction(residual, t):
    """Damped Newton step on the Euclidean semi-dual: (H + mu I) d = -F."""
    support = tf.cast(t > 0, t.dtype)  # (B, m, n)
    size = tf.maximum(tf.reduce_sum(support, axis=-2, keepdims=True), 1)
    m = tf.shape(residual)[-1]
    hess = tf.linalg.diag(tf.reduce_sum(support, axis=-1))
    hess -= tf.matmul(support / size, support, transpose_b=True)
    hess += 1.0 / tf.cast(m, t.dtype)
    mu = tf.norm(residual, axis=-1, keepdims=True)
    eps = np.finfo(t.dtype.as_numpy_dtype).eps
    hess += tf.linalg.diag(tf.broadcast_to(mu + eps, tf.shape(residual)))
    chol = tf.linalg.cholesky(hess)
    return -tf.linalg.cholesky_solve(chol, residual[..., tf.newaxis])[..., 0]


def _line_search(alpha, d, norm0, x, a, b):
    """Largest step 2^-j along d that decreases ||F|| enough (all candidates in one pass).

    The merit is the residual norm, which (unlike the semi-dual's value) keeps its
    precision in float32 near the solution. Without a sufficient decrease, the step
    with the smallest residual is taken. Returns the new alpha with its residual and
    plan, so the loop needs no extra evaluation.
    """
    steps = tf.constant(_STEPS, alpha.dtype)
    count = len(_STEPS)
    rows, m = tf.shape(x)[0], tf.shape(x)[1]
    cand = tf.reshape(alpha[:, None, :] + steps[None, :, None] * d[:, None, :], [-1, m])
    xr, ar, br = (tf.repeat(v, count, axis=0) for v in (x, a, b))
    res, t = _residual(cand, xr, ar, br, "euclidean", False)
    norms = tf.reshape(tf.norm(res, axis=-1), [rows, count])
    norms = tf.where(tf.math.is_finite(norms), norms, np.inf)
    ok = norms <= (1 - 1e-4 * steps[None, :]) * norm0[:, None]
    first = tf.where(
        tf.reduce_any(ok, axis=-1),
        tf.argmax(tf.cast(ok, tf.int32), axis=-1),
        tf.argmin(norms, axis=-1),
    )
    index = tf.range(rows, dtype=first.dtype) * count + first
    return tf.gather(cand, index), tf.gather(res, index), tf.gather(t, index)


def _threshold(z, mass):
    """tau with sum(max(z - tau, 0)) = mass along the last axis, (..., k) -> (...)."""
    p = _simplex_solve(z, mass[..., tf.newaxis])
    support = tf.cast(p > 0, z.dtype)
    return tf.reduce_sum((z - p) * support, axis=-1) / tf.maximum(
        tf.reduce_sum(support, axis=-1), 1
    )


def _block_ascent(alpha, x, a, b, sweeps):
    """Exact maximization of the Euclidean dual over the column, then the row potentials.

    A few sweeps balance the rows' supports before Newton: from a poor start most
    columns hold one entry, where the semi-dual's Hessian vanishes.
    """

    def body(i, alpha):
        beta = -_threshold(tf.linalg.matrix_transpose(x + alpha[:, :, None]), b)
        alpha = -_threshold(x + beta[:, None, :], a)
        return i + 1, alpha - tf.reduce_mean(alpha, axis=-1, keepdims=True)

    return tf.while_loop(lambda i, _: i < sweeps, body, (0, alpha))[1]


@c.graph_when_eager  # the Newton loop is slow as eager ops
def _euclidean_solve(alpha, x, a, b, tol, max_iter):
    """Semismooth Newton on the Euclidean semi-dual; returns the row potentials."""
    alpha = _block_ascent(alpha, x, a, b, _ASCENT_SWEEPS)
    scale = tf.maximum(tf.reduce_max(tf.abs(a), axis=-1), tf.reduce_max(tf.abs(b), axis=-1))
    # below a few ulps per summed entry the residual is rounding, not progress
    n = tf.cast(tf.shape(x)[-1], x.dtype)
    target = tf.maximum(tol, 4 * n * np.finfo(x.dtype.as_numpy_dtype).eps) * scale

    def worst(res):
        return tf.reduce_max(tf.abs(res), axis=-1)

    def finished(res):
        # rows with a non-finite entry cannot converge and must not hold the loop
        stuck = ~tf.math.is_finite(worst(res)) | ~tf.math.is_finite(scale)
        return (worst(res) <= target) | stuck

    def body(i, alpha, res, t, best):
        d = _newton_direction(res, t)
        new = _line_search(alpha, d, tf.norm(res, axis=-1), x, a, b)
        # finished rows stay as they are: a row's result does not depend on its batch
        done = finished(res)
        alpha, res, t = (
            tf.where(tf.reshape(done, [-1] + [1] * (v.shape.rank - 1)), v, w)
            for v, w in zip((alpha, res, t), new)
        )
        # the best iterate so far (rounding can make late steps worse in float32)
        better = worst(res) < best[1]
        best = (tf.where(better[:, None], alpha, best[0]), tf.where(better, worst(res), best[1]))
        return i + 1, alpha, res, t, best

    def cond(i, alpha, res, t, best):
        return (i < max_iter) & ~tf.reduce_all(finished(res))

    res, t = _residual(alpha, x, a, b, "euclidean", False)
    best = (alpha, tf.where(tf.math.is_finite(worst(res)), worst(res), np.inf))
    return tf.while_loop(cond, body, (0, alpha, res, t, best))[4][0]


@c.graph_when_eager  # Sinkhorn's loop is slow as eager ops
def _sinkhorn_solve(f, x, a, b, tol, max_iter):
    """Log-domain Sinkhorn; returns the row potentials (mean 0)."""
    log_a, log_b = tf.math.log(a), tf.math.log(b)

    def col_potential(f):
        return log_b - tf.reduce_logsumexp(x + f[:, :, None], axis=-2)

    def body(i, f, err):
        # finished rows stay as they are: a row's result does not depend on its batch
        active = err > tol
        f_new = log_a - tf.reduce_logsumexp(x + col_potential(f)[:, None, :], axis=-1)
        f = tf.where(active[:, None], f_new, f)
        plan = tf.exp(x + f[:, :, None] + col_potential(f)[:, None, :])
        new_err = tf.reduce_sum(tf.abs(tf.reduce_sum(plan, axis=-1) - a), axis=-1)
        new_err /= tf.reduce_sum(a, axis=-1)
        # rows with a non-finite entry cannot converge and must not hold the loop
        new_err = tf.where(tf.math.is_finite(new_err), new_err, tf.zeros_like(new_err))
        return i + 1, f, tf.where(active, new_err, err)

    def cond(i, f, err):
        return (i < max_iter) & tf.reduce_any(err > tol)

    start = (0, f, tf.fill(tf.shape(f)[:1], tf.constant(np.inf, x.dtype)))
    f = tf.while_loop(cond, body, start)[1]
    return f - tf.reduce_mean(f, axis=-1, keepdims=True)


def _default_tol(dtype, divergence):
    if dtype == tf.float64:
        return 1e-13 if divergence == "euclidean" else 1e-10
    return 1e-6 if divergence == "euclidean" else 1e-5


def _flatten(x, a, b):
    """(x, a, b) broadcast to one batch axis: (B, m, n), (B, m), (B, n)."""
    batch = tf.broadcast_dynamic_shape(
        tf.broadcast_dynamic_shape(tf.shape(x)[:-2], tf.shape(a)[:-1]), tf.shape(b)[:-1]
    )
    m, n = tf.shape(x)[-2], tf.shape(x)[-1]
    rows = tf.reduce_prod(batch)
    x = tf.reshape(tf.broadcast_to(x, tf.concat([batch, [m, n]], 0)), tf.stack([rows, m, n]))
    a = tf.reshape(tf.broadcast_to(a, tf.concat([batch, [m]], 0)), tf.stack([rows, m]))
    b = tf.reshape(tf.broadcast_to(b, tf.concat([batch, [n]], 0)), tf.stack([rows, n]))
    return x, a, b, batch


# Plain TF code without Python control flow on tensors: autograph would only spend
# seconds converting the solver and the implicit-gradient machinery.
@tf.autograph.experimental.do_not_convert
def projection_transport(
    x,
    a,
    b,
    divergence="euclidean",
    tol=None,
    max_iter=None,
    backward_tol=None,
    on_failure="warn",
):
    """Projection onto the transport polytope {T >= 0 : T 1 = a, T^T 1 = b}.

    `divergence="euclidean"`: argmin ||T - x||^2 (jaxopt `projection_transport`);
    `divergence="kl"`: argmin KL(T || exp(x)) (jaxopt `kl_projection_transport`;
    Sinkhorn's entropic transport plan for the score matrix `x`). See the module
    docstring for the algorithms.

    Args:
      x: floating tensor `(..., m, n)`.
      a: row marginals `(..., m)`, non-negative (positive for "kl").
      b: column marginals `(..., n)`, non-negative (positive for "kl"), with
        `sum(a) == sum(b)`.
      divergence: "euclidean" or "kl".
      tol: relative tolerance on the marginals (default 1e-13 Euclidean / 1e-10 KL
        in float64, 1e-6 / 1e-5 in float32). max_iter: Newton steps (default 50) or
        Sinkhorn iterations (default 2000).
      backward_tol: tolerance of the backward CG solve (default 1e-10 in float64,
        1e-5 otherwise).
      on_failure: "warn", "raise" or "ignore" for a row whose marginals the solver
        did not reach (as `keras_implicit.custom_root`).

    Returns:
      Tensor like `x`: its columns sum to `b` exactly (closed form) and its rows to
      `a` to `tol`. A matrix with a NaN or infinite entry, or whose marginals have
      unequal masses (beyond sqrt(eps) relative; Python/numpy marginals raise a
      ValueError instead), gives a NaN matrix (the other matrices of the batch are
      unaffected). Gradients w.r.t. `x`, `a` and
      `b` by implicit differentiation; at ties (an entry exactly at its column's
      threshold) the Euclidean Jacobian treats the entry as zero, as
      `projection_simplex` does.
    """
    with tf.name_scope("projection_transport"):
        if divergence not in _DIVERGENCES:
            raise ValueError(
                f"`divergence` must be one of {list(_DIVERGENCES)}. "
                f"Received: divergence={divergence!r}"
            )
        x, original = c.upcast_half(c.as_float_tensor(x))
        c.require_rank(x, 2)
        check = c.positive if divergence == "kl" else c.non_negative
        a_t = c.as_param(a, x.dtype, "a", check)
        b_t = c.as_param(b, x.dtype, "b", check)
        _check_masses(a, b)
        if tol is None:
            tol = _default_tol(x.dtype, divergence)
        tol = _validation.positive_float("tol", tol)
        if max_iter is None:
            max_iter = 50 if divergence == "euclidean" else 2000
        max_iter = _validation.positive_int("max_iter", max_iter)
        if backward_tol is None:
            backward_tol = 1e-10 if x.dtype == tf.float64 else 1e-5
        xf, af, bf, batch = _flatten(x, a_t, b_t)
        out_shape = tf.concat([batch, tf.shape(x)[-2:]], 0)
        loop = _euclidean_solve if divergence == "euclidean" else _sinkhorn_solve
        settings = (tf.constant(tol, x.dtype), tf.constant(max_iter))

        def solver(alpha, xs, as_, bs):
            return loop(alpha, xs, as_, bs, *settings)

        def fn(alpha, xs, as_, bs):
            return _residual(alpha, xs, as_, bs, divergence)[0]

        m = x.shape[-2]
        solve = custom_root(
            fn,
            linear_solver="cg",
            tol=max(1e3 * tol, 10 * float(np.finfo(x.dtype.as_numpy_dtype).eps) ** 0.5),
            backward_tol=backward_tol,
            backward_max_iter=max(100, 4 * m) if m is not None else 400,
            batch_dims=1,
            on_failure=on_failure,
        )(solver)
        # Both projections ignore offsets r_i + c_j of x (the potentials absorb them):
        # the solvers see x without its row and column means, so that their
        # objectives and exponentials stay at the scale of x's variation.
        xf = xf - tf.reduce_mean(xf, axis=-1, keepdims=True)
        xf = xf - tf.reduce_mean(xf, axis=-2, keepdims=True)
        alpha = solve(tf.zeros_like(af), xf, af, bf)
        t = _columns(alpha, xf, bf, divergence)
        # A matrix with a NaN or infinite entry has no defined projection, and
        # marginals of unequal masses (tensors are not checked eagerly) leave the
        # polytope empty: both give an all-NaN matrix.
        finite = tf.reduce_all(tf.math.is_finite(xf), axis=[-2, -1])
        mass_a, mass_b = tf.reduce_sum(af, axis=-1), tf.reduce_sum(bf, axis=-1)
        slack = float(np.sqrt(np.finfo(x.dtype.as_numpy_dtype).eps))
        equal = tf.abs(mass_a - mass_b) <= slack * tf.maximum(mass_a, mass_b)
        ok = (finite & equal)[:, None, None]
        t = tf.where(ok, t, tf.fill(tf.shape(t), tf.constant(np.nan, t.dtype)))
        return c.restore_dtype(tf.reshape(t, out_shape), original)


def _check_masses(a, b):
    """sum(a) == sum(b) for Python/numpy marginals (tensors are not inspected)."""
    if tf.is_tensor(a) or tf.is_tensor(b) or isinstance(a, tf.Variable):
        return
    if isinstance(b, tf.Variable):
        return
    sa = np.sum(np.asarray(a, dtype=np.float64), axis=-1)
    sb = np.sum(np.asarray(b, dtype=np.float64), axis=-1)
    try:
        bad = np.any(np.abs(sa - sb) > 1e-6 * np.maximum(np.abs(sa), np.abs(sb)))
    except ValueError:
        return
    if bad:
        raise ValueError(
            "The marginals must have equal sums (sum(a) == sum(b)). "
            f"Received: sum(a)={np.round(sa, 8).tolist()}, sum(b)={np.round(sb, 8).tolist()}"
        )


@tf.autograph.experimental.do_not_convert
def projection_birkhoff(x, divergence="euclidean", **kwargs):
    """Projection onto the Birkhoff polytope (doubly stochastic matrices).

    `projection_transport(x, ones(n), ones(n), divergence, ...)` for square `x`
    `(..., n, n)` (jaxopt `projection_birkhoff` / `kl_projection_birkhoff`). The KL
    projection is Sinkhorn's normalization of exp(x).
    """
    with tf.name_scope("projection_birkhoff"):
        x = c.as_float_tensor(x)
        c.require_rank(x, 2)
        m, n = x.shape[-2], x.shape[-1]
        if m is not None and n is not None and m != n:
            raise ValueError(
                "The Birkhoff polytope holds square matrices (..., n, n). "
                f"Received: x.shape={x.shape}"
            )
        ones = tf.ones(tf.shape(x)[-1:], x.dtype)
        return projection_transport(x, ones, ones, divergence=divergence, **kwargs)
