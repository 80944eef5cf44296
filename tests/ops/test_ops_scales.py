"""Every projection at every scale: 1e-30 .. 1e30 in float32 and float64.

Each op is run on x = s * x1 (x1 of unit scale) in both dtypes and compared with a
float64 reference evaluated on the rescaled problem: a projection is positively
homogeneous in (x, set parameters), P(s x; p) = s P(x; p / s), and its Jacobian is
0-homogeneous, J(s x; p) = J(x; p / s). Two parameter regimes:

* "scaled": the set parameters (radius, value, bounds, offsets) scale with x, so the
  rescaled problem is the unit one;
* "fixed": the parameters keep their unit-scale values while x grows or shrinks, so
  the rescaled problem has a tiny or huge radius/value (1e-30 with |x| ~ 1, ...).
  A naive float32 simplex threshold returns all zeros here.

Checked: finiteness of the output and of the Jacobian, feasibility, agreement with
the reference (hence optimality: projections onto convex sets are unique), and the
Jacobian (tape.batch_jacobian in the op's dtype) against central finite differences
of the float64 reference on the rescaled problem. The references are numpy closed
forms and the textbook sort-based simplex formula, applied to max-shifted input
(the simplex projection is invariant to adding a constant to x), plus mpmath for the
exponential cone.
"""

import functools
import zlib

import numpy as np
import ops_reference as ref
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keras_implicit.ops as ops

# The extreme scales run by default, the middle ones in the slow sweep.
SCALES = [1e-30, 1e30] + [pytest.param(s, marks=pytest.mark.slow) for s in (1e-10, 1.0, 1e10)]
DTYPES = [np.float32, np.float64]
# Value tolerance relative to the row's scale, Jacobian tolerance relative to the
# Jacobian's largest entry: a few ulps of each dtype times the dimension.
VALUE_TOL = {np.float32: 3e-6, np.float64: 1e-13}
JAC_TOL = {np.float32: 2e-4, np.float64: 1e-7}

N = 6
A_VEC = np.array([1.0, -2.0, 0.5, 0.0, 1.5, -0.7])
A_MAT = np.array([[1.0, 2.0, 0.0, -1.0, 0.5, 0.3], [0.0, 1.0, 1.0, 1.0, -2.0, 0.4]])
B_MAT = np.array([0.3, -1.2])
LOWER = np.array([-1.0, -0.5, 0.0, -2.0, 0.3, -0.1])
UPPER = np.array([1.0, 0.5, 0.2, 2.0, 0.4, 0.6])


# ------------------------------------------------------------------ references (float64)


def _simplex_ref(x, value):
    """Sort-based projection of x - max(x): exact for tiny values next to large x."""
    return ref.numpy_simplex(x - x.max(-1, keepdims=True), value)


def _l1_sphere_ref(x, radius):
    ax = np.abs(x)
    return np.where(x >= 0, 1.0, -1.0) * _simplex_ref(ax, radius)


def _l1_ball_ref(x, radius):
    inside = np.abs(x).sum(-1, keepdims=True) < radius
    return np.where(inside, x, _l1_sphere_ref(x, radius))


def _unit(x):
    m = np.abs(x).max(-1, keepdims=True)
    xs = x / np.where(m > 0, m, 1.0)
    return xs / np.linalg.norm(xs, axis=-1, keepdims=True), m * np.linalg.norm(
        xs, axis=-1, keepdims=True
    )


def _l2_ball_ref(x, radius):
    u, norm = _unit(x)
    return np.where(norm < radius, x, radius * u)


def _l2_sphere_ref(x, radius):
    return radius * _unit(x)[0]


def _hyperplane_ref(x, b):
    return x - ((x @ A_VEC) - b)[..., None] / (A_VEC @ A_VEC) * A_VEC


def _halfspace_ref(x, b):
    return x - np.maximum((x @ A_VEC) - b, 0)[..., None] / (A_VEC @ A_VEC) * A_VEC


def _affine_ref(x, A, b):
    residual = x @ A.T - b
    return x - np.linalg.solve(A @ A.T, residual[..., None])[..., 0] @ A


def _soc_ref(x):
    t, v = x[..., :1], x[..., 1:]
    s = np.linalg.norm(v, axis=-1, keepdims=True)
    boundary = 0.5 * (t + s) * np.concatenate([np.ones_like(t), v / s], axis=-1)
    return np.where(s <= -t, 0.0, np.where(s < t, x, boundary))


