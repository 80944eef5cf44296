"""What the convex-program solvers share: per-row status codes, norms, tolerances.

Both solvers (`qp_admm`, the OSQP splitting of a QP, and `cone`, the COSMO splitting
of a cone program) iterate ADMM in chunks inside one fixed-shape `tf.while_loop`,
check every row after each chunk, and classify it with the codes below.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

SOLVED = 0
MAX_ITER = 1
PRIMAL_INFEASIBLE = 2
DUAL_INFEASIBLE = 3
NUMERICAL_ERROR = 4
NOT_CONVEX = 5  # a QP whose Q (batched input or trained weight) is not PSD
STATUS_NAMES = {
    SOLVED: "solved",
    MAX_ITER: "max_iter",
    PRIMAL_INFEASIBLE: "primal_infeasible",
    DUAL_INFEASIBLE: "dual_infeasible",
    NUMERICAL_ERROR: "numerical_error",
    NOT_CONVEX: "non_convex",
}

# relative tolerance of the infeasibility certificates, and its floor in machine
# epsilons of the solve dtype (float32: 1.2e-4, OSQP's default)
INFEASIBLE_TOL = 1e-5
INFEASIBLE_TOL_ULPS = 1e3


def inf_norm(x):
    """Row-wise max |x| over the last axis; 0 for an empty axis (reduce_max gives -inf)."""
    pad = tf.zeros(tf.concat([tf.shape(x)[:-1], [1]], axis=0), x.dtype)
    return tf.reduce_max(tf.abs(tf.concat([x, pad], axis=-1)), axis=-1)


def infeasible_tol(tol: float, dtype) -> float:
    """The certificates' relative tolerance in `dtype`: `tol`, at least 1e3 epsilons.

    The certificates are differences of iterates that grow linearly; in float32 their
    rounding (amplified by a stiff equality-row penalty) leaves A^T dy ~ 1e-4 |dy|
    where float64 reaches 1e-11, so a float64 tolerance would never certify.
    """
    return max(tol, INFEASIBLE_TOL_ULPS * float(np.finfo(tf.as_dtype(dtype).as_numpy_dtype).eps))


# bounds of the per-row ADMM step size rho
RHO_MIN, RHO_MAX = 1e-6, 1e6


def balanced_rho(rho, r_prim, s_prim, r_dual, s_dual, *, factor: float):
    """Residual balancing (OSQP / COSMO): rho * sqrt(relative primal / relative dual).

    r_*: the rows' primal and dual residual norms, s_*: the scales they are relative to.
    Returns (rho, moved): a row's rho changes only when the proposal, clipped to
    [RHO_MIN, RHO_MAX], is more than `factor` away from it (each change costs the
    solver a refactorization), both residuals are positive and the proposal is finite.
    The fixed points of the ADMM map do not depend on rho, so the step size is free to
    follow the residuals.
    """
    tiny = tf.constant(np.finfo(rho.dtype.as_numpy_dtype).tiny, rho.dtype)
    ratio = (r_prim / (s_prim + tiny)) / (r_dual / (s_dual + tiny) + tiny)
    proposed = tf.clip_by_value(rho * tf.sqrt(ratio), RHO_MIN, RHO_MAX)
    moved = (proposed > factor * rho) | (proposed * factor < rho)
    moved &= tf.math.is_finite(proposed) & (r_prim > 0) & (r_dual > 0)
    return tf.where(moved, proposed, rho), moved


def classify(finite, converged, primal_infeasible, dual_infeasible):
    """Per-row status after a chunk: not finite > solved > infeasible > max_iter."""
    unsolved = tf.where(
        primal_infeasible,
        PRIMAL_INFEASIBLE,
        tf.where(dual_infeasible, DUAL_INFEASIBLE, MAX_ITER),
    )
    return tf.where(~finite, NUMERICAL_ERROR, tf.where(converged, SOLVED, unsolved))


def chunks(max_iter: int, check_interval: int) -> int:
    """Number of chunks of `check_interval` iterations covering `max_iter` (at least 1)."""
    return max(1, -(-max_iter // check_interval))


def keep_solved_gradient(status, tensors):
    """`tensors` ([B, ...]) with the gradient stopped on rows whose status is not SOLVED."""
    ok = tf.equal(status, SOLVED)

    def mask(t):
        row = tf.reshape(ok, [-1] + [1] * (t.shape.rank - 1))
        return tf.where(row, t, tf.stop_gradient(t))

    return tf.nest.map_structure(mask, tensors)
