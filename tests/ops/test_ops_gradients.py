"""Gradients of every op against central finite differences (float64, away from kinks).

Reverse mode (VJPs via tape.jacobian) and forward mode (JVPs via ForwardAccumulator)
are both compared with the finite-difference Jacobian, w.r.t. the input and w.r.t.
the set parameters. A second group pins the documented element at the kinks and
checks that zero vectors never give NaN gradients.
"""

import numpy as np
import ops_reference as ref
import pytest
import tensorflow as tf

import keras_implicit.ops as ops

RNG = np.random.default_rng(11)


def _sym(n, eigs):
    q, _ = np.linalg.qr(RNG.normal(size=(n, n)))
    return q @ np.diag(eigs) @ q.T


def _exp_general_points():
    """Points in case 4 of the exp cone, spread over both signs of the root rho."""
    pts = np.array(
        [
            [1.0, 1.0, 0.5],  # r > 0, s > 0
            [2.0, -0.5, 1.0],  # r > 0, s <= 0
            [-1.0, 0.5, -0.3],  # r <= 0, s > 0
            [0.3, 2.0, -1.0],
            [-2.0, 1.0, 0.05],
            [1.0, 0.2, 3.0],
        ]
    )
    return pts


# (name, fn, args, indices of args to differentiate)
CASES = [
    ("simplex", ops.projection_simplex, [RNG.normal(size=(2, 5)), np.array([1.3, 0.7])], [0, 1]),
    ("sparsemax", ops.sparsemax, [RNG.normal(size=(3, 4))], [0]),
    ("l1_ball_out", ops.projection_l1_ball, [2 * RNG.normal(size=(2, 5)), np.array(1.1)], [0, 1]),
    ("l1_ball_in", ops.projection_l1_ball, [0.1 * RNG.normal(size=(2, 5)), np.array(3.0)], [0, 1]),
    ("l1_sphere", ops.projection_l1_sphere, [0.2 * RNG.normal(size=(2, 5)), np.array(1.7)], [0, 1]),
    (
        "l2_ball_out",
        ops.projection_l2_ball,
        [2 * RNG.normal(size=(2, 5)), np.array([0.9, 1.2])],
        [0, 1],
    ),
    ("l2_ball_in", ops.projection_l2_ball, [0.1 * RNG.normal(size=(2, 5)), np.array(2.0)], [0, 1]),
    ("l2_sphere", ops.projection_l2_sphere, [RNG.normal(size=(2, 5)), np.array(1.4)], [0, 1]),
    (
        "linf_ball",
        ops.projection_linf_ball,
        [np.array([[0.3, -1.7, 2.2, -0.1], [1.1, 0.2, -0.4, -3.0]]), np.array(0.8)],
        [0, 1],
    ),
    (
        "box",
        ops.projection_box,
        [
            np.array([[0.3, -1.7, 2.2, -0.1], [1.1, 0.2, -0.4, -3.0]]),
            np.array([-1.0, -0.5, 0.0, -0.2]),
            np.array([1.0, 0.5, 2.0, 0.3]),
        ],
        [0, 1, 2],
    ),
    ("non_negative", ops.projection_non_negative, [np.array([[0.3, -1.7, 2.2, -0.1]])], [0]),
    (
        "hyperplane",
        ops.projection_hyperplane,
        [RNG.normal(size=(2, 4)), RNG.normal(size=4), np.array([0.3, -0.2])],
        [0, 1, 2],
    ),
    (
        "halfspace",
        ops.projection_halfspace,
        # first row violates, second satisfies a^T x <= b
        [
            np.array([[2.0, 1.0, 0.0, 1.0], [-2.0, -1.0, 0.0, -1.0]]),
            np.array([1.0, 0.5, -0.3, 0.2]),
            np.array(0.4),
        ],
        [0, 1, 2],
    ),
    (
        "affine_set",
        ops.projection_affine_set,
        [RNG.normal(size=(2, 4)), RNG.normal(size=(2, 4)), RNG.normal(size=2)],
        [0, 1, 2],
    ),
    (
        "second_order_cone",
        ops.projection_second_order_cone,
        [
            np.array(
                [
                    [0.3, 1.0, -0.5, 0.7],
                    [2.0, 0.1, 0.2, -0.3],
                    [-3.0, 0.4, 0.1, 0.2],
                    [-0.2, 1.0, 1.0, 0.0],
                ]
            )
        ],
        [0],
    ),
    (
        "psd_cone",
        ops.projection_psd_cone,
        [np.stack([_sym(4, [2.0, 0.7, -0.5, -1.5]), RNG.normal(size=(4, 4))])],
        [0],
    ),
    # Repeated eigenvalues of both signs: the projection is smooth there (no zero eigenvalue).
    ("psd_cone_repeated", ops.projection_psd_cone, [_sym(4, [1.0, 1.0, -1.0, -1.0])[None]], [0]),
    ("exp_cone_general", ops.projection_exp_cone, [_exp_general_points()], [0]),
    (
        "exp_cone_other_cases",
        ops.projection_exp_cone,
        # interior of K, interior of the polar cone, special region
        [np.array([[0.1, 1.0, 3.0], [1.0, -2.0, -3.0], [-1.0, -0.5, 2.0], [-1.0, -0.5, -2.0]])],
        [0],
    ),
    (
        "prox_lasso",
        ops.prox_lasso,
        [np.array([[0.3, -1.7, 2.2, -0.1]]), np.array(0.5), np.array(0.8)],
        [0, 1, 2],
    ),
    (
        "prox_elastic_net",
        ops.prox_elastic_net,
        [np.array([[0.3, -1.7, 2.2, -0.1]]), np.array(0.5), np.array(0.3), np.array(0.8)],
        [0, 1, 2, 3],
    ),
    (
        "prox_group_lasso",
        ops.prox_group_lasso,
        [np.array([[0.3, -1.7, 2.2, -0.1], [0.1, 0.1, 0.0, -0.1]]), np.array(0.5), np.array(1.5)],
        [0, 1, 2],
    ),
    (
        "prox_ridge",
        ops.prox_ridge,
        [RNG.normal(size=(2, 3)), np.array(0.5), np.array(0.8)],
        [0, 1, 2],
    ),
    (
        "prox_non_negative_lasso",
        ops.prox_non_negative_lasso,
        [np.array([[0.3, -1.7, 2.2, -0.1]]), np.array(0.2), np.array(0.8)],
        [0, 1, 2],
    ),
]


