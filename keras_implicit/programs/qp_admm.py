"""Batched dense QP solver: OSQP-style ADMM with Ruiz scaling and polishing.

Problem, per batch row:  min 1/2 x^T Q x + q^T x  s.t.  A x = b,  G x <= h.

The constraints are stacked as lo <= C x <= hi with C = [A; G], lo = [b; -inf],
hi = [b; h], and solved by the ADMM splitting of Stellato et al., "OSQP: an operator
splitting solver for quadratic programs" (Math. Prog. Comp. 2020): the x-update solves
(Q + sigma I + C^T R C) x = rhs with a per-row inverse from a Cholesky factor, the
z-update clips to [lo, hi], relaxation alpha, R = rho * diag(1e3 for equality rows).
Iterations run in chunks of `check_interval` inside a fixed-shape `tf.while_loop`;
after each chunk every row is checked (convergence, primal/dual infeasibility
certificates, NaN), finished rows are frozen, and rho is re-balanced per row from the
ratio of primal to dual residual (refactorizing only costs one batched Cholesky of an
n x n matrix). At the end each row is "polished": with the active set read off the
duals, the KKT system of the equality-constrained QP is solved directly by QR (with
iterative refinement), and the polished point replaces the ADMM point when it is
feasible and at least as accurate. This gives solutions accurate to roundoff.
Before iterating, each row is equilibrated by modified Ruiz scaling (OSQP, section 5.1):
variables x = D x̄, constraints E C, cost c, chosen so the columns of the KKT matrix
[[P, C^T], [C, 0]] have comparable inf-norms; ADMM runs on the scaled problem, but the
convergence test, rho re-balancing, infeasibility certificates, polishing and outputs
all use the unscaled quantities, so tolerances keep their meaning in the caller's units.

The gradient (implicit differentiation of the KKT conditions) is attached by
`keras_implicit.programs.qp.solve_qp`.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from keras_implicit import _dense
from keras_implicit.programs._admm import (
    INFEASIBLE_TOL,
    MAX_ITER,
    SOLVED,
    balanced_rho,
    chunks,
    classify,
    inf_norm,
    infeasible_tol,
)

_EQ_RHO_SCALE = 1e3  # OSQP: equality rows get a much stiffer penalty
_RHO_ADAPT_RATIO = 5.0  # re-balance rho only when off by more than this factor
# Ruiz norms below _SCALING_MIN are treated as 1 (an empty or zero column must not be
# blown up), and every accumulated scaling factor stays within [_SCALING_MIN, _SCALING_MAX]
_SCALING_MIN, _SCALING_MAX = 1e-4, 1e4


@dataclasses.dataclass(frozen=True)
class Settings:
    # absolute and relative tolerance on the ADMM residuals; None: 1e-6 in float64,
    # 1e-4 in float32 (polishing then usually lands at roundoff level anyway)
    tol: float | None = None
    max_iter: int = 4000
    rho: float = 0.1
    sigma: float = 1e-6
    alpha: float = 1.6
    check_interval: int = 25
    polish: bool = True
    # relative tolerance of the infeasibility certificates; raised to
    # _admm.INFEASIBLE_TOL_ULPS machine epsilons of the solve dtype (float32: 1.2e-4, OSQP's
    # default), below which the rounding of the iterate differences hides the certificate
    infeasible_tol: float = INFEASIBLE_TOL
    # Ruiz equilibration passes before ADMM; 0 disables problem scaling
    scaling: int = 10


# ----------------------------------------------------------------------------- helpers


def _mv(mat, vec):
    return tf.linalg.matvec(mat, vec)


def _mtv(mat, vec):
    return tf.linalg.matvec(mat, vec, transpose_a=True)


def symmetrize(Q):
    return 0.5 * (Q + tf.linalg.matrix_transpose(Q))


def _factor(P, C, rho_vec, sigma):
    """(P + sigma I + C^T R C)^-1 per row.

    The explicit inverse turns every ADMM step into one batched matvec: faster than two
    triangular solves at these sizes, and much cheaper for XLA to compile in the loop.
    """
    n = tf.shape(P)[-1]
    eye = tf.eye(n, dtype=P.dtype)
    kkt = P + sigma * eye + tf.linalg.matmul(C * rho_vec[..., None], C, transpose_a=True)
    return _dense.spd_inverse(kkt)


def _rho_vector(rho, is_eq):
    """Per-constraint penalty: rho on inequalities, 1e3 rho on equalities."""
    return tf.where(
        is_eq, _EQ_RHO_SCALE * rho[:, None], rho[:, None] + tf.zeros_like(is_eq, rho.dtype)
    )


def _residuals(P, q, C, x, z, y):
    """OSQP's primal/dual residuals and the scales of their relative tolerances."""
    Cx, Px, Cty = _mv(C, x), _mv(P, x), _mtv(C, y)
    r_prim = inf_norm(Cx - z)
    r_dual = inf_norm(Px + q + Cty)
    s_prim = tf.maximum(inf_norm(Cx), inf_norm(z))
    s_dual = tf.maximum(tf.maximum(inf_norm(Px), inf_norm(Cty)), inf_norm(q))
    return r_prim, r_dual, s_prim, s_dual


