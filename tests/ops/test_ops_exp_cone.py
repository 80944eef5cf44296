"""Exponential cone projection: Moreau certificates on many points, adversarial cases.

For a closed convex cone K, p = P_K(v) iff p ∈ K, v - p ∈ K° and <p, v - p> = 0
(Moreau). Checking these three conditions is an exact optimality certificate that
does not depend on our algorithm, so it can be applied to thousands of points.
"""

import numpy as np
import ops_reference as ref
import pytest
import tensorflow as tf

import keras_implicit.ops as ops


def _points(rng, n):
    """Random points at mixed scales plus points hugging every case boundary."""
    base = rng.normal(size=(n, 3)) * np.exp(rng.uniform(-3, 3, size=(n, 1)))
    rho = rng.uniform(-8, 8, size=n)
    sp = np.exp(rng.uniform(-3, 3, size=n))
    on_k = sp[:, None] * np.stack([rho, np.ones(n), np.exp(rho)], axis=-1)
    normal = np.stack([np.exp(rho), (1 - rho) * np.exp(rho), -np.ones(n)], axis=-1)
    mu = np.exp(rng.uniform(-3, 3, size=(n, 1)))
    eps = 10.0 ** rng.uniform(-12, -2, size=(n, 1))
    rows = [
        base,
        on_k,  # on K's boundary
        on_k + mu * normal,  # case 4 with a known answer (on_k)
        on_k * (1 + eps),  # just around K's boundary
        mu * normal,  # on the polar cone's boundary
        mu * normal + eps * rng.normal(size=(n, 3)),
        np.stack([-np.abs(base[:, 0]), eps[:, 0] * np.abs(base[:, 1]), base[:, 2]], -1),  # y -> 0+
        np.stack([eps[:, 0], -np.abs(base[:, 1]), base[:, 2]], -1),  # x -> 0+, y < 0
        np.stack([base[:, 0], base[:, 1], eps[:, 0] * base[:, 2]], -1),  # z -> 0
    ]
    return np.concatenate(rows), on_k, on_k + mu * normal


def _polar_rounding_slack(d, scale):
    """How much the polar test can move when d = v - p carries rounding errors.

    d is a difference of float64 numbers, so each entry is off by ~eps ||v||. The
    test function phi(d) = u exp(v/u - 1) + w has gradient
    (E (1 - v/u), E, 1) with E = exp(v/u - 1); when u is tiny and v/u large (a
    projection next to K's face y = 0) that gradient is huge and phi cannot be
    evaluated to 1e-9 even for an exact projection. The slack is 8 eps ||v|| ||grad||_1.
    """
    u, v = d[..., 0], d[..., 1]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        ratio = v / np.where(u > 0, u, 1.0)
        big_e = np.exp(ratio - 1.0)
        grad = np.abs(big_e * (1.0 - ratio)) + big_e + 1.0
    grad = np.where(u > 0, grad, 1.0)
    return 8 * np.finfo(np.float64).eps * scale * np.nan_to_num(grad, posinf=np.inf)


def _certificate(v, p, tol):
    scale = np.linalg.norm(v, axis=-1)
    d = v - p
    primal = ref.exp_cone_violation(p)
    dual = ref.exp_polar_violation(d)
    gap = np.abs(np.sum(p * d, axis=-1))
    dual_bad = dual > tol * scale + _polar_rounding_slack(d, scale)
    bad = (primal > tol * scale) | dual_bad | (gap > tol * scale**2)
    return bad, primal / np.maximum(scale, 1e-300), dual / np.maximum(scale, 1e-300)


def test_moreau_certificate_float64():
    rng = np.random.default_rng(0)
    v, _, _ = _points(rng, 400)
    p = np.asarray(ops.projection_exp_cone(v))
    bad, primal, dual = _certificate(v, p, 1e-9)
    assert not bad.any(), (v[bad][:5], p[bad][:5], primal[bad][:5], dual[bad][:5])


def test_known_answers_in_the_general_case():
    """v = vp + mu * normal(vp) with vp on K's boundary must project to vp exactly."""
    rng = np.random.default_rng(1)
    _, on_k, v = _points(rng, 300)
    p = np.asarray(ops.projection_exp_cone(v))
    scale = np.linalg.norm(v, axis=-1, keepdims=True)
    np.testing.assert_allclose(p / scale, on_k / scale, atol=1e-9)


