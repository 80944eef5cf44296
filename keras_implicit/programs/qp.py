"""The QP as a differentiable TensorFlow function: `solve_qp`.

    z*(theta) = argmin_z 1/2 z^T Q z + q^T z   s.t.   A z = b,   G z <= h

Forward: `qp_admm.admm` (OSQP-style ADMM with polishing) on rows rescaled to unit size,
after a per-row check of Q's convexity. Backward: `ki.custom_root` on the KKT
conditions at the solution,
    F(x, nu, lam) = [Q x + q + A^T nu + G^T lam;  A x - b;  M (G x - h) + (1 - M) lam] = 0
with M = 1 on inequality rows whose dual is positive (active) and 0 elsewhere. For the
problem sizes a layer meets (tens to a few hundreds of variables) the Jacobian K of F
is small and dense, so K^T w = g is solved per row directly (`ki.linalg.Dense`: K
materialized, then QR; exact, and cheaper than a matrix-free Krylov solve). Parameter
gradients are -(dF/dtheta)^T w, one VJP of F, so broadcast (unbatched) weights receive
the sum over the batch.
Conservative-Jacobian choice at kinks: a weakly active constraint (lam = 0 and
G x = h) is treated as inactive (M = 0). Rows whose status is not SOLVED, or whose
solve is not finite, contribute an exactly zero gradient.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_implicit import _dense, implicit, linalg
from keras_implicit._structure import SolverStats, row_norm, safe_divide
from keras_implicit.programs import qp_admm
from keras_implicit.programs._admm import NOT_CONVEX, NUMERICAL_ERROR, keep_solved_gradient
from keras_implicit.programs.qp_admm import Settings

__all__ = ["NAMES", "Settings", "check_psd_array", "psd_rows", "solve_qp"]

NAMES = ("Q", "q", "A", "b", "G", "h")


def _kkt_residual(x, nu, lam, mask_in, Q, q, A, b, G, h):
    """F of the module docstring (batched; unbatched parameters broadcast)."""
    P = qp_admm.symmetrize(Q)
    stat = (
        tf.linalg.matvec(P, x)
        + q
        + tf.linalg.matvec(A, nu, transpose_a=True)
        + tf.linalg.matvec(G, lam, transpose_a=True)
    )
    stat = tf.broadcast_to(stat, tf.shape(x))
    eq = tf.linalg.matvec(A, x) - b
    eq = tf.broadcast_to(eq, tf.shape(nu))
    ineq = mask_in * (tf.linalg.matvec(G, x) - h) + (1.0 - mask_in) * lam
    return stat, eq, ineq


def psd_tolerance(dtype) -> float:
    """Relative tolerance of the PSD check: min eig >= -tol * max(1, ||(Q + Q^T)/2||_F)."""
    return 1e-8 if tf.as_dtype(dtype) == tf.float64 else 1e-5


def psd_rows(Q):
    """Per row (B,) bool: is the symmetric part of Q (B, n, n) PSD (within tolerance).

    P = (Q + Q^T)/2 passes when P + tol * max(1, ||P||_F) I is positive definite: the
    pivots of its LDL^T factorization (`_dense.smallest_pivot`, cheap under XLA unlike
    an eigendecomposition) are all positive.
    """
    P = qp_admm.symmetrize(Q)
    scale = tf.maximum(tf.sqrt(tf.reduce_sum(tf.square(P), axis=[-2, -1])), 1.0)
    shift = psd_tolerance(Q.dtype) * scale
    n = tf.shape(P)[-1]
    shifted = P + shift[:, None, None] * tf.eye(n, dtype=P.dtype)
    return _dense.smallest_pivot(shifted) > 0


def check_psd_array(Q):
    """Raises a ValueError quoting the minimum eigenvalue if `Q`'s symmetric part is not PSD."""
    arr = np.asarray(Q, dtype="float64")
    if arr.size == 0:
        return
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`Q` must be finite. Received: Q={np.asarray(Q)!r}")
    eig = np.linalg.eigvalsh(0.5 * (arr + arr.T))
    tol = psd_tolerance("float64" if np.asarray(Q).dtype == np.float64 else "float32")
    bound = tol * max(1.0, float(np.linalg.norm(0.5 * (arr + arr.T))))
    if eig.min() < -bound:
        raise ValueError(
            "`Q` must be symmetric positive semidefinite (only then is the QP convex); "
            f"the minimum eigenvalue of its symmetric part (Q + Q^T)/2 is {eig.min():.6g} "
            f"(tolerance {-bound:.3g}). Received: Q with eigenvalues in "
            f"[{eig.min():.6g}, {eig.max():.6g}]"
        )


