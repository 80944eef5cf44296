"""Projections onto the second-order, PSD and exponential cones (SCS conventions).

Kink convention as everywhere in `keras_implicit.ops`: on a boundary between two
pieces of the projection, the derivative of the most constrained piece is used (a
constraint holding with equality is treated as active). Each docstring states the
resulting element of the Clarke Jacobian.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from keras_implicit.ops import _common as c

__all__ = ["projection_exp_cone", "projection_psd_cone", "projection_second_order_cone"]


# --------------------------------------------------------------------------------------
# Second-order cone
# --------------------------------------------------------------------------------------


@tf.custom_gradient
def _soc_core(x):
    # stop_gradient: the forward pass must not be differentiated op by op (also not
    # by forward-mode accumulators); the custom gradient below is the derivative.
    x = tf.stop_gradient(x)
    # The projection is positively homogeneous and its Jacobian 0-homogeneous: both
    # are evaluated at x/k, k a power of two near max|x| (exact), so that ||v||^2
    # neither overflows (|x| ~ 1e20 in float32) nor underflows (|x| ~ 1e-20).
    k = c.max_abs_scale(x)
    xn = x / k
    t = xn[..., :1]
    v = xn[..., 1:]
    s = tf.sqrt(c.sum_last(tf.square(v)))
    polar = s <= -t  # includes the apex 0 and the polar cone's boundary
    interior = tf.logical_and(s < t, tf.logical_not(polar))
    # Off the boundary branch s can be 0; the safe norm keeps those (unselected)
    # values finite so that no NaN reaches a masked gradient.
    s_safe = c.safe_norm(v)
    u = v / s_safe
    half = 0.5 * (t + s)
    boundary_value = k * tf.concat([half, half * u], axis=-1)
    zero = tf.zeros_like(x)
    y = tf.where(polar, zero, tf.where(interior, x, boundary_value))

    def grad(g):
        gt = g[..., :1]
        gv = g[..., 1:]
        ug = c.sum_last(u * gv)
        ratio = t / s_safe
        out_t = 0.5 * (gt + ug)
        out_v = 0.5 * gt * u + 0.5 * (1.0 + ratio) * gv - 0.5 * ratio * ug * u
        boundary_grad = tf.concat([out_t, out_v], axis=-1)
        return tf.where(polar, tf.zeros_like(g), tf.where(interior, g, boundary_grad))

    return y, grad


def projection_second_order_cone(x):
    """Projection onto the second-order cone {(t, v) : ||v||_2 <= t} (SCS order: t first).

    With `s = ||v||`: identity if `s < t`; 0 if `s <= -t`; otherwise
    `(t + s)/2 * (1, v/s)`.

    Args:
      x: floating tensor `(..., 1 + n)`; `x[..., 0]` is t.

    Returns:
      Tensor like `x`. Jacobian (closed form, symmetric): identity for `s < t`, 0 for
      `s <= -t` (polar cone including its boundary and the apex), and for the rest
      (cone boundary `s == t` included), with `u = v/s`,
      `[[1/2, u^T/2], [u/2, (1 + t/s)/2 I - (t/(2s)) u u^T]]`.
    """
    with tf.name_scope("projection_second_order_cone"):
        x, original = c.upcast_half(c.as_float_tensor(x))
        c.require_rank(x, 1)
        if x.shape[-1] is not None and x.shape[-1] < 1:
            raise ValueError(
                f"The last axis of `x` must hold (t, v) with at least t. Received: "
                f"x.shape={x.shape}"
            )
        return c.restore_dtype(_soc_core(x), original)


# --------------------------------------------------------------------------------------
# PSD cone
# --------------------------------------------------------------------------------------


def _transpose(m):
    return tf.linalg.matrix_transpose(m)


@tf.custom_gradient
def _psd_core(x):
    x = tf.stop_gradient(x)  # eigh's own gradient is unstable at repeated eigenvalues
    # eigh fails on non-finite input (an error for the whole batch on CPU): such
    # matrices are solved as 0 and reported as NaN, leaving the other rows intact.
    finite = tf.reduce_all(tf.math.is_finite(x), axis=[-2, -1], keepdims=True)
    x = tf.where(finite, x, tf.zeros_like(x))
    # Solved for x/k, k a power of two near max|x| (exact; the projection is
    # positively homogeneous and Gamma below 0-homogeneous), so that neither the
    # symmetrization nor an eigensolver that squares entries (XLA's Jacobi) over-
    # or underflows.
    k = c.power_of_two_scale(tf.reduce_max(tf.abs(x), axis=[-2, -1], keepdims=True))
    xk = x / k
    sym = 0.5 * (xk + _transpose(xk))
    lam, vec = tf.linalg.eigh(sym)
    lam_pos = tf.nn.relu(lam)
    y = tf.matmul(vec * lam_pos[..., tf.newaxis, :], vec, transpose_b=True)
    y = (0.5 * (y + _transpose(y))) * k  # exactly symmetric despite rounding
    y = tf.where(finite, y, tf.fill(tf.shape(y), tf.constant(np.nan, y.dtype)))

    def grad(g):
        g_sym = 0.5 * (g + _transpose(g))
        g_eig = tf.matmul(tf.matmul(vec, g_sym, transpose_a=True), vec)
        pos = lam > 0
        pos_i = pos[..., :, tf.newaxis]
        pos_j = pos[..., tf.newaxis, :]
        lam_i = lam[..., :, tf.newaxis]
        lam_j = lam[..., tf.newaxis, :]
        mixed = tf.not_equal(pos_i, pos_j)
        # Divided differences of relu. Only mixed-sign pairs need a division, and
        # there |lam_i - lam_j| >= the positive one > 0, so it is always well
        # conditioned; equal (repeated) eigenvalues are never mixed and get relu'.
        diff = tf.where(mixed, lam_i - lam_j, tf.ones_like(g_eig))
        divided = (tf.nn.relu(lam_i) - tf.nn.relu(lam_j)) / diff
        both = tf.logical_and(pos_i, pos_j)
        gamma = tf.where(mixed, divided, tf.where(both, tf.ones_like(g_eig), tf.zeros_like(g_eig)))
        return tf.matmul(tf.matmul(vec, gamma * g_eig), vec, transpose_b=True)

    return y, grad


def projection_psd_cone(x):
    """Projection onto the cone of symmetric positive semidefinite matrices.

    `x` is first symmetrized, `(x + x^T)/2` (that is also the Frobenius projection of
    a non-symmetric matrix onto the PSD cone), then `V diag(max(lambda, 0)) V^T` from
    `tf.linalg.eigh`.

    Args:
      x: floating tensor `(..., n, n)`. float16/bfloat16 are computed in float32.

    Returns:
      Symmetric tensor like `x`. Gradient by the Daleckii-Krein formula
      `dY = V (Gamma o (V^T sym(dX) V)) V^T` with
      `Gamma_ij = (relu(l_i) - relu(l_j)) / (l_i - l_j)` for `l_i != l_j` and
      `relu'(l_i)` for equal eigenvalues, taking `relu'(0) = 0` (a zero eigenvalue
      is treated as clipped). Repeated eigenvalues are handled exactly since Gamma
      only depends on which eigenvalues are positive.
    """
    with tf.name_scope("projection_psd_cone"):
        x = c.as_float_tensor(x)
        c.require_rank(x, 2)
        if x.shape[-1] is not None and x.shape[-2] is not None and x.shape[-1] != x.shape[-2]:
            raise ValueError(
                f"`x` must hold square matrices (..., n, n). Received: x.shape={x.shape}"
            )
        x, original = c.upcast_half(x)
        return c.restore_dtype(_psd_core(x), original)


# --------------------------------------------------------------------------------------
# Exponential cone
# --------------------------------------------------------------------------------------
#
# K = cl{(r, s, t) : s > 0, s exp(r/s) <= t}; polar K° = {(u, v, w) : u > 0,
# u exp(v/u) <= -e w} ∪ {(0, v, w) : v <= 0, w <= 0}.
#
# Four cases (Parikh & Boyd 2014, §6.3.4; Friberg 2021):
#   1. v in K            -> v
#   2. v in K°           -> 0
#   3. r <= 0 and s <= 0 -> (r, 0, max(t, 0))         (Moreau: residual (0, s, min(t,0)) ∈ K°)
#   4. otherwise the projection vp lies on the smooth boundary, vp = sp (rho, 1, e^rho),
#      and v - vp = mu (e^rho, (1 - rho) e^rho, -1) is the outward normal (mu > 0).
#      Solving the first two coordinates for sp and mu leaves one scalar equation
#      (our own derivation, equivalent to Friberg's univariate formulation):
#        h(rho) = ((rho-1) r + s) e^rho - (r - rho s) e^-rho - (rho^2 - rho + 1) t = 0,
#        sp = ((rho-1) r + s) / q,  mu e^rho = (r - rho s) / q,  q = rho^2 - rho + 1.
#      Feasibility (sp > 0, mu > 0) confines rho to an interval whose ends are
#      rho = 1 - s/r (sp = 0) and rho = r/s (mu = 0); h < 0 at the first (v not in K°)
#      and h > 0 at the second (v not in K). Any root in between gives a pair
#      (vp, v - vp) in K x K° that is orthogonal, which by Moreau's theorem *is* the
#      projection, so a bracketed root finder is provably correct.
#
# Numerics: the projection is positively homogeneous, so we solve for v/||v||. h is
# evaluated as htil = h * exp(-|rho|), which never overflows, and its sign is what
# bisection uses. The bracket's infinite or huge end is replaced by doubling steps
# away from its finite end. From the root, the projection is recovered from the
# primal side (sp (rho, 1, e^rho)) for rho <= 0 and from the dual side (v - vd) for
# rho > 0, where each is free of cancellation. Finally that point competes with the
# always-feasible points (min(r, 0), 0, max(t, 0)) and 0 on a first-order optimality
# measure (Moreau's conditions), which guards the extreme roots where the recovery
# over/underflows (in the spirit of Friberg's safeguards).

_EXP_ROOT_ITERS = 64
_EXP_BRACKET_DOUBLINGS = 12  # the bracket search looks up to 2^11 away from its anchor

_EXP_RHO_SMOOTH_MAX = 1e4

_CASE_POLAR, _CASE_SPECIAL, _CASE_INTERIOR, _CASE_SMOOTH, _CASE_HEURISTIC = 0, 1, 2, 3, 4


def _exp_h(rho, r, s, t):
    """(htil, dhtil/drho) with htil = h(rho) exp(-|rho|)."""
    q = rho * rho - rho + 1.0
    e = tf.exp(-tf.abs(rho))  # <= 1
    e2 = e * e
    a = (rho - 1.0) * r + s  # coefficient of e^rho in h
    b = r - rho * s  # coefficient of -e^-rho in h
    da = rho * r + s  # coefficient of e^rho in h'
    db = r - (rho - 1.0) * s  # coefficient of +e^-rho in h'
    dq = 2.0 * rho - 1.0
    nonneg = rho >= 0
    # rho >= 0: htil = a - b e^-2rho - q t e^-rho ; rho < 0: htil = a e^2rho - b - q t e^rho
    htil = tf.where(nonneg, a - b * e2 - q * t * e, a * e2 - b - q * t * e)
    hptil = tf.where(nonneg, da + db * e2 - dq * t * e, da * e2 + db - dq * t * e)  # h' e^-|rho|
    # d/drho [h e^-|rho|] = (h' - sign(rho) h) e^-|rho|
    dhtil = tf.where(nonneg, hptil - htil, hptil + htil)
    return htil, dhtil


def _exp_bracket(r, s, t, dtype):
    """Finite (lo, hi) with htil(lo) < 0 < htil(hi) for case-4 rows."""
    big = tf.constant(np.finfo(dtype.as_numpy_dtype).max, dtype)
    r_pos = r > 0
    s_pos = s > 0
    one = tf.ones_like(r)
    lower_end = tf.where(r_pos, 1.0 - s / tf.where(r_pos, r, one), -big)  # sp = 0
    upper_end = tf.where(s_pos, r / tf.where(s_pos, s, one), big)  # mu = 0
    # Anchor at the finite end (for r, s > 0 the one nearer 0); double outwards.
    from_lower = tf.logical_and(r_pos, tf.logical_or(tf.logical_not(s_pos), s <= r))
    anchor = tf.where(from_lower, lower_end, upper_end)
    far_end = tf.where(from_lower, upper_end, lower_end)
    direction = tf.where(from_lower, one, -one)
    steps = tf.constant(2.0, dtype) ** tf.range(_EXP_BRACKET_DOUBLINGS, dtype=dtype)
    cand = anchor[..., tf.newaxis] + direction[..., tf.newaxis] * steps
    cand = tf.where(
        from_lower[..., tf.newaxis],
        tf.minimum(cand, far_end[..., tf.newaxis]),
        tf.maximum(cand, far_end[..., tf.newaxis]),
    )
    h, _ = _exp_h(cand, r[..., tf.newaxis], s[..., tf.newaxis], t[..., tf.newaxis])
    # Wanted sign at the far end: > 0 when searching upwards, < 0 downwards.
    good = tf.where(from_lower[..., tf.newaxis], h > 0, h < 0)
    # First good candidate (or the last one if none is: the heuristic then takes over).
    idx = tf.argmax(tf.cast(good, tf.int32), axis=-1, output_type=tf.int32)
    idx = tf.where(tf.reduce_any(good, axis=-1), idx, _EXP_BRACKET_DOUBLINGS - 1)
    positions = tf.range(_EXP_BRACKET_DOUBLINGS)

    def select(i):
        # A masked sum (not a multiply by one-hot) so inf candidates cannot make NaN.
        mask = tf.equal(positions, i[..., tf.newaxis])
        return tf.reduce_sum(tf.where(mask, cand, tf.zeros_like(cand)), axis=-1)

    far = select(idx)
    # The bracket's inner end is the previous candidate (or the anchor).
    prev = select(tf.maximum(idx - 1, 0))
    near = tf.where(idx > 0, prev, anchor)
    lo = tf.where(from_lower, near, far)
    hi = tf.where(from_lower, far, near)
    return lo, hi


def _exp_root(r, s, t, lo, hi):
    """Safeguarded Newton-bisection (rtsafe-style) with a fixed iteration count."""
    rho0 = 0.5 * (lo + hi)
    width0 = hi - lo

    def body(i, rho, lo, hi, step_old):
        h, dh = _exp_h(rho, r, s, t)
        lo = tf.where(h < 0, rho, lo)
        hi = tf.where(h > 0, rho, hi)
        newton = rho - h / tf.where(dh > 0, dh, tf.ones_like(dh))
        # Take the Newton step only if it stays in the bracket and shrinks fast
        # enough; otherwise bisect. Guarantees convergence with a fixed budget.
        use_newton = (
            (dh > 0)
            & (newton > lo)
            & (newton < hi)
            & (tf.abs(newton - rho) <= 0.5 * step_old)
            & tf.math.is_finite(newton)
        )
        mid = 0.5 * (lo + hi)
        new_rho = tf.where(use_newton, newton, mid)
        step = tf.abs(new_rho - rho)
        new_rho = tf.where(tf.equal(h, 0), rho, new_rho)
        return i + 1, new_rho, lo, hi, step

    _, rho, _, _, _ = tf.while_loop(
        lambda i, *_: i < _EXP_ROOT_ITERS,
        body,
        (tf.constant(0), rho0, lo, hi, width0),
        maximum_iterations=_EXP_ROOT_ITERS,
    )
    return rho


def _exp_smooth_point(rho, r, s):
    """vp = sp (rho, 1, e^rho) with sp = ((rho-1) r + s)/q, overflow-safe."""
    q = rho * rho - rho + 1.0
    sp = tf.nn.relu(((rho - 1.0) * r + s) / q)
    tiny = np.finfo(r.dtype.as_numpy_dtype).tiny
    tp = tf.where(sp > 0, tf.exp(rho + tf.math.log(tf.maximum(sp, tiny))), tf.zeros_like(sp))
    return tf.stack([sp * rho, sp, tp], axis=-1)


def _exp_dual_based_point(rho, r, s, t):
    """Feasible point from the dual side: v - vd(rho), moved onto K if needed.

    vd = rd (1, 1 - rho, -e^-rho) with rd = (r - rho s)/q has no cancellation where
    the primal formula's numerator ((rho-1) r + s) cancels (near the region x <= 0,
    y <= 0), so v - vd is accurate in absolute terms there (the primal and the dual
    recoveries are accurate in complementary regions, as Friberg observes). Rounding
    can leave it a hair outside K; it is made feasible by lowering x to
    y log(z/y), whose sensitivity is logarithmic (lifting z instead would be
    exponentially sensitive to the tiny x/y ratio).
    """
    q = rho * rho - rho + 1.0
    rd = tf.nn.relu((r - rho * s) / q)
    max_exp = tf.constant(math.log(np.finfo(r.dtype.as_numpy_dtype).max) - 2.0, r.dtype)
    px = r - rd
    py = s - (1.0 - rho) * rd
    pz = t + rd * tf.exp(tf.minimum(-rho, max_exp))
    smooth = (py > 0) & (pz > 0)
    py_safe = tf.where(smooth, py, tf.ones_like(py))
    pz_safe = tf.where(smooth, pz, tf.ones_like(pz))
    x_max = py_safe * tf.math.log(pz_safe / py_safe)
    return tf.stack(
        [
            tf.where(smooth, tf.minimum(px, x_max), tf.minimum(px, 0)),
            tf.where(smooth, py, tf.zeros_like(py)),
            tf.where(smooth, pz, tf.nn.relu(pz)),
        ],
        axis=-1,
    )


def _exp_certificate_error(p, w):
    """max(polar-cone violation of w - p, |<p, w - p>|) for p in K (Moreau)."""
    d = w - p
    u, v, z = d[..., 0], d[..., 1], d[..., 2]
    u_pos = u > 0
    u_safe = tf.where(u_pos, u, tf.ones_like(u))
    # u exp(v/u) <= -e z  <=>  u exp(v/u - 1) + z <= 0; overflow gives +inf (rejected).
    smooth = tf.where(
        u_pos,
        tf.nn.relu(u * tf.exp(v / u_safe - 1.0) + z),
        tf.fill(tf.shape(u), tf.constant(np.inf, u.dtype)),
    )
    face = tf.maximum(tf.abs(u), tf.maximum(tf.nn.relu(v), tf.nn.relu(z)))
    polar_violation = tf.minimum(smooth, face)
    return tf.maximum(polar_violation, tf.abs(tf.reduce_sum(p * d, axis=-1)))


def _exp_classify(r, s, t):
    """Case masks for the normalized point (r, s, t)."""
    e = tf.constant(math.e, r.dtype)
    one = tf.ones_like(r)
    r_pos = r > 0
    s_pos = s > 0
    polar = tf.logical_or(
        r_pos & (r * tf.exp(s / tf.where(r_pos, r, one)) <= -e * t),
        tf.equal(r, 0) & (s <= 0) & (t <= 0),
    )
    special = (r <= 0) & (s <= 0) & ~polar
    in_k_value = s * tf.exp(r / tf.where(s_pos, s, one))
    interior = s_pos & (in_k_value < t) & ~polar
    on_boundary = s_pos & tf.equal(in_k_value, t) & ~polar
    return polar, special, interior, on_boundary


@c.graph_when_eager  # the fixed-count root-finding loop is slow as eager ops
def _exp_forward(v):
    """Returns (projection, case, rho, v/||v||) for points v (..., 3)."""
    dtype = v.dtype
    # The projection is positively homogeneous; it is solved for w = v/||v||, with
    # ||v|| = k ||v/k||, k a power of two near max|v|, so that neither 1e-300 nor
    # 1e300 under/overflows when squared. It is scaled back in two steps (by
    # ||v/k|| <= 2 sqrt(3), then exactly by k), so it can only overflow where the
    # projection itself is beyond the largest float. (TF flushes subnormal numbers to
    # zero on CPU.)
    k = c.power_of_two_scale(tf.reduce_max(tf.abs(v), axis=-1))[..., tf.newaxis]
    vk = v / k
    norm = tf.norm(vk, axis=-1)
    scale = tf.where(norm > 0, norm, tf.ones_like(norm))
    # Normalization also lets the NaN of a non-finite row stay in that row only.
    w = vk / scale[..., tf.newaxis]
    r, s, t = w[..., 0], w[..., 1], w[..., 2]
    polar, special, interior, on_boundary = _exp_classify(r, s, t)
    general = ~(polar | special | interior | on_boundary)

    # Root finding only matters for `general` rows; others get a harmless bracket.
    lo, hi = _exp_bracket(r, s, t, dtype)
    lo = tf.where(general, lo, -tf.ones_like(lo))
    hi = tf.where(general, hi, tf.ones_like(hi))
    rho = _exp_root(r, s, t, lo, hi)
    rho = tf.where(on_boundary, r / tf.where(on_boundary, s, tf.ones_like(s)), rho)

    # Candidates for case 4, all in K. From rho, p = sp (rho, 1, e^rho) (primal
    # recovery) has absolute error ~ eps max(|rho|, e^rho)/q, fine for rho <= 0;
    # p = v - vd(rho) (dual recovery) has error ~ eps max(|rho|, e^-rho)/q, fine for
    # rho >= 0. So the recovery is picked by the sign of rho.
    formula = tf.where(
        (rho > 0)[..., tf.newaxis],
        _exp_dual_based_point(rho, r, s, t),
        _exp_smooth_point(rho, r, s),
    )
    heuristic = tf.stack([tf.minimum(r, 0), tf.zeros_like(s), tf.nn.relu(t)], axis=-1)
    zero = tf.zeros_like(w)
    # Safeguard for roots far out, where the formula over/underflows: keep the
    # candidate that best satisfies Moreau's optimality conditions (w - p in the
    # polar cone, <p, w - p> = 0). Unlike the distance, which is flat to second
    # order near the optimum, this measure is first order in the error.
    candidates = tf.stack([formula, heuristic, zero], axis=-2)
    scores = tf.stack([_exp_certificate_error(c_, w) for c_ in (formula, heuristic, zero)], -1)
    # NaN scores (overflowed candidates) must never win.
    scores = tf.where(tf.math.is_nan(scores), tf.constant(np.inf, dtype), scores)
    best = tf.argmin(scores, axis=-1, output_type=tf.int32)
    general_point = tf.reduce_sum(
        tf.where(
            tf.equal(tf.range(3), best[..., tf.newaxis])[..., tf.newaxis],
            candidates,
            tf.zeros_like(candidates),
        ),
        axis=-2,
    )
    codes = tf.constant([_CASE_SMOOTH, _CASE_HEURISTIC, _CASE_POLAR])
    general_case = tf.gather(codes, best)
    # A root this far out means the point sits on a limiting ray of K's boundary
    # (y -> 0 or x/y -> -inf), at rounding distance from the heuristic point; the
    # implicit formula would overflow there, so the heuristic's Jacobian is used.
    # Beyond |rho| = -log(eps) (16 in float32, 37 in float64) the point is within
    # e^-|rho| < eps (relative) of the heuristic point and so is its Jacobian, while
    # the implicit formula's e^|rho| products lose all accuracy (float64 gave 6e37
    # for a derivative of 1e-50 at rho = 126) and then overflow.
    rho_smooth_max = min(_EXP_RHO_SMOOTH_MAX, -math.log(np.finfo(dtype.as_numpy_dtype).eps))
    far_out = ~(tf.abs(rho) <= rho_smooth_max)
    general_case = tf.where(
        tf.equal(general_case, _CASE_SMOOTH) & far_out, _CASE_HEURISTIC, general_case
    )
    special_point = tf.stack([r, tf.zeros_like(s), tf.nn.relu(t)], axis=-1)

    def pick(mask, a, b):
        return tf.where(mask[..., tf.newaxis], a, b)

    out = pick(
        polar, zero, pick(special, special_point, pick(interior | on_boundary, w, general_point))
    )
    case = tf.where(
        polar,
        _CASE_POLAR,
        tf.where(
            special,
            _CASE_SPECIAL,
            tf.where(interior, _CASE_INTERIOR, tf.where(on_boundary, _CASE_SMOOTH, general_case)),
        ),
    )
    # A non-finite input row yields NaN (every comparison above was False for it).
    # The select also sits between the two scalings: grappler would otherwise
    # reorder the chain of products into out * (scale * k), which overflows.
    out = tf.where(
        tf.reduce_all(tf.math.is_finite(v), axis=-1, keepdims=True),
        out * scale[..., tf.newaxis],
        tf.fill(tf.shape(out), tf.constant(np.nan, dtype)),
    )
    out = out * k
    # rho only matters for smooth-case rows; zero it elsewhere so that no NaN or inf
    # enters the (linear) gradient, even multiplied by zero in forward-over-reverse.
    rho = tf.where(tf.equal(case, _CASE_SMOOTH), rho, tf.zeros_like(rho))
    return out, case, rho, w


def _exp_smooth_vjp(g, rho, r, s, t):
    """g^T J for J = d vp / d v at a case-4 point, by implicit differentiation of h.

    vp = sp(rho, v) a(rho) with a = (rho, 1, e^rho) and h(rho, v) = 0, so
    J = a (dsp/dv)^T + (d vp/d rho)(d rho/d v)^T, d rho/d v = -(dh/dv) / (dh/drho).
    Every e^{±rho} is scaled by e^-|rho| where it appears in a ratio.
    """
    gr, gs, gt = g[..., 0], g[..., 1], g[..., 2]
    q = rho * rho - rho + 1.0
    num = (rho - 1.0) * r + s
    sp = num / q
    max_exp = tf.constant(math.log(np.finfo(r.dtype.as_numpy_dtype).max) - 2.0, r.dtype)
    exp_rho = tf.exp(tf.minimum(rho, max_exp))
    e = tf.exp(-tf.abs(rho))
    nonneg = rho >= 0
    # dh/dv scaled by e^-|rho|: ((rho-1)e^rho - e^-rho, e^rho + rho e^-rho, -q)
    e_pos = tf.where(nonneg, tf.ones_like(e), e * e)  # e^rho * e^-|rho|
    e_neg = tf.where(nonneg, e * e, tf.ones_like(e))  # e^-rho * e^-|rho|
    dh_r = (rho - 1.0) * e_pos - e_neg
    dh_s = e_pos + rho * e_neg
    dh_t = -q * e
    hp = (rho * r + s) * e_pos + (r - (rho - 1.0) * s) * e_neg - (2.0 * rho - 1.0) * t * e
    hp = tf.where(tf.equal(hp, 0), tf.ones_like(hp), hp)
    dsp_drho = (r * q - num * (2.0 * rho - 1.0)) / (q * q)
    # g . a and g . d vp/d rho
    g_a = gr * rho + gs + gt * exp_rho
    g_dvp = dsp_drho * g_a + sp * (gr + gt * exp_rho)
    coef = -g_dvp / hp
    out_r = g_a * (rho - 1.0) / q + coef * dh_r
    out_s = g_a / q + coef * dh_s
    out_t = coef * dh_t
    return tf.stack([out_r, out_s, out_t], axis=-1)


@tf.custom_gradient
def _exp_core(v):
    y, case, rho, w = _exp_forward(tf.stop_gradient(v))

    def grad(g):
        r, s, t = w[..., 0], w[..., 1], w[..., 2]
        zeros = tf.zeros_like(r)
        ones = tf.ones_like(r)
        # The Jacobian is homogeneous of degree 0, so it is evaluated at w = v/||v||.
        smooth = _exp_smooth_vjp(g, rho, r, s, t)
        t_pos = tf.cast(t > 0, g.dtype)
        special = g * tf.stack([ones, zeros, t_pos], axis=-1)
        heuristic = g * tf.stack([tf.cast(r < 0, g.dtype), zeros, t_pos], axis=-1)
        out = tf.zeros_like(g)
        for code, value in (
            (_CASE_SPECIAL, special),
            (_CASE_INTERIOR, g),
            (_CASE_SMOOTH, smooth),
            (_CASE_HEURISTIC, heuristic),
        ):
            out = tf.where(tf.equal(case, code)[..., tf.newaxis], value, out)
        return out

    return y, grad


def projection_exp_cone(x):
    """Projection onto the exponential cone K = cl{(x, y, z) : y > 0, y exp(x/y) <= z}.

    SCS convention: the last axis has size 3 and holds (x, y, z). Cases: points of K
    are returned unchanged; points of the polar cone map to 0; points with x <= 0 and
    y <= 0 map to (x, 0, max(z, 0)); all others are solved by a safeguarded
    Newton-bisection root find of a univariate equation (fixed iteration count,
    per element; see the comment block in this module and Friberg, "Projection onto
    the exponential cone: a univariate root-finding problem", 2021).

    Args:
      x: floating tensor `(..., 3)`. float16/bfloat16 are computed in float32.

    Returns:
      Tensor like `x`. Jacobian: identity in the interior of K; 0 on the polar cone
      (its boundary and the apex included); `diag(1, 0, [z > 0])` in the region
      x <= 0, y <= 0 (this includes K's face y = 0); elsewhere, and on K's smooth
      boundary y > 0, y exp(x/y) = z, the implicit-function derivative of the root
      equation (exact Jacobian of the projection there).
    """
    with tf.name_scope("projection_exp_cone"):
        x = c.as_float_tensor(x)
        c.require_rank(x, 1)
        if x.shape[-1] is not None and x.shape[-1] != 3:
            raise ValueError(
                f"The exponential cone acts on a last axis of size 3 (x, y, z). "
                f"Received: x.shape={x.shape}"
            )
        x, original = c.upcast_half(x)
        return c.restore_dtype(_exp_core(x), original)
