"""Diagnostics: can this implicit gradient be trusted?

The implicit function theorem (smooth or nonsmooth) needs dF/dy invertible at the
solution; for a fixed point z = T(z) that is I - J with J = dT/dz, guaranteed when the
spectral radius of J is below 1. These tools measure it (`check_invertibility`,
`spectral_radius`) and compare implicit gradients with central finite differences on a
user's own problem (`check_gradients`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from keras_implicit import _validation, implicit, linalg
from keras_implicit._structure import Packer, row_norm, safe_divide

_SOLVES = {"fixed_point": implicit.fixed_point, "root": implicit.root, "argmin": implicit.argmin}


def _check_kind(kind):
    return _validation.one_of("kind", kind, tuple(_SOLVES))


class GradientCheck(NamedTuple):
    """Directional derivatives of <u, y*(args)> along random directions.

    Attributes:
        relative_error: max over directions of |implicit - fd| / max(|fd|, scale).
        implicit: implicit-gradient directional derivatives, one per direction.
        finite_difference: central finite differences, one per direction.
        ok: relative_error <= rtol.
    """

    relative_error: float
    implicit: np.ndarray
    finite_difference: np.ndarray
    ok: bool


def check_gradients(
    fn,
    y0,
    *args,
    kind="fixed_point",
    solve=None,
    variables=(),
    num_directions=3,
    eps=None,
    rtol=1e-4,
    seed=0,
    **solve_kwargs,
) -> GradientCheck:
    """Compares implicit gradients with central finite differences (eager).

    The scalar L(args) = <u, y*(args)> for a random u is differentiated along
    `num_directions` random unit directions in the space of the floating-point `args`
    and of `variables` (tf.Variables fn reads, e.g. `layer.trainable_variables`).
    Use float64 for a meaningful check; away from kinks of a nonsmooth fn.

    Args:
        kind: "fixed_point", "root" or "argmin": which solve `fn` defines.
        solve: instead of `fn` and `kind`, any differentiable solve `solve(y0, *args)`,
            e.g. a solver decorated with `ki.custom_fixed_point` (fn is then ignored).
        eps: finite-difference step (default: cube root of the machine epsilon).
        **solve_kwargs: passed to the solve (solver, tol, max_iter, batch_dims, ...).
    """
    if solve is None:
        builtin = _SOLVES[_check_kind(kind)]

        def solve(y0, *solve_args):
            return builtin(fn, y0, *solve_args, **solve_kwargs)

    elif solve_kwargs:
        raise ValueError(f"Pass settings to your own `solve`. Received: {sorted(solve_kwargs)}")
    num_directions = _validation.positive_int("num_directions", num_directions)
    rtol = _validation.non_negative_float("rtol", rtol)
    variables = list(variables)
    args = [tf.convert_to_tensor(a) for a in args]
    inputs = [i for i, a in enumerate(args) if a.dtype.is_floating]
    if not inputs and not variables:
        raise ValueError("check_gradients needs floating-point `args` or `variables` to perturb.")
    dtype = (args[inputs[0]] if inputs else variables[0]).dtype
    eps = float(np.finfo(dtype.as_numpy_dtype).eps ** (1 / 3)) if eps is None else eps
    rng = np.random.default_rng(seed)

    def objective(arg_values):
        full = list(args)
        for i, value in zip(inputs, arg_values):
            full[i] = value
        return solve(y0, *full)

    solution = objective([args[i] for i in inputs])
    weights = tf.nest.map_structure(
        lambda t: tf.constant(rng.normal(size=t.shape.as_list()), t.dtype), solution
    )

    def scalar(arg_values):
        out = objective(arg_values)
        return tf.add_n(
            [tf.reduce_sum(w * o) for w, o in zip(tf.nest.flatten(weights), tf.nest.flatten(out))]
        )

    base = [args[i] for i in inputs]
    with tf.GradientTape() as tape:
        tape.watch(base)
        value = scalar(base)
    grads = tape.gradient(
        value, base + variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    grads = [
        g.numpy() if not isinstance(g, tf.IndexedSlices) else tf.convert_to_tensor(g).numpy()
        for g in grads
    ]

    originals = [v.numpy() for v in variables]
    implicit_dd, fd_dd = [], []
    for _ in range(num_directions):
        directions = [rng.normal(size=g.shape) for g in grads]
        norm = np.sqrt(sum(float(np.sum(d * d)) for d in directions))
        directions = [d / norm for d in directions]
        implicit_dd.append(sum(float(np.sum(g * d)) for g, d in zip(grads, directions)))
        values = []
        for sign in (1.0, -1.0):
            shifted = [
                b + tf.constant(sign * eps * d, b.dtype)
                for b, d in zip(base, directions[: len(base)])
            ]
            for var, orig, d in zip(variables, originals, directions[len(base) :]):
                var.assign(orig + sign * eps * d)
            values.append(float(scalar(shifted)))
        for var, orig in zip(variables, originals):
            var.assign(orig)
        fd_dd.append((values[0] - values[1]) / (2 * eps))
    implicit_dd, fd_dd = np.array(implicit_dd), np.array(fd_dd)
    scale = max(np.abs(fd_dd).max(), np.abs(implicit_dd).max(), 1e-12)
    error = float(np.abs(implicit_dd - fd_dd).max() / scale)
    return GradientCheck(error, implicit_dd, fd_dd, error <= rtol)


def _residual_operator(fn, y, args, kind, batch_dims):
    """matvec(v) = (dF/dy)^T v at y on packed rows, with F as in `ki.implicit`."""
    y = tf.nest.map_structure(tf.convert_to_tensor, y)
    packer = Packer(y, batch_dims, what="y")
    args = [tf.convert_to_tensor(a) for a in args]
    y_packed = packer.pack(y)

    def residual(v):
        structure = packer.unpack(v)
        if kind == "fixed_point":
            return v - packer.pack(fn(structure, *args))
        if kind == "root":
            return packer.pack(fn(structure, *args))
        leaves = tf.nest.flatten(structure)
        with tf.GradientTape() as inner:
            inner.watch(leaves)
            value = tf.reduce_sum(fn(tf.nest.pack_sequence_as(structure, leaves), *args))
        return packer.pack(tf.nest.pack_sequence_as(structure, inner.gradient(value, leaves)))

    def matvec(v):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(y_packed)
            out = residual(y_packed)
        return tape.gradient(
            out, y_packed, output_gradients=v, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )

    return matvec, y_packed


def jacobian(fn, y, *args, kind="fixed_point", batch_dims=0) -> np.ndarray:
    """Dense dF/dy at y, one [D, D] matrix per batch row ([B, D, D]; [D, D] unbatched).

    F is the implicit residual: y - fn(y) for fixed points, fn for roots, grad fn for
    argmin. With a nonsmooth fn this is the conservative-Jacobian element that
    backpropagation selects, which is exactly what the backward pass inverts.
    """
    kind = _check_kind(kind)
    matvec, y_packed = _residual_operator(fn, y, args, kind, batch_dims)
    transposed = linalg.materialize(matvec, y_packed).numpy()  # rows of (dF/dy)^T
    matrices = np.transpose(transposed, (0, 2, 1))
    return matrices[0] if batch_dims == 0 else matrices


class InvertibilityReport(NamedTuple):
    """The paper's condition at a solution, worst batch row.

    Attributes:
        smallest_singular_value: sigma_min(dF/dy) (for fixed points: of I - J).
        condition_number: sigma_max / sigma_min (inf when singular).
        spectral_radius: max |eig(J)| for fixed points (< 1 guarantees invertibility
            and convergence of the iteration), None otherwise.
        invertible: sigma_min > threshold * max(sigma_max, 1).
        message: a sentence saying what this means for the gradients.
    """

    smallest_singular_value: float
    condition_number: float
    spectral_radius: float | None
    invertible: bool
    message: str


def check_invertibility(
    fn, y, *args, kind="fixed_point", batch_dims=0, threshold=1e-6, max_dense_dim=4096
) -> InvertibilityReport:
    """Checks that the implicit linear system at the solution `y` is invertible.

    Materializes dF/dy (D matvecs per row) and takes its SVD, so D is limited by
    `max_dense_dim`; use `spectral_radius` for a matrix-free estimate on large problems.
    """
    kind = _check_kind(kind)
    threshold = _validation.non_negative_float("threshold", threshold)
    matrices = jacobian(fn, y, *args, kind=kind, batch_dims=batch_dims)
    matrices = matrices[None] if matrices.ndim == 2 else matrices
    if matrices.shape[-1] > max_dense_dim:
        raise ValueError(
            f"check_invertibility materializes a {matrices.shape[-1]}x{matrices.shape[-1]} "
            f"matrix; above max_dense_dim={max_dense_dim} use ki.diagnostics.spectral_radius."
        )
    singular = np.linalg.svd(matrices, compute_uv=False)
    sigma_min = float(singular[:, -1].min())
    sigma_max = float(singular[:, 0].max())
    condition = float(np.max(singular[:, 0] / np.maximum(singular[:, -1], 1e-300)))
    radius = None
    if kind == "fixed_point":
        eye = np.eye(matrices.shape[-1])
        radius = float(np.abs(np.linalg.eigvals(eye - matrices)).max())
    invertible = sigma_min > threshold * max(sigma_max, 1.0)
    if invertible:
        message = (
            f"dF/dy is invertible at the solution (sigma_min={sigma_min:.3g}, "
            f"condition number {condition:.3g}): implicit gradients are well defined"
        )
        if radius is not None and radius >= 1:
            message += (
                f", but the spectral radius of J is {radius:.3g} >= 1: Neumann series "
                "and plain fixed-point iteration diverge; use GMRES/Broyden"
            )
        message += "."
    else:
        message = (
            f"dF/dy is (numerically) singular at the solution (sigma_min={sigma_min:.3g}): the "
            "implicit function theorem's invertibility condition fails, the backward linear "
            "solve has no unique solution and gradient-based training may stall or diverge. "
            "Remedies: a monotone/contractive parametrization, a ridge in the backward solve "
            "(backward_ridge), or a different Jacobian selection at kinks."
        )
    return InvertibilityReport(sigma_min, condition, radius, bool(invertible), message)


def spectral_radius(fn, z, *args, batch_dims=0, num_iter=100, seed=0):
    """Matrix-free power-iteration estimate of the spectral radius of J = dfn/dz per row.

    Uses VJPs only (J^T has J's spectrum). For non-normal J the estimate converges to
    the modulus of the dominant eigenvalue; values >= 1 mean the fixed-point iteration
    and the Neumann backward are not guaranteed to converge. Returns a numpy array
    (a float when batch_dims=0).
    """
    num_iter = _validation.positive_int("num_iter", num_iter)
    matvec, z_packed = _residual_operator(fn, z, args, "fixed_point", batch_dims)

    def jt(v):  # J^T v = v - (I - J)^T v
        return v - matvec(v)

    v = tf.random.stateless_normal(tf.shape(z_packed), [seed, 0], dtype=z_packed.dtype)
    v = safe_divide(v, row_norm(v)[:, None])
    estimate = tf.zeros(tf.shape(z_packed)[:1], z_packed.dtype)
    for _ in range(num_iter):
        # two steps per update: the ratio over a pair is exact for a +-lambda or complex
        # conjugate dominant pair, where single-step ratios oscillate
        w = jt(jt(v))
        estimate = tf.sqrt(row_norm(w))
        v = safe_divide(w, row_norm(w)[:, None])
    result = estimate.numpy()
    return float(result[0]) if batch_dims == 0 else result


__all__ = [
    "GradientCheck",
    "InvertibilityReport",
    "check_gradients",
    "check_invertibility",
    "jacobian",
    "spectral_radius",
]
