"""Box section, polyhedron, transport/Birkhoff polytopes, sparse simplex, non-negative ridge.

Values against cvxpy/Clarabel (float64; the sparse simplex, a non-convex set, against
enumeration of its supports), gradients against central finite differences, in both
device branches of the ops where the op sums along an axis.
"""

import itertools

import cvxpy as cp
import numpy as np
import ops_reference as ref
import pytest
import tensorflow as tf
from device_branches import device_branch  # noqa: F401 (fixture used by name)

import keras_implicit.ops as ops

RNG = np.random.default_rng(5)


def _np_fn(fn):
    return lambda *a: np.asarray(fn(*[tf.constant(v) for v in a]))


def _check_vjp(fn, args, wrts, atol=1e-6, jvp=True):
    for wrt in wrts:
        fd = ref.fd_jacobian(_np_fn(fn), args, wrt)
        vjp = ref.tf_vjp_jacobian(fn, args, wrt)
        np.testing.assert_allclose(vjp, fd, atol=atol, err_msg=f"VJP wrt arg {wrt}")
        if jvp:
            tangent = RNG.normal(size=np.shape(args[wrt]))
            got = ref.tf_jvp(fn, args, wrt, tangent)
            want = np.tensordot(fd, tangent, axes=np.ndim(tangent))
            np.testing.assert_allclose(got, want, atol=atol, err_msg=f"JVP wrt arg {wrt}")


# ------------------------------------------------------------------ box section

LOWER = np.array([-1.0, -0.5, -np.inf, -0.2, 0.0, -1.0])
UPPER = np.array([1.0, 0.5, 0.3, np.inf, 2.0, 1.0])
W = np.array([1.0, -2.0, 0.5, 1.5, 0.0, 1.0])


def _box_section_ref(x, c):
    lo, hi = np.maximum(LOWER, -1e9), np.minimum(UPPER, 1e9)  # cvxpy wants finite bounds
    return ref.cvx_project(x, lambda y: [y >= lo, y <= hi, W @ y == c])


@pytest.mark.usefixtures("device_branch")
def test_box_section_matches_cvxpy():
    inside = np.array([0.2, 0.1, -0.3, 0.4, 1.0, -0.5])
    c_inside = float(W @ inside)
    tie = inside.copy()
    tie[0] = 1.0  # exactly on a bound
    rows = [RNG.normal(size=6), 3 * RNG.normal(size=6), inside, tie, 1e3 * RNG.normal(size=6)]
    cs = [0.4, -1.1, c_inside, float(W @ tie), 2.0]
    x = np.stack(rows)
    y = np.asarray(ops.projection_box_section(x, LOWER, UPPER, W, np.array(cs)))
    for xi, ci, yi in zip(rows, cs, y):
        np.testing.assert_allclose(yi, _box_section_ref(xi, ci), atol=1e-7 * max(1, abs(xi).max()))
        np.testing.assert_allclose(W @ yi, ci, atol=1e-12 * max(1, abs(xi).max()))
    np.testing.assert_allclose(y[2], inside, atol=1e-15)  # points of the set are fixed
    # c at the largest value of w^T y over the box: the section is one point
    corner = np.where(W > 0, np.minimum(UPPER, 10.0), np.maximum(LOWER, -10.0))
    bounded_lo, bounded_hi = np.maximum(LOWER, -10.0), np.minimum(UPPER, 10.0)
    top = ops.projection_box_section(rows[0], bounded_lo, bounded_hi, W, float(W @ corner))
    np.testing.assert_allclose(W @ np.asarray(top), W @ corner, atol=1e-12)
    # c beyond it: empty section, NaN row; the other rows are unaffected
    both = ops.projection_box_section(x[:2], bounded_lo, bounded_hi, W, [0.4, 1e3])
    assert np.all(np.isnan(np.asarray(both)[1]))
    np.testing.assert_allclose(np.asarray(both)[0], y[0], atol=1e-14)


def test_box_section_bad_arguments():
    with pytest.raises(ValueError, match=r"Received: lower=1\.0, upper=0\.0"):
        ops.projection_box_section(np.ones((2, 3)), 1.0, 0.0, np.ones(3), 0.5)
    with pytest.raises(ValueError, match=r"Received: c=nan"):
        ops.projection_box_section(np.ones((2, 3)), 0.0, 1.0, np.ones(3), float("nan"))


