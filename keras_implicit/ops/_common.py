"""Shared helpers for the projection and prox ops: dtype resolution, parameters, norms.

Every public op resolves one floating dtype from `x` up front and casts its set
parameters to it, so float32 and float64 inputs never mix silently.
"""

from __future__ import annotations

import functools
import numbers
import os

import numpy as np
import tensorflow as tf

from keras_implicit import _structure, _validation
from keras_implicit._structure import row_sum


def as_float_tensor(x, name: str = "x") -> tf.Tensor:
    """Converts `x` to a floating tensor.

    Python / numpy input that is integral is promoted to float32 (a convenience for
    literals such as `[1, 2, 3]`); a *tensor* of a non-floating dtype is rejected,
    since silently changing the dtype of a graph value hides bugs.
    """
    if tf.is_tensor(x) or isinstance(x, tf.Variable):
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            raise TypeError(
                f"`{name}` must be a floating-point tensor. Received: {name}.dtype={x.dtype.name}"
            )
        return x
    # No dtype_hint: it would silently turn numpy float64 into float32.
    x = tf.convert_to_tensor(np.asarray(x) if isinstance(x, np.generic) else x)
    if x.dtype.is_integer or x.dtype == tf.bool:
        x = tf.cast(x, tf.float32)
    if not x.dtype.is_floating:
        raise TypeError(f"`{name}` must be floating-point. Received: {name}.dtype={x.dtype.name}")
    return x


def require_rank(x: tf.Tensor, min_rank: int, name: str = "x") -> None:
    rank = x.shape.rank
    if rank is not None and rank < min_rank:
        raise ValueError(f"`{name}` must have rank >= {min_rank}. Received: {name}.shape={x.shape}")


