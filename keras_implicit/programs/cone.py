"""Batched conic programs: COSMO-style ADMM with an implicit gradient.

    x*(c, A, b, P) = argmin_x 1/2 x'Px + c'x   s.t.   A x + s = b,   s in K

K is a product of cones given by an SCS-style spec dict (`validate_cone`); the solver
and its gradient are described in `keras_implicit.layers.cone_program`, the layer
that wraps them.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from keras_implicit import _dense, implicit
from keras_implicit import ops as kops
from keras_implicit.programs import _admm
from keras_implicit.programs._admm import (
    INFEASIBLE_TOL,
    MAX_ITER,
    NOT_CONVEX,
    chunks,
    classify,
    inf_norm,
    infeasible_tol,
    keep_solved_gradient,
)

__all__ = ["cone_dim", "project_cone", "solve_cone_program", "validate_cone"]

_KEYS = ("z", "l", "q", "s", "ep")
# adaptive step size: the factor a balanced rho must differ by to be taken (the QP
# solver keeps OSQP's 5)
RHO_UPDATE_FACTOR = 2.0
# the per-row status codes (those of QuadraticProgram but non_convex)
STATUS_NAMES = {k: v for k, v in _admm.STATUS_NAMES.items() if k != NOT_CONVEX}


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
    return _dense.spd_inverse(matrix if P is None else matrix + P)


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
    ny = inf_norm(dy)
    dist_dual = inf_norm(project_cone(-dy, cone))
    p_inf = (
        (ny > eps)
        & (inf_norm(tf.linalg.matvec(A, dy, transpose_a=True)) <= eps * ny)
        & (tf.reduce_sum(b * dy, -1) <= -eps * ny)
        & (dist_dual <= eps * ny)
    )
    nx = inf_norm(dx)
    u = -tf.linalg.matvec(A, dx)
    dist_primal = inf_norm(u - project_cone(u, cone))
    d_inf = (nx > eps) & (tf.reduce_sum(c * dx, -1) <= -eps * nx) & (dist_primal <= eps * nx)
    if P is not None:
        d_inf &= inf_norm(tf.linalg.matvec(P, dx)) <= eps * nx
    return p_inf, d_inf


def _solve(c, A, b, cone, settings, batch, P=None):
    """Runs ADMM in chunks with per-row convergence and per-row adaptive rho.

    Returns the state (x, s, y), status, iterations and the final rho (B, 1).
    """
    dtype = c.dtype
    sigma = tf.constant(settings["sigma"], dtype)
    alpha = tf.constant(settings["alpha"], dtype)
    eps = tf.constant(settings["tol"], dtype)
    eps_inf = tf.constant(infeasible_tol(INFEASIBLE_TOL, dtype), dtype)
    adaptive = settings.get("adaptive_rho", True)
    rho = tf.fill([batch, 1], tf.constant(settings["rho"], dtype))
    inv = _inverse(A, rho, sigma, P)
    n, m = tf.shape(c)[-1], tf.shape(b)[-1]
    x, s, y = tf.zeros([batch, n], dtype), tf.zeros([batch, m], dtype), tf.zeros([batch, m], dtype)
    status = tf.fill([batch], tf.constant(MAX_ITER, tf.int32))
    iters = tf.zeros([batch], tf.int32)
    interval = settings["check_interval"]
    n_chunks = chunks(settings["max_iter"], interval)

    def chunk(k, x, s, y, status, iters, rho, inv):
        active = tf.equal(status, MAX_ITER)

        def inner(i, x, s, y):
            return (i + 1, *_admm_step((x, s, y), c, A, b, cone, rho, sigma, alpha, inv))

        _, xn, sn, yn = tf.while_loop(lambda i, *_: i < interval, inner, (0, x, s, y))
        Ax, Aty = tf.linalg.matvec(A, xn), tf.linalg.matvec(A, yn, transpose_a=True)
        Px = tf.zeros_like(xn) if P is None else tf.linalg.matvec(P, xn)
        r_prim = inf_norm(Ax + sn - b)
        r_dual = inf_norm(Px + c - Aty)
        s_prim = tf.maximum(tf.maximum(inf_norm(Ax), inf_norm(sn)), inf_norm(b))
        s_dual = tf.maximum(tf.maximum(inf_norm(Aty), inf_norm(c)), inf_norm(Px))
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
        new = classify(finite, done, p_inf, d_inf)
        status = tf.where(active, new, status)
        iters = tf.where(active, iters + interval, iters)
        a2 = active[:, None]
        if adaptive:
            balanced, move = _admm.balanced_rho(
                rho[:, 0], r_prim, s_prim, r_dual, s_dual, factor=RHO_UPDATE_FACTOR
            )
            move &= tf.equal(status, MAX_ITER)
            rho = tf.where(move[:, None], balanced[:, None], rho)
            inv = tf.cond(
                tf.reduce_any(move),
                lambda: tf.where(move[:, None, None], _inverse(A, rho, sigma, P), inv),
                lambda: inv,
            )
        x, s, y = tf.where(a2, xn, x), tf.where(a2, sn, s), tf.where(a2, yn, y)
        return k + 1, x, s, y, status, iters, rho, inv

    _, x, s, y, status, iters, rho, _ = tf.while_loop(
        lambda k, *rest: (k < n_chunks) & tf.reduce_any(tf.equal(rest[3], MAX_ITER)),
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

        solve = implicit.custom_fixed_point(
            fixed_map,
            linear_solver="gmres",
            tol=max(10 * settings["tol"], 1e-12),
            backward_tol=settings["backward_tol"],
            backward_max_iter=settings["backward_max_iter"],
            batch_dims=1,
            # the forward is reported through the status; a failed gradient solve
            # under the caller's policy (`settings["backward_on_failure"]`)
            on_failure="ignore",
            backward_on_failure=settings.get("backward_on_failure", "ignore"),
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
        # unsolved rows: value kept, gradient cut (the cotangent into the solve is zero)
        x, y = keep_solved_gradient(status, (x, y))
        return x, y, status
