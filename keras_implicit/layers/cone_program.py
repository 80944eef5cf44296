"""`ConeProgram`: a differentiable, batched conic program as a Keras layer.

    x*(c, A, b) = argmin_x c^T x   s.t.   A x + s = b,   s in K

K is a product of cones given by an SCS-style spec dict, in this order along s:
``{"z": 2, "l": 3, "q": [3], "s": [2], "ep": 1}``
  z   zero cone of that dimension (equalities A_i x = b_i)
  l   nonnegative orthant (inequalities A_i x <= b_i)
  q   list of second-order cone sizes; each block (t, v) with ||v|| <= t (t first)
  s   list of PSD matrix orders k; each block holds k(k+1)/2 entries, SCS's
      vectorization: the lower triangle column by column, off-diagonal entries
      scaled by sqrt(2) (so that the vector inner product is the trace one)
  ep  number of exponential cones, each (x, y, z) with y exp(x/y) <= z

Forward: ADMM on the splitting  A x + s = b, s in K  (the conic operator splitting
of Garstka, Cannon, Goulart, "COSMO", JOTA 2021, a generalization of OSQP's): the
x-update solves (sigma I + rho A^T A) x = ... with an explicit per-row inverse, the
s-update projects onto K with the `keras_implicit.ops` cone projections. We use this
rather than SCS's homogeneous self-dual embedding because the iterate (x, s, y) is
the primal-dual solution itself, so the solution map is directly the fixed point of
one map. Per-row convergence checks (primal/dual residuals), frozen finished rows.
Infeasibility: every `check_interval` steps the iterate differences are tested as
certificates (COSMO's, the ADMM analogue of SCS's tau -> 0, kappa > 0 rays of the
homogeneous embedding): dy in K*, A^T dy ~ 0, b^T dy < 0 flags a row primal
infeasible; -A dx in K, c^T dx < 0 flags it dual infeasible (unbounded). Both
tests are relative to the size of the difference, with tolerance 1e-5 (at least
1e3 machine epsilons of the solve dtype: float32 rounding hides smaller ones).

Backward: implicit differentiation of that fixed point with `ki.custom_fixed_point`
(matrix-free GMRES on (I - J^T) u = g, J the Jacobian of the ADMM map, whose cone
projections contribute their closed-form Jacobians). Rows whose status is not 0
(solved) get an exactly zero gradient; the other rows are unaffected.

Outputs: x (B, n); with `return_duals=True` also y (B, m) (the dual, in K*); with
`return_status=True` also status (B,) int32, the codes of `QuadraticProgram`:
0 solved, 1 max_iter, 2 primal infeasible, 3 dual infeasible (unbounded),
4 numerical error (`ConeProgram.STATUS_NAMES`). Rows not solved hold the last
iterate: mask them with the status. They are reported under `on_failure` ("warn",
"raise" or "ignore"), through the same policy as `QuadraticProgram`.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from keras_implicit import _policy, _validation
from keras_implicit import implicit as _implicit
from keras_implicit import ops as kops
from keras_implicit.layers import _qp_solver as qps
from keras_implicit.layers.qp import (
    cast_input,
    check_input_names,
    normalize_inputs,
    program_output_spec,
    report_status,
    solve_dtype,
    to_compute_dtype,
)

__all__ = ["ConeProgram", "project_cone", "validate_cone"]

_KEYS = ("z", "l", "q", "s", "ep")
INPUT_NAMES = ("c", "A", "b")
# P (a quadratic objective) is an input only when named: in a dict or in `input_names`
ALL_INPUT_NAMES = (*INPUT_NAMES, "P")
INFEASIBLE_TOL = 1e-5  # relative tolerance of the infeasibility certificates
# adaptive step size: bounds, and the factor a balanced rho must differ by to be taken
RHO_MIN, RHO_MAX, RHO_UPDATE_FACTOR = 1e-6, 1e6, 2.0
# the per-row status codes, shared with QuadraticProgram
STATUS_NAMES = {
    k: v
    for k, v in qps.STATUS_NAMES.items()
    if k
    in (qps.SOLVED, qps.MAX_ITER, qps.PRIMAL_INFEASIBLE, qps.DUAL_INFEASIBLE, qps.NUMERICAL_ERROR)
}


# ------------------------------------------------------------------ cone spec


def validate_cone(cone) -> dict:
    """Normalizes an SCS-style cone dict; errors quote the received value."""
    if not isinstance(cone, dict):
        raise ValueError(
            f"`cone` must be a dict like {{'l': 3, 'q': [3]}}. Received: cone={cone!r}"
        )
    bad = [k for k in cone if k not in _KEYS]
    if bad:
        raise ValueError(
            f"Unsupported cone keys {bad}; supported: {list(_KEYS)}. Received: cone={cone!r}"
        )
    out = {}
    for k in ("z", "l", "ep"):
        v = cone.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"cone['{k}'] must be a non-negative integer. Received: cone={cone!r}")
        out[k] = int(v)
    for k, least in (("q", 1), ("s", 1)):
        v = cone.get(k, [])
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            v = [v]
        v = list(v)
        if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < least for d in v):
            raise ValueError(
                f"cone['{k}'] must be a list of integers >= {least}. Received: cone={cone!r}"
            )
        out[k] = [int(d) for d in v]
    if cone_dim(out) == 0:
        raise ValueError(f"The cone is empty. Received: cone={cone!r}")
    return out


def cone_dim(cone) -> int:
    return (
        cone["z"]
        + cone["l"]
        + sum(cone["q"])
        + sum(k * (k + 1) // 2 for k in cone["s"])
        + 3 * cone["ep"]
    )


def _tril_indices(k):
    """SCS order: lower triangle column by column."""
    rows, cols = [], []
    for j in range(k):
        for i in range(j, k):
            rows.append(i)
            cols.append(j)
    return np.array(rows), np.array(cols)


def _psd_project_vec(v, k):
    """Projection of SCS-vectorized symmetric matrices v (B, k(k+1)/2) onto the PSD cone."""
    rows, cols = _tril_indices(k)
    dtype = v.dtype
    scale = np.where(rows == cols, 1.0, 1.0 / math.sqrt(2.0))
    entries = v * tf.constant(scale, dtype)
    flat_lower = rows * k + cols
    flat_upper = cols * k + rows
    batch = tf.shape(v)[0]
    # scatter via a fixed 0/1 matrix: (B, T) @ (T, k*k); duplicates on the diagonal
    # are avoided because lower/upper coincide only there (use lower only)
    T = len(rows)
    mat = np.zeros((T, k * k))
    mat[np.arange(T), flat_lower] = 1.0
    off = rows != cols
    mat[np.arange(T)[off], flat_upper[off]] = 1.0
    full = tf.reshape(tf.matmul(entries, tf.constant(mat, dtype)), [batch, k, k])
    proj = kops.projection_psd_cone(full)
    flat = tf.reshape(proj, [batch, k * k])
    out = tf.gather(flat, flat_lower, axis=-1)
    return out / tf.constant(scale, dtype)


def project_cone(v, cone):
    """Projection of v (B, m) onto K (the product cone of `cone`, SCS order)."""
    parts, i = [], 0
    if cone["z"]:
        parts.append(tf.zeros_like(v[:, i : i + cone["z"]]))
        i += cone["z"]
    if cone["l"]:
        parts.append(kops.projection_non_negative(v[:, i : i + cone["l"]]))
        i += cone["l"]
    for d in cone["q"]:
        parts.append(kops.projection_second_order_cone(v[:, i : i + d]))
        i += d
    for k in cone["s"]:
        t = k * (k + 1) // 2
        parts.append(_psd_project_vec(v[:, i : i + t], k))
        i += t
    if cone["ep"]:
        e = cone["ep"]
        block = tf.reshape(v[:, i : i + 3 * e], [-1, e, 3])
        parts.append(tf.reshape(kops.projection_exp_cone(block), [-1, 3 * e]))
        i += 3 * e
    return tf.concat(parts, axis=-1)


# ------------------------------------------------------------------ solver


def _inverse(A, rho, sigma, P=None):
    """(P + sigma I + rho A^T A)^{-1} per row (P: the quadratic objective, or None).

    rho is a scalar or a per-row step size of shape (B, 1).
    """
    n = tf.shape(A)[-1]
    eye = tf.eye(n, batch_shape=tf.shape(A)[:1], dtype=A.dtype)
    rho = tf.reshape(rho, [-1, 1, 1]) if rho.shape.rank else rho
    matrix = sigma * eye + rho * tf.linalg.matmul(A, A, transpose_a=True)
    return spd_inverse(matrix if P is None else matrix + P)


# largest order inverted by unrolled Gauss-Jordan under XLA (the graph grows as n^1)
UNROLLED_INVERSE_MAX_ORDER = 64


def spd_inverse(matrix):
    """Inverse of a batch of symmetric positive definite matrices (B, n, n).

    Under XLA on CPU, `tf.linalg.inv` and `tf.linalg.cholesky` compile to slow scalar
    loops (about 3x slower than Gauss-Jordan at n = 12, 4x at n = 60); there, for a
    static n up to UNROLLED_INVERSE_MAX_ORDER, Gauss-Jordan elimination is unrolled
    into batched rank-one updates, which XLA fuses. Positive definiteness makes
    pivoting unnecessary. Elsewhere this is `tf.linalg.inv` (LAPACK).
    """
    n = matrix.shape[-1]
    if n is None or n > UNROLLED_INVERSE_MAX_ORDER or not _policy.in_xla_context():
        return tf.linalg.inv(matrix)
    return _gauss_jordan_inverse(matrix)


@tf.custom_gradient
def _gauss_jordan_inverse(matrix):
    n = matrix.shape[-1]
    dtype = matrix.dtype
    augmented = tf.concat([matrix, tf.eye(n, batch_shape=tf.shape(matrix)[:1], dtype=dtype)], -1)
    for k in range(n):
        pivot_row = augmented[:, k, :] / augmented[:, k, k : k + 1]
        column = augmented[:, :, k] - tf.one_hot(k, n, dtype=dtype)
        augmented -= column[:, :, None] * pivot_row[:, None, :]
    inverse = augmented[:, :, n:]

    def grad(upstream):  # d(M^-1) = -M^-1 dM M^-1
        return -tf.linalg.matmul(
            tf.linalg.matmul(inverse, upstream, transpose_a=True), inverse, transpose_b=True
        )

    return inverse, grad


def _balanced_rho(rho, r_prim, s_prim, r_dual, s_dual, tiny):
    """Residual balancing (OSQP / COSMO): rho * sqrt(relative primal / relative dual).

    Applied per row only when it moves rho by more than RHO_UPDATE_FACTOR, clipped to
    [RHO_MIN, RHO_MAX]; the fixed points of the ADMM map do not depend on rho, so the
    step size is free to follow the residuals.
    """
    ratio = (r_prim / (s_prim + tiny)) / (r_dual / (s_dual + tiny) + tiny)
    proposed = tf.clip_by_value(rho * tf.sqrt(ratio), RHO_MIN, RHO_MAX)
    move = (proposed > RHO_UPDATE_FACTOR * rho) | (proposed * RHO_UPDATE_FACTOR < rho)
    move &= tf.math.is_finite(proposed) & (r_prim > 0) & (r_dual > 0)
    return tf.where(move, proposed, rho), move


def _admm_step(state, c, A, b, cone, rho, sigma, alpha, inv):
    """One relaxed ADMM step on (x, s, y); fixed points are primal-dual solutions.

    Scaled-dual ADMM on the consensus s~ = s, s in K, with (x~, s~) from the
    equality-constrained subproblem A x~ + s~ = b; at a fixed point P x + c = A^T y.
    A quadratic objective enters only through `inv` (COSMO's x-update).
    """
    x, s, y = state
    rhs = sigma * x - c + tf.linalg.matvec(A, rho * (b - s) + y, transpose_a=True)
    xt = tf.linalg.matvec(inv, rhs)
    st = b - tf.linalg.matvec(A, xt)
    x_new = alpha * xt + (1.0 - alpha) * x
    sr = alpha * st + (1.0 - alpha) * s
    s_new = project_cone(sr + y / rho, cone)
    y_new = y + rho * (sr - s_new)
    return x_new, s_new, y_new


def _infeasibility(c, A, b, cone, dx, dy, eps, P=None):
    """Per-row certificates from ADMM iterate differences (COSMO, Garstka et al. 2021).

    The ADMM iterates of an infeasible problem diverge linearly; their differences
    converge to certificates (scaled arbitrarily, so every test is relative):
      primal infeasible: dy in K*, A^T dy = 0, b^T dy < 0 (dy: conic dual sign);
      dual infeasible (unbounded): -A dx in K, c^T dx < 0 (and P dx = 0).
    K* membership is dist(dy, K*) = ||P_K(-dy)|| (Moreau; the zero cone's dual is
    free, and P_K zeroes that block).
    """
    ny = qps._inf_norm(dy)
    dist_dual = qps._inf_norm(project_cone(-dy, cone))
    p_inf = (
        (ny > eps)
        & (qps._inf_norm(tf.linalg.matvec(A, dy, transpose_a=True)) <= eps * ny)
        & (tf.reduce_sum(b * dy, -1) <= -eps * ny)
        & (dist_dual <= eps * ny)
    )
    nx = qps._inf_norm(dx)
    u = -tf.linalg.matvec(A, dx)
    dist_primal = qps._inf_norm(u - project_cone(u, cone))
    d_inf = (nx > eps) & (tf.reduce_sum(c * dx, -1) <= -eps * nx) & (dist_primal <= eps * nx)
    if P is not None:
        d_inf &= qps._inf_norm(tf.linalg.matvec(P, dx)) <= eps * nx
    return p_inf, d_inf


def _solve(c, A, b, cone, settings, batch, P=None):
    """Runs ADMM in chunks with per-row convergence and per-row adaptive rho.

    Returns the state (x, s, y), status, iterations and the final rho (B, 1).
    """
    dtype = c.dtype
    sigma = tf.constant(settings["sigma"], dtype)
    alpha = tf.constant(settings["alpha"], dtype)
    eps = tf.constant(settings["tol"], dtype)
    eps_inf = tf.constant(qps.infeasible_tol(INFEASIBLE_TOL, dtype), dtype)
    tiny = tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype)
    adaptive = settings.get("adaptive_rho", True)
    rho = tf.fill([batch, 1], tf.constant(settings["rho"], dtype))
    inv = _inverse(A, rho, sigma, P)
    n, m = tf.shape(c)[-1], tf.shape(b)[-1]
    x, s, y = tf.zeros([batch, n], dtype), tf.zeros([batch, m], dtype), tf.zeros([batch, m], dtype)
    status = tf.fill([batch], tf.constant(qps.MAX_ITER, tf.int32))
    iters = tf.zeros([batch], tf.int32)
    interval = settings["check_interval"]
    n_chunks = max(1, -(-settings["max_iter"] // interval))

    def chunk(k, x, s, y, status, iters, rho, inv):
        active = tf.equal(status, qps.MAX_ITER)

        def inner(i, x, s, y):
            return (i + 1, *_admm_step((x, s, y), c, A, b, cone, rho, sigma, alpha, inv))

        _, xn, sn, yn = tf.while_loop(lambda i, *_: i < interval, inner, (0, x, s, y))
        Ax, Aty = tf.linalg.matvec(A, xn), tf.linalg.matvec(A, yn, transpose_a=True)
        Px = tf.zeros_like(xn) if P is None else tf.linalg.matvec(P, xn)
        r_prim = qps._inf_norm(Ax + sn - b)
        r_dual = qps._inf_norm(Px + c - Aty)
        s_prim = tf.maximum(tf.maximum(qps._inf_norm(Ax), qps._inf_norm(sn)), qps._inf_norm(b))
        s_dual = tf.maximum(tf.maximum(qps._inf_norm(Aty), qps._inf_norm(c)), qps._inf_norm(Px))
        # primal 1/2 x'Px + c'x against dual -1/2 x'Px - b'y (y the conic dual, -yn)
        xPx = tf.reduce_sum(xn * Px, -1)
        primal = 0.5 * xPx + tf.reduce_sum(c * xn, -1)
        gap = tf.abs(primal + 0.5 * xPx - tf.reduce_sum(b * yn, -1))
        done = (
            (r_prim <= eps * (1 + s_prim))
            & (r_dual <= eps * (1 + s_dual))
            & (gap <= eps * (1 + tf.abs(primal)))
        )
        finite = tf.math.is_finite(r_prim) & tf.math.is_finite(r_dual)
        # certificates from the iterate differences over this chunk (not checked on
        # the first chunk, whose differences are from the zero start)
        p_inf, d_inf = _infeasibility(c, A, b, cone, xn - x, -(yn - y), eps_inf, P)
        p_inf &= k > 0
        d_inf &= k > 0
        new = tf.where(
            ~finite,
            qps.NUMERICAL_ERROR,
            tf.where(
                done,
                qps.SOLVED,
                tf.where(
                    p_inf,
                    qps.PRIMAL_INFEASIBLE,
                    tf.where(d_inf, qps.DUAL_INFEASIBLE, qps.MAX_ITER),
                ),
            ),
        )
        status = tf.where(active, new, status)
        iters = tf.where(active, iters + interval, iters)
        a2 = active[:, None]
        if adaptive:
            balanced, move = _balanced_rho(rho[:, 0], r_prim, s_prim, r_dual, s_dual, tiny)
            move &= tf.equal(status, qps.MAX_ITER)
            rho = tf.where(move[:, None], balanced[:, None], rho)
            inv = tf.cond(
                tf.reduce_any(move),
                lambda: tf.where(move[:, None, None], _inverse(A, rho, sigma, P), inv),
                lambda: inv,
            )
        x, s, y = tf.where(a2, xn, x), tf.where(a2, sn, s), tf.where(a2, yn, y)
        return k + 1, x, s, y, status, iters, rho, inv

    _, x, s, y, status, iters, rho, _ = tf.while_loop(
        lambda k, *rest: (k < n_chunks) & tf.reduce_any(tf.equal(rest[3], qps.MAX_ITER)),
        chunk,
        (0, x, s, y, status, iters, rho, inv),
    )
    return (x, s, y), status, iters, rho


def _row_scale(t):
    """Per row max |t| (1 where that is 0 or not finite), gradient stopped."""
    t = tf.stop_gradient(t)
    scale = tf.reduce_max(tf.abs(t), axis=list(range(1, t.shape.rank)))
    return tf.where(tf.math.is_finite(scale) & (scale > 0), scale, tf.ones_like(scale))


def solve_cone_program(c, A, b, cone, settings, P=None):
    """Batched c (B, n), A (B, m, n), b (B, m) [, P (B, n, n)]; differentiable w.r.t. all.

    Solves min 1/2 x'Px + c'x s.t. Ax + s = b, s in K (P = None: a linear objective).
    Each row is solved on rescaled data: with sA, sb the largest entries of A and b,
    x = k x^ (k = sb / sA) turns the problem into one with A / sA, b / sb, k P and c,
    whose objective is then divided by its own largest entry so. The identity holds
    for any positive constants, so solving the rescaled row and mapping back
    (x = k x^, y = y^ so / sA) is exact, gradients included with the scales held
    fixed. Tolerances are then relative to the data's scale (a cost of 1e-8 is solved
    as accurately as one of 1).
    """
    sA, sb = _row_scale(A), _row_scale(b)
    k = sb / sA
    P_hat = None if P is None else P * k[:, None, None]
    so = _row_scale(c) if P is None else tf.maximum(_row_scale(c), _row_scale(P_hat))
    if P_hat is not None:
        P_hat = P_hat / so[:, None, None]
    x, y, status = _solve_normalized(
        c / so[:, None], A / sA[:, None, None], b / sb[:, None], cone, settings, P_hat
    )
    return x * k[:, None], y * (so / sA)[:, None], status


def _solve_normalized(c, A, b, cone, settings, P=None):
    with tf.name_scope("cone_program"):
        batch = tf.shape(c)[0]
        dtype = c.dtype
        rho = tf.constant(settings["rho"], dtype)
        sigma = tf.constant(settings["sigma"], dtype)
        alpha = tf.constant(settings["alpha"], dtype)
        status_box = {}

        def fixed_map(state, c_, A_, b_, *P_):
            # the rho each row's forward solve ended with: the fixed point is the same
            # for any rho, and the balanced one suits the backward's linear solve too
            rho_ = status_box.get("rho", rho)
            inv = _inverse(A_, rho_, sigma, *P_)
            return _admm_step(state, c_, A_, b_, cone, rho_, sigma, alpha, inv)

        def solver(state0, c_, A_, b_, *P_):
            state, status, iters, final_rho = _solve(c_, A_, b_, cone, settings, batch, *P_)
            status_box["status"], status_box["iters"] = status, iters
            status_box["rho"] = tf.stop_gradient(final_rho)
            return state

        solve = _implicit.custom_fixed_point(
            fixed_map,
            linear_solver="gmres",
            tol=max(10 * settings["tol"], 1e-12),
            backward_tol=settings["backward_tol"],
            backward_max_iter=settings["backward_max_iter"],
            batch_dims=1,
            on_failure="ignore",
        )(solver)
        m = tf.shape(b)[-1]
        state0 = (
            tf.zeros_like(c),
            tf.zeros([batch, m], dtype),
            tf.zeros([batch, m], dtype),
        )
        x, _, y = solve(state0, c, A, b, *([] if P is None else [P]))
        y = -y  # the ADMM multiplier is minus the conic dual: Px + c + A^T y = 0, y in K*
        status = tf.stop_gradient(status_box["status"])
        ok = tf.equal(status, qps.SOLVED)[:, None]
        # unsolved rows: value kept, gradient cut (the cotangent into the solve is zero)
        x = tf.where(ok, x, tf.stop_gradient(x))
        y = tf.where(ok, y, tf.stop_gradient(y))
        return x, y, status


# ------------------------------------------------------------------ the layer


@keras.saving.register_keras_serializable(package="keras_implicit")
class ConeProgram(keras.layers.Layer):
    """Batched differentiable conic program  min 1/2 x'Px + c'x  s.t.  A x + s = b,  s in K.

    P (positive semidefinite, (B, n, n)) is optional: pass it in the input dict (or name
    it in `input_names`) for a quadratic objective; without it the objective is c'x.

    Args:
      cone: SCS-style dict (see the module docstring).
      A, b: optional arrays held by the layer (constant; learnable if named in
        `trainable_params`); otherwise passed in `call`.
      input_names: the parameters `call` receives, in order, when `call` gets a
        list/tuple or a single tensor. Default: those of c, A, b not given as arrays,
        in that order. Not needed when `call` gets a dict.
      return_duals, return_status: extra outputs (dual y in K*, int32 status).
      tol: ADMM tolerance (default 1e-7 in float64, 1e-4 otherwise). max_iter, rho,
        sigma, alpha, check_interval: ADMM settings.
      adaptive_rho: rebalance each row's step size rho from its primal and dual
        residuals every `check_interval` steps (`rho` is then the initial value).
        The solution does not depend on rho; the number of iterations does.
      backward_tol, backward_max_iter: the GMRES solve of the implicit gradient
        (backward_tol default 1e-9 in float64, 1.2e-5 otherwise). Tolerances below 100
        machine epsilons of the solve dtype are raised to that floor, with one warning.
      on_failure: "warn" (default), "raise" or "ignore" for rows not solved, as for
        `QuadraticProgram` (under XLA: "raise" sets those rows to NaN; read the status).

    STATUS_NAMES: status code -> name (0 solved, 1 max_iter, 2 primal_infeasible,
      3 dual_infeasible, 4 numerical_error), as for QuadraticProgram.

    Call: a dict with "c" (B, n) and, unless held by the layer, "A" (B, m, n) and
    "b" (B, m) (m must equal the cone dimension); or a list/tuple in the order of
    `input_names`; or one tensor when exactly one parameter is an input.
    Under a mixed precision policy the solve runs in float32 and the outputs come
    back in the compute dtype.
    """

    STATUS_NAMES = STATUS_NAMES

    def __init__(
        self,
        cone,
        A=None,
        b=None,
        trainable_params=(),
        input_names=None,
        return_duals=False,
        return_status=False,
        tol=None,
        max_iter=5000,
        rho=1.0,
        adaptive_rho=True,
        sigma=1e-6,
        alpha=1.6,
        check_interval=25,
        backward_tol=None,
        backward_max_iter=200,
        on_failure="warn",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.cone = validate_cone(cone)
        self._cone_config = dict(cone)
        self._arrays = {}
        for name, value, rank in (("A", A, 2), ("b", b, 1)):
            if value is not None:
                arr = np.asarray(value, dtype="float64")
                if arr.ndim != rank:
                    raise ValueError(
                        f"`{name}` must have rank {rank}. Received: {name}.shape={arr.shape}"
                    )
                self._arrays[name] = arr
        m = cone_dim(self.cone)
        if "A" in self._arrays and self._arrays["A"].shape[0] != m:
            raise ValueError(
                f"A must have {m} rows (the cone dimension of {self._cone_config}). "
                f"Received: A.shape={self._arrays['A'].shape}"
            )
        if "b" in self._arrays and self._arrays["b"].shape[0] != m:
            raise ValueError(
                f"b must have {m} entries (the cone dimension of {self._cone_config}). "
                f"Received: b.shape={self._arrays['b'].shape}"
            )
        if isinstance(trainable_params, str):
            trainable_params = (trainable_params,)
        trainable_params = tuple(trainable_params or ())
        if any(k not in self._arrays for k in trainable_params):
            raise ValueError(
                f"`trainable_params` may only name arrays given ({sorted(self._arrays)}). "
                f"Received: trainable_params={trainable_params!r}"
            )
        self.trainable_params = trainable_params
        self.input_names = check_input_names(input_names, ALL_INPUT_NAMES, self._arrays)
        self.return_duals = bool(return_duals)
        self.return_status = bool(return_status)
        self.settings = {
            "tol": None if tol is None else _validation.positive_float("tol", tol),
            "max_iter": _validation.positive_int("max_iter", max_iter),
            "rho": _validation.positive_float("rho", rho),
            "adaptive_rho": bool(adaptive_rho),
            "sigma": _validation.positive_float("sigma", sigma),
            "alpha": _validation.float_in_range("alpha", alpha, 0.0, 2.0, low_open=True),
            "check_interval": _validation.positive_int("check_interval", check_interval),
            "backward_tol": (
                None
                if backward_tol is None
                else _validation.positive_float("backward_tol", backward_tol)
            ),
            "backward_max_iter": _validation.positive_int("backward_max_iter", backward_max_iter),
        }
        if alpha >= 2.0:
            raise ValueError(f"`alpha` must be in (0, 2). Received: alpha={alpha!r}")
        self.on_failure = _policy.check_policy(on_failure)
        # the settings the solve runs with: tolerances resolved and floored for the
        # solve dtype (warned once here, not at every call)
        dtype = solve_dtype(self)
        wide = dtype == tf.float64
        defaults = {"tol": 1e-7 if wide else 1e-4, "backward_tol": 1e-9 if wide else 0.0}
        given = {k: self.settings[k] for k in defaults if self.settings[k] is not None}
        # defaults take the floor silently (float32's backward_tol is the floor itself);
        # tolerances the user gave are floored with one warning
        floor = _policy.tol_floor(dtype)
        solve_settings = dict(self.settings)
        solve_settings.update({k: max(v, floor) for k, v in defaults.items()})
        solve_settings.update(_policy.floored_tols(given, dtype, what="ConeProgram"))
        self._solve_settings = solve_settings
        self._vars = {}
        self._input_keys = None

    def _normalize(self, inputs):
        names = INPUT_NAMES
        if isinstance(inputs, dict) or (self.input_names and "P" in self.input_names):
            names = ALL_INPUT_NAMES
        return normalize_inputs(inputs, names, self._arrays, self.input_names, "ConeProgram")

    def _check_shapes(self, shapes):
        """Ranks, n and m of the input shapes (batch axis first); unknown sizes pass."""
        m = cone_dim(self.cone)
        for k in ("A", "b"):
            if (k in shapes) == (k in self._arrays):
                raise ValueError(
                    f"`{k}` must be either a layer array or an input, not both/neither. "
                    f"Received input keys {sorted(shapes)} with arrays {sorted(self._arrays)}"
                )
        if "c" not in shapes:
            raise ValueError(
                f"ConeProgram needs `c` as an input. Received input keys {sorted(shapes)}"
            )
        ranks = {"c": 2, "A": 3, "b": 2, "P": 3}
        dims = {"c": ("n",), "A": ("m", "n"), "b": ("m",), "P": ("n", "n")}
        sizes = {"m": (m, "the cone")}
        if "A" in self._arrays:
            sizes["n"] = (self._arrays["A"].shape[1], "A")
        for k, shape in shapes.items():
            shape = tuple(shape)
            if len(shape) != ranks[k]:
                raise ValueError(
                    f"Input `{k}` must have shape (batch, {', '.join(dims[k])}). "
                    f"Received: {k}.shape={shape}"
                )
            for name, size in zip(dims[k], shape[1:]):
                if size is None:
                    continue
                if name in sizes and sizes[name][0] != size:
                    raise ValueError(
                        f"Inconsistent ConeProgram sizes: {name}={sizes[name][0]} from "
                        f"{sizes[name][1]} but {size} from `{k}`. Received: {k}.shape={shape}"
                    )
                sizes.setdefault(name, (size, f"`{k}`"))

    def build(self, input_shape):
        shapes = self._normalize(input_shape)
        self._check_shapes(shapes)
        self._input_keys = tuple(k for k in ALL_INPUT_NAMES if k in shapes)
        for k, arr in self._arrays.items():
            self._vars[k] = self.add_weight(
                name=k,
                shape=arr.shape,
                initializer=keras.initializers.Constant(arr),
                trainable=k in self.trainable_params,
            )

    def call(self, inputs):
        inputs = self._normalize(inputs)
        keys = tuple(k for k in ALL_INPUT_NAMES if k in inputs)
        if keys != self._input_keys:
            raise ValueError(
                f"ConeProgram was built with inputs {self._input_keys}. Received: {keys}"
            )
        self._check_shapes({k: v.shape for k, v in inputs.items()})
        dtype = solve_dtype(self)
        c = cast_input("c", inputs["c"], dtype, "ConeProgram")
        batch = tf.shape(c)[0]

        def get(k):
            if k in inputs:
                return cast_input(k, inputs[k], dtype, "ConeProgram")
            v = tf.cast(self._vars[k], dtype)
            return tf.broadcast_to(v, tf.concat([[batch], tf.shape(v)], 0))

        A, b = get("A"), get("b")
        P = cast_input("P", inputs["P"], dtype, "ConeProgram") if "P" in inputs else None
        x, y, status = solve_cone_program(c, A, b, self.cone, self._solve_settings, P)
        x, y = report_status((x, y), status, self.on_failure, "ConeProgram")
        x, y = to_compute_dtype(self, (x, y))
        out = [x]
        if self.return_duals:
            out.append(y)
        if self.return_status:
            out.append(status)
        return out[0] if len(out) == 1 else tuple(out)

    def compute_output_shape(self, input_shape):
        shapes = self._normalize(input_shape)
        batch, n = tuple(shapes["c"])
        out = [(batch, n)]
        if self.return_duals:
            out.append((batch, cone_dim(self.cone)))
        if self.return_status:
            out.append((batch,))
        return out[0] if len(out) == 1 else tuple(out)

    def compute_output_spec(self, inputs):
        shapes = self.compute_output_shape({k: v.shape for k, v in self._normalize(inputs).items()})
        return program_output_spec(self, shapes)

    def get_config(self):
        config = super().get_config()
        config.update({k: v.tolist() for k, v in self._arrays.items()})
        config.update(
            cone=self._cone_config,
            trainable_params=list(self.trainable_params),
            input_names=None if self.input_names is None else list(self.input_names),
            return_duals=self.return_duals,
            return_status=self.return_status,
            on_failure=self.on_failure,
            **self.settings,
        )
        return config