def _check_array(name: str, value, check) -> None:
    """Applies a scalar check to every entry of a Python/numpy value (vectorized)."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        check(name, float(arr))
        return
    predicate, phrase = _ELEMENTWISE[check.__name__]
    if not np.all(predicate(arr)):
        shown = value.tolist() if isinstance(value, np.ndarray) else value
        raise ValueError(f"Every entry of `{name}` must be {phrase}. Received: {name}={shown!r}")


def as_param(value, dtype: tf.DType, name: str, check=None) -> tf.Tensor:
    """Converts a set parameter to a tensor of `dtype`, differentiably.

    Python numbers, lists and numpy arrays are validated eagerly with `check` (a
    function of `keras_implicit._validation`); tensors and variables are only cast
    (checking their values would force a device sync and is impossible in a graph).
    """
    if value is None:
        raise ValueError(f"`{name}` is required. Received: {name}=None")
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a number or a tensor. Received: {name}={value!r}")
    if tf.is_tensor(value) or isinstance(value, tf.Variable):
        value = tf.convert_to_tensor(value)
        if not (value.dtype.is_floating or value.dtype.is_integer):
            raise TypeError(
                f"`{name}` must be a real tensor. Received: {name}.dtype={value.dtype.name}"
            )
        return tf.cast(value, dtype)
    if isinstance(value, numbers.Real):
        if check is not None:
            check(name, value)
        return tf.constant(value, dtype=dtype)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a number, an array or a tensor. Received: {name}={value!r}"
        ) from None
    if check is not None:
        _check_array(name, arr, check)
    return tf.constant(arr, dtype=dtype)


def non_negative(name, value):
    return _validation.non_negative_float(name, value)


def positive(name, value):
    return _validation.positive_float(name, value)


def finite(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number. Received: {name}={value!r}")
    return float(value)


def per_vector(param: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """Broadcasts a one-number-per-vector parameter to shape `x.shape[:-1] + [1]`.

    The parameter must be broadcastable to the batch shape `x.shape[:-1]`. Using an
    explicit `tf.broadcast_to` lets autodiff sum the gradient back to the
    parameter's own shape, so the custom gradients below can work elementwise.
    """
    target = tf.concat([tf.shape(x)[:-1], [1]], axis=0)
    return tf.broadcast_to(param[..., tf.newaxis], target)


DEVICE_BRANCH_ENV = "KERAS_IMPLICIT_DEVICE_BRANCH"
_DEVICE_BRANCHES = ("auto", "accelerator", "cpu")
# Tests set this to "accelerator" or "cpu"; None defers to the environment variable.
_device_branch_override = None


@functools.cache
def _device_branch_setting() -> str:
    """KERAS_IMPLICIT_DEVICE_BRANCH (auto, accelerator or cpu), read once per process."""
    value = os.environ.get(DEVICE_BRANCH_ENV, "auto").strip().lower() or "auto"
    if value not in _DEVICE_BRANCHES:
        raise ValueError(
            f"{DEVICE_BRANCH_ENV} must be one of {list(_DEVICE_BRANCHES)}. "
            f"Received: {DEVICE_BRANCH_ENV}={value!r}"
        )
    return value


def accelerator_branch() -> bool:
    """Whether the ops take the code paths written for GPUs/TPUs.

    "auto" follows the visible devices; "accelerator" forces those paths on a CPU
    (so both branches can run in tests); "cpu" forces the CPU paths where they are
    exact (float32 sums stay reductions on a GPU/TPU, see `_structure.row_sum`).
    """
    setting = _device_branch_override or _device_branch_setting()
    if setting == "auto":
        return _structure._accelerator_visible()
    return setting == "accelerator"


def sum_last(v: tf.Tensor) -> tf.Tensor:
    """Sum over the last axis, keeping it.

    CPU branch: a product with a column of ones (`_structure.row_sum`), as fast under
    XLA on CPU as jax's sum. Accelerator branch: a reduction, except in float64,
    where matrix products are exact on every device.
    """
    if accelerator_branch() and v.dtype != tf.float64:
        return tf.reduce_sum(v, axis=-1, keepdims=True)
    return row_sum(v, keepdims=True)


def safe_norm(x: tf.Tensor) -> tf.Tensor:
    """Euclidean norm over the last axis (kept) whose gradient at 0 is 0, not NaN.

    `sqrt` has an infinite derivative at 0; clamping the squared norm at the
    smallest normal number keeps every derivative finite, and the clamp's own
    derivative is zero there, so masked-out branches contribute exact zeros.
    """
    sq = sum_last(tf.square(x))
    return tf.sqrt(tf.maximum(sq, np.finfo(x.dtype.as_numpy_dtype).tiny))


def power_of_two_scale(m: tf.Tensor) -> tf.Tensor:
    """A power of two within a factor of 2 of `m` (1 where `m` is 0 or not finite).

    Dividing by it is exact, so homogeneous ops can work on O(1) values (no squares
    that overflow at 1e20 or underflow at 1e-20 in float32) and scale back exactly.
    """
    info = np.finfo(m.dtype.as_numpy_dtype)
    ok = tf.logical_and(m > 0, tf.math.is_finite(m))
    safe = tf.where(ok, m, tf.ones_like(m))
    exponent = tf.clip_by_value(
        tf.round(tf.math.log(safe) / np.log(2.0)), float(info.minexp), float(info.maxexp - 1)
    )
    return tf.pow(tf.constant(2.0, m.dtype), exponent)


def max_abs_scale(x: tf.Tensor) -> tf.Tensor:
    """`power_of_two_scale` of max|x| over the last axis (kept), without gradient."""
    return tf.stop_gradient(power_of_two_scale(tf.reduce_max(tf.abs(x), axis=-1, keepdims=True)))


def unit_and_norm(x: tf.Tensor):
    """(x/||x||, ||x||) over the last axis (norm kept), free of over/underflow.

    Both come from x/m with m a power of two near max|x|, so the squares are O(1).
    The unit vector is 0 where x = 0 and its gradient stays finite there (the
    squared norm is clamped at the smallest normal number, as in `safe_norm`). The
    norm is for comparisons (no gradient); it is inf only if the true norm exceeds
    the largest float.
    """
    tiny = np.finfo(x.dtype.as_numpy_dtype).tiny

    def direct():
        return x * tf.math.rsqrt(sq), tf.sqrt(sq)

    def rescaled():
        m = max_abs_scale(x)
        xs = x / m
        sq_s = sum_last(tf.square(xs))
        unit = xs * tf.math.rsqrt(tf.maximum(sq_s, tiny))
        # After the rescaling sq_s <= 4n, so it is infinite only for an infinite entry:
        # that row's direction is undefined and becomes NaN as a whole.
        unit = tf.where(
            tf.math.is_finite(sq_s), unit, tf.fill(tf.shape(unit), tf.constant(np.nan, x.dtype))
        )
        return unit, m * tf.sqrt(sq_s)

    # Rescaling costs a max-reduction, which XLA runs slowly on CPU; it is needed only
    # where the plain squared norm over- or underflows (or is 0, or not finite). Above
    # sqrt(tiny), squares lost to underflow change it by at most n * sqrt(tiny) relative.
    sq = sum_last(tf.square(x))
    plain = tf.reduce_all(tf.math.is_finite(sq) & (sq >= np.sqrt(tiny)))
    unit, norm = tf.cond(plain, direct, rescaled)
    return unit, tf.stop_gradient(norm)


def upcast_half(x: tf.Tensor):
    """float16/bfloat16 inputs are computed in float32 (eigh and exp need the range)."""
    if x.dtype in (tf.float16, tf.bfloat16):
        return tf.cast(x, tf.float32), x.dtype
    return x, None


def finite_or_inf(name, value):
    """Any number but NaN (box bounds may be infinite)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or np.isnan(value):
        raise ValueError(f"`{name}` must be a number (not NaN). Received: {name}={value!r}")
    return float(value)


def restore_dtype(y: tf.Tensor, original):
    return y if original is None else tf.cast(y, original)


def graph_when_eager(fn):
    """Runs `fn` as a traced graph function when called eagerly, inline otherwise.

    The iterative ops (root finding, threshold search) would dispatch hundreds of
    small eager ops; tracing them once is much faster. Inside an outer tf.function
    or XLA computation the plain Python function is inlined instead, so the static
    shapes of the surrounding graph are kept (a relaxed-shape graph function would
    return tensors of unknown rank, which Keras shape inference cannot use).
    """
    # One graph per device branch: a trace holds the branch it was traced with.
    graphs = {}

    @functools.wraps(fn)
    def wrapper(*args):
        if not tf.executing_eagerly():
            return fn(*args)
        branch = accelerator_branch()
        if branch not in graphs:
            graphs[branch] = tf.function(fn, autograph=False, reduce_retracing=True)
        return graphs[branch](*args)

    return wrapper


# Vectorized forms of the checks above, for arrays (NaN fails every one of them).
_ELEMENTWISE = {
    "non_negative": (lambda a: a >= 0, "a non-negative number"),
    "positive": (lambda a: a > 0, "a positive number"),
    "finite": (np.isfinite, "a finite number"),
    "finite_or_inf": (lambda a: ~np.isnan(a), "a number (not NaN)"),
}
