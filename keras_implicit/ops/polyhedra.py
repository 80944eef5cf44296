"""Projections onto polyhedra: the box section and a general polyhedron (through the QP).

Box section {y : lower <= y <= upper, w^T y = c}: the projection is
`y(tau) = clip(x - tau w, lower, upper)` with tau the root of the non-increasing,
piecewise-linear scalar dual g(tau) = w^T y(tau) - c. The root is exact: a
bisection on tau, stopped once no breakpoint of g (where a coordinate meets a
bound) lies inside the bracket, finds the linear piece holding the root (O(n) per
step, about log2(n) steps on typical data), and on that piece
tau = (sum_F w_i x_i + sum_{not F} w_i y_i - c) / sum_F w_i^2, with F the free
coordinates. Gradients are the autodiff of that formula on the identified pieces
(masks held fixed), so they are exact and forward mode works too.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_implicit.ops import _common as cm
from keras_implicit.ops.projections import _check_ordered, projection_box

__all__ = ["projection_box_section", "projection_polyhedron"]


def _breakpoints(x, lo, hi, w):
    """Values of tau where a coordinate meets a bound, and which of them exist."""
    nonzero = tf.not_equal(w, 0)
    safe_w = tf.where(nonzero, w, tf.ones_like(w))
    points, valid = [], []
    for bound in (lo, hi):
        t = (x - bound) / safe_w
        keep = tf.logical_and(nonzero, tf.math.is_finite(t))
        points.append(tf.where(keep, t, tf.zeros_like(t)))
        valid.append(keep)
    return tf.concat(points, axis=-1), tf.concat(valid, axis=-1)


def _dual(t, x, lo, hi, w, target):
    """g(t) = w^T clip(x - t w, lo, hi) - c, for t of shape (..., 1)."""
    return cm.sum_last(w * tf.clip_by_value(x - t * w, lo, hi)) - target


# Bisection steps at most; a row stops as soon as no breakpoint lies inside its
# bracket (typically after about log2(n) steps).
_MAX_BISECTIONS = 160


@cm.graph_when_eager  # the bisection loop is slow as eager ops
def _segment_point(x, lo, hi, w, target):
    """A point inside the linear piece of g that holds the root, and the piece's ends.

    Bisection on tau between the smallest and the largest breakpoint, until no
    breakpoint lies strictly inside the bracket (O(n) per step, no sort: XLA's CPU
    sort costs more than the whole search).
    """
    bp, valid = _breakpoints(x, lo, hi, w)
    inf = tf.constant(np.inf, x.dtype)
    exists = tf.reduce_any(valid, axis=-1, keepdims=True)
    first = tf.where(exists, tf.reduce_min(tf.where(valid, bp, inf), -1, keepdims=True), 0)
    last = tf.where(exists, tf.reduce_max(tf.where(valid, bp, -inf), -1, keepdims=True), 0)
    below = _dual(first, x, lo, hi, w, target) < 0  # the root is left of every breakpoint
    above = _dual(last, x, lo, hi, w, target) >= 0  # ... or right of them (or the last)
    searching = exists & ~below & ~above

    def straddled(low, high):
        inside = valid & (bp > low) & (bp < high)
        return tf.reduce_any(inside, axis=-1, keepdims=True) & searching

    def body(i, low, high):
        mid = 0.5 * low + 0.5 * high
        up = _dual(mid, x, lo, hi, w, target) >= 0
        return i + 1, tf.where(up, mid, low), tf.where(up, high, mid)

    def cond(i, low, high):
        return (i < _MAX_BISECTIONS) & tf.reduce_any(straddled(low, high))

    _, low, high = tf.while_loop(cond, body, (tf.constant(0), first, last))
    left = tf.where(below | ~exists, -inf, tf.where(above, last, low))
    right = tf.where(above | ~exists, inf, tf.where(below, first, high))
    one = tf.ones_like(left)
    point = tf.where(
        tf.math.is_finite(left) & tf.math.is_finite(right),
        0.5 * left + 0.5 * right,
        tf.where(
            tf.math.is_finite(left),
            left + one + tf.abs(left),
            tf.where(tf.math.is_finite(right), right - one - tf.abs(right), tf.zeros_like(left)),
        ),
    )
    return point, left, right


@tf.autograph.experimental.do_not_convert  # no Python control flow on tensors
def projection_box_section(x, lower, upper, w, c=0.0):
    """Projection onto the box section {y : lower <= y <= upper, w^T y = c}.

    jaxopt's `projection_box_section`. Exact (see the module docstring); w may have
    entries of any sign and zeros.

    Args:
      x: floating tensor `(..., n)`.
      lower, upper: bounds broadcastable against `x` (may be infinite), lower <= upper.
      w: weight vector broadcastable against `x`.
      c: the value of `w^T y`, number or tensor broadcastable to `x.shape[:-1]`.

    Returns:
      Tensor like `x`. Rows where the section is empty (c outside the range of
      `w^T y` over the box) and rows with a NaN or infinite entry are NaN.
      Gradient: with F the coordinates strictly between their bounds,
      y_F = x_F - tau w_F and the others sit on their bound; exact derivatives of
      that solution w.r.t. `x`, the bounds, `w` and `c` (a coordinate exactly on a
      bound counts as on the bound, unless no coordinate is free: then those at a
      bound with w_i != 0 are taken as free).
    """
    with tf.name_scope("projection_box_section"):
        x, original = cm.upcast_half(cm.as_float_tensor(x))
        cm.require_rank(x, 1)
        lo = cm.as_param(lower, x.dtype, "lower", cm.finite_or_inf)
        hi = cm.as_param(upper, x.dtype, "upper", cm.finite_or_inf)
        _check_ordered(lower, upper)
        w = cm.as_param(w, x.dtype, "w", cm.finite)
        target = cm.per_vector(cm.as_param(c, x.dtype, "c", cm.finite), x)
        shape = tf.shape(x + lo + hi + w)
        lo, hi, w = (tf.broadcast_to(v, shape) for v in (lo, hi, w))
        x = tf.broadcast_to(x, shape)
        target = tf.broadcast_to(target, tf.concat([shape[:-1], [1]], 0))
        # the search works on rows: (rows, n)
        x, lo, hi, w = (tf.reshape(v, tf.stack([-1, shape[-1]])) for v in (x, lo, hi, w))
        y = _box_section(x, lo, hi, w, tf.reshape(target, [-1, 1]))
        return cm.restore_dtype(tf.reshape(y, shape), original)


def _box_section(x, lo, hi, w, target):
    stopped = [tf.stop_gradient(v) for v in (x, lo, hi, w, target)]
    xs, los, his, ws, _ = stopped
    point, left, right = (tf.stop_gradient(v) for v in _segment_point(*stopped))
    inner = xs - point * ws
    free = (inner > los) & (inner < his) & tf.not_equal(ws, 0)
    no_free = tf.logical_not(tf.reduce_any(free, axis=-1, keepdims=True))
    # No free coordinate on the piece: the root is a breakpoint (its finite end);
    # the coordinates meeting a bound there are the free ones.
    end = tf.where(tf.math.is_finite(left), left, right)
    at_end = xs - end * ws
    loose = (at_end >= los) & (at_end <= his) & tf.not_equal(ws, 0)
    free = tf.where(no_free, loose, free)
    fixed_value = projection_box(x - point * w, lo, hi)
    num = cm.sum_last(tf.where(free, w * x, w * fixed_value)) - target
    den = cm.sum_last(tf.where(free, w * w, tf.zeros_like(w)))
    ok = den > 0
    tau = num / tf.where(ok, den, tf.ones_like(den))
    y = tf.where(free, x - tau * w, projection_box(x - tau * w, lo, hi))
    # With no free coordinate g is constant on the piece: the section is empty
    # unless g vanishes there (c is then the extreme value of w^T y over the box).
    g = _dual(point, xs, los, his, ws, tf.stop_gradient(target))
    slack = (
        4
        * np.finfo(x.dtype.as_numpy_dtype).eps
        * (cm.sum_last(tf.abs(ws * fixed_value)) + tf.abs(target))
    )
    empty = tf.logical_and(no_free, tf.stop_gradient(tf.abs(g) > slack))
    # Like the other row-coupled ops, a row with a NaN or infinite entry is NaN.
    finite_row = tf.reduce_all(tf.math.is_finite(xs), axis=-1, keepdims=True)
    feasible = ok & tf.math.is_finite(tau) & tf.logical_not(empty) & finite_row
    return tf.where(feasible, y, tf.fill(tf.shape(y), tf.constant(np.nan, y.dtype)))


def projection_polyhedron(x, A=None, b=None, G=None, h=None, **qp_settings):
    """Projection onto the polyhedron {y : A y = b, G y <= h}, through the QP layer.

    Solves min 1/2 ||y - x||^2 s.t. A y = b, G y <= h with
    `keras_implicit.layers.QuadraticProgram` (ADMM with polishing; implicit KKT
    gradients w.r.t. `x`, `A`, `b`, `G`, `h`). A thin function: every call builds a
    layer, so inside a training step prefer a `QuadraticProgram` layer with `Q = I`.

    Args:
      x: floating tensor `(..., n)`.
      A, b: equality constraints `(p, n)`, `(p,)` (or batched `(..., p, n)`,
        `(..., p)`), or None. G, h: inequality constraints `(m, n)`, `(m,)` (or
        batched), or None. At least one pair is needed.
      **qp_settings: keyword arguments of `QuadraticProgram` (tol, max_iter, rho,
        on_failure, ...).

    Returns:
      Tensor like `x`. Rows the QP does not solve (infeasible set) are reported under
      `on_failure` (default "warn") as by the layer.
    """
    from keras_implicit.layers.qp import QuadraticProgram  # the layers import the ops

    with tf.name_scope("projection_polyhedron"):
        x = cm.as_float_tensor(x)
        cm.require_rank(x, 1)
        if (A is None) != (b is None) or (G is None) != (h is None):
            raise ValueError(
                "`A` and `b` (and `G` and `h`) come as pairs. "
                f"Received: A={A is not None}, b={b is not None}, "
                f"G={G is not None}, h={h is not None}"
            )
        if A is None and G is None:
            raise ValueError(
                "Give equality (A, b) or inequality (G, h) constraints. Received: none"
            )
        n = tf.shape(x)[-1]
        batch = tf.shape(x)[:-1]
        rows = tf.reduce_prod(batch)
        inputs = {"Q": None, "q": tf.reshape(-x, tf.stack([rows, n]))}
        eye = tf.eye(n, dtype=x.dtype)
        inputs["Q"] = tf.broadcast_to(eye, tf.stack([rows, n, n]))
        for mat_name, vec_name, mat, vec in (("A", "b", A, b), ("G", "h", G, h)):
            if mat is None:
                continue
            mat = cm.as_param(mat, x.dtype, mat_name, cm.finite)
            vec = cm.as_param(vec, x.dtype, vec_name, cm.finite)
            k = tf.shape(mat)[-2]
            mat = tf.broadcast_to(mat, tf.concat([batch, [k, n]], 0))
            vec = tf.broadcast_to(vec, tf.concat([batch, [k]], 0))
            inputs[mat_name] = tf.reshape(mat, tf.stack([rows, k, n]))
            inputs[vec_name] = tf.reshape(vec, tf.stack([rows, k]))
        layer = QuadraticProgram(dtype=x.dtype.name, **qp_settings)
        y = layer(inputs)
        return tf.reshape(y, tf.shape(x))