def _psd_ref(x):
    sym = 0.5 * (x + np.swapaxes(x, -1, -2))
    lam, vec = np.linalg.eigh(sym)
    return (vec * np.maximum(lam, 0)[..., None, :]) @ np.swapaxes(vec, -1, -2)


def _exp_ref(x):
    return np.stack([ref.exp_cone_projection_mp(row, digits=30) for row in x])


# name -> (op(x, **params), reference(x, **params), unit-scale params, row shape,
#          set_violation kind). Every parameter here scales with x.
CASES = {
    "non_negative": (
        lambda x: ops.projection_non_negative(x),
        lambda x: np.maximum(x, 0),
        {},
        (N,),
        "non_negative",
    ),
    "box": (
        lambda x, lower, upper: ops.projection_box(x, lower, upper),
        lambda x, lower, upper: np.clip(x, lower, upper),
        {"lower": LOWER, "upper": UPPER},
        (N,),
        "box",
    ),
    "hyperplane": (
        lambda x, b: ops.projection_hyperplane(x, A_VEC, b),
        _hyperplane_ref,
        {"b": 0.7},
        (N,),
        "hyperplane",
    ),
    "halfspace": (
        lambda x, b: ops.projection_halfspace(x, A_VEC, b),
        _halfspace_ref,
        {"b": 0.7},
        (N,),
        "halfspace",
    ),
    "affine_set": (
        lambda x, b: ops.projection_affine_set(x, A_MAT, b),
        lambda x, b: _affine_ref(x, A_MAT, b),
        {"b": B_MAT},
        (N,),
        "affine_set",
    ),
    "simplex": (
        lambda x, value: ops.projection_simplex(x, value),
        _simplex_ref,
        {"value": 0.8},
        (N,),
        "simplex",
    ),
    "sparsemax": (lambda x: ops.sparsemax(x), lambda x: _simplex_ref(x, 1.0), {}, (N,), "simplex"),
    "l1_ball": (
        lambda x, radius: ops.projection_l1_ball(x, radius),
        _l1_ball_ref,
        {"radius": 0.8},
        (N,),
        "l1_ball",
    ),
    "l1_sphere": (
        lambda x, radius: ops.projection_l1_sphere(x, radius),
        _l1_sphere_ref,
        {"radius": 0.8},
        (N,),
        "l1_sphere",
    ),
    "l2_ball": (
        lambda x, radius: ops.projection_l2_ball(x, radius),
        _l2_ball_ref,
        {"radius": 1.3},
        (N,),
        "l2_ball",
    ),
    "l2_sphere": (
        lambda x, radius: ops.projection_l2_sphere(x, radius),
        _l2_sphere_ref,
        {"radius": 1.3},
        (N,),
        "l2_sphere",
    ),
    "linf_ball": (
        lambda x, radius: ops.projection_linf_ball(x, radius),
        lambda x, radius: np.clip(x, -radius, radius),
        {"radius": 0.6},
        (N,),
        "linf_ball",
    ),
    "second_order_cone": (
        lambda x: ops.projection_second_order_cone(x),
        _soc_ref,
        {},
        (N,),
        "second_order_cone",
    ),
    "psd_cone": (lambda x: ops.projection_psd_cone(x), _psd_ref, {}, (3, 3), "psd_cone"),
    "exp_cone": (lambda x: ops.projection_exp_cone(x), _exp_ref, {}, (3,), "exp_cone"),
}
# Ops accurate relative to their output, however large x is: a simplex projection
# of value 0.8 is exact to float32 precision of 0.8 even when |x| ~ 1e30 (its
# absolute error is not allowed to be eps * |x|). Others are held to eps * |x|.
OUTPUT_RELATIVE = {
    "simplex",
    "sparsemax",
    "l1_ball",
    "l1_sphere",
    "l2_ball",
    "l2_sphere",
    "linf_ball",
    "box",
    "non_negative",
}
# the fixed (unscaled) data of the sets, for ref.set_violation
SET_DATA = {"hyperplane": {"a": A_VEC}, "halfspace": {"a": A_VEC}, "affine_set": {"A": A_MAT}}
# sparsemax's value is fixed at 1: its "scaled" regime would be projection_simplex.
_FIXED_ONLY = {"sparsemax"}
_PARAM_KINDS = sorted(k for k, case in CASES.items() if case[2] or k in _FIXED_ONLY)


