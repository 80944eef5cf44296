"""Independent references for the projection/prox tests: cvxpy, numpy, finite differences."""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import tensorflow as tf

_CLARABEL = {
    "solver": "CLARABEL",
    "tol_gap_abs": 1e-12,
    "tol_gap_rel": 1e-12,
    "tol_feas": 1e-12,
    "tol_ktratio": 1e-10,
    "max_iter": 500,
}


# Second try for degenerate problems (e.g. PSD with several zero eigenvalues, where
# interior-point methods lose strict complementarity): SCS to high accuracy.
_SCS = {"solver": "SCS", "eps": 1e-10, "max_iters": 200_000}


def cvx_project(x, constraints_fn, symmetric=False, objective_extra=None, homogeneous=False):
    """argmin_y 1/2||y - x||^2 (+ extra(y)) s.t. constraints_fn(y), solved by Clarabel.

    Interior-point solvers lose accuracy on badly scaled data (|x| ~ 1e6), so several
    equivalent formulations are tried and the first one solved to `optimal` wins. For
    cones (`homogeneous=True`) we use P(c x) = c P(x) and solve for x/||x||.
    """
    x = np.asarray(x, dtype=np.float64)
    norm = float(np.linalg.norm(x))
    if homogeneous and norm > 0:
        return norm * cvx_project(x / norm, constraints_fn, symmetric, objective_extra)
    weight = 1.0 / max(1.0, norm) ** 2
    best = None
    for settings in (_CLARABEL, _SCS):
        for form in ("plain", "weighted", "norm"):
            y = cp.Variable(x.shape, symmetric=symmetric)
            if form == "weighted":
                objective = 0.5 * weight * cp.sum_squares(y - x)
            elif form == "norm":
                objective = cp.norm(cp.vec(y - x, order="F"), 2)
            else:
                objective = 0.5 * cp.sum_squares(y - x)
            if objective_extra is not None:
                if form == "norm":
                    continue
                factor = weight if form == "weighted" else 1.0
                objective = objective + factor * objective_extra(y)
            problem = cp.Problem(cp.Minimize(objective), constraints_fn(y))
            try:
                problem.solve(**settings)
            except cp.error.SolverError:
                continue
            if problem.status == "optimal":
                return np.asarray(y.value)
            if problem.status == "optimal_inaccurate" and best is None:
                best = np.asarray(y.value)
    assert best is not None, "cvxpy reference failed in every formulation"
    return best