def test_box_section_scale_invariance():
    # P(s x; s lower, s upper, w, s c) = s P(x; lower, upper, w, c), at 1e-12 .. 1e12
    x = RNG.normal(size=(2, 6))
    base = np.asarray(ops.projection_box_section(x, LOWER, UPPER, W, 0.4))
    for s in (1e-12, 1e12):
        scaled = np.asarray(ops.projection_box_section(s * x, s * LOWER, s * UPPER, W, s * 0.4))
        np.testing.assert_allclose(scaled, s * base, rtol=1e-12, atol=1e-14 * s)


def test_box_section_gradients_match_finite_differences():
    x = np.array([[0.3, -1.7, 2.2, -0.1, 0.7], [1.1, 0.2, -0.4, -3.0, 0.25]])
    lo = np.array([-1.0, -0.5, -0.3, -0.2, -2.0])
    hi = np.array([1.0, 0.5, 2.0, 0.3, 0.6])
    w = np.array([1.0, -2.0, 0.5, 1.5, 0.7])
    c = np.array([0.4, -0.3])
    _check_vjp(ops.projection_box_section, [x, lo, hi, w, c], [0, 1, 2, 3, 4])


def test_box_section_float32_and_modes():
    x = RNG.normal(size=(3, 6))
    want = np.asarray(ops.projection_box_section(x, LOWER, UPPER, W, 0.4))
    fn = tf.function(
        lambda v: ops.projection_box_section(v, LOWER, UPPER, W, 0.4),
        jit_compile=True,
        input_signature=[tf.TensorSpec([None, 6], tf.float32)],
    )
    got = fn(tf.constant(x, tf.float32))
    assert got.dtype == tf.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


# ------------------------------------------------------------------ polyhedron

A_EQ = np.array([[1.0, 1.0, 0.5, -1.0]])
B_EQ = np.array([0.5])
G_IN = np.array([[1.0, -1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, -1.0, 2.0]])
H_IN = np.array([0.2, 0.8, 0.3])


def test_polyhedron_matches_cvxpy_and_active_set_jacobian():
    x = np.array([[1.0, -0.4, 0.9, 0.3], [0.1, 0.8, 0.5, -1.2], [-0.7, 0.2, 0.0, 0.6]])
    y = np.asarray(ops.projection_polyhedron(x, A_EQ, B_EQ, G_IN, H_IN))
    want = ref.cvx_batch(x, lambda v: [A_EQ @ v == B_EQ, G_IN @ v <= H_IN])
    np.testing.assert_allclose(y, want, atol=1e-7)
    # The Jacobian w.r.t. x is the projection onto the null space of the active
    # constraints C = [A; G_active]: I - C^T (C C^T)^{-1} C (a dense reference).
    jac = ref.tf_vjp_jacobian(
        lambda v: ops.projection_polyhedron(v, A_EQ, B_EQ, G_IN, H_IN), [x[:1]], 0
    )[0, :, 0, :]
    active = np.abs(G_IN @ want[0] - H_IN) < 1e-7
    assert 0 < active.sum() < 3  # a face, not a vertex nor the interior
    con = np.vstack([A_EQ, G_IN[active]])
    expected = np.eye(4) - con.T @ np.linalg.solve(con @ con.T, con)
    np.testing.assert_allclose(jac, expected, atol=1e-6)


def test_polyhedron_infeasible_row_is_reported():
    # y_0 <= -1 and -y_0 <= -1 ... is feasible; y_0 <= -1 and y_0 >= 1 is not
    G = np.array([[1.0, 0.0], [-1.0, 0.0]])
    with pytest.warns(Warning, match="QuadraticProgram"):
        y = ops.projection_polyhedron(np.zeros((2, 2)), G=G, h=np.array([[-1.0, -1.0], [1.0, 1.0]]))
    np.testing.assert_allclose(np.asarray(y)[1], [0.0, 0.0], atol=1e-7)  # the feasible row


