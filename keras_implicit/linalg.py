"""Matrix-free linear solvers for the backward pass of implicit differentiation.

One signature for all (as jaxopt's): `solve_xxx(matvec, b, init=None, tol=..., max_iter=...,
ridge=0.0) -> (x, SolverStats)` solves (A + ridge I) x = b where `matvec(v) = A v`.
`b` is [B, D] with independent rows (A is block diagonal: one block per row), or [D].
Convergence is judged per row on the relative residual ||b - (A + ridge I) x|| / ||b||
(a zero right-hand side converges at once to x = 0); a converged row stops changing.

The classes (`CG`, `GMRES`, ...) hold the validated settings and are what
`ki.fixed_point(..., linear_solver=...)` accepts; calling one solves. Each `solve_xxx`
function validates its arguments once, by building its class, and calls it.
"""

from __future__ import annotations

import tensorflow as tf

from keras_implicit import _validation
from keras_implicit._registry import Registry, Settings
from keras_implicit._structure import (
    SolverStats,
    broyden_root,
    finite_rows,
    row_norm,
    row_sum,
    safe_divide,
    while_loop,
)


def _dot(a, b):
    return row_sum(a * b)


def _prepare(matvec, b, init, ridge):
    b = tf.convert_to_tensor(b)
    unbatched = b.shape.rank == 1
    if unbatched:
        b = b[None]
        inner = matvec

        def matvec(v):
            return inner(v[0])[None]

    if b.shape.rank != 2:
        raise ValueError(f"`b` must have shape [D] or [B, D]. Received shape: {b.shape}")
    x0 = tf.zeros_like(b) if init is None else tf.reshape(tf.cast(init, b.dtype), tf.shape(b))
    if ridge:
        base = matvec
        ridge_t = tf.constant(ridge, b.dtype)

        def matvec(v):
            return base(v) + ridge_t * v

    return matvec, b, x0, unbatched


def _finish(x, stats, unbatched):
    if unbatched:
        return x[0], SolverStats(*(s[0] for s in stats))
    return x, stats


def _stats(matvec, b, x, iterations, tol):
    residual = safe_divide(row_norm(b - matvec(x)), row_norm(b))
    return SolverStats(iterations, residual, residual <= tol)


def _loop(body, state, max_iter):
    return while_loop(
        lambda it, active, *rest: tf.reduce_any(active), body, state, maximum_iterations=max_iter
    )


def _cg(matvec, b, x, tol_t, max_iter):
    """Conjugate gradient for symmetric positive definite A; returns (x, iterations)."""
    b_norm = row_norm(b)
    r = b - matvec(x)
    rs = _dot(r, r)
    active = tf.sqrt(rs) > tol_t * b_norm

    def body(it, active, x, r, p, rs, iterations):
        ap = matvec(p)
        alpha = safe_divide(rs, _dot(p, ap))
        keep = active[:, None]
        x = tf.where(keep, x + alpha[:, None] * p, x)
        r_new = r - alpha[:, None] * ap
        rs_new = _dot(r_new, r_new)
        p_new = r_new + safe_divide(rs_new, rs)[:, None] * p
        r, p, rs = (
            tf.where(keep, r_new, r),
            tf.where(keep, p_new, p),
            tf.where(active, rs_new, rs),
        )
        iterations = iterations + tf.cast(active, tf.int32)
        ok = tf.logical_and(tf.math.is_finite(rs_new), alpha != 0)
        active = tf.logical_and(active, tf.logical_and(ok, tf.sqrt(rs) > tol_t * b_norm))
        return it + 1, active, x, r, p, rs, iterations

    zeros = tf.zeros(tf.shape(b)[:1], tf.int32)
    state = (tf.constant(0), active, x, r, r, rs, zeros)
    _, _, x, _, _, _, iterations = _loop(body, state, max_iter)
    return x, iterations


