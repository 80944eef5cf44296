"""QuadraticProgram and ConeProgram at their edges: precision, failure policy, inputs.

Infeasibility certificates and tolerances in the precision the layer computes in,
one failure policy for both layers (eager, graph, XLA), the same input forms, mixed
precision, unknown batch dimensions, and bad rows that never touch the good ones.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_implicit.layers import _qp_solver as qps
from keras_implicit.layers.qp import solve_qp

NAMES = ("Q", "q", "A", "b", "G", "h")


DEFAULTS = qps.Settings()


def _solve(d, dtype, settings=DEFAULTS):
    params = {k: tf.constant(v, dtype) for k, v in d.items()}
    return tf.function(lambda p: solve_qp(p, dict.fromkeys(NAMES, True), settings))(params)


def box_section_qps(rng, batch=4, n=5):
    """min 1/2 |z|^2 + q^T z  s.t.  w^T z = 1,  lower <= z <= upper with lower > upper."""
    lower = rng.uniform(0.5, 1.0, (batch, n))
    upper = lower - rng.uniform(0.1, 1.0, (batch, n))
    return {
        "Q": np.broadcast_to(np.eye(n), (batch, n, n)),
        "q": rng.standard_normal((batch, n)),
        "A": rng.uniform(0.5, 1.5, (batch, 1, n)),
        "b": np.ones((batch, 1)),
        "G": np.broadcast_to(np.concatenate([np.eye(n), -np.eye(n)]), (batch, 2 * n, n)),
        "h": np.concatenate([upper, -lower], axis=1),
    }


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_infeasible_and_unbounded_certified_in_the_compute_dtype(dtype):
    rng = np.random.default_rng(7)
    d = box_section_qps(rng, batch=16)
    _, _, _, status, iters = _solve(d, dtype)
    assert status.numpy().tolist() == [qps.PRIMAL_INFEASIBLE] * 16
    # certified within a quarter of the 4000-iteration budget (float32 used to run it out)
    assert iters.numpy().max() <= 1000
    # an unbounded LP: min q^T z, q > 0, z <= 1
    n = 5
    unbounded = {
        "Q": np.zeros((4, n, n)),
        "q": rng.uniform(0.5, 1.0, (4, n)),
        "A": np.zeros((4, 0, n)),
        "b": np.zeros((4, 0)),
        "G": np.broadcast_to(np.eye(n), (4, n, n)),
        "h": np.ones((4, n)),
    }
    _, _, _, status, iters = _solve(unbounded, dtype)
    assert status.numpy().tolist() == [qps.DUAL_INFEASIBLE] * 4
    assert iters.numpy().max() <= 400