def _unit_points(name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    row_shape = CASES[name][3]
    x = rng.normal(size=(4, *row_shape))
    if name == "second_order_cone":  # interior, polar and two general points
        s = np.linalg.norm(x[:, 1:], axis=-1)
        x[:, 0] = s * np.array([1.5, -1.5, 0.3, -0.4])
    if name == "halfspace":  # two rows on each side of the plane
        x[:2] += 3 * A_VEC
        x[2:] -= 3 * A_VEC
    return x


def _support_jacobian(y, signs=None):
    """diag(1_S) - 1_S 1_S^T/|S| (times D = diag(signs) on both sides)."""
    support = (y != 0).astype(float)
    jac = support[..., :, None] * np.eye(y.shape[-1]) - (
        support[..., :, None] * support[..., None, :] / support.sum(-1)[..., None, None]
    )
    if signs is not None:
        jac = signs[..., :, None] * jac * signs[..., None, :]
    return jac


def _radial_jacobian(x, radius):
    u, norm = _unit(x)
    eye = np.eye(x.shape[-1])
    return (radius / norm)[..., None] * (eye - u[..., :, None] * u[..., None, :])


def _l1_jacobian(x, y, radius):
    jac = _support_jacobian(y, np.where(x >= 0, 1.0, -1.0))
    inside = np.abs(x).sum(-1) < radius
    return np.where(inside[:, None, None], np.eye(x.shape[-1]), jac)


def _plane_jacobian(x, a, active):
    proj = np.eye(len(a)) - np.outer(a, a) / (a @ a)
    return np.where(active[:, None, None], proj, np.eye(len(a)))


# Closed-form Jacobians where the output can be far larger than x (a value or
# offset of 1e10 on the unit problem), so that finite differences would cancel.
ANALYTIC_JACOBIANS = {
    "simplex": lambda x, y, value: _support_jacobian(y),
    "sparsemax": lambda x, y: _support_jacobian(y),
    "l1_sphere": lambda x, y, radius: _support_jacobian(y, np.where(x >= 0, 1.0, -1.0)),
    "l1_ball": _l1_jacobian,
    "l2_sphere": lambda x, y, radius: _radial_jacobian(x, radius),
    "l2_ball": lambda x, y, radius: np.where(
        (_unit(x)[1] < radius)[..., None], np.eye(x.shape[-1]), _radial_jacobian(x, radius)
    ),
    "hyperplane": lambda x, y, b: _plane_jacobian(x, A_VEC, np.ones(len(x), bool)),
    "halfspace": lambda x, y, b: _plane_jacobian(x, A_VEC, x @ A_VEC > b),
    "affine_set": lambda x, y, b: np.broadcast_to(
        np.eye(N) - A_MAT.T @ np.linalg.solve(A_MAT @ A_MAT.T, A_MAT), (len(x), N, N)
    ),
}


def _fd_jacobian(fn, x, eps=1e-6):
    """Central differences of fn over each row of x: (batch, *row, *row)."""
    row_shape = x.shape[1:]
    jac = np.zeros((x.shape[0], *row_shape, *row_shape))
    for idx in np.ndindex(row_shape):
        step = np.zeros_like(x)
        step[(slice(None), *idx)] = eps
        jac[(Ellipsis, *idx)] = (fn(x + step) - fn(x - step)) / (2 * eps)
    return jac


@functools.cache
def _reference(name, param_factor):
    """(x1, P(x1; p * param_factor), J(x1; p * param_factor)) in float64."""
    _, ref_fn, params, _, _ = CASES[name]
    x1 = _unit_points(name)
    p = {k: np.asarray(v) * param_factor for k, v in params.items()}
    if name == "sparsemax":  # value 1 at scale s is value 1/s on the unit problem
        fn = functools.partial(_simplex_ref, value=param_factor)
    else:
        fn = functools.partial(ref_fn, **p)
    y1 = fn(x1)
    if name in ANALYTIC_JACOBIANS:
        return x1, y1, ANALYTIC_JACOBIANS[name](x1, y1, **p)
    return x1, y1, _fd_jacobian(fn, x1)


def _batch_jacobian(tape, y, x):
    """(batch, *row, *row) from one VJP per output entry (cheaper than pfor here)."""
    row_shape = tuple(y.shape[1:])
    jac = np.zeros((y.shape[0], *row_shape, *x.shape[1:]))
    for idx in np.ndindex(row_shape):
        cotangent = np.zeros(y.shape)
        cotangent[(slice(None), *idx)] = 1.0
        grad = tape.gradient(y, x, output_gradients=tf.constant(cotangent, y.dtype))
        jac[(slice(None), *idx)] = np.asarray(grad, np.float64)
    return jac


def _assert_below(err, tol):
    bad = ~(err <= tol)  # NaN is bad too
    assert not np.any(bad), f"errors {err[bad]} above {np.broadcast_to(tol, err.shape)[bad]}"


def _run(name, dtype, scale, fixed):
    op, _, params, _, kind = CASES[name]
    param_factor = 1.0 / scale if fixed else 1.0
    x1, y1, j1 = _reference(name, param_factor)
    x = tf.constant((x1 * scale).astype(dtype))
    given = {k: np.asarray(v) * (1.0 if fixed else scale) for k, v in params.items()}
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = op(x, **given)
    jac = _batch_jacobian(tape, y, x)
    y = np.asarray(y, np.float64)
    assert y.dtype == np.float64 and x.dtype == tf.as_dtype(dtype)
    assert np.all(np.isfinite(y)), y
    assert np.all(np.isfinite(jac))

    row_axes = tuple(range(1, y.ndim))
    row_scale = np.abs(y1).max(row_axes) * scale
    if name not in OUTPUT_RELATIVE:
        row_scale = np.maximum(row_scale, np.abs(x1).max(row_axes) * scale)
    row_scale = row_scale.reshape(-1, *([1] * (y.ndim - 1)))
    tol = VALUE_TOL[dtype] * row_scale
    _assert_below(np.abs(y - y1 * scale), tol + np.finfo(dtype).tiny)
    # feasibility, with the parameters as given to the op
    if name == "sparsemax":
        given = {"value": 1.0}
    violation = ref.set_violation(kind, y, **given, **SET_DATA.get(name, {}))
    _assert_below(violation, tol.reshape(-1) + np.finfo(dtype).tiny)

    jac_scale = np.max(np.abs(j1))
    np.testing.assert_allclose(jac, j1, rtol=0, atol=JAC_TOL[dtype] * max(jac_scale, 1e-300))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(set(CASES) - _FIXED_ONLY))