def _bicgstab(matvec, b, x, tol_t, max_iter):
    """BiCGStab (van der Vorst 1992), two matvecs per iteration; returns (x, iterations)."""
    dtype = b.dtype
    b_norm = row_norm(b)
    r = b - matvec(x)
    r_hat = r
    batch = tf.shape(b)[:1]
    one = tf.ones(batch, dtype)
    active = row_norm(r) > tol_t * b_norm

    def body(it, active, x, r, p, v, rho, alpha, omega, iterations):
        rho_new = _dot(r_hat, r)
        beta = safe_divide(rho_new, rho) * safe_divide(alpha, omega)
        p = r + beta[:, None] * (p - omega[:, None] * v)
        v = matvec(p)
        alpha = safe_divide(rho_new, _dot(r_hat, v))
        s = r - alpha[:, None] * v
        t = matvec(s)
        omega = safe_divide(_dot(t, s), _dot(t, t))
        x_new = x + alpha[:, None] * p + omega[:, None] * s
        r_new = s - omega[:, None] * t
        keep = active[:, None]
        x = tf.where(keep, x_new, x)
        r = tf.where(keep, r_new, r)
        iterations = iterations + tf.cast(active, tf.int32)
        r_norm = row_norm(r)
        # rho or omega at zero is a breakdown: the row cannot make progress
        ok = tf.logical_and(tf.math.is_finite(r_norm), tf.logical_and(rho_new != 0, omega != 0))
        active = tf.logical_and(active, tf.logical_and(ok, r_norm > tol_t * b_norm))
        return it + 1, active, x, r, p, v, rho_new, alpha, omega, iterations

    zeros = tf.zeros_like(b)
    state = (
        tf.constant(0),
        active,
        x,
        r,
        zeros,
        zeros,
        one,
        one,
        one,
        tf.zeros(batch, tf.int32),
    )
    out = _loop(body, state, max_iter)
    return out[2], out[-1]