def _primal_infeasible(C, lo, hi, dy, eps):
    """OSQP certificate: C^T dy ~ 0 and hi^T dy+ + lo^T dy- < 0 (dy: change of y over a chunk)."""
    norm = inf_norm(dy)
    pos, neg = tf.maximum(dy, 0.0), tf.minimum(dy, 0.0)
    # an infinite bound paired with a nonzero dual step makes the support term +inf
    big = tf.fill(tf.shape(dy), tf.constant(float("inf"), dy.dtype))
    zero = tf.zeros_like(dy)
    safe_u = tf.where(tf.math.is_finite(hi), hi, zero)
    safe_l = tf.where(tf.math.is_finite(lo), lo, zero)
    up = tf.where(pos > 0, tf.where(tf.math.is_finite(hi), safe_u * pos, big), zero)
    lo_term = tf.where(neg < 0, tf.where(tf.math.is_finite(lo), safe_l * neg, big), zero)
    support = tf.reduce_sum(up + lo_term, axis=-1)
    return (norm > eps) & (inf_norm(_mtv(C, dy)) <= eps * norm) & (support <= -eps * norm)


def _dual_infeasible(P, q, C, lo, hi, dx, eps):
    """OSQP certificate: P dx ~ 0, q^T dx < 0, C dx in the recession cone of [lo, hi]."""
    norm = inf_norm(dx)
    Cdx = _mv(C, dx)
    tol = eps * norm[:, None]
    ok_upper = tf.where(tf.math.is_finite(hi), Cdx <= tol, tf.ones_like(Cdx, tf.bool))
    ok_lower = tf.where(tf.math.is_finite(lo), Cdx >= -tol, tf.ones_like(Cdx, tf.bool))
    in_cone = tf.reduce_all(ok_upper & ok_lower, axis=-1)
    return (
        (norm > eps)
        & (inf_norm(_mv(P, dx)) <= eps * norm)
        & (tf.reduce_sum(q * dx, axis=-1) <= -eps * norm)
        & in_cone
    )


# ----------------------------------------------------------------------------- scaling


def _limit_norm(norm):
    # also maps the -inf that reduce_max gives over an empty axis to 1
    norm = tf.where(norm < _SCALING_MIN, tf.ones_like(norm), norm)
    return tf.minimum(norm, _SCALING_MAX)


def _limit_scale(scale):
    # a non-finite factor (NaN data) must not poison the scaling: such rows are flagged
    # by the NaN check after the first chunk, with or without scaling
    scale = tf.where(tf.math.is_finite(scale), scale, tf.ones_like(scale))
    return tf.clip_by_value(scale, _SCALING_MIN, _SCALING_MAX)


def _scaled(P, q, C, D, E, c):
    """c D P D, c D q, E C D for per-row diagonal D [B,n], E [B,m] and scalar c [B]."""
    Ps = c[:, None, None] * D[:, :, None] * P * D[:, None, :]
    return Ps, c[:, None] * D * q, E[:, :, None] * C * D[:, None, :]


