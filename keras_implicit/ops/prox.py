"""Proximal operators of common penalties.

prox_{scaling * g}(x) = argmin_y 1/2||y - x||^2 + scaling * g(y).

Every op takes the penalty strength(s) and a `scaling` (the step size of a proximal
gradient method); only their product matters. Strengths and `scaling` may be Python
numbers (validated non-negative) or tensors broadcastable against `x` (per
coordinate), except in `prox_group_lasso`, where they are one number per vector.
Gradients flow to `x`, the strengths and `scaling` through autodiff of the closed
forms below, written with explicit masks so the element of the Clarke Jacobian at a
kink is the documented one: a threshold met with equality counts as active (the
output is clamped there), e.g. soft-thresholding has derivative 0 at |x| = lambda.
"""

from __future__ import annotations

import tensorflow as tf

from keras_implicit.ops import _common as c

__all__ = [
    "prox_elastic_net",
    "prox_group_lasso",
    "prox_lasso",
    "prox_non_negative_lasso",
    "prox_non_negative_ridge",
    "prox_ridge",
]


def _strength(value, x, name):
    return c.as_param(value, x.dtype, name, c.non_negative)


def _soft_threshold(x, lam):
    """sign(x) max(|x| - lam, 0), derivative 0 at |x| == lam; NaN propagates."""
    killed = tf.abs(x) <= lam
    shrunk = x - tf.where(x > 0, lam, -lam)
    return tf.where(killed, tf.zeros_like(shrunk), shrunk)


def prox_lasso(x, l1reg=1.0, scaling=1.0):
    """Soft-thresholding: argmin_y 1/2||y - x||^2 + scaling * l1reg * ||y||_1.

    Solution `sign(x) * max(|x| - scaling * l1reg, 0)`. Derivative w.r.t. `x`: 1 where
    `|x| > lambda`, 0 where `|x| <= lambda`; w.r.t. `lambda = scaling * l1reg`:
    `-sign(x)` where `|x| > lambda`.

    Args:
      x: floating tensor of any shape.
      l1reg, scaling: non-negative numbers or tensors broadcastable against `x`.
    """
    with tf.name_scope("prox_lasso"):
        x = c.as_float_tensor(x)
        lam = _strength(l1reg, x, "l1reg") * _strength(scaling, x, "scaling")
        return _soft_threshold(x, lam)


def prox_non_negative_lasso(x, l1reg=1.0, scaling=1.0):
    """argmin_{y >= 0} 1/2||y - x||^2 + scaling * l1reg * sum(y).

    Solution `max(x - scaling * l1reg, 0)`; derivative 1 w.r.t. `x` (and -1 w.r.t.
    `scaling * l1reg`) where `x > scaling * l1reg`, else 0.

    Args:
      x: floating tensor of any shape.
      l1reg, scaling: non-negative numbers or tensors broadcastable against `x`.
    """
    with tf.name_scope("prox_non_negative_lasso"):
        x = c.as_float_tensor(x)
        lam = _strength(l1reg, x, "l1reg") * _strength(scaling, x, "scaling")
        return tf.nn.relu(x - lam)


def prox_ridge(x, l2reg=1.0, scaling=1.0):
    """argmin_y 1/2||y - x||^2 + scaling * l2reg / 2 * ||y||^2 = x / (1 + scaling * l2reg).

    Smooth; exact autodiff. (Note the 1/2 in the penalty: `l2reg` is the curvature.)

    Args:
      x: floating tensor of any shape.
      l2reg, scaling: non-negative numbers or tensors broadcastable against `x`.
    """
    with tf.name_scope("prox_ridge"):
        x = c.as_float_tensor(x)
        lam = _strength(l2reg, x, "l2reg") * _strength(scaling, x, "scaling")
        return x / (1.0 + lam)


def prox_non_negative_ridge(x, l2reg=1.0, scaling=1.0):
    """argmin_{y >= 0} 1/2||y - x||^2 + scaling * l2reg / 2 * ||y||^2.

    Solution `max(x, 0) / (1 + scaling * l2reg)` (jaxopt's `prox_non_negative_ridge`).
    Derivative w.r.t. `x`: `1 / (1 + lambda)` where `x > 0`, 0 where `x <= 0`
    (relu'(0) = 0); w.r.t. `lambda = scaling * l2reg`: `-max(x, 0) / (1 + lambda)^2`.

    Args:
      x: floating tensor of any shape.
      l2reg, scaling: non-negative numbers or tensors broadcastable against `x`.
    """
    with tf.name_scope("prox_non_negative_ridge"):
        x = c.as_float_tensor(x)
        lam = _strength(l2reg, x, "l2reg") * _strength(scaling, x, "scaling")
        return tf.nn.relu(x) / (1.0 + lam)


def prox_elastic_net(x, l1reg=1.0, l2reg=1.0, scaling=1.0):
    """argmin_y 1/2||y - x||^2 + scaling * (l1reg ||y||_1 + l2reg / 2 ||y||^2).

    Solution `prox_lasso(x, l1reg, scaling) / (1 + scaling * l2reg)`; the kink
    convention is that of `prox_lasso`.

    Args:
      x: floating tensor of any shape.
      l1reg, l2reg, scaling: non-negative numbers or tensors broadcastable against `x`.
    """
    with tf.name_scope("prox_elastic_net"):
        x = c.as_float_tensor(x)
        s = _strength(scaling, x, "scaling")
        l1 = _strength(l1reg, x, "l1reg")
        l2 = _strength(l2reg, x, "l2reg")
        return _soft_threshold(x, s * l1) / (1.0 + s * l2)


def prox_group_lasso(x, l2reg=1.0, scaling=1.0):
    """Block soft-thresholding: argmin_y 1/2||y - x||^2 + scaling * l2reg * ||y||_2.

    Each vector along the last axis is one group (reshape to `(..., groups, size)`
    for several groups per sample). Solution `max(1 - lambda/||x||, 0) x` with
    `lambda = scaling * l2reg`. Jacobian where `||x|| > lambda`:
    `(1 - lambda/||x||) I + lambda x x^T/||x||^3`; 0 where `||x|| <= lambda`
    (including x = 0, without NaN).

    Args:
      x: floating tensor `(..., n)`.
      l2reg, scaling: non-negative numbers or tensors broadcastable to `x.shape[:-1]`.
    """
    with tf.name_scope("prox_group_lasso"):
        x = c.as_float_tensor(x)
        c.require_rank(x, 1)
        lam = c.per_vector(_strength(l2reg, x, "l2reg") * _strength(scaling, x, "scaling"), x)
        killed = tf.sqrt(c.sum_last(tf.square(x))) <= lam
        factor = tf.where(killed, tf.zeros_like(lam), 1.0 - lam / c.safe_norm(x))
        return factor * x