def test_float32_under_xla_agrees_with_float64():
    # (The Moreau certificate itself is ill-conditioned in float32 when v - p has a
    # tiny first entry, so float32 is judged against the certified float64 result.)
    rng = np.random.default_rng(2)
    v, _, _ = _points(rng, 200)
    p64 = np.asarray(ops.projection_exp_cone(v))
    fn = tf.function(ops.projection_exp_cone, jit_compile=True)
    p32 = np.asarray(fn(tf.constant(v, tf.float32))).astype(np.float64)
    scale = np.linalg.norm(v, axis=-1, keepdims=True)
    np.testing.assert_allclose(p32 / scale, p64 / scale, atol=3e-6)
    assert np.all(ref.exp_cone_violation(p32) <= 1e-6 * scale[:, 0])


@pytest.mark.parametrize(
    "v",
    [
        [1.0, 1e-300, 1.0],  # y denormal-ish, x > 0
        [-1.0, 1e-300, -0.5],  # root at rho ~ -1e300
        [1e-300, -1.0, 0.5],  # next to the special region
        [700.0, 1.0, 1.0],  # exp overflow in the K test
        [-700.0, 1.0, -1.0],
        [1.0, -1e-17, 1e-17],
        [0.0, 0.0, -1.0],
        [0.0, 1.0, 0.0],
        [1e-300, 1e-300, 1e-300],  # (TF flushes denormals to zero, so no smaller)
        [1e300, -1e300, 1e300],
    ],
)
def test_extreme_points_are_finite_and_certified(v):
    v = np.array([v])
    p = np.asarray(ops.projection_exp_cone(v))
    assert np.all(np.isfinite(p))
    with np.errstate(over="ignore"):
        scale = np.linalg.norm(v / np.abs(v).max()) * np.abs(v).max()
    bad, _, _ = _certificate(v / scale, p / scale, 1e-8)
    assert not bad.any(), p
    with tf.GradientTape() as tape:
        x = tf.constant(v)
        tape.watch(x)
        y = ops.projection_exp_cone(x)
    assert np.all(np.isfinite(np.asarray(tape.gradient(y, x))))


@pytest.mark.slow
def test_moreau_certificate_many_points():
    rng = np.random.default_rng(10)
    v, _, _ = _points(rng, 20_000)
    p = np.asarray(ops.projection_exp_cone(v))
    bad, _, _ = _certificate(v, p, 1e-9)
    assert not bad.any(), v[bad][:5]
    # Where the float64 certificate is ill-conditioned (large rounding slack), compare
    # with a 50-digit solution instead.
    mp = pytest.importorskip("mpmath")
    del mp
    scale = np.linalg.norm(v, axis=-1)
    loose = np.where(_polar_rounding_slack(v - p, scale) > 1e-9 * scale)[0]
    checked = 0
    for i in loose[:200]:
        exact = ref.exp_cone_projection_mp(v[i])
        if exact is not None:
            checked += 1
            np.testing.assert_allclose(p[i], exact, rtol=0, atol=1e-14 * scale[i])
    assert checked >= 0.9 * min(len(loose), 200)
    # And a random sample of all points, with the same multi-precision reference.
    for i in rng.choice(len(v), 300, replace=False):
        exact = ref.exp_cone_projection_mp(v[i], digits=60)
        if exact is not None:
            np.testing.assert_allclose(p[i], exact, rtol=0, atol=1e-14 * scale[i])


def test_jacobian_matches_multiprecision_finite_differences():
    """The VJP Jacobian against central differences of the 50-digit reference projection
    (mpmath, independent of our root finder) at points of every case: general, interior
    of K, polar interior, x <= 0 & y <= 0. (cvxpy's exp-cone solutions, ~1e-8 accurate,
    are too noisy for differences to resolve 1e-6.)"""
    pytest.importorskip("mpmath")
    points = np.array(
        [[1.0, 1.0, 0.5], [0.5, -1.0, 2.0], [-2.0, 0.5, -0.3], [0.3, 1.0, 3.0], [-1.0, -0.5, 2.0]]
    )
    eps = 1e-6
    for v in points:
        with tf.GradientTape(persistent=True) as tape:
            x = tf.constant(v[None])
            tape.watch(x)
            y = ops.projection_exp_cone(x)[0]
            rows = [y[i] for i in range(3)]
        jac = np.stack([np.asarray(tape.gradient(r, x))[0] for r in rows])
        fd = np.stack(
            [
                (ref.exp_cone_projection_mp(v + eps * e) - ref.exp_cone_projection_mp(v - eps * e))
                / (2 * eps)
                for e in np.eye(3)
            ],
            axis=1,
        )
        np.testing.assert_allclose(jac, fd, atol=1e-8, err_msg=str(v))
