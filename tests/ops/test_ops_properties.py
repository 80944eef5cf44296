"""Hypothesis property tests: feasibility, idempotence, non-expansiveness.

For a closed convex set C, P_C is idempotent (P(P(x)) = P(x)) and non-expansive
(||P(x) - P(y)|| <= ||x - y||); for the spheres (non-convex) only feasibility and
idempotence hold. Inputs mix magnitudes from 1e-3 to 1e3. Examples are derandomized
so that CI runs are reproducible.
"""

import numpy as np
import ops_reference as ref
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keras_implicit.ops as ops

A_VEC = np.array([1.0, -2.0, 0.5, 0.0, 1.5])
A_MAT = np.array([[1.0, 2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 1.0, 1.0, -2.0]])
B_VEC = np.array([0.3, -1.2])
LO = np.array([-1.0, -0.5, 0.0, -2.0, 0.3])
HI = np.array([1.0, 0.5, 0.0, 2.0, 0.4])

# name -> (op, row shape, params for the feasibility check, convex?)
SETS = {
    "simplex": (lambda x: ops.projection_simplex(x, 2.0), (5,), {"value": 2.0}, True),
    "l1_ball": (lambda x: ops.projection_l1_ball(x, 2.0), (5,), {"radius": 2.0}, True),
    "l1_sphere": (lambda x: ops.projection_l1_sphere(x, 2.0), (5,), {"radius": 2.0}, False),
    "l2_ball": (lambda x: ops.projection_l2_ball(x, 2.0), (5,), {"radius": 2.0}, True),
    "l2_sphere": (lambda x: ops.projection_l2_sphere(x, 2.0), (5,), {"radius": 2.0}, False),
    "linf_ball": (lambda x: ops.projection_linf_ball(x, 2.0), (5,), {"radius": 2.0}, True),
    "box": (lambda x: ops.projection_box(x, LO, HI), (5,), {"lower": LO, "upper": HI}, True),
    "non_negative": (ops.projection_non_negative, (5,), {}, True),
    "hyperplane": (
        lambda x: ops.projection_hyperplane(x, A_VEC, 0.7),
        (5,),
        {"a": A_VEC, "b": 0.7},
        True,
    ),
    "halfspace": (
        lambda x: ops.projection_halfspace(x, A_VEC, 0.7),
        (5,),
        {"a": A_VEC, "b": 0.7},
        True,
    ),
    "affine_set": (
        lambda x: ops.projection_affine_set(x, A_MAT, B_VEC),
        (5,),
        {"A": A_MAT, "b": B_VEC},
        True,
    ),
    "second_order_cone": (ops.projection_second_order_cone, (5,), {}, True),
    "exp_cone": (ops.projection_exp_cone, (3,), {}, True),
    "psd_cone": (ops.projection_psd_cone, (3, 3), {}, True),
}

_magnitude = st.sampled_from([1e-3, 1.0, 1e3])


def _pairs(row_shape):
    elems = st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False)
    base = hnp.arrays(np.float64, (2, 2, *row_shape), elements=elems)
    return st.tuples(base, _magnitude).map(lambda t: t[0] * t[1])


def _norms(z):
    return np.linalg.norm(z.reshape(len(z), -1), axis=-1)


@pytest.mark.parametrize("name", sorted(SETS))
def test_projection_properties(name):
    fn, row_shape, params, convex = SETS[name]

    @settings(max_examples=20, deadline=None, derandomize=True)
    @given(_pairs(row_shape))
    def check(pair):
        x, y = pair[0], pair[1]
        px, py = np.asarray(fn(x)), np.asarray(fn(y))
        scale = np.maximum(1.0, np.maximum(_norms(x), _norms(y)))
        # feasibility
        assert np.all(ref.set_violation(name, px, **params) <= 1e-9 * scale)
        # idempotence
        ppx = np.asarray(fn(px))
        assert np.all(_norms(ppx - px) <= 1e-9 * scale)
        if convex:  # non-expansiveness
            assert np.all(_norms(px - py) <= _norms(x - y) + 1e-9 * scale)

    check()


@settings(max_examples=20, deadline=None, derandomize=True)
@given(_pairs((5,)), st.floats(0.0, 10.0))
def test_prox_lasso_properties(pair, lam):
    """Soft-thresholding is non-expansive and equals x - P_{linf ball of radius lam}(x)."""
    x, y = pair[0], pair[1]
    px, py = np.asarray(ops.prox_lasso(x, lam)), np.asarray(ops.prox_lasso(y, lam))
    assert np.all(_norms(px - py) <= _norms(x - y) + 1e-12)
    # Moreau: prox of lam ||.||_1 = identity - projection onto the dual-norm ball.
    np.testing.assert_allclose(px, x - np.asarray(ops.projection_linf_ball(x, lam)), atol=1e-12)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(_pairs((5,)), st.floats(0.0, 10.0))
def test_prox_group_lasso_moreau(pair, lam):
    """prox of lam ||.||_2 = identity - projection onto the l2 ball of radius lam."""
    x = pair[0]
    expected = x - np.asarray(ops.projection_l2_ball(x, lam))
    np.testing.assert_allclose(np.asarray(ops.prox_group_lasso(x, lam)), expected, atol=1e-12)