def cvx_batch(xs, constraints_fn, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "solution may be inaccurate"
        return np.stack([cvx_project(x, constraints_fn, **kwargs) for x in xs])


# Constraint builders (functions of the cvxpy variable y) for each set.
def simplex(value=1.0):
    def cons(y):
        return [y >= 0, cp.sum(y) == value]

    return cons


def l1_ball(radius=1.0):
    return lambda y: [cp.norm1(y) <= radius]


def l2_ball(radius=1.0):
    return lambda y: [cp.norm2(y) <= radius]


def linf_ball(radius=1.0):
    return lambda y: [cp.norm_inf(y) <= radius]


def box(lower, upper):
    return lambda y: [y >= lower, y <= upper]


def non_negative():
    return lambda y: [y >= 0]


def hyperplane(a, b):
    return lambda y: [a @ y == b]


def halfspace(a, b):
    return lambda y: [a @ y <= b]


def affine(A, b):
    return lambda y: [A @ y == b]


def soc():
    return lambda y: [cp.SOC(y[0], y[1:])]


def exp_cone():
    return lambda y: [cp.constraints.ExpCone(y[0], y[1], y[2])]


def psd():
    return lambda y: [y >> 0]


def numpy_simplex(x, value=1.0):
    """Textbook sort-based projection onto the simplex (Held et al. 1974), in numpy."""
    x = np.asarray(x, dtype=np.float64)
    u = np.sort(x, axis=-1)[..., ::-1]
    css = np.cumsum(u, axis=-1)
    k = np.arange(1, x.shape[-1] + 1)
    cond = u - (css - value) / k > 0
    rho = cond.sum(axis=-1, keepdims=True)
    tau = (np.take_along_axis(css, rho - 1, axis=-1) - value) / rho
    return np.maximum(x - tau, 0)


def l1_sphere_bruteforce(x, radius):
    """Nearest point of the l1 sphere by enumerating all orthant faces (small n only).

    On each face {sigma * u : u >= 0, sum(u) = radius} the nearest point is a simplex
    projection of sigma * x; the answer is the best over all 2^n sign patterns, which
    does not assume that the orthant of x is optimal.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    best, best_d = None, np.inf
    for mask in range(2**n):
        sigma = np.array([1.0 if (mask >> i) & 1 else -1.0 for i in range(n)])
        y = sigma * numpy_simplex(sigma * x, radius)
        d = np.linalg.norm(y - x)
        if d < best_d - 1e-12:
            best, best_d = y, d
    return best


def exp_cone_violation(p):
    """Max of the constraint violations of points p (..., 3) w.r.t. the exponential cone."""
    r, s, t = p[..., 0], p[..., 1], p[..., 2]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        val = np.where(s > 0, s * np.exp(r / np.where(s > 0, s, 1.0)) - t, 0.0)
        face = np.where(s <= 0, np.maximum(np.maximum(r, 0.0), -t), 0.0)
    return np.maximum.reduce([np.maximum(val, 0), np.maximum(-s, 0), face])


# --------------------------------------------------------------------------------------
# Derivatives
# --------------------------------------------------------------------------------------


def fd_jacobian(fn, args, wrt, eps=1e-6):
    """Central finite-difference Jacobian of fn(*args) w.r.t. args[wrt], float64.

    Returns an array of shape out.shape + args[wrt].shape.
    """
    args = [np.array(a, dtype=np.float64) for a in args]
    base = np.asarray(fn(*args))
    target = args[wrt]
    jac = np.zeros(base.shape + target.shape)
    for idx in np.ndindex(target.shape):
        plus = [a.copy() for a in args]
        minus = [a.copy() for a in args]
        plus[wrt][idx] += eps
        minus[wrt][idx] -= eps
        jac[(Ellipsis, *idx)] = (np.asarray(fn(*plus)) - np.asarray(fn(*minus))) / (2 * eps)
    return jac


def tf_vjp_jacobian(fn, args, wrt):
    """Jacobian from reverse mode (tape.jacobian, i.e. one VJP per output entry)."""
    tensors = [tf.constant(np.asarray(a, dtype=np.float64)) for a in args]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(tensors[wrt])
        out = fn(*tensors)
    jac = tape.jacobian(out, tensors[wrt], experimental_use_pfor=False)
    return np.asarray(jac)


def tf_jvp(fn, args, wrt, tangent):
    """Forward-mode JVP with tf.autodiff.ForwardAccumulator."""
    tensors = [tf.constant(np.asarray(a, dtype=np.float64)) for a in args]
    tangent = tf.constant(np.asarray(tangent, dtype=np.float64))
    with tf.autodiff.ForwardAccumulator(tensors[wrt], tangent) as acc:
        out = fn(*tensors)
    return np.asarray(acc.jvp(out))


def exp_polar_violation(d):
    """Violation of membership in the polar of the exponential cone, for d (..., 3).

    K° = {(u, v, w): u > 0, u exp(v/u) <= -e w} ∪ {(0, v, w): v <= 0, w <= 0};
    the first condition is written u exp(v/u - 1) + w <= 0.
    """
    u, v, w = d[..., 0], d[..., 1], d[..., 2]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        smooth = np.where(u > 0, u * np.exp(v / np.where(u > 0, u, 1.0) - 1.0) + w, np.inf)
    face = np.maximum(np.maximum(v, 0), np.maximum(w, 0)) + np.abs(u)
    return np.maximum(np.minimum(smooth, face), 0.0)


def set_violation(kind, y, **p):
    """Max constraint violation of each row of y (batch, ...) for the named set."""
    flat = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    if kind == "simplex":
        return np.maximum(np.abs(flat.sum(-1) - p["value"]), np.maximum(-flat.min(-1), 0))
    if kind == "l1_ball":
        return np.maximum(np.abs(flat).sum(-1) - p["radius"], 0)
    if kind == "l1_sphere":
        return np.abs(np.abs(flat).sum(-1) - p["radius"])
    if kind == "l2_ball":
        return np.maximum(np.linalg.norm(flat, axis=-1) - p["radius"], 0)
    if kind == "l2_sphere":
        return np.abs(np.linalg.norm(flat, axis=-1) - p["radius"])
    if kind == "linf_ball":
        return np.maximum(np.abs(flat).max(-1) - p["radius"], 0)
    if kind == "box":
        return np.maximum(np.maximum(p["lower"] - flat, flat - p["upper"]), 0).max(-1)
    if kind == "non_negative":
        return np.maximum(-flat.min(-1), 0)
    if kind == "hyperplane":
        return np.abs(flat @ p["a"] - p["b"])
    if kind == "halfspace":
        return np.maximum(flat @ p["a"] - p["b"], 0)
    if kind == "affine_set":
        return np.abs(flat @ p["A"].T - p["b"]).max(-1)
    if kind == "second_order_cone":
        return np.maximum(np.linalg.norm(flat[:, 1:], axis=-1) - flat[:, 0], 0)
    if kind == "exp_cone":
        return exp_cone_violation(flat)
    if kind == "psd_cone":
        m = np.asarray(y, dtype=np.float64)
        sym_err = np.abs(m - np.swapaxes(m, -1, -2)).max(axis=(-1, -2))
        return np.maximum(np.maximum(-np.linalg.eigvalsh(m).min(-1), 0), sym_err)
    raise KeyError(kind)


def exp_cone_projection_mp(v, digits=50):
    """Exponential-cone projection in multiple precision (mpmath), for spot checks.

    Cases as in Parikh & Boyd (in K, in the polar cone, x <= 0 and y <= 0), else the
    root of h(rho) = ((rho-1) r + s) e^rho - (r - rho s) e^-rho - (rho^2-rho+1) t on
    the interval where sp > 0 and mu > 0, found by bisection on a bracket that is
    widened by doubling. Returns a float64 array, or None where `digits` do not
    suffice to resolve the root (roots thousands of units out, next to the face y = 0).
    """
    import mpmath as mp

    with mp.workdps(digits):
        r, s, t = (mp.mpf(float(a)) for a in v)
        if (s > 0 and s * mp.exp(r / s) <= t) or (r <= 0 and s == 0 and t >= 0):
            return np.array([float(r), float(s), float(t)])
        if (r > 0 and r * mp.exp(s / r) <= -mp.e * t) or (r == 0 and s <= 0 and t <= 0):
            return np.zeros(3)
        if r <= 0 and s <= 0:
            return np.array([float(r), 0.0, float(max(t, 0))])

        def h(rho):
            q = rho * rho - rho + 1
            return ((rho - 1) * r + s) * mp.exp(rho) - (r - rho * s) * mp.exp(-rho) - q * t

        lower = 1 - s / r if r > 0 else None  # sp = 0
        upper = r / s if s > 0 else None  # mu = 0
        if lower is None:
            step = mp.mpf(1)
            while h(upper - step) >= 0:
                step *= 2
            lower = upper - step
        if upper is None:
            step = mp.mpf(1)
            while h(lower + step) <= 0:
                step *= 2
            upper = lower + step
        for _ in range(4 * digits + 64):  # plain bisection: slow but unconditional
            mid = (lower + upper) / 2
            if h(mid) < 0:
                lower = mid
            else:
                upper = mid
        rho = (lower + upper) / 2
        sp = ((rho - 1) * r + s) / (rho * rho - rho + 1)
        out = np.array([float(sp * rho), float(sp), float(sp * mp.exp(rho))])
        if not (sp > 0 and np.all(np.isfinite(out))):
            # The root sits closer to a bracket end than `digits` can resolve
            # (|rho| in the thousands): no reference for this point.
            return None
        return out