def solve_qp(
    params: dict,
    batched: dict,
    settings: qp_admm.Settings,
    check_psd=None,
    backward_on_failure="ignore",
):
    """Solves the batch of QPs; differentiable w.r.t. every floating tensor in `params`.

    params: name -> tensor for all six names (absent ones as zero-size/zero tensors).
    batched: name -> bool (True if the tensor has the leading batch axis).
    check_psd: test Q's PSD-ness per row (status 5 "non_convex" where it fails);
      default: when Q is batched.
    backward_on_failure: policy for a gradient solve (the KKT system at the active set)
      that misses its tolerance, e.g. a singular one: "ignore", "warn" or "raise".
    Returns x, nu, lam, status, iterations.

    Rows whose data is small are solved in normalized units, so that the absolute part
    of the tolerance does not swallow them: with tau = min(1, largest |b|, |h| (finite))
    and sigma = min(1, largest |Q|, |q| / tau), the QP (Q / sigma, q / (tau sigma), A,
    b / tau, G, h / tau) has the solution x* / tau and duals / (tau sigma), exactly (a
    cost of 1e-8 is solved as accurately as one of 1). Rows with data of size 1 or more
    are solved as given (Ruiz equilibration handles their units). The gradient through
    the stopped scales is exact: x* is homogeneous of degree 0 in (Q, q) and of degree
    1 in (q, b, h).
    """
    if check_psd is None:
        check_psd = batched["Q"]
    ref = next(params[k] for k in NAMES if batched[k])
    B = tf.shape(ref)[0]

    def full(name):
        t = params[name]
        return t if batched[name] else tf.broadcast_to(t, tf.concat([[B], tf.shape(t)], 0))

    Q, q, A, b, G, h = (full(k) for k in NAMES)

    def row_max(t):
        t = tf.abs(tf.stop_gradient(t))
        t = tf.where(tf.math.is_finite(t), t, tf.zeros_like(t))
        pad = tf.zeros([B, 1], t.dtype)  # keeps empty parameters (p = 0, m = 0) defined
        return tf.reduce_max(tf.concat([tf.reshape(t, [B, -1]), pad], -1), -1)

    def usable(scale):
        return tf.where(scale > 0, tf.minimum(scale, 1.0), tf.ones_like(scale))

    tau = usable(tf.maximum(row_max(b), row_max(h)))
    sigma = usable(tf.maximum(row_max(Q), row_max(q) / tau))
    normalized = {
        "Q": Q / sigma[:, None, None],
        "q": q / (tau * sigma)[:, None],
        "A": A,
        "b": b / tau[:, None],
        "G": G,
        "h": h / tau[:, None],
    }
    x, nu, lam, status, iters = _solve_normalized(
        normalized, settings, check_psd, backward_on_failure
    )
    dual = (tau * sigma)[:, None]
    return x * tau[:, None], nu * dual, lam * dual, status, iters


def _usable_rows(params, check_psd):
    """The rows' data (gradient stopped) with bad rows replaced by a trivial problem.

    Returns the cleaned Q, q, A, b, G, h and per row: finite data and (with `check_psd`)
    a PSD Q.
    """
    Q, q, A, b, G, h = (tf.stop_gradient(params[k]) for k in NAMES)
    B, n = tf.shape(q)[0], tf.shape(q)[-1]
    finite = tf.ones([B], tf.bool)
    for t in (Q, q, A, b, G, h):
        finite &= tf.reduce_all(tf.math.is_finite(t), axis=list(range(1, t.shape.rank)))
    eye = tf.eye(n, batch_shape=[B], dtype=Q.dtype)
    Q = tf.where(finite[:, None, None], Q, eye)
    convex = psd_rows(Q) if check_psd else tf.ones([B], tf.bool)
    ok = finite & convex
    Q = tf.where(ok[:, None, None], Q, eye)
    q, b, h = (tf.where(ok[:, None], t, tf.zeros_like(t)) for t in (q, b, h))
    A, G = (tf.where(ok[:, None, None], t, tf.zeros_like(t)) for t in (A, G))
    return (Q, q, A, b, G, h), finite, convex


