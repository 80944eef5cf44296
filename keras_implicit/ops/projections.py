"""Euclidean projections onto simple sets whose projection has a closed form.

All ops act on vectors along the last axis and are batched over the leading axes.
Gradients are the autodiff of the closed form written with explicit masks, so the
element of the Clarke Jacobian chosen at a kink is the one stated in each docstring.

Kink convention (the same in every op of `keras_implicit.ops`): when the input lies
exactly where two pieces of the projection meet, the derivative is that of the *most
constrained* piece, i.e. a constraint that holds with equality is treated as active.
So relu'(0) = 0, a coordinate exactly on a box bound takes the gradient of the bound,
and a point exactly on the sphere of a ball uses the radial projection formula (the
radius receives gradient). Every such choice is an element of the Clarke Jacobian.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_implicit.ops import _common as c

__all__ = [
    "projection_affine_set",
    "projection_box",
    "projection_halfspace",
    "projection_hyperplane",
    "projection_l2_ball",
    "projection_l2_sphere",
    "projection_linf_ball",
    "projection_non_negative",
]


def projection_non_negative(x):
    """Projection onto the non-negative orthant: `max(x, 0)` elementwise.

    Args:
      x: floating tensor of any shape.

    Returns:
      Tensor like `x`. Gradient: 1 where `x > 0`, 0 where `x <= 0` (relu'(0) = 0).
    """
    with tf.name_scope("projection_non_negative"):
        x = c.as_float_tensor(x)
        return tf.nn.relu(x)


def projection_box(x, lower, upper):
    """Projection onto the box {y : lower <= y <= upper}: `clip(x, lower, upper)`.

    Args:
      x: floating tensor `(..., n)`.
      lower, upper: numbers or tensors broadcastable against `x` (per coordinate or
        shared). Requires `lower <= upper` (checked for Python/numpy values only).

    Returns:
      Tensor like `x`. Gradient: w.r.t. `x` 1 where `lower < x < upper`; w.r.t.
      `lower` 1 where `x <= lower`; w.r.t. `upper` 1 where `x >= upper` (a coordinate
      exactly on a bound follows the bound). Gradients to `lower`/`upper` are summed
      over the axes along which they were broadcast.
    """
    with tf.name_scope("projection_box"):
        x = c.as_float_tensor(x)
        lo = c.as_param(lower, x.dtype, "lower", c.finite_or_inf)
        hi = c.as_param(upper, x.dtype, "upper", c.finite_or_inf)
        _check_ordered(lower, upper)
        upper_active = x >= hi
        lower_active = tf.logical_and(x <= lo, tf.logical_not(upper_active))
        # tf.where broadcasts `lo`/`hi`; its gradient sums back to their shapes.
        return tf.where(upper_active, hi, tf.where(lower_active, lo, x))


def _check_ordered(lower, upper):
    """lower <= upper for Python/numpy bounds (tensors are not inspected, as elsewhere)."""
    if tf.is_tensor(lower) or tf.is_tensor(upper):
        return
    if isinstance(lower, tf.Variable) or isinstance(upper, tf.Variable):
        return
    try:
        bad = np.any(np.asarray(lower, dtype=np.float64) > np.asarray(upper, dtype=np.float64))
    except (TypeError, ValueError):  # shapes that do not broadcast fail later, in TF
        return
    if bad:
        raise ValueError(
            f"`lower` must not exceed `upper`. Received: lower={lower!r}, upper={upper!r}"
        )


def projection_linf_ball(x, radius=1.0):
    """Projection onto {y : ||y||_inf <= radius}: `clip(x, -radius, radius)`.

    Args:
      x: floating tensor `(..., n)`.
      radius: non-negative number or tensor broadcastable to the batch shape
        `x.shape[:-1]` (one radius per vector).

    Returns:
      Tensor like `x`. Gradient: w.r.t. `x` 1 where `|x| < radius`, else 0; w.r.t.
      `radius` `+1` where `x >= radius` and `-1` where `x <= -radius`.
    """
    with tf.name_scope("projection_linf_ball"):
        x = c.as_float_tensor(x)
        c.require_rank(x, 1)
        r = c.per_vector(c.as_param(radius, x.dtype, "radius", c.non_negative), x)
        return tf.where(x >= r, r, tf.where(x <= -r, -r, x))


def projection_l2_ball(x, radius=1.0):
    """Projection onto {y : ||y||_2 <= radius}: `x * min(1, radius / ||x||)`.

    Args:
      x: floating tensor `(..., n)`.
      radius: non-negative number or tensor broadcastable to `x.shape[:-1]`.

    Returns:
      Tensor like `x`. Jacobian: identity where `||x|| < radius`; where
      `||x|| >= radius` (boundary included) it is `(r/||x||)(I - x x^T/||x||^2)` and
      the derivative w.r.t. the radius is `x/||x||`. At `x = 0, radius = 0` both are 0.
    """
    with tf.name_scope("projection_l2_ball"):
        x, original = c.upcast_half(c.as_float_tensor(x))
        c.require_rank(x, 1)
        r = c.per_vector(c.as_param(radius, x.dtype, "radius", c.non_negative), x)
        # The norm and direction come from x rescaled by a power of two, so neither
        # over- nor underflows at any scale; the direction's gradient is finite at 0,
        # so the unused branch's (masked) gradient is 0, not NaN. Testing `inside`
        # (not `outside`) lets a NaN row fall in the NaN branch.
        unit, norm = c.unit_and_norm(x)
        inside = norm < r
        return c.restore_dtype(tf.where(inside, x, r * unit), original)


def projection_l2_sphere(x, radius=1.0):
    """Projection onto the sphere {y : ||y||_2 = radius}: `radius * x / ||x||`.

    The sphere is not convex; the projection is unique except at `x = 0`, where every
    point of the sphere is nearest and we return `radius * e_1` (first basis vector).

    Args:
      x: floating tensor `(..., n)`.
      radius: non-negative number or tensor broadcastable to `x.shape[:-1]`.

    Returns:
      Tensor like `x`. Jacobian `(r/||x||)(I - x x^T/||x||^2)`, derivative w.r.t. the
      radius `x/||x||`; at `x = 0` the Jacobian w.r.t. `x` is 0 and w.r.t. the radius `e_1`.
    """
    with tf.name_scope("projection_l2_sphere"):
        x, original = c.upcast_half(c.as_float_tensor(x))
        c.require_rank(x, 1)
        r = c.per_vector(c.as_param(radius, x.dtype, "radius", c.non_negative), x)
        unit, norm = c.unit_and_norm(x)  # rescaled: no over/underflow at any scale
        e1 = tf.one_hot(0, tf.shape(x)[-1], dtype=x.dtype)
        direction = tf.where(tf.equal(norm, 0), e1, unit)  # NaN stays NaN
        return c.restore_dtype(r * direction, original)


def _dot(a, b):
    return c.sum_last(a * b)


def _normalized_plane(x, a, b):
    """(a, b) as tensors, both divided by a power of two near max|a| (no gradient).

    The set {a^T y = b} (or <= b) does not change, so neither do the projection and
    its gradients, but ||a||^2 can no longer over- or underflow.
    """
    a = c.as_param(a, x.dtype, "a", c.finite)
    b = c.per_vector(c.as_param(b, x.dtype, "b", c.finite), x)
    k = c.max_abs_scale(a)
    return a / k, b / k


def _safe_sq_norm(a):
    """||a||^2, and a safe divisor that is 1 where a == 0 (the op then returns x)."""
    sq = c.sum_last(tf.square(a))
    return sq, tf.where(sq > 0, sq, tf.ones_like(sq))


def projection_hyperplane(x, a, b=0.0):
    """Projection onto the hyperplane {y : a^T y = b}.

    `y = x - (a^T x - b) / ||a||^2 * a`. Smooth in `(x, a, b)`; gradients w.r.t. all
    three are exact autodiff of this formula. `a = 0` is degenerate; there the op
    returns `x` (and gradient 0 w.r.t. `a`, `b`).

    Args:
      x: floating tensor `(..., n)`.
      a: normal vector, shape broadcastable to `x` (e.g. `(n,)` or `(..., n)`).
      b: offset, number or tensor broadcastable to `x.shape[:-1]`.
    """
    with tf.name_scope("projection_hyperplane"):
        x, original = c.upcast_half(c.as_float_tensor(x))
        c.require_rank(x, 1)
        a, b = _normalized_plane(x, a, b)
        sq, divisor = _safe_sq_norm(a)
        step = tf.where(tf.equal(sq, 0), tf.zeros_like(b), (_dot(a, x) - b) / divisor)
        return c.restore_dtype(x - step * a, original)


def projection_halfspace(x, a, b=0.0):
    """Projection onto the halfspace {y : a^T y <= b}.

    `y = x - max(a^T x - b, 0) / ||a||^2 * a`. Gradient: identity where
    `a^T x < b`; where `a^T x >= b` (boundary included) the hyperplane projection's
    Jacobian `I - a a^T/||a||^2` and exact derivatives w.r.t. `a` and `b`. `a = 0`
    returns `x`.

    Args:
      x: floating tensor `(..., n)`.
      a: normal vector, broadcastable to `x`.
      b: offset, number or tensor broadcastable to `x.shape[:-1]`.
    """
    with tf.name_scope("projection_halfspace"):
        x, original = c.upcast_half(c.as_float_tensor(x))
        c.require_rank(x, 1)
        a, b = _normalized_plane(x, a, b)
        sq, divisor = _safe_sq_norm(a)
        violation = _dot(a, x) - b
        # Written as "inactive" so that a NaN violation propagates instead of being
        # silently treated as feasible.
        inactive = tf.logical_or(violation < 0, tf.equal(sq, 0))
        step = tf.where(inactive, tf.zeros_like(violation), violation / divisor)
        return c.restore_dtype(x - step * a, original)


def projection_affine_set(x, A, b):
    """Projection onto the affine set {y : A y = b}.

    `y = x - A^T (A A^T)^{-1} (A x - b)`, computed stably from a thin QR of `A^T`
    (`A^T = Q R`): `y = x - Q (Q^T x) + Q R^{-T} b`, which avoids squaring the
    condition number. Smooth in `(x, A, b)`; gradients are autodiff through QR and
    the triangular solve.

    Args:
      x: floating tensor `(..., n)`.
      A: matrix `(m, n)` or batched `(..., m, n)` broadcastable against the batch of
        `x`, with `m <= n` and full row rank (the set must be non-empty).
      b: right-hand side `(m,)` or `(..., m)`, broadcastable likewise.
    """
    with tf.name_scope("projection_affine_set"):
        x, original = c.upcast_half(c.as_float_tensor(x))
        c.require_rank(x, 1)
        A = c.as_param(A, x.dtype, "A", c.finite)
        b = c.as_param(b, x.dtype, "b", c.finite)
        if A.shape.rank is not None and A.shape.rank < 2:
            raise ValueError(f"`A` must have rank >= 2 (m, n). Received: A.shape={A.shape}")
        m, n = A.shape[-2], A.shape[-1]
        if n is not None and x.shape[-1] is not None and n != x.shape[-1]:
            raise ValueError(
                f"`A` must have as many columns as `x` has entries. "
                f"Received: A.shape={A.shape}, x.shape={x.shape}"
            )
        if m is not None and n is not None and m > n:
            raise ValueError(
                f"`A` must have at most as many rows as columns (full row rank). "
                f"Received: A.shape={A.shape}"
            )
        # {A y = b} = {(A/k) y = b/k}: with k a power of two near max|A| the QR's
        # Householder norms neither over- nor underflow (gradients are unchanged,
        # the set does not depend on k).
        k = c.power_of_two_scale(tf.reduce_max(tf.abs(A), axis=[-2, -1]))
        k = tf.stop_gradient(k)[..., tf.newaxis]
        A = A / k[..., tf.newaxis]
        b = b / k
        q, r = tf.linalg.qr(tf.linalg.matrix_transpose(A))  # A^T = Q R, Q: (n, m)
        qtx = tf.linalg.matvec(q, x, transpose_a=True)
        # R^{-T} b: lower-triangular solve with R^T.
        w = tf.linalg.triangular_solve(r, b[..., tf.newaxis], lower=False, adjoint=True)
        return c.restore_dtype(x - tf.linalg.matvec(q, qtx - w[..., 0]), original)
