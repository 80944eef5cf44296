"""Projections onto the simplex, the l1 ball and the l1 sphere, and sparsemax.

Forward: the projection onto {y >= 0, sum(y) = s} is `max(x - tau, 0)` where tau is
the root of the piecewise-linear decreasing equation f(tau) = sum(max(x - tau, 0)) - s.

Scale: tau itself is not computed. With m = max(x), the op solves for
delta = m - tau, which lies in [s/n, s], on the shifted vector z = x - m <= 0, and
returns `max(z + delta, 0)`. In float32, tau = 3e9 - 1 has no representation (the
spacing there is 256) and `x - tau` would lose `s` entirely, while z and delta are
exact or accurate to a few ulps whatever the magnitude of x: the entries that can be
in the support (z > -s) satisfy x >= m - s, and their difference with m is exact
whenever s <= m (Sterbenz). When s > 1, z and s are divided by a power of two near s
for the search, so that no partial sum can overflow even for s near the largest
float. Rows with a NaN or infinite entry return NaN.

* Exact Newton iterations on f from an upper bound of delta (Michelot's algorithm:
  delta <- (s - sum_{z_i > -delta} z_i) / #{z_i > -delta}) decrease monotonically
  and stop, exactly, as soon as the support stops shrinking; on typical data that
  takes a handful of O(n) passes. They are all vectorized over the batch.
* Rows that have not finished after `_NEWTON_MAX_ITER` passes fall back to the
  sort-based O(n log n) formula delta = min_k (s - sum_{i<=k} u_i) / k, u = z sorted
  in decreasing order (the minimizing k is the support size). So the worst case is
  O(n log n) and the typical case O(n) with a small constant; both are XLA-compilable.

Gradient (custom, closed form): with support S = {i : y_i > 0},
dy/dx = diag(1_S) - 1_S 1_S^T / |S| and dy/ds = 1_S / |S|. A coordinate with
x_i == tau exactly (y_i = 0) is outside S: the non-negativity constraint is treated
as active, which is an element of the Clarke Jacobian (same convention as relu'(0)=0).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_implicit import _validation
from keras_implicit.ops import _common as c

__all__ = [
    "projection_l1_ball",
    "projection_l1_sphere",
    "projection_simplex",
    "projection_sparse_simplex",
    "sparsemax",
]

# Newton passes before the sort fallback. Random data needs ~5-10.
_NEWTON_MAX_ITER = 32


def _delta_sort(z, value):
    """delta = min_k (value - cumsum(sorted_desc(z))_k) / k  (O(n log n))."""
    u = tf.sort(z, axis=-1, direction="DESCENDING")
    n = tf.shape(z)[-1]
    k = tf.cast(tf.range(1, n + 1), z.dtype)
    return tf.reduce_min((value - tf.cumsum(u, axis=-1)) / k, axis=-1, keepdims=True)


def _delta_newton(z, value, max_iter):
    """Newton/Michelot iterations on the shifted problem; returns (delta, converged)."""
    n = tf.cast(tf.shape(z)[-1], z.dtype)
    # Both are upper bounds of delta (lower bounds of tau): the largest entry of y
    # is at most `value`, and f(mean(x) - value/n) >= 0. A sum(z) of -inf (entries
    # whose difference with the max overflowed) makes the second one +inf.
    delta0 = tf.minimum(value, (value - c.sum_last(z)) / n)
    count0 = tf.fill(tf.shape(delta0), tf.constant(-1, z.dtype))

    def body(i, delta, count, _):
        active = z + delta > 0  # the support of the output max(z + delta, 0)
        new_count = c.sum_last(tf.cast(active, z.dtype))
        total = c.sum_last(tf.where(active, z, tf.zeros_like(z)))
        # An empty support only happens for value == 0 (delta = 0); keep delta there.
        new_delta = tf.where(new_count > 0, (value - total) / tf.maximum(new_count, 1), delta)
        # Same support twice in a row => delta is the exact root.
        done = tf.equal(new_count, count)
        return i + 1, new_delta, new_count, tf.reduce_all(done)

    def cond(i, delta, count, all_done):
        return tf.logical_and(i < max_iter, tf.logical_not(all_done))

    _, delta, count, _ = tf.while_loop(
        cond, body, (tf.constant(0), delta0, count0, tf.constant(False))
    )
    # `count` is from the last pass; convergence means the final delta's support
    # equals it.
    final_count = c.sum_last(tf.cast(z + delta > 0, z.dtype))
    converged = tf.logical_or(tf.equal(final_count, count), tf.equal(count, 0))
    return delta, converged


def _search_scale(value):
    """A power of two near `value` when value > 1, else 1 (keeps the search's sums finite)."""
    dtype = value.dtype
    max_exponent = float(np.finfo(dtype.as_numpy_dtype).maxexp - 2)
    exponent = tf.clip_by_value(
        tf.floor(tf.math.log(tf.maximum(value, 1)) / np.log(2.0)), 0.0, max_exponent
    )
    return tf.pow(tf.constant(2.0, dtype), exponent)


@c.graph_when_eager  # the Newton loop is slow as eager ops
def _simplex_graph(x, value, max_newton_iter):
    finite = tf.reduce_all(tf.math.is_finite(x), axis=-1, keepdims=True)
    x = tf.where(finite, x, tf.zeros_like(x))  # NaN rows must not hold the loop
    z = x - tf.reduce_max(x, axis=-1, keepdims=True)
    scale = _search_scale(value)
    z_scaled = z / scale
    value_scaled = value / scale
    delta, converged = _delta_newton(z_scaled, value_scaled, max_newton_iter)
    delta = tf.cond(
        tf.reduce_all(converged),
        lambda: delta,
        lambda: tf.where(converged, delta, _delta_sort(z_scaled, value_scaled)),
    )
    y = tf.nn.relu(z + delta * scale)
    return tf.where(finite, y, tf.fill(tf.shape(y), tf.constant(np.nan, y.dtype)))


def _simplex_solve(x, value, max_newton_iter=None):
    """Projection of the rows of `x` onto {y >= 0, sum y = value} (no gradient)."""
    if max_newton_iter is None:
        max_newton_iter = _NEWTON_MAX_ITER
    return _simplex_graph(x, value, tf.constant(max_newton_iter))


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
    y = _simplex_solve(tf.stop_gradient(x), tf.stop_gradient(value))

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
        x, original = c.upcast_half(c.as_float_tensor(x))
        c.require_rank(x, 1)
        value = c.per_vector(c.as_param(value, x.dtype, "value", c.non_negative), x)
        return c.restore_dtype(_simplex_core(x, value), original)


def projection_sparse_simplex(x, max_nonzeros, value=1.0):
    """Projection onto the sparse simplex {y >= 0, sum(y) = value, ||y||_0 <= max_nonzeros}.

    jaxopt's `projection_sparse_simplex`. The set is not convex, but its projection
    has a closed form (Kyrillidis et al., 2013): keep the `max_nonzeros` largest
    entries of `x`, project them onto the simplex, set the others to 0. Ties at the
    k-th largest value keep the first entries (`tf.math.top_k` order), one of the
    nearest points.

    Args:
      x: floating tensor `(..., n)`.
      max_nonzeros: positive Python int k (with k >= n this is `projection_simplex`).
      value: non-negative number or tensor broadcastable to `x.shape[:-1]`.

    Returns:
      Tensor like `x`. Jacobian: that of `projection_simplex` on the kept entries
      (`diag(1_S) - 1_S 1_S^T/|S|`, S the support), 0 elsewhere; derivative w.r.t.
      `value` `1_S/|S|`.
    """
    with tf.name_scope("projection_sparse_simplex"):
        k = _validation.positive_int("max_nonzeros", max_nonzeros)
        x, original = c.upcast_half(c.as_float_tensor(x))
        c.require_rank(x, 1)
        value = c.per_vector(c.as_param(value, x.dtype, "value", c.non_negative), x)
        n = x.shape[-1]
        if n is not None and k >= n:
            return c.restore_dtype(_simplex_core(x, value), original)
        if n is None:
            k = tf.minimum(k, tf.shape(x)[-1])
        top, indices = tf.math.top_k(x, k=k, sorted=False)
        y_top = _simplex_core(top, value)
        # scatter the k entries back: (..., k) @ one_hot (..., k, n)
        spread = tf.one_hot(indices, tf.shape(x)[-1], dtype=x.dtype)
        y = tf.linalg.matvec(spread, y_top, transpose_a=True)
        return c.restore_dtype(y, original)


def sparsemax(x):
    """Sparsemax (Martins & Astudillo, 2016): projection of `x` onto the probability simplex.

    Equal to `projection_simplex(x, 1.0)` along the last axis; same Jacobian.
    """
    with tf.name_scope("sparsemax"):
        x, original = c.upcast_half(c.as_float_tensor(x))
        c.require_rank(x, 1)
        return c.restore_dtype(
            _simplex_core(x, c.per_vector(tf.constant(1.0, x.dtype), x)), original
        )


def _signs(x):
    # sign with sign(0) = +1 so that a zero coordinate can still carry mass on the
    # sphere; d|x|/dx = sign(x) uses the same choice.
    return tf.where(x >= 0, tf.ones_like(x), -tf.ones_like(x))


@tf.custom_gradient
def _l1_sphere_core(x, radius):
    x = tf.stop_gradient(x)
    signs = _signs(x)
    w = _simplex_solve(tf.abs(x), tf.stop_gradient(radius))

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
    w = _simplex_solve(ax, radius)
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
        x, original = c.upcast_half(c.as_float_tensor(x))
        c.require_rank(x, 1)
        radius = c.per_vector(c.as_param(radius, x.dtype, "radius", c.non_negative), x)
        return c.restore_dtype(_l1_ball_core(x, radius), original)


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
        x, original = c.upcast_half(c.as_float_tensor(x))
        c.require_rank(x, 1)
        radius = c.per_vector(c.as_param(radius, x.dtype, "radius", c.non_negative), x)
        return c.restore_dtype(_l1_sphere_core(x, radius), original)