def ruiz_equilibrate(P, q, C, passes):
    """Modified Ruiz equilibration per row; returns D [B,n], E [B,m], c [B].

    Each pass divides every column of the current scaled KKT matrix [[P, C^T], [C, 0]]
    (and, by symmetry, its row) by the square root of its inf-norm, then rescales the
    cost so that the larger of the mean column inf-norm of P and the inf-norm of q is 1.
    """
    dtype = P.dtype
    B, n, m = tf.shape(P)[0], tf.shape(P)[-1], tf.shape(C)[-2]
    n_safe = tf.cast(tf.maximum(n, 1), dtype)
    # the inf-norms of a diagonally scaled matrix are those of |P|, |C| weighted by the
    # factors, so no scaled matrix is formed inside the loop: at batch 128, n = 20 that
    # halves the cost of a pass
    abs_P, abs_C, abs_q = tf.abs(P), tf.abs(C), tf.abs(q)

    def col_norms_P(D):  # of D P D (P symmetric: rows are columns)
        return D * tf.reduce_max(D[:, :, None] * abs_P, axis=-2)

    def one_pass(k, D, E, c):
        col_C = D * tf.reduce_max(E[:, :, None] * abs_C, axis=-2)
        row_C = E * tf.reduce_max(abs_C * D[:, None, :], axis=-1)
        var_norm = tf.maximum(c[:, None] * col_norms_P(D), col_C)
        D = D * tf.math.rsqrt(_limit_norm(var_norm))
        E = E * tf.math.rsqrt(_limit_norm(row_C))
        mean_P = c * tf.reduce_sum(col_norms_P(D), axis=-1) / n_safe
        norm_q = c * tf.reduce_max(D * abs_q, axis=-1)
        c = c / _limit_norm(tf.maximum(mean_P, norm_q))
        return k + 1, D, E, c

    start = (tf.constant(0), tf.ones([B, n], dtype), tf.ones([B, m], dtype), tf.ones([B], dtype))
    # a loop rather than unrolled passes: unrolling multiplies graph tracing time. Each
    # pass bounds its own step; the accumulated factors are bounded at the end (the
    # caller builds the scaled problem from the bounded factors)
    _, D, E, c = tf.while_loop(lambda k, *_: k < passes, one_pass, start)
    return _limit_scale(D), _limit_scale(E), _limit_scale(c)


# ----------------------------------------------------------------------------- forward


def resolve(settings: Settings, dtype) -> Settings:
    if settings.tol is not None:
        return settings
    return dataclasses.replace(settings, tol=1e-6 if dtype == tf.float64 else 1e-4)