def test_polyhedron_requires_constraint_pairs():
    with pytest.raises(ValueError, match="come as pairs"):
        ops.projection_polyhedron(np.ones((2, 4)), A=A_EQ)
    with pytest.raises(ValueError, match="Received: none"):
        ops.projection_polyhedron(np.ones((2, 4)))


# ------------------------------------------------------------------ transport

MARG_A = np.array([0.5, 1.5, 1.0])
MARG_B = np.array([0.8, 0.2, 1.2, 0.8])


def _transport_ref(x, a, b, divergence):
    t = cp.Variable(x.shape)
    if divergence == "kl":  # KL(T || exp(x)) up to a constant
        objective = cp.sum(-cp.entr(t) - cp.multiply(t, x) - t)
    else:
        objective = 0.5 * cp.sum_squares(t - x)
    constraints = [t >= 0, cp.sum(t, axis=1) == a, cp.sum(t, axis=0) == b]
    cp.Problem(cp.Minimize(objective), constraints).solve(**ref._CLARABEL)
    return t.value


@pytest.mark.usefixtures("device_branch")
@pytest.mark.parametrize("divergence", ["euclidean", "kl"])
def test_transport_matches_cvxpy(divergence):
    x = np.stack([RNG.normal(size=(3, 4)), 3 * RNG.normal(size=(3, 4))])
    y = np.asarray(ops.projection_transport(x, MARG_A, MARG_B, divergence=divergence))
    # Clarabel's exponential cone is accurate to ~1e-7 on entries near 1e-5
    atol = 1e-7 if divergence == "euclidean" else 1e-6
    for xi, yi in zip(x, y):
        np.testing.assert_allclose(yi, _transport_ref(xi, MARG_A, MARG_B, divergence), atol=atol)
    if divergence == "kl":  # optimality: log T - x = f_i + g_j (double centering is 0)
        d = np.log(y) - x
        d = (
            d
            - d.mean(-1, keepdims=True)
            - d.mean(-2, keepdims=True)
            + d.mean((-2, -1))[:, None, None]
        )
        np.testing.assert_allclose(d, 0, atol=1e-10)
    np.testing.assert_allclose(y.sum(-1), np.broadcast_to(MARG_A, (2, 3)), atol=1e-9)
    np.testing.assert_allclose(y.sum(-2), np.broadcast_to(MARG_B, (2, 4)), atol=1e-12)
    assert np.all(y >= 0)
    # Adding r_i + c_j to x changes neither projection (the potentials absorb it),
    # also when the shift is a thousand times the entries.
    shift = 1e3 * (RNG.normal(size=(3, 1)) + RNG.normal(size=(1, 4)))
    shifted = ops.projection_transport(x + shift, MARG_A, MARG_B, divergence=divergence)
    np.testing.assert_allclose(np.asarray(shifted), y, atol=1e-8)


@pytest.mark.parametrize("divergence", ["euclidean", "kl"])
def test_birkhoff_matches_cvxpy(divergence):
    x = RNG.normal(size=(2, 2, 3, 3))  # two leading batch axes
    y = np.asarray(ops.projection_birkhoff(x, divergence=divergence))
    assert y.shape == x.shape
    ones = np.ones(3)
    for xi, yi in zip(x.reshape(-1, 3, 3), y.reshape(-1, 3, 3)):
        np.testing.assert_allclose(yi, _transport_ref(xi, ones, ones, divergence), atol=1e-7)
    with pytest.raises(ValueError, match=r"Received: x.shape=\(3, 4\)"):
        ops.projection_birkhoff(np.ones((3, 4)))


@pytest.mark.parametrize("divergence", ["euclidean", "kl"])
def test_transport_gradients_match_finite_differences(divergence):
    tol = {"tol": 1e-15, "max_iter": 20000} if divergence == "kl" else {}
    x = np.array([[0.3, -1.2, 0.8], [1.4, 0.2, -0.5]])
    marg_a, marg_b = np.array([0.7, 1.3]), np.array([0.4, 0.9, 0.7])

    def fn(v, a, b):
        return ops.projection_transport(v, a, b, divergence=divergence, **tol)

    _check_vjp(fn, [x, marg_a, marg_b], [0], jvp=False)
    # the marginals move together (equal masses): a directional derivative
    da = np.array([0.3, -0.1])
    db = np.array([0.1, -0.2, 0.3])
    weights = RNG.normal(size=x.shape)
    eps = 1e-6

    def loss(s):
        return float(np.sum(weights * np.asarray(fn(x, marg_a + s * da, marg_b + s * db))))

    fd = (loss(eps) - loss(-eps)) / (2 * eps)
    a, b = tf.constant(marg_a), tf.constant(marg_b)
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        value = tf.reduce_sum(weights * fn(tf.constant(x), a, b))
    ga, gb = tape.gradient(value, [a, b])
    np.testing.assert_allclose(np.dot(ga, da) + np.dot(gb, db), fd, atol=1e-6)


