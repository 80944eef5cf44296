"""Every projection against an independent reference (cvxpy/Clarabel, float64).

Each case mixes random points with adversarial ones: points already in the set, on
its boundary, at kinks (ties), and at huge (1e6) and tiny (1e-8) scales. Checked:
feasibility, optimality (distance no larger than the reference's), and agreement
with the reference (projections onto convex sets are unique).
"""

import zlib

import numpy as np
import ops_reference as ref
import pytest
from device_branches import device_branch  # noqa: F401 (fixture used by name)

import keras_implicit.ops as ops

N = 5


def _scale_variants(rng, base):
    """Random points plus the same directions at huge and tiny scales."""
    return [base, 1e6 * rng.normal(size=base.shape), 1e-8 * rng.normal(size=base.shape)]


def _simplex_inputs(rng, value):
    inside = rng.dirichlet(np.ones(N)) * value
    face = inside.copy()
    face[:2] = 0
    face *= value / face.sum()
    ties = np.array([1.0, 1.0, 1.0, 0.2, -3.0])
    equal = np.full(N, 0.7)
    rows = [rng.normal(size=N), inside, face, ties, equal, 3 * rng.normal(size=N)]
    rows += _scale_variants(rng, rng.normal(size=N))[1:]
    return np.stack(rows)


def _ball_inputs(rng, radius, norm_ord):
    d = rng.normal(size=N)
    on_boundary = radius * d / np.linalg.norm(d, ord=norm_ord)
    ties = np.array([2.0, -2.0, 2.0, 0.1, 0.0])
    rows = [
        0.3 * on_boundary,  # inside
        on_boundary,  # exactly on the boundary (up to rounding)
        3.0 * on_boundary,  # outside
        ties,
        np.zeros(N),
        rng.normal(size=N),
        1e6 * rng.normal(size=N),
        1e-8 * rng.normal(size=N),
    ]
    return np.stack(rows)


def _soc_inputs(rng):
    v = rng.normal(size=N - 1)
    s = np.linalg.norm(v)
    rows = [
        np.r_[2 * s, v],  # interior
        np.r_[-2 * s, v],  # polar
        np.r_[s, v],  # cone boundary
        np.r_[-s, v],  # polar boundary
        np.r_[0.3 * s, v],  # general
        np.r_[0.0, v],  # t = 0
        np.zeros(N),  # apex
        np.r_[1.0, np.zeros(N - 1)],
        1e6 * rng.normal(size=N),
        1e-8 * rng.normal(size=N),
    ]
    return np.stack(rows)


def _exp_inputs(rng):
    rho, sp = 0.7, 1.3
    on_k = sp * np.array([rho, 1.0, np.exp(rho)])
    rows = [
        rng.normal(size=3),
        rng.normal(size=3),
        on_k,  # on the boundary of K
        on_k + np.array([0.0, 0.0, 0.5]),  # interior
        np.array([1.0, -2.0, -3.0]),  # polar
        np.array([-1.0, -0.5, 2.0]),  # special region r<=0, s<=0
        np.array([-1.0, -0.5, -2.0]),  # special region, negative t
        np.array([-1.0, 0.0, 2.0]),  # K's face y = 0
        np.array([1.0, 0.0, 1e3]),  # y = 0, x > 0: just outside
        np.array([1e-9, -1.0, 0.3]),  # next to the special region
        np.array([-1.0, 5e-4, -0.01]),  # root far to the left
        np.array([3.0, 1.0, 0.1]),
        np.array([-2.0, 1.0, -0.5]),
        np.zeros(3),
        1e6 * rng.normal(size=3),
        1e-8 * rng.normal(size=3),
    ]
    return np.stack(rows)


def _psd_inputs(rng):
    n = 4
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    rows = [
        rng.normal(size=(n, n)),  # non-symmetric: the PSD cone projection of sym part
        q @ np.diag([2.0, 1.0, 0.5, 0.1]) @ q.T,  # already PSD
        q @ np.diag([-2.0, -1.0, -0.5, -0.1]) @ q.T,  # NSD
        q @ np.diag([1.0, 1.0, -1.0, -1.0]) @ q.T,  # repeated eigenvalues of both signs
        q @ np.diag([0.0, 0.0, 2.0, -3.0]) @ q.T,  # zero eigenvalues
        np.zeros((n, n)),
        1e6 * rng.normal(size=(n, n)),
        1e-8 * rng.normal(size=(n, n)),
    ]
    return np.stack(rows)


def _generic_inputs(rng):
    rows = [rng.normal(size=N) for _ in range(4)]
    rows += [np.zeros(N), 1e6 * rng.normal(size=N), 1e-8 * rng.normal(size=N)]
    return np.stack(rows)