def admm(P, q, C, lo, hi, is_eq, settings: Settings):
    """Solves the batch; returns x [B,n], y [B,m] (duals of lo <= Cx <= hi), status, iters."""
    dtype = P.dtype
    B, n, m = tf.shape(P)[0], tf.shape(P)[-1], tf.shape(C)[-2]
    s = resolve(settings, dtype)
    sigma, alpha = tf.constant(s.sigma, dtype), tf.constant(s.alpha, dtype)
    eps = tf.constant(s.tol, dtype)
    eps_inf = tf.constant(infeasible_tol(s.infeasible_tol, dtype), dtype)

    # ADMM iterates on the scaled problem (Ps, qs, Cs, los, his); every test below and
    # everything returned is in the caller's units
    if s.scaling:
        D, E, c = ruiz_equilibrate(P, q, C, s.scaling)
        Ps, qs, Cs = _scaled(P, q, C, D, E, c)
        los, his = E * lo, E * hi  # E > 0: infinite bounds stay infinite

        def unscale(x, z, y):
            return D * x, z / E, E * y / c[:, None]

    else:
        Ps, qs, Cs, los, his = P, q, C, lo, hi

        def unscale(x, z, y):
            return x, z, y

    rho = tf.fill([B], tf.constant(s.rho, dtype))
    rho_vec = _rho_vector(rho, is_eq)
    chol = _factor(Ps, Cs, rho_vec, sigma)
    x = tf.zeros([B, n], dtype)
    z = tf.zeros([B, m], dtype)
    y = tf.zeros([B, m], dtype)
    status = tf.fill([B], tf.constant(MAX_ITER, tf.int32))
    iters = tf.zeros([B], tf.int32)
    n_chunks = chunks(s.max_iter, s.check_interval)

    def step(x, z, y, chol, rho_vec):
        rhs = sigma * x - qs + _mtv(Cs, rho_vec * z - y)
        xt = _mv(chol, rhs)
        zt = _mv(Cs, xt)
        x_new = alpha * xt + (1.0 - alpha) * x
        zr = alpha * zt + (1.0 - alpha) * z
        z_new = tf.clip_by_value(zr + y / rho_vec, los, his)
        y_new = y + rho_vec * (zr - z_new)
        return x_new, z_new, y_new

    def chunk(k, x, z, y, rho, chol, status, iters, refs):
        active = tf.equal(status, MAX_ITER)

        def inner(i, x, z, y):
            return (i + 1, *step(x, z, y, chol, _rho_vector(rho, is_eq)))

        _, xn, zn, yn = tf.while_loop(
            lambda i, *_: i < s.check_interval, inner, (tf.constant(0), x, z, y)
        )
        xu, zu, yu = unscale(xn, zn, yn)
        r_prim, r_dual, s_prim, s_dual = _residuals(P, q, C, xu, zu, yu)
        converged = (r_prim <= eps + eps * s_prim) & (r_dual <= eps + eps * s_dual)
        finite = tf.math.is_finite(r_prim) & tf.math.is_finite(r_dual)
        # Certificates from iterate differences over three spans: this chunk, and since
        # each of two reference points (see `refs` below). OSQP's one-step differences
        # carry the rounding of the growing iterates, which in float32 is ~1e-2 of the
        # difference; over a span of s steps the signal grows with s while the rounding
        # stays that of one iterate. A sum of certificates is one (they form a cone).
        # The first chunk starts from zero, not on the ray, and is not tested.
        p_inf, d_inf = tf.zeros([B], tf.bool), tf.zeros([B], tf.bool)
        for x0, y0 in ((x, y), *refs):
            dx, _, dy = unscale(xn - x0, zn, yn - y0)
            p_inf |= _primal_infeasible(C, lo, hi, dy, eps_inf) & (k > 0)
            d_inf |= _dual_infeasible(P, q, C, lo, hi, dx, eps_inf) & (k > 0)
        new_status = classify(finite, converged, p_inf, d_inf)
        status = tf.where(active, new_status, status)
        iters = tf.where(active, iters + s.check_interval, iters)
        # freeze rows that finished before this chunk (broken rows keep their last value)
        x = tf.where(active[:, None], xn, x)
        z = tf.where(active[:, None], zn, z)
        y = tf.where(active[:, None], yn, y)
        # re-balance rho (per row) where primal and dual residuals are far apart
        rho_new, change = balanced_rho(rho, r_prim, s_prim, r_dual, s_dual, factor=_RHO_ADAPT_RATIO)
        change &= tf.equal(status, MAX_ITER)
        # references: the latest rho change (the ray's slope changes with rho) and the
        # latest power-of-two chunk (the span is at least half the iterations so far)
        restart = tf.equal(tf.bitwise.bitwise_and(k + 1, k), 0)
        resets = (change | tf.equal(k, 0), tf.fill([B], restart))
        refs = tuple(
            (tf.where(r[:, None], x, x0), tf.where(r[:, None], y, y0))
            for r, (x0, y0) in zip(resets, refs)
        )
        rho = tf.where(change, rho_new, rho)
        chol = tf.cond(
            tf.reduce_any(change),
            lambda: _factor(Ps, Cs, _rho_vector(rho, is_eq), sigma),
            lambda: chol,
        )
        return k + 1, x, z, y, rho, chol, status, iters, refs

    _, x, z, y, rho, chol, status, iters, _ = tf.while_loop(
        lambda k, x, z, y, rho, chol, status, iters, *_: (
            (k < n_chunks) & tf.reduce_any(tf.equal(status, MAX_ITER))
        ),
        chunk,
        (tf.constant(0), x, z, y, rho, chol, status, iters, ((x, y), (x, y))),
    )
    x, z, y = unscale(x, z, y)
    # clean the duals: exactly zero on inactive rows (the backward reads the active
    # set from them)
    y = y * _active_mask(y, z, lo, hi, is_eq)
    if s.polish:
        x, y, status = polish(P, q, C, lo, hi, is_eq, x, z, y, status, eps)
    return x, y, status, iters


