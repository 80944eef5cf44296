"""Projections onto the simplex, the l1 ball and the l1 sphere, and sparsemax.

Forward: the projection onto {y >= 0, sum(y) = s} is `max(x - tau, 0)` where tau is
the root of the piecewise-linear decreasing equation f(tau) = sum(max(x - tau, 0)) - s.

* Exact Newton iterations on f from a lower bound of tau (Michelot's algorithm:
  tau <- (sum_{x_i > tau} x_i - s) / #{x_i > tau}) increase monotonically and stop,
  exactly, as soon as the support stops shrinking; on typical data that takes a
  handful of O(n) passes. They are all vectorized over the batch.
* Rows that have not finished after `_NEWTON_MAX_ITER` passes fall back to the
  sort-based O(n log n) formula tau = max_k (sum_{i<=k} u_i - s) / k, u sorted in
  decreasing order (the maximizing k is the support size). So the worst case is
  O(n log n) and the typical case O(n) with a small constant; both are XLA-compilable.

Gradient (custom, closed form): with support S = {i : y_i > 0},
dy/dx = diag(1_S) - 1_S 1_S^T / |S| and dy/ds = 1_S / |S|. A coordinate with
x_i == tau exactly (y_i = 0) is outside S: the non-negativity constraint is treated
as active, which is an element of the Clarke Jacobian (same convention as relu'(0)=0).
"""

from __future__ import annotations

import tensorflow as tf

from keras_implicit.ops import _common as c

__all__ = ["projection_l1_ball", "projection_l1_sphere", "projection_simplex", "sparsemax"]

# Newton passes before the sort fallback. Random data needs ~5-10.
_NEWTON_MAX_ITER = 32


def _threshold_sort(x, value):
    """tau = max_k (cumsum(sorted_desc(x))_k - value) / k  (O(n log n))."""
    u = tf.sort(x, axis=-1, direction="DESCENDING")
    n = tf.shape(x)[-1]
    k = tf.cast(tf.range(1, n + 1), x.dtype)
    return tf.reduce_max((tf.cumsum(u, axis=-1) - value) / k, axis=-1, keepdims=True)


def _threshold_newton(x, value, max_iter):
    """Newton/Michelot iterations; returns (tau, converged) per row."""
    n = tf.cast(tf.shape(x)[-1], x.dtype)
    # Both are lower bounds of tau: f(max(x) - s) >= 0 and f(mean(x) - s/n) >= 0.
    tau0 = tf.maximum(
        tf.reduce_max(x, axis=-1, keepdims=True) - value,
        (c.sum_last(x) - value) / n,
    )
    count0 = tf.fill(tf.shape(tau0), tf.constant(-1, x.dtype))

    def body(i, tau, count, _):
        active = x > tau
        new_count = c.sum_last(tf.cast(active, x.dtype))
        total = c.sum_last(tf.where(active, x, tf.zeros_like(x)))
        # An empty support only happens for value == 0 (tau0 = max(x)); keep tau there.
        new_tau = tf.where(new_count > 0, (total - value) / tf.maximum(new_count, 1), tau)
        # Same support twice in a row => tau is the exact root. Non-finite rows
        # (NaN input) are declared done so they cannot hold the batch hostage.
        done = tf.logical_or(tf.equal(new_count, count), tf.logical_not(tf.math.is_finite(tau)))
        return i + 1, new_tau, new_count, tf.reduce_all(done)

    def cond(i, tau, count, all_done):
        return tf.logical_and(i < max_iter, tf.logical_not(all_done))

    _, tau, count, _ = tf.while_loop(cond, body, (tf.constant(0), tau0, count0, tf.constant(False)))
    # `count` is from the last pass; convergence means the final tau's support
    # equals it.
    final_count = c.sum_last(tf.cast(x > tau, x.dtype))
    converged = tf.logical_or(
        tf.logical_or(tf.equal(final_count, count), tf.equal(count, 0)),
        tf.logical_not(tf.math.is_finite(tau)),
    )
    return tau, converged


@c.graph_when_eager  # the Newton loop is slow as eager ops
def _simplex_threshold_graph(x, value, max_newton_iter):
    tau, converged = _threshold_newton(x, value, max_newton_iter)
    return tf.cond(
        tf.reduce_all(converged),
        lambda: tau,
        lambda: tf.where(converged, tau, _threshold_sort(x, value)),
    )


def _simplex_threshold(x, value, max_newton_iter=None):
    """Threshold tau of the projection of rows of `x` onto {y >= 0, sum y = value}."""
    if max_newton_iter is None:
        max_newton_iter = _NEWTON_MAX_ITER
    return _simplex_threshold_graph(x, value, tf.constant(max_newton_iter))


def _support_vjp(g, support):
    """VJP of y = max(x - tau, 0) through tau: (gx, gvalue) on the support."""
    s = tf.cast(support, g.dtype)
    size = tf.maximum(c.sum_last(s), 1)
    mean = c.sum_last(g * s) / size
    return s * (g - mean), mean