def _case(name, rng):
    """(inputs, our op as fn(x), reference constraints, extra kwargs, feasibility fn)."""
    a = np.array([1.0, -2.0, 0.5, 0.0, 1.5])
    A = np.array([[1.0, 2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 1.0, 1.0, -2.0]])
    lo = np.array([-1.0, -0.5, 0.0, -2.0, 0.3])
    hi = np.array([1.0, 0.5, 0.0, 2.0, 0.4])
    if name == "simplex":
        x = _simplex_inputs(rng, 2.5)
        return x, lambda v: ops.projection_simplex(v, 2.5), ref.simplex(2.5), {}
    if name == "sparsemax":
        x = _simplex_inputs(rng, 1.0)
        return x, ops.sparsemax, ref.simplex(1.0), {}
    if name == "l1_ball":
        x = _ball_inputs(rng, 1.5, 1)
        return x, lambda v: ops.projection_l1_ball(v, 1.5), ref.l1_ball(1.5), {}
    if name == "l2_ball":
        x = _ball_inputs(rng, 1.5, 2)
        return x, lambda v: ops.projection_l2_ball(v, 1.5), ref.l2_ball(1.5), {}
    if name == "linf_ball":
        x = _ball_inputs(rng, 1.5, np.inf)
        return x, lambda v: ops.projection_linf_ball(v, 1.5), ref.linf_ball(1.5), {}
    if name == "box":
        x = np.concatenate([_generic_inputs(rng), lo[None], hi[None], (lo + hi)[None] / 2])
        return x, lambda v: ops.projection_box(v, lo, hi), ref.box(lo, hi), {}
    if name == "non_negative":
        x = np.concatenate([_generic_inputs(rng), np.array([[0.0, -0.0, 1.0, -1.0, 0.0]])])
        return x, ops.projection_non_negative, ref.non_negative(), {}
    if name == "hyperplane":
        on = rng.normal(size=N)
        on = on - (a @ on - 0.7) / (a @ a) * a
        x = np.concatenate([_generic_inputs(rng), on[None]])
        return x, lambda v: ops.projection_hyperplane(v, a, 0.7), ref.hyperplane(a, 0.7), {}
    if name == "halfspace":
        on = rng.normal(size=N)
        on = on - (a @ on - 0.7) / (a @ a) * a
        x = np.concatenate([_generic_inputs(rng), on[None], (on - a)[None]])
        return x, lambda v: ops.projection_halfspace(v, a, 0.7), ref.halfspace(a, 0.7), {}
    if name == "affine_set":
        b = np.array([0.3, -1.2])
        x = _generic_inputs(rng)
        return x, lambda v: ops.projection_affine_set(v, A, b), ref.affine(A, b), {}
    if name == "second_order_cone":
        x = _soc_inputs(rng)
        return x, ops.projection_second_order_cone, ref.soc(), {"homogeneous": True}
    if name == "exp_cone":
        x = _exp_inputs(rng)
        return x, ops.projection_exp_cone, ref.exp_cone(), {"homogeneous": True}
    if name == "psd_cone":
        x = _psd_inputs(rng)
        return x, ops.projection_psd_cone, ref.psd(), {"symmetric": True, "homogeneous": True}
    raise KeyError(name)


CONVEX = [
    "simplex",
    "sparsemax",
    "l1_ball",
    "l2_ball",
    "linf_ball",
    "box",
    "non_negative",
    "hyperplane",
    "halfspace",
    "affine_set",
    "second_order_cone",
    "exp_cone",
    "psd_cone",
]


def _feasibility(name, y):
    """Max constraint violation of our outputs, computed directly in numpy."""
    a = np.array([1.0, -2.0, 0.5, 0.0, 1.5])
    flat = y.reshape(len(y), -1)
    if name in ("simplex", "sparsemax"):
        value = 2.5 if name == "simplex" else 1.0
        return np.maximum(np.abs(flat.sum(-1) - value), np.maximum(-flat.min(-1), 0))
    if name == "l1_ball":
        return np.maximum(np.abs(flat).sum(-1) - 1.5, 0)
    if name == "l2_ball":
        return np.maximum(np.linalg.norm(flat, axis=-1) - 1.5, 0)
    if name == "linf_ball":
        return np.maximum(np.abs(flat).max(-1) - 1.5, 0)
    if name == "box":
        lo = np.array([-1.0, -0.5, 0.0, -2.0, 0.3])
        hi = np.array([1.0, 0.5, 0.0, 2.0, 0.4])
        return np.maximum(np.maximum(lo - flat, flat - hi), 0).max(-1)
    if name == "non_negative":
        return np.maximum(-flat.min(-1), 0)
    if name == "hyperplane":
        return np.abs(flat @ a - 0.7)
    if name == "halfspace":
        return np.maximum(flat @ a - 0.7, 0)
    if name == "affine_set":
        A = np.array([[1.0, 2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 1.0, 1.0, -2.0]])
        return np.abs(flat @ A.T - np.array([0.3, -1.2])).max(-1)
    if name == "second_order_cone":
        return np.maximum(np.linalg.norm(flat[:, 1:], axis=-1) - flat[:, 0], 0)
    if name == "exp_cone":
        return ref.exp_cone_violation(flat)
    if name == "psd_cone":
        sym_err = np.abs(y - np.swapaxes(y, -1, -2)).max(axis=(-1, -2))
        return np.maximum(np.maximum(-np.linalg.eigvalsh(y).min(-1), 0), sym_err)
    raise KeyError(name)