def _active_mask(y, z, lo, hi, is_eq):
    """1 for equality rows and for bounds whose dual dominates the slack (OSQP's test).

    ADMM's duals of inactive rows are zero only up to roundoff, so `y != 0` is not a
    usable test; `y > hi - z` (upper) / `y < lo - z` (lower) is.
    """
    upper = tf.math.is_finite(hi) & (y > hi - z)
    lower = tf.math.is_finite(lo) & (y < lo - z)
    return tf.cast(is_eq | upper | lower, y.dtype)


def _active_bound(y, lo, hi):
    bound = tf.where(y < 0, lo, hi)
    return tf.where(tf.math.is_finite(bound), bound, tf.zeros_like(bound))


def kkt_matrix(P, C, mask):
    """Jacobian of the active-set KKT residual w.r.t. (x, y): [[P, C^T], [M C, I - M]]."""
    top = tf.concat([P, tf.linalg.matrix_transpose(C)], axis=-1)
    bottom = tf.concat([C * mask[..., None], tf.linalg.diag(1.0 - mask)], axis=-1)
    return tf.concat([top, bottom], axis=-2)


def _refined_solve(K, rhs, reg_diag, steps=2):
    """Solves K w = rhs through K + diag(reg) with iterative refinement (K may be singular)."""
    factors = _dense.factor(K + tf.linalg.diag(reg_diag))
    w = _dense.solve(factors, rhs)
    for _ in range(steps):
        w = w + _dense.solve(factors, rhs - _mv(K, w))
    return w


def polish(P, q, C, lo, hi, is_eq, x, z, y, status, eps):
    """Direct KKT solve on the active set guessed from the duals; kept where it helps."""
    dtype = P.dtype
    n = tf.shape(P)[-1]
    mask = tf.cast(is_eq | tf.not_equal(y, 0.0), dtype)
    bound = _active_bound(y, lo, hi)
    K = kkt_matrix(P, C, mask)
    rhs = tf.concat([-q, mask * bound], axis=-1)
    delta = tf.constant(1e-9 if dtype == tf.float64 else 1e-6, dtype)
    reg = tf.concat([tf.fill(tf.shape(q), delta), -delta * mask], axis=-1)
    w = _refined_solve(K, rhs, reg)
    xp, yp = w[:, :n], w[:, n:]
    # polished duals: inactive rows exactly 0, inequality duals of the right sign
    yp = yp * mask
    Cx = _mv(C, xp)
    viol = inf_norm(tf.maximum(Cx - hi, 0.0) + tf.maximum(lo - Cx, 0.0))
    sign_ok = tf.reduce_all(is_eq | ((y >= 0) & (yp >= -eps)) | ((y <= 0) & (yp <= eps)), axis=-1)
    r_dual = inf_norm(_mv(P, xp) + q + _mtv(C, yp))
    zp = tf.clip_by_value(Cx, lo, hi)
    _, _, s_prim, s_dual = _residuals(P, q, C, xp, zp, yp)
    r_prim0, r_dual0, _, _ = _residuals(P, q, C, x, z, y)
    good = (
        tf.math.is_finite(viol)
        & tf.math.is_finite(r_dual)
        & sign_ok
        & (viol <= tf.maximum(r_prim0, eps + eps * s_prim))
        & (r_dual <= tf.maximum(r_dual0, eps + eps * s_dual))
        & tf.reduce_all(tf.math.is_finite(w), axis=-1)
    )
    # polishing can also finish rows ADMM left at max_iter
    use = good & (tf.equal(status, SOLVED) | tf.equal(status, MAX_ITER))
    solved_now = use & (viol <= eps + eps * s_prim) & (r_dual <= eps + eps * s_dual)
    x = tf.where(use[:, None], xp, x)
    y = tf.where(use[:, None], yp, y)
    status = tf.where(solved_now, SOLVED, status)
    return x, y, status