def test_transport_validation():
    with pytest.raises(ValueError, match=r"Received: sum\(a\)=3.0, sum\(b\)=2.0"):
        ops.projection_transport(np.ones((3, 2)), MARG_A, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"Received: divergence='l2'"):
        ops.projection_transport(np.ones((3, 4)), MARG_A, MARG_B, divergence="l2")
    with pytest.raises(ValueError, match=r"Received: a="):
        ops.projection_transport(np.ones((3, 4)), [0.0, 2.0, 1.0], MARG_B, divergence="kl")
    # tensors are not inspected eagerly: a matrix whose marginals have unequal masses
    # (an empty polytope) is NaN, the others are unaffected
    b = tf.constant(np.stack([MARG_B, 2 * MARG_B]))
    y = np.asarray(ops.projection_transport(np.ones((2, 3, 4)), tf.constant(MARG_A), b))
    assert np.all(np.isnan(y[1]))
    np.testing.assert_allclose(y[0].sum(-1), MARG_A, atol=1e-12)


# ------------------------------------------------------------------ sparse simplex


def _sparse_simplex_enumerated(x, k, value):
    """Nearest point over every support of size k (each a simplex projection)."""
    best, best_dist = None, np.inf
    for support in itertools.combinations(range(x.size), k):
        y = np.zeros_like(x)
        y[list(support)] = ref.numpy_simplex(x[list(support)], value)
        dist = np.sum((y - x) ** 2)
        if dist < best_dist - 1e-14:
            best, best_dist = y, dist
    return best


@pytest.mark.usefixtures("device_branch")
def test_sparse_simplex_matches_enumeration():
    x = np.vstack([RNG.normal(size=(4, 6)), 1e3 * RNG.normal(size=(1, 6))])
    for k, value in [(1, 1.0), (2, 1.0), (3, 2.5), (6, 1.0)]:
        y = np.asarray(ops.projection_sparse_simplex(x, k, value))
        for xi, yi in zip(x, y):
            np.testing.assert_allclose(yi, _sparse_simplex_enumerated(xi, k, value), atol=1e-12)
        assert np.all(np.count_nonzero(y, axis=-1) <= k)
    np.testing.assert_allclose(
        np.asarray(ops.projection_sparse_simplex(x, 10)), np.asarray(ops.projection_simplex(x))
    )
    with pytest.raises(ValueError, match=r"Received: max_nonzeros=0"):
        ops.projection_sparse_simplex(x, 0)


def test_sparse_simplex_gradients_match_finite_differences():
    x = np.array([[0.9, 0.1, 0.5, -1.0, 0.7], [0.2, 1.3, -0.4, 0.6, 1.0]])
    fn = lambda v, s: ops.projection_sparse_simplex(v, 3, s)  # noqa: E731
    _check_vjp(fn, [x, np.array([1.3, 0.8])], [0, 1])


# ------------------------------------------------------------------ non-negative ridge


def test_prox_non_negative_ridge_matches_cvxpy_and_finite_differences():
    x = np.array([[0.3, -1.7, 2.2, -0.1, 1.0]])
    lam = 0.6 * 0.5
    y = np.asarray(ops.prox_non_negative_ridge(x, 0.6, 0.5))
    want = ref.cvx_project(
        x[0], lambda v: [v >= 0], objective_extra=lambda v: 0.5 * lam * cp.sum_squares(v)
    )
    np.testing.assert_allclose(y[0], want, atol=1e-8)
    _check_vjp(ops.prox_non_negative_ridge, [x, np.array(0.6), np.array(0.5)], [0, 1, 2])