def _solve_normalized(params, settings, check_psd, backward_on_failure):
    """Solves rows given with a batch axis on every parameter; see `solve_qp`."""
    with tf.name_scope("quadratic_program"):
        (Q, q, A, b, G, h), finite, convex = _usable_rows(params, check_psd)
        dtype, B = q.dtype, tf.shape(q)[0]
        p, m_in = b.shape[-1], h.shape[-1]
        C = tf.concat([A, G], axis=-2)
        inf = tf.fill([B, m_in], tf.constant(np.inf, dtype))
        lower = tf.concat([b, -inf], axis=-1)
        upper = tf.concat([b, h], axis=-1)
        is_eq = tf.broadcast_to(
            tf.concat([tf.ones([p], tf.bool), tf.zeros([m_in], tf.bool)], axis=0), [B, p + m_in]
        )
        P = qp_admm.symmetrize(Q)
        x, y, status, iters = qp_admm.admm(P, q, C, lower, upper, is_eq, settings)
        ok = finite & convex
        status = tf.where(ok, status, tf.where(convex, NUMERICAL_ERROR, NOT_CONVEX))
        x = tf.where(ok[:, None], x, tf.constant(np.nan, dtype))
        y = tf.where(ok[:, None], y, tf.constant(np.nan, dtype))
        x, y, status, iters = (tf.stop_gradient(t) for t in (x, y, status, iters))
        x, nu, lam = _attach_gradient(x, y[:, :p], y[:, p:], params, P, C, backward_on_failure)
        x, nu, lam = keep_solved_gradient(status, (x, nu, lam))
        return x, nu, lam, status, iters


class _AdjointKKT(linalg.LinearSolver):
    """K^T w = g per row by QR, with K the KKT Jacobian [[P, C^T], [M C, I - M]].

    `custom_root` hands a linear solver the VJP of F as `matvec`; K is known in closed
    form, so it is built directly rather than materialized from n + p + m VJPs.
    """

    name = "kkt_qr"

    def __init__(self, P, C, mask, tol=1e-5):
        super().__init__(tol=tol, max_iter=1)
        self._data = (P, C, mask)

    def with_options(self, **options):
        tol = options.get("tol")
        return self if tol is None else _AdjointKKT(*self._data, tol=tol)

    def __call__(self, matvec, b, init=None):
        K = qp_admm.kkt_matrix(*self._data)
        w = _dense.solve(_dense.factor(K), b, adjoint=True)
        residual = safe_divide(row_norm(b - tf.linalg.matvec(K, w, transpose_a=True)), row_norm(b))
        converged = tf.math.is_finite(residual) & (residual <= self.tol)
        return w, SolverStats(tf.ones(tf.shape(b)[:1], tf.int32), residual, converged)


def _attach_gradient(x, nu, lam, params, P, C, backward_on_failure):
    """(x, nu, lam) as the root of the KKT residual F, with implicit gradients.

    `custom_root` solves (dF/d(x, nu, lam))^T w = g per row (`_AdjointKKT`) and
    returns -(dF/dtheta)^T w. The active set (M) is read off the duals and held fixed.
    """
    mask_in = tf.cast(tf.not_equal(lam, 0.0), lam.dtype)
    mask = tf.concat([tf.ones_like(nu), mask_in], axis=-1)

    def residual(solution, *theta):
        return _kkt_residual(*solution, mask_in, *theta)

    solve = implicit.custom_root(
        residual,
        linear_solver=_AdjointKKT(P, C, mask),
        batch_dims=1,
        on_failure="ignore",  # the forward is reported through the status
        backward_on_failure=backward_on_failure,
    )(lambda solution, *theta: solution)
    return solve((x, nu, lam), *(params[k] for k in NAMES))
