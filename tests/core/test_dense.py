"""keras_implicit._dense: the small batched factorizations, in every mode, against numpy."""

import numpy as np
import pytest
import tensorflow as tf

from keras_implicit import _dense
from keras_implicit.programs.qp import psd_rows

MODES = {"eager": None, "function": False, "xla": True}


def _run(fn, mode, *args):
    if MODES[mode] is not None:
        fn = tf.function(fn, jit_compile=MODES[mode])
    return tf.nest.map_structure(lambda t: t.numpy(), fn(*(tf.constant(a) for a in args)))


@pytest.mark.parametrize("mode", list(MODES))
def test_inverse_and_solve_match_numpy_and_isolate_a_singular_row(mode):
    rng = np.random.default_rng(0)
    M = rng.standard_normal((5, 9, 9))
    M[2, :, 4] = 0.0  # singular
    M[3] = np.eye(9)[::-1] * 3.0  # zero diagonal: needs row pivoting
    S = M @ M.transpose(0, 2, 1) + np.eye(9)
    b = rng.standard_normal((5, 9))
    inv, inv_spd, w, v = _run(
        lambda m, s, b: (
            _dense.inverse(m),
            _dense.spd_inverse(s),
            _dense.solve(_dense.factor(m), b, adjoint=True),
            _dense.solve(_dense.factor(m), b),
        ),
        mode,
        M,
        S,
        b,
    )
    good = [0, 1, 3, 4]
    np.testing.assert_allclose(inv[good], np.linalg.inv(M[good]), atol=1e-10)
    np.testing.assert_allclose(inv_spd, np.linalg.inv(S), atol=1e-10)
    np.testing.assert_allclose(
        w[good], np.linalg.solve(M[good].transpose(0, 2, 1), b[good][..., None])[..., 0], atol=1e-10
    )
    np.testing.assert_allclose(
        v[good], np.linalg.solve(M[good], b[good][..., None])[..., 0], atol=1e-10
    )
    assert not np.isfinite(inv[2]).all() and not np.isfinite(w[2]).all()


@pytest.mark.parametrize("mode", list(MODES))
def test_psd_check_agrees_with_eigenvalues(mode):
    rng = np.random.default_rng(1)
    L = rng.standard_normal((6, 6))
    S = L @ L.T
    low = np.linalg.eigvalsh(S).min()
    u = rng.standard_normal(6)
    Q = np.stack(
        [
            S,  # PD
            np.outer(u, u),  # PSD, rank 1 (roundoff eigenvalues ~ -1e-16)
            np.zeros((6, 6)),
            S - (low + 1e-3) * np.eye(6),  # min eigenvalue -1e-3
            -S,
            L,  # nonsymmetric: its symmetric part decides
        ]
    )
    expected = [np.linalg.eigvalsh(0.5 * (q + q.T)).min() >= -1e-8 * 40 for q in Q]
    assert expected == [True, True, True, False, False, bool(expected[5])]
    assert _run(psd_rows, mode, Q).tolist() == expected
    assert _run(psd_rows, mode, np.zeros((2, 0, 0))).tolist() == [True, True]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("n", [5, 70])  # unrolled, and a while_loop past the unrolled size
def test_spd_solve_matches_numpy_and_isolates_a_singular_row(mode, n):
    rng = np.random.default_rng(2)
    L = rng.standard_normal((3, n, n))
    S = L @ L.transpose(0, 2, 1) + 0.1 * np.eye(n)
    S[1] = 0.0  # singular: that row alone comes out non-finite
    b = rng.standard_normal((3, n))
    (x,) = _run(lambda s, b: (_dense.spd_solve(s, b),), mode, S, b)
    good = [0, 2]
    np.testing.assert_allclose(
        x[good], np.linalg.solve(S[good], b[good][..., None])[..., 0], rtol=1e-8
    )
    assert not np.isfinite(x[1]).all()