@pytest.mark.parametrize("name,fn,args,wrts", CASES, ids=[c[0] for c in CASES])
def test_jacobian_matches_finite_differences(name, fn, args, wrts):
    def np_fn(*a):
        return np.asarray(fn(*[tf.constant(v) for v in a]))

    for wrt in wrts:
        fd = ref.fd_jacobian(np_fn, args, wrt)
        vjp = ref.tf_vjp_jacobian(fn, args, wrt)
        np.testing.assert_allclose(vjp, fd, atol=1e-6, err_msg=f"VJP {name} wrt arg {wrt}")
        tangent = RNG.normal(size=np.shape(args[wrt]))
        jvp = ref.tf_jvp(fn, args, wrt, tangent)
        fd_jvp = np.tensordot(fd, tangent, axes=np.ndim(tangent))
        np.testing.assert_allclose(jvp, fd_jvp, atol=1e-6, err_msg=f"JVP {name} wrt arg {wrt}")


def test_simplex_jacobian_closed_form():
    """diag(s) - s s^T/|s| on the support, written out by hand for one point."""
    x = np.array([0.9, 0.1, 0.5, -1.0])  # tau = 0.2 -> support {0, 2}
    jac = ref.tf_vjp_jacobian(ops.sparsemax, [x], 0)
    s = np.array([1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(jac, np.diag(s) - np.outer(s, s) / 2, atol=1e-15)


def test_exp_cone_implicit_jacobian_matches_kkt_solve():
    """The implicit-function Jacobian against an independent dense KKT linear solve.

    At a case-4 point, vp = v - mu grad g(vp) with g(p) = p2 exp(p1/p2) - p3 = 0.
    Differentiating: (I + mu H) dvp + grad g dmu = dv, grad g^T dvp = 0.
    """
    v = np.array([1.0, 1.0, 0.5])
    vp = np.asarray(ops.projection_exp_cone(v[None]))[0]
    r, s, _ = vp
    e = np.exp(r / s)
    grad_g = np.array([e, e * (1 - r / s), -1.0])
    hess = e * np.array([[1 / s, -r / s**2, 0], [-r / s**2, r**2 / s**3, 0], [0, 0, 0]])
    mu = (v - vp)[2] / grad_g[2]
    kkt = np.zeros((4, 4))
    kkt[:3, :3] = np.eye(3) + mu * hess
    kkt[:3, 3] = grad_g
    kkt[3, :3] = grad_g
    jac_kkt = np.linalg.solve(kkt, np.vstack([np.eye(3), np.zeros((1, 3))]))[:3]
    jac = ref.tf_vjp_jacobian(ops.projection_exp_cone, [v[None]], 0)[0, :, 0, :]
    np.testing.assert_allclose(jac, jac_kkt, atol=1e-9)


# --------------------------------------------------------------------------------------
# Documented elements at kinks
# --------------------------------------------------------------------------------------


def _grad(fn, *args, wrt=0):
    tensors = [tf.constant(np.asarray(a, dtype=np.float64)) for a in args]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        out = tf.reduce_sum(fn(*tensors))
    return [np.asarray(g) if g is not None else None for g in tape.gradient(out, tensors)]


def test_kink_conventions():
    # relu'(0) = 0
    assert _grad(ops.projection_non_negative, [0.0, 1.0])[0].tolist() == [0.0, 1.0]
    # a coordinate on a box bound follows the bound
    gx, glo, ghi = _grad(ops.projection_box, [-1.0, 1.0, 0.0], -1.0, 1.0)
    assert gx.tolist() == [0.0, 0.0, 1.0] and glo == 1.0 and ghi == 1.0
    # on the sphere of the l2 ball: the radial formula (radius gets x/||x||)
    x = np.array([0.6, 0.8])
    gx, gr = _grad(ops.projection_l2_ball, x, 1.0)
    np.testing.assert_allclose(gr, x.sum())  # d sum(y)/d r = sum(x/||x||)
    np.testing.assert_allclose(gx, (np.eye(2) - np.outer(x, x)) @ np.ones(2))
    # simplex tie x_i == tau: coordinate outside the support
    jac = ref.tf_vjp_jacobian(ops.sparsemax, [np.array([1.0, 0.0, -1.0])], 0)  # tau = 0
    np.testing.assert_allclose(jac, np.diag([1.0, 0.0, 0.0]) - np.diag([1.0, 0, 0]), atol=0)
    # soft-threshold at |x| == lambda: derivative 0
    assert _grad(ops.prox_lasso, [0.5, 0.6], 0.5)[0].tolist() == [0.0, 1.0]
    # PSD: zero eigenvalue treated as clipped (relu'(0) = 0)
    jac = ref.tf_vjp_jacobian(ops.projection_psd_cone, [np.diag([0.0, 2.0])], 0)
    np.testing.assert_allclose(jac[0, 0, 0, 0], 0.0)
    np.testing.assert_allclose(jac[1, 1, 1, 1], 1.0)
    # SOC: cone boundary s == t uses the boundary formula, s == -t gives 0
    jac_b = ref.tf_vjp_jacobian(ops.projection_second_order_cone, [np.array([1.0, 1.0])], 0)
    np.testing.assert_allclose(jac_b, [[0.5, 0.5], [0.5, 0.5]])
    jac_p = ref.tf_vjp_jacobian(ops.projection_second_order_cone, [np.array([-1.0, 1.0])], 0)
    np.testing.assert_allclose(jac_p, np.zeros((2, 2)))
    # exp cone, special region incl. K's face y = 0: diag(1, 0, [z > 0])
    jac_e = ref.tf_vjp_jacobian(ops.projection_exp_cone, [np.array([-1.0, 0.0, 2.0])], 0)
    np.testing.assert_allclose(jac_e, np.diag([1.0, 0.0, 1.0]))


ZERO_CASES = [
    (ops.projection_simplex, (np.zeros(4), 1.0)),
    (ops.sparsemax, (np.zeros(4),)),
    (ops.projection_l1_ball, (np.zeros(4), 0.0)),
    (ops.projection_l1_ball, (np.zeros(4), 1.0)),
    (ops.projection_l1_sphere, (np.zeros(4), 1.0)),
    (ops.projection_l2_ball, (np.zeros(4), 0.0)),
    (ops.projection_l2_ball, (np.zeros(4), 1.0)),
    (ops.projection_l2_sphere, (np.zeros(4), 1.0)),
    (ops.projection_linf_ball, (np.zeros(4), 0.0)),
    (ops.projection_second_order_cone, (np.zeros(4),)),
    (ops.projection_psd_cone, (np.zeros((3, 3)),)),
    (ops.projection_exp_cone, (np.zeros(3),)),
    (ops.prox_group_lasso, (np.zeros(4), 1.0)),
    (ops.projection_hyperplane, (np.zeros(4), np.zeros(4), 0.0)),
    (ops.projection_halfspace, (np.zeros(4), np.zeros(4), 0.0)),
]


@pytest.mark.parametrize(
    "fn,args", ZERO_CASES, ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(ZERO_CASES)]
)
def test_no_nan_gradients_at_zero(fn, args):
    values = np.asarray(fn(*args))
    assert np.all(np.isfinite(values))
    for g in _grad(fn, *args):
        assert g is None or np.all(np.isfinite(g)), fn.__name__