def _gmres(matvec, b, x, tol_t, max_iter, restart):
    """Restarted GMRES(restart) with Givens rotations, batched over rows.

    The Arnoldi basis uses classical Gram-Schmidt applied twice (as accurate as modified
    Gram-Schmidt, and vectorized). `max_iter` bounds the total number of matvecs.
    Returns (x, iterations).
    """
    dtype = b.dtype
    m = min(restart, max_iter)
    batch = tf.shape(b)[0]
    dim = tf.shape(b)[1]
    target = tol_t * row_norm(b)
    basis_mask = tf.range(m + 1)

    def cycle(x, active):
        """One restart cycle of at most m Arnoldi steps; returns (x, steps taken)."""
        r = b - matvec(x)
        beta = row_norm(r)
        v0 = safe_divide(r, beta[:, None])
        # step-major buffers updated one slot at a time: XLA writes them in place
        # (whole-tensor one-hot updates would rewrite m+1 vectors every step)
        basis = tf.concat([v0[None], tf.zeros(tf.stack([m, batch, dim]), dtype)], 0)
        givens_c = tf.zeros([batch, m], dtype)
        givens_s = tf.zeros([batch, m], dtype)
        g = tf.one_hot(tf.zeros([batch], tf.int32), m + 1, dtype=dtype) * beta[:, None]
        hessenberg = tf.zeros(tf.stack([m, batch, m + 1]), dtype)  # column j at [j]
        steps = tf.zeros([batch], tf.int32)
        running = tf.logical_and(active, beta > target)

        def arnoldi(j, running, basis, hessenberg, givens_c, givens_s, g, steps):
            w = matvec(tf.gather(basis, j))
            known = tf.cast(basis_mask <= j, dtype)[None, :]
            h = tf.einsum("kbd,bd->bk", basis, w) * known
            w = w - tf.einsum("bk,kbd->bd", h, basis)
            h2 = tf.einsum("kbd,bd->bk", basis, w) * known
            w = w - tf.einsum("bk,kbd->bd", h2, basis)
            h = h + h2
            h_next = row_norm(w)
            basis = tf.tensor_scatter_nd_update(
                basis, [[j + 1]], safe_divide(w, h_next[:, None])[None]
            )
            h = h + tf.one_hot(j + 1, m + 1, dtype=dtype)[None, :] * h_next[:, None]

            def rotate(i, h):
                c, s = givens_c[:, i], givens_s[:, i]
                hi, hi1 = h[:, i], h[:, i + 1]
                new_i, new_i1 = c * hi + s * hi1, -s * hi + c * hi1
                hot_i = tf.one_hot(i, m + 1, dtype=dtype)[None, :]
                hot_i1 = tf.one_hot(i + 1, m + 1, dtype=dtype)[None, :]
                h = h + hot_i * (new_i - hi)[:, None] + hot_i1 * (new_i1 - hi1)[:, None]
                return i + 1, h

            _, h = while_loop(lambda i, h: i < j, rotate, (tf.constant(0), h))
            hj, hj1 = h[:, j], h[:, j + 1]
            denom = tf.sqrt(hj * hj + hj1 * hj1)
            c = tf.where(denom > 0, safe_divide(hj, denom), tf.ones_like(hj))
            s = safe_divide(hj1, denom)
            hot_j = tf.one_hot(j, m + 1, dtype=dtype)[None, :]
            hot_j1 = tf.one_hot(j + 1, m + 1, dtype=dtype)[None, :]
            h = h + hot_j * (denom - hj)[:, None] - hot_j1 * hj1[:, None]
            gj = g[:, j]
            g_new = g + hot_j * ((c - 1) * gj)[:, None] + hot_j1 * (-s * gj)[:, None]

            keep = running[:, None]
            col = tf.one_hot(j, m, dtype=dtype)[None, :]
            givens_c = tf.where(keep, givens_c + col * c[:, None], givens_c)
            givens_s = tf.where(keep, givens_s + col * s[:, None], givens_s)
            hessenberg = tf.tensor_scatter_nd_update(
                hessenberg, [[j]], tf.where(keep, h, tf.zeros_like(h))[None]
            )
            g = tf.where(keep, g_new, g)
            steps = steps + tf.cast(running, tf.int32)
            estimate = tf.abs(g[:, j + 1])
            running = tf.logical_and(
                running,
                tf.logical_and(
                    estimate > target, tf.logical_and(h_next > 0, tf.math.is_finite(estimate))
                ),
            )
            return j + 1, running, basis, hessenberg, givens_c, givens_s, g, steps

        state = (tf.constant(0), running, basis, hessenberg, givens_c, givens_s, g, steps)
        out = while_loop(
            lambda j, running, *rest: tf.logical_and(j < m, tf.reduce_any(running)),
            arnoldi,
            state,
        )
        _, _, basis, hessenberg, _, _, g, steps = out
        # solve the triangular system on the first `steps` columns of each row
        r_upper = tf.transpose(hessenberg[:, :, :m], [1, 2, 0])  # [B, i, j]
        used = tf.range(m)[None, :] < steps[:, None]
        used_f = tf.cast(used, dtype)
        r_upper = r_upper * used_f[:, :, None] * used_f[:, None, :]
        r_upper = tf.linalg.set_diag(
            r_upper, tf.where(used, tf.linalg.diag_part(r_upper), tf.ones_like(used_f))
        )
        y = tf.linalg.triangular_solve(r_upper, (g[:, :m] * used_f)[:, :, None], lower=False)
        update = tf.einsum("bk,kbd->bd", y[:, :, 0], basis[:m])
        update = tf.where(tf.math.is_finite(update), update, tf.zeros_like(update))
        return x + update, steps

    def outer(it, active, x, iterations):
        x_new, steps = cycle(x, active)
        x = tf.where(active[:, None], x_new, x)
        iterations = iterations + steps
        res = row_norm(b - matvec(x))
        progress = steps > 0
        active = tf.logical_and(
            active,
            tf.logical_and(res > target, tf.logical_and(progress, iterations < max_iter)),
        )
        return it + 1, active, x, iterations

    active = row_norm(b - matvec(x)) > target
    n_cycles = -(-max_iter // m)
    state = (tf.constant(0), active, x, tf.zeros([batch], tf.int32))
    _, _, x, iterations = _loop(outer, state, n_cycles)
    return x, iterations


def _neumann(matvec, b, x, tol_t, max_iter):
    """Truncated Neumann series / Richardson iteration x <- b + (I - A) x.

    For the fixed-point adjoint A = I - J^T this is x = sum_k (J^T)^k b, which converges
    when the spectral radius of J is below 1. With a handful of terms it is the cheap
    "phantom" / Jacobian-free backward (Fung et al. 2022, Geng et al. 2021).
    Returns (x, iterations).
    """
    target = tol_t * row_norm(b)
    r = b - matvec(x)

    def body(it, active, x, r, iterations):
        x_new = x + r
        r_new = b - matvec(x_new)
        keep = active[:, None]
        x, r = tf.where(keep, x_new, x), tf.where(keep, r_new, r)
        iterations = iterations + tf.cast(active, tf.int32)
        norm = row_norm(r)
        active = tf.logical_and(active, tf.logical_and(norm > target, tf.math.is_finite(norm)))
        return it + 1, active, x, r, iterations

    batch = tf.shape(b)[:1]
    state = (tf.constant(0), row_norm(r) > target, x, r, tf.zeros(batch, tf.int32))
    _, _, x, _, iterations = _loop(body, state, max_iter)
    return x, iterations


def _broyden(matvec, b, x, tol, max_iter, memory):
    """Limited-memory Broyden on the residual A x - b (quasi-Newton on the adjoint system).

    Starts from H = I (a Richardson step), which suits A = I - J^T; it is the backward
    solver of the original DEQ paper. Returns (x, iterations).
    """
    b_norm = row_norm(b)
    x, stats = broyden_root(
        lambda v: matvec(v) - b,
        x,
        tol=tol,
        max_iter=max_iter,
        memory=memory,
        residual_fn=lambda r, v: safe_divide(row_norm(r), b_norm),
    )
    return x, stats.iterations


def materialize(matvec, b):
    """Dense matrices [B, D, D] of the row operators, from D matvecs (small D only)."""
    dim = b.shape[-1]
    if dim is None:
        dim = tf.shape(b)[-1]
    eye = tf.eye(dim, dtype=b.dtype)

    def column(i):
        e = tf.broadcast_to(eye[i][None, :], tf.shape(b))
        return matvec(e)

    columns = tf.TensorArray(b.dtype, size=dim)
    _, columns = while_loop(
        lambda i, ta: i < dim, lambda i, ta: (i + 1, ta.write(i, column(i))), (0, columns)
    )
    return tf.transpose(columns.stack(), [1, 2, 0])  # [B, D(rows), D(columns)]


def _dense(matvec, b, tol_t):
    """Materializes A (D matvecs) and solves by QR; returns (x, SolverStats).

    QR rather than LU: TF's LU raises on a singular matrix (and XLA has no LU), while a
    triangular solve lets a singular row come out non-finite, reported as an infinite
    residual.
    """
    matrix = materialize(matvec, b)
    q, r = tf.linalg.qr(matrix)
    rhs = tf.linalg.matvec(q, b, transpose_a=True)[:, :, None]
    x = tf.linalg.triangular_solve(r, rhs, lower=False)[:, :, 0]
    iterations = tf.fill(tf.shape(b)[:1], tf.shape(b)[1])
    residual = safe_divide(row_norm(b - tf.linalg.matvec(matrix, x)), row_norm(b))
    residual = tf.where(
        tf.math.is_finite(residual),
        residual,
        tf.fill(tf.shape(residual), tf.constant(float("inf"), b.dtype)),
    )
    return x, SolverStats(iterations, residual, residual <= tol_t)


class LinearSolver(Settings):
    """Settings for a matrix-free linear solver; `solver(matvec, b, init)` solves.

    Args:
        tol: relative residual tolerance per row, ||b - (A + ridge I) x|| / ||b||.
        max_iter: maximum number of iterations (matvecs for GMRES).
        ridge: Tikhonov term added to A.
    """

    name = "linear_solver"
    _fields = ("tol", "max_iter", "ridge")

    def __init__(self, tol: float = 1e-5, max_iter: int = 100, ridge: float = 0.0):
        self.tol = _validation.non_negative_float("tol", tol)
        self.max_iter = _validation.positive_int("max_iter", max_iter)
        self.ridge = _validation.non_negative_float("ridge", ridge)

    def __call__(self, matvec, b, init=None):
        """Solves (A + ridge I) x = b with matvec(v) = A v; returns (x, SolverStats)."""
        with tf.name_scope(f"solve_{self.name}"):
            matvec, b, x0, unbatched = _prepare(matvec, b, init, self.ridge)
            tol = tf.constant(self.tol, b.dtype)
            x, stats = self._solve(matvec, b, x0, tol)
            return _finish(x, stats, unbatched)

    def _solve(self, matvec, b, x0, tol):
        """(x, SolverStats) on prepared [B, D] rows; subclasses run their iteration."""
        x, iterations = self._iterate(matvec, b, x0, tol)
        return x, _stats(matvec, b, x, iterations, tol)

    def _iterate(self, matvec, b, x0, tol):
        raise NotImplementedError


_REGISTRY = Registry(LinearSolver, "linear_solver")


@_REGISTRY.register(keras_name="linalg.CG")
class CG(LinearSolver):
    """Conjugate gradient: symmetric positive definite systems (argmin Hessians)."""

    name = "cg"

    def _iterate(self, matvec, b, x0, tol):
        return _cg(matvec, b, x0, tol, self.max_iter)


@_REGISTRY.register(keras_name="linalg.BiCGStab")
class BiCGStab(LinearSolver):
    """BiCGStab: general nonsymmetric systems, short recurrences, two matvecs per step.

    BiCGStab can break down (a zero inner product ends a row's progress, e.g. on a
    skew-symmetric A) where GMRES still converges. With `fallback_restart` set, rows
    that BiCGStab leaves unconverged are solved again by GMRES(fallback_restart),
    started from BiCGStab's iterate and given its own `max_iter`; the fallback runs only
    when some row needs it. Under XLA its buffers are allocated whether it runs or not
    (restart 10 doubles BiCGStab's peak memory; 3 or less adds none but does not rescue
    a skew-symmetric system), so it is off by default. On the fixed-point adjoint
    I - J^T with ||J|| < 1 the symmetric part of A is positive definite and BiCGStab
    does not break down this way.

    Args:
        fallback_restart: restart length of the GMRES fallback, or None (default) for none.
    """

    name = "bicgstab"
    _fields = (*LinearSolver._fields, "fallback_restart")

    def __init__(self, tol=1e-5, max_iter=100, ridge=0.0, fallback_restart=None):
        super().__init__(tol=tol, max_iter=max_iter, ridge=ridge)
        if fallback_restart is not None:
            fallback_restart = _validation.positive_int("fallback_restart", fallback_restart)
        self.fallback_restart = fallback_restart

    def _solve(self, matvec, b, x0, tol):
        x, iterations = _bicgstab(matvec, b, x0, tol, self.max_iter)
        stats = _stats(matvec, b, x, iterations, tol)
        if self.fallback_restart is None:
            return x, stats

        def rescue():
            failed = tf.logical_not(stats.converged)
            start = tf.where(finite_rows(x)[:, None], x, tf.zeros_like(x))
            y, more = _gmres(matvec, b, start, tol, self.max_iter, self.fallback_restart)
            y = tf.where(failed[:, None], y, x)
            more = iterations + tf.where(failed, more, 0)
            return (y, *_stats(matvec, b, y, more, tol))

        out = tf.cond(tf.reduce_all(stats.converged), lambda: (x, *stats), rescue)
        return out[0], SolverStats(*out[1:])


@_REGISTRY.register(keras_name="linalg.GMRES")
class GMRES(LinearSolver):
    """Restarted GMRES: general nonsymmetric systems, monotone residual.

    Args:
        restart: Krylov basis size per cycle (memory: restart + 1 vectors per row).
    """

    name = "gmres"
    _fields = (*LinearSolver._fields, "restart")

    def __init__(self, tol=1e-5, max_iter=100, ridge=0.0, restart=20):
        super().__init__(tol=tol, max_iter=max_iter, ridge=ridge)
        self.restart = _validation.positive_int("restart", restart)

    def _iterate(self, matvec, b, x0, tol):
        return _gmres(matvec, b, x0, tol, self.max_iter, self.restart)


@_REGISTRY.register(keras_name="linalg.Neumann")
class Neumann(LinearSolver):
    """Truncated Neumann series: cheap, needs spectral radius of I - A below 1."""

    name = "neumann"

    def _iterate(self, matvec, b, x0, tol):
        return _neumann(matvec, b, x0, tol, self.max_iter)


@_REGISTRY.register(keras_name="linalg.Broyden")
class Broyden(LinearSolver):
    """Limited-memory Broyden on the adjoint system.

    Args:
        memory: rank of the inverse-Jacobian correction kept.
    """

    name = "broyden"
    _fields = (*LinearSolver._fields, "memory")

    def __init__(self, tol=1e-5, max_iter=100, ridge=0.0, memory=20):
        super().__init__(tol=tol, max_iter=max_iter, ridge=ridge)
        self.memory = _validation.positive_int("memory", memory)

    def _iterate(self, matvec, b, x0, tol):
        return _broyden(matvec, b, x0, self.tol, self.max_iter, self.memory)


@_REGISTRY.register(keras_name="linalg.Dense")
class Dense(LinearSolver):
    """Materialize and QR-solve: exact reference for small problems.

    `max_iter` and an initial guess are ignored; `tol` only judges the reported
    convergence (a singular A yields non-finite rows, reported with an infinite residual).
    """

    name = "dense"

    def __call__(self, matvec, b, init=None):
        return super().__call__(matvec, b, None)

    def _solve(self, matvec, b, x0, tol):
        return _dense(matvec, b, tol)


def solve_cg(matvec, b, init=None, tol=1e-5, max_iter=100, ridge=0.0):
    """Conjugate gradient for symmetric positive definite A (e.g. a Hessian: argmin)."""
    return CG(tol=tol, max_iter=max_iter, ridge=ridge)(matvec, b, init)


def solve_bicgstab(matvec, b, init=None, tol=1e-5, max_iter=100, ridge=0.0):
    """BiCGStab (van der Vorst 1992) for general nonsymmetric A; two matvecs per iteration."""
    return BiCGStab(tol=tol, max_iter=max_iter, ridge=ridge)(matvec, b, init)


def solve_gmres(matvec, b, init=None, tol=1e-5, max_iter=100, ridge=0.0, restart=20):
    """Restarted GMRES(restart); `max_iter` bounds the total number of matvecs."""
    return GMRES(tol=tol, max_iter=max_iter, ridge=ridge, restart=restart)(matvec, b, init)


def solve_neumann(matvec, b, init=None, tol=1e-5, max_iter=100, ridge=0.0):
    """Truncated Neumann series x <- b + (I - A) x (the cheap "phantom" backward)."""
    return Neumann(tol=tol, max_iter=max_iter, ridge=ridge)(matvec, b, init)


def solve_broyden(matvec, b, init=None, tol=1e-5, max_iter=100, ridge=0.0, memory=20):
    """Limited-memory Broyden on the residual A x - b."""
    return Broyden(tol=tol, max_iter=max_iter, ridge=ridge, memory=memory)(matvec, b, init)


def solve_dense(matvec, b, init=None, tol=1e-5, max_iter=100, ridge=0.0):
    """Materializes A (D matvecs) and solves by QR: exact, O(D^3), for small problems.

    `init` and `max_iter` are accepted for the common signature and ignored (max_iter is
    still validated); `tol` only judges the reported convergence.
    """
    return Dense(tol=tol, max_iter=max_iter, ridge=ridge)(matvec, b, init)


def get(identifier, **options) -> LinearSolver:
    """Returns a linear solver from a name, a config dict or a `LinearSolver` instance.

    Keyword `options` (tol=, max_iter=, ridge=, ...) as in `ki.solvers.get`.
    """
    return _REGISTRY.get(identifier, options)


__all__ = [
    "CG",
    "GMRES",
    "BiCGStab",
    "Broyden",
    "Dense",
    "LinearSolver",
    "Neumann",
    "get",
    "materialize",
    "solve_bicgstab",
    "solve_broyden",
    "solve_cg",
    "solve_dense",
    "solve_gmres",
    "solve_neumann",
]