def test_projection_with_parameters_scaled(name, dtype, scale):
    _run(name, dtype, scale, fixed=False)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", _PARAM_KINDS)
def test_projection_with_parameters_fixed(name, dtype, scale):
    """Huge x with a unit radius/value (and tiny x with a huge relative one)."""
    _run(name, dtype, scale, fixed=True)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_simplex_examples_from_the_issue(dtype):
    """Entries ~1e9 next to a value of 1: a naive float32 threshold x - tau loses the
    value entirely (sum 0, not 1)."""
    y = np.asarray(ops.projection_simplex(tf.constant([3e9, 2e9, 1e9], dtype)))
    np.testing.assert_array_equal(y, [1.0, 0.0, 0.0])
    y = np.asarray(ops.projection_simplex(tf.constant([3e9, 2e9, 1e9], dtype), 0.8))
    np.testing.assert_allclose(y, [0.8, 0.0, 0.0], rtol=1e-7)
    x = np.random.default_rng(0).normal(size=(3, 50)) * 1e9
    y = np.asarray(ops.projection_simplex(tf.constant(x, dtype)))
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
    x32 = np.asarray(tf.constant(x, dtype), np.float64)
    np.testing.assert_allclose(y, _simplex_ref(x32, 1.0), atol=1e-6)
    for op in (ops.projection_l1_ball, ops.projection_l1_sphere):
        y = np.asarray(op(tf.constant([-3e9, 2e9, 1e9], dtype), 0.8))
        np.testing.assert_allclose(y, [-0.8, 0.0, 0.0], rtol=1e-7)
    y = np.asarray(ops.sparsemax(tf.constant([[1e9, 1e9 - 64.0, 0.0]], dtype)))
    np.testing.assert_allclose(y, [[1.0, 0.0, 0.0]], rtol=1e-7)


# op(x, s): the projection with its parameter scaled by s (radius 1e38 at s = 1e38)
NEAR_MAX = {
    "simplex": lambda x, s: ops.projection_simplex(x, s),
    "l1_ball": lambda x, s: ops.projection_l1_ball(x, s),
    "l2_ball": lambda x, s: ops.projection_l2_ball(x, s),
    "l2_sphere": lambda x, s: ops.projection_l2_sphere(x, s),
    "hyperplane": lambda x, s: ops.projection_hyperplane(x, A_VEC[:4], 0.5 * s),
    "soc": lambda x, s: ops.projection_second_order_cone(x),
    "exp_cone": lambda x, s: ops.projection_exp_cone(x[:, :3]),
    "psd_cone": lambda x, s: ops.projection_psd_cone(tf.reshape(x, [-1, 2, 2])),
}