_REFERENCES = {}  # name -> cvxpy solutions (the cases are seeded by name)


@pytest.mark.usefixtures("device_branch")
@pytest.mark.parametrize("name", CONVEX)
def test_projection_matches_cvxpy(name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    x, fn, cons, kwargs = _case(name, rng)
    ours = np.asarray(fn(x))
    assert ours.dtype == np.float64 and ours.shape == x.shape
    if name not in _REFERENCES:
        _REFERENCES[name] = ref.cvx_batch(x, cons, **kwargs)
    expected = _REFERENCES[name]
    for xi, yi, ei in zip(x, ours, expected):
        scale = max(1.0, np.linalg.norm(xi))
        dist_ours = np.linalg.norm(yi - xi)
        dist_ref = np.linalg.norm(ei - xi)
        # The reference is itself slightly infeasible, so allow solver-level slack.
        assert dist_ours <= dist_ref + 1e-7 * scale, (xi, yi, ei)
        # Agreement (the projection is unique) at the reference solver's accuracy.
        np.testing.assert_allclose(yi, ei, atol=2e-5 * scale, rtol=0, err_msg=str(xi))
    scales = np.maximum(1.0, np.linalg.norm(x.reshape(len(x), -1), axis=-1))
    assert np.all(_feasibility(name, ours) <= 1e-10 * scales)


def test_tiny_scale_is_exact_relative_to_input():
    """At 1e-8 the cvxpy check above is loose in absolute terms; check scale invariance."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 3))
    for fn in (
        ops.projection_exp_cone,
        ops.projection_second_order_cone,
        lambda v: ops.projection_simplex(v, 1.0),
    ):
        big = np.asarray(fn(x))
        if fn is ops.projection_exp_cone or fn is ops.projection_second_order_cone:
            # Cones are positively homogeneous: P(c x) = c P(x).
            np.testing.assert_allclose(np.asarray(fn(1e-8 * x)), 1e-8 * big, rtol=1e-9, atol=0)
            np.testing.assert_allclose(np.asarray(fn(1e6 * x)), 1e6 * big, rtol=1e-9, atol=0)
        else:
            # Simplex is translation-equivariant: P(x + c 1) = P(x).
            np.testing.assert_allclose(np.asarray(fn(x + 1e3)), big, atol=1e-10)
    # Non-convex cones of PSD: P(c X) = c P(X) as well.
    m = rng.normal(size=(2, 3, 3))
    p = np.asarray(ops.projection_psd_cone(m))
    np.testing.assert_allclose(
        np.asarray(ops.projection_psd_cone(1e-8 * m)), 1e-8 * p, rtol=1e-9, atol=1e-22
    )


def test_simplex_matches_numpy_sort_reference_on_many_rows():
    """Our Newton + sort-fallback threshold against the textbook sort algorithm."""
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            rng.normal(size=(50, 30)),
            rng.exponential(size=(20, 30)) ** 3,  # heavy tails
            np.round(rng.normal(size=(20, 30)), 1),  # many ties
            np.geomspace(1, 1e-6, 30)[None].repeat(5, 0),
        ]
    )
    for value in (1.0, 0.01, 7.0):
        np.testing.assert_allclose(
            np.asarray(ops.projection_simplex(x, value)), ref.numpy_simplex(x, value), atol=1e-12
        )


def test_simplex_sort_fallback_path():
    """Forcing the fallback (1 Newton pass) gives the same projection as Newton."""
    import tensorflow as tf

    from keras_implicit.ops import simplex as simplex_module

    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(16, 40)))
    value = tf.ones([16, 1], tf.float64)
    z = x - tf.reduce_max(x, axis=-1, keepdims=True)
    delta_newton, converged = simplex_module._delta_newton(z, value, 64)
    assert bool(np.all(converged))
    delta_sort = simplex_module._delta_sort(z, value)
    np.testing.assert_allclose(delta_newton, delta_sort, atol=1e-13)
    _, converged_one = simplex_module._delta_newton(z, value, 1)
    assert not bool(np.all(converged_one))  # one pass does not finish these rows
    y_fallback = simplex_module._simplex_solve(x, value, max_newton_iter=1)
    np.testing.assert_allclose(y_fallback, ref.numpy_simplex(np.asarray(x)), atol=1e-13)


def test_simplex_value_per_row():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 6))
    values = np.array([0.5, 1.0, 2.0, 0.0])
    y = np.asarray(ops.projection_simplex(x, values))
    np.testing.assert_allclose(y.sum(-1), values, atol=1e-12)
    for xi, vi, yi in zip(x, values, y):
        np.testing.assert_allclose(yi, ref.numpy_simplex(xi, vi) if vi > 0 else 0 * xi, atol=1e-12)


def test_l1_sphere_against_orthant_enumeration():
    rng = np.random.default_rng(5)
    x = np.concatenate(
        [
            rng.normal(size=(4, 4)),
            0.05 * rng.normal(size=(3, 4)),  # inside the ball: pushed out
            np.array([[0.0, 0.0, 0.1, -0.2], [0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 1.0, -1.0]]),
        ]
    )
    y = np.asarray(ops.projection_l1_sphere(x, 1.5))
    np.testing.assert_allclose(np.abs(y).sum(-1), 1.5, atol=1e-12)
    for xi, yi in zip(x, y):
        best = ref.l1_sphere_bruteforce(xi, 1.5)
        # Ties between equally near points may pick different points: compare distances.
        assert np.linalg.norm(yi - xi) <= np.linalg.norm(best - xi) + 1e-12


def test_l2_sphere():
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.normal(size=(3, 4)), np.zeros((1, 4))])
    y = np.asarray(ops.projection_l2_sphere(x, 2.0))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 2.0, atol=1e-12)
    np.testing.assert_allclose(y[:3], 2.0 * x[:3] / np.linalg.norm(x[:3], axis=-1, keepdims=True))
    np.testing.assert_allclose(y[3], [2.0, 0, 0, 0])  # documented choice at 0


def test_affine_set_batched_matrix():
    rng = np.random.default_rng(7)
    A = rng.normal(size=(3, 2, 5))
    b = rng.normal(size=(3, 2))
    x = rng.normal(size=(3, 5))
    y = np.asarray(ops.projection_affine_set(x, A, b))
    for i in range(3):
        expected = ref.cvx_project(x[i], ref.affine(A[i], b[i]))
        np.testing.assert_allclose(y[i], expected, atol=1e-7)


def test_prox_operators_match_cvxpy():
    """Each prox solves the documented objective: argmin 1/2||y - x||^2 + scaling * g(y)."""
    import cvxpy as cp

    rng = np.random.default_rng(8)
    x = np.concatenate([rng.normal(size=(3, 5)), np.array([[0.3, -0.3, 0.0, 2.0, -2.0]])])
    l1, l2, s = 0.3, 0.7, 1.5
    cases = [
        (lambda v: ops.prox_lasso(v, l1, s), lambda y: s * l1 * cp.norm1(y), None),
        (
            lambda v: ops.prox_elastic_net(v, l1, l2, s),
            lambda y: s * (l1 * cp.norm1(y) + l2 / 2 * cp.sum_squares(y)),
            None,
        ),
        (lambda v: ops.prox_ridge(v, l2, s), lambda y: s * l2 / 2 * cp.sum_squares(y), None),
        (lambda v: ops.prox_group_lasso(v, l2, s), lambda y: s * l2 * cp.norm2(y), None),
        (
            lambda v: ops.prox_non_negative_lasso(v, l1, s),
            lambda y: s * l1 * cp.sum(y),
            lambda y: [y >= 0],
        ),
    ]
    for fn, penalty, cons in cases:
        ours = np.asarray(fn(x))
        expected = ref.cvx_batch(x, cons or (lambda y: []), objective_extra=penalty)
        np.testing.assert_allclose(ours, expected, atol=1e-6)


@pytest.mark.slow
def test_simplex_and_l1_ball_large_against_numpy():
    """Large rows, including geometric sequences that make Newton take many passes."""
    rng = np.random.default_rng(12)
    x = np.concatenate(
        [
            rng.normal(size=(64, 1000)),
            rng.standard_cauchy(size=(16, 1000)),
            np.geomspace(1.0, 1e-12, 1000)[None].repeat(4, 0),
            -np.geomspace(1.0, 1e-12, 1000)[None].repeat(4, 0),
        ]
    )
    for value in (1.0, 10.0, 300.0):
        np.testing.assert_allclose(
            np.asarray(ops.projection_simplex(x, value)), ref.numpy_simplex(x, value), atol=1e-10
        )
        ours = np.asarray(ops.projection_l1_ball(x, value))
        outside = np.abs(x).sum(-1, keepdims=True) > value
        expected = np.where(outside, np.sign(x) * ref.numpy_simplex(np.abs(x), value), x)
        np.testing.assert_allclose(ours, expected, atol=1e-10)