@tf.custom_gradient
def _simplex_core(x, value):
    # stop_gradient on the inputs: neither reverse nor forward mode may look inside
    # the threshold search (a while loop); the custom gradient is the derivative.
    x = tf.stop_gradient(x)
    tau = _simplex_threshold(x, tf.stop_gradient(value))
    y = tf.nn.relu(x - tau)

    def grad(g):
        return _support_vjp(g, y > 0)

    return y, grad


def projection_simplex(x, value=1.0):
    """Projection onto the simplex {y : y >= 0, sum(y) = value}.

    Solves argmin_y ||y - x||^2 s.t. y >= 0, sum(y) = value, row by row along the
    last axis. See the module docstring for the algorithm (exact; O(n) Newton passes
    with an O(n log n) sort fallback).

    Args:
      x: floating tensor `(..., n)`.
      value: non-negative number or tensor broadcastable to `x.shape[:-1]`.

    Returns:
      Tensor like `x`. Jacobian `diag(1_S) - 1_S 1_S^T/|S|`, derivative w.r.t.
      `value` `1_S/|S|`, with S = {i : y_i > 0} (ties x_i == tau are outside S).
    """
    with tf.name_scope("projection_simplex"):
        x = c.as_float_tensor(x)
        c.require_rank(x, 1)
        value = c.per_vector(c.as_param(value, x.dtype, "value", c.non_negative), x)
        return _simplex_core(x, value)


def sparsemax(x):
    """Sparsemax (Martins & Astudillo, 2016): projection of `x` onto the probability simplex.

    Equal to `projection_simplex(x, 1.0)` along the last axis; same Jacobian.
    """
    with tf.name_scope("sparsemax"):
        x = c.as_float_tensor(x)
        c.require_rank(x, 1)
        return _simplex_core(x, c.per_vector(tf.constant(1.0, x.dtype), x))


def _signs(x):
    # sign with sign(0) = +1 so that a zero coordinate can still carry mass on the
    # sphere; d|x|/dx = sign(x) uses the same choice.
    return tf.where(x >= 0, tf.ones_like(x), -tf.ones_like(x))


@tf.custom_gradient
def _l1_sphere_core(x, radius):
    x = tf.stop_gradient(x)
    signs = _signs(x)
    ax = tf.abs(x)
    tau = _simplex_threshold(ax, tf.stop_gradient(radius))
    w = tf.nn.relu(ax - tau)

    def grad(g):
        gw, gr = _support_vjp(g * signs, w > 0)
        return gw * signs, gr

    return signs * w, grad


@tf.custom_gradient
def _l1_ball_core(x, radius):
    x = tf.stop_gradient(x)
    radius = tf.stop_gradient(radius)
    signs = _signs(x)
    ax = tf.abs(x)
    inside = c.sum_last(ax) < radius
    tau = _simplex_threshold(ax, radius)
    w = tf.nn.relu(ax - tau)
    y = tf.where(inside, x, signs * w)

    def grad(g):
        gw, gr = _support_vjp(g * signs, w > 0)
        return tf.where(inside, g, gw * signs), tf.where(inside, tf.zeros_like(gr), gr)

    return y, grad


def projection_l1_ball(x, radius=1.0):
    """Projection onto the l1 ball {y : ||y||_1 <= radius}.

    Inside the ball `y = x`; otherwise `y = sign(x) * projection_simplex(|x|, radius)`
    (Duchi et al., 2008), using the same exact threshold algorithm as the simplex.

    Args:
      x: floating tensor `(..., n)`.
      radius: non-negative number or tensor broadcastable to `x.shape[:-1]`.

    Returns:
      Tensor like `x`. Jacobian: identity where `||x||_1 < radius`; where
      `||x||_1 >= radius` (boundary included) `D (diag(1_S) - 1_S 1_S^T/|S|) D` with
      `D = diag(sign(x))`, S the support of y, and derivative w.r.t. the radius
      `sign(x) 1_S / |S|`.
    """
    with tf.name_scope("projection_l1_ball"):
        x = c.as_float_tensor(x)
        c.require_rank(x, 1)
        radius = c.per_vector(c.as_param(radius, x.dtype, "radius", c.non_negative), x)
        return _l1_ball_core(x, radius)


def projection_l1_sphere(x, radius=1.0):
    """Projection onto the l1 sphere {y : ||y||_1 = radius} (a non-convex set).

    The nearest point lies in the closed orthant of `x` (flipping a sign can only
    increase the distance), so it is `sign(x) * projection_simplex(|x|, radius)` for
    points inside and outside the ball alike, with sign(0) taken as +1. Where several
    points are nearest (ties in `|x|` at the threshold, zero coordinates), this
    choice is returned.

    Args:
      x: floating tensor `(..., n)`.
      radius: non-negative number or tensor broadcastable to `x.shape[:-1]`.

    Returns:
      Tensor like `x`. Jacobian `D (diag(1_S) - 1_S 1_S^T/|S|) D`, `D = diag(sign(x))`,
      derivative w.r.t. the radius `sign(x) 1_S/|S|`.
    """
    with tf.name_scope("projection_l1_sphere"):
        x = c.as_float_tensor(x)
        c.require_rank(x, 1)
        radius = c.per_vector(c.as_param(radius, x.dtype, "radius", c.non_negative), x)
        return _l1_sphere_core(x, radius)