@pytest.mark.parametrize("name", sorted(NEAR_MAX))
def test_float32_near_the_largest_float(name):
    """Entries up to 1e38, whose squares, sums and differences overflow, give finite
    values and gradients equal to the rescaled float64 projection's."""
    op = NEAR_MAX[name]
    rng = np.random.default_rng(3)
    x1 = rng.uniform(-1, 1, size=(8, 4))
    x1 /= np.abs(x1).max(-1, keepdims=True)
    x = tf.constant(x1 * 1e38, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = op(x, 1e38)
        loss = tf.reduce_sum(y)
    grad = np.asarray(tape.gradient(loss, x), np.float64)
    assert np.all(np.isfinite(np.asarray(y))), np.asarray(y)
    assert np.all(np.isfinite(grad)), grad
    small = tf.constant(x1)
    with tf.GradientTape() as tape:
        tape.watch(small)
        expected = op(small, 1.0)
        loss = tf.reduce_sum(expected)
    expected_grad = np.asarray(tape.gradient(loss, small))
    expected = np.asarray(expected) * 1e38
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=0, atol=1e-5 * 1e38)
    np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_exp_cone_jacobian_finite_for_every_direction(dtype):
    """20000 random directions: the Jacobian is finite (a direct implicit formula
    overflows for roots rho ~ 100..2000, next to the region x <= 0, y <= 0)."""
    x = np.random.default_rng(1).normal(size=(20000, 3))
    x /= np.abs(x).max(-1, keepdims=True)
    xt = tf.constant(x, dtype)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(ops.projection_exp_cone(xt) * tf.constant([1.0, -2.0, 0.5], dtype))
    assert np.all(np.isfinite(np.asarray(tape.gradient(loss, xt))))


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_exp_cone_jacobian_next_to_the_special_region(dtype):
    """Points just right of x = 0 with y < 0 (roots rho of 126 and 2065): the
    Jacobian is diag(0, 0, 1) to within 1e-50, by central differences of the
    100-digit mpmath projection (a direct implicit formula gives d z / d x = 6e37
    in float64 here)."""
    pts = np.array([[0.00794681, -1.0, 0.09122577], [3.5173386e-04, -0.726139088, 1.0]])
    xt = tf.constant(pts, dtype)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        y = ops.projection_exp_cone(xt)
    jac = np.asarray(_batch_jacobian(tape, y, xt))
    np.testing.assert_allclose(jac, np.broadcast_to(np.diag([0.0, 0.0, 1.0]), jac.shape), atol=1e-6)
    fd = np.stack(
        [
            (
                ref.exp_cone_projection_mp(pts[0] + e, 100)
                - ref.exp_cone_projection_mp(pts[0] - e, 100)
            )
            / 2e-7
            for e in 1e-7 * np.eye(3)
        ],
        axis=-1,
    )
    np.testing.assert_allclose(jac[0], fd, atol=1e-6)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    st.integers(-30, 30),
    st.integers(-30, 30),
    hnp.arrays(np.float64, (3, 7), elements=st.floats(-1.0, 1.0, allow_subnormal=False)),
)
def test_simplex_family_at_random_scales(x_exponent, value_exponent, x1):
    """float32 projections onto the simplex and the l1 ball/sphere with |x| and the
    value each anywhere in 1e-30..1e30: exact against the shifted float64 reference,
    relative to the value."""
    value = 10.0**value_exponent
    x = tf.constant(x1 * 10.0**x_exponent, tf.float32)
    x64 = np.asarray(x, np.float64)
    for op, expected in (
        (ops.projection_simplex, _simplex_ref(x64, value)),
        (ops.projection_l1_sphere, _l1_sphere_ref(x64, value)),
        (ops.projection_l1_ball, _l1_ball_ref(x64, value)),
    ):
        y = np.asarray(op(x, value), np.float64)
        scale = np.maximum(np.abs(expected).max(-1, keepdims=True), np.finfo(np.float32).tiny)
        _assert_below(np.abs(y - expected), 1e-5 * scale)
