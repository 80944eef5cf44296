"""Implicit differentiation: fixed points, roots and minima as differentiable ops.

Every entry point reduces to a root y*(x) of F(y, x) = 0:
  fixed_point: F(z, x) = z - fn(z, x);  root: F = fn;  argmin: F = grad_y f(y, x).
The forward solver runs with gradient recording paused (its iterations are never
stored: memory does not grow with iterations). A `tf.custom_gradient` op then attaches
the implicit gradient: for a cotangent g on y*, solve (dF/dy)^T w = g with a matrix-free
linear solver and return -(dF/dx)^T w to the arguments and to every variable fn reads
(Keras weights). With nonsmooth fn, backpropagation through fn yields one element of a
conservative Jacobian, which the nonsmooth implicit function theorem (Bolte, Le,
Pauwels, Silveti-Falls 2021) accepts as long as dF/dy is invertible; the backward solve
failing to converge is the symptom of that condition failing, and is reported.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import tensorflow as tf

from keras_implicit import _policy, _validation, linalg, solvers
from keras_implicit._structure import Packer, compute_dtype, finite_rows, row_norm
from keras_implicit.errors import ConvergenceWarning
from keras_implicit.solvers import SolverStats

try:  # TF >= 2.13
    from tensorflow.python.eager.record import stop_recording as _tape_paused
except ImportError:  # pragma: no cover - older layout
    from tensorflow.python.eager.tape import stop_recording as _tape_paused

# `_tape_paused()` stops every gradient tape on this thread, so the forward solve is
# never recorded: with a tape recording, each iteration that reads a watched variable
# would keep its activations alive (memory growing with iterations). There is no
# public equivalent: `GradientTape.stop_recording` needs the user's tape object, and a
# throwaway tape's `stop_recording` does not pause the others (measured).


def _to_tensor(value, dtype):
    """Python scalars take the problem's dtype; tensors and arrays keep theirs."""
    if isinstance(value, (float, int)) and not isinstance(value, bool):
        return tf.constant(value, dtype)
    return tf.convert_to_tensor(value)


_floor_warned = set()


def _warn_floor(what: str, name: str, tol: float, floor: float, dtype: tf.DType) -> None:
    """Says once per process and setting that a tolerance was raised to the floor."""
    key = (what, name, tol, dtype.name)
    if key in _floor_warned:
        return
    _floor_warned.add(key)
    warnings.warn(
        f"{what}: {name}={tol:.3g} is below what a solve in {dtype.name} can reach "
        f"({_policy.RESIDUAL_FLOOR_ULPS:g} machine epsilons); using {name}={floor:.3g}. "
        f"Received: {name}={tol!r}",
        ConvergenceWarning,
        stacklevel=_policy.user_stacklevel(),
    )


class _Problem:
    """A residual map F(y, *args) on structures, validated and cast to the compute dtype."""

    def __init__(self, y0, batch_dims, *, what):
        label = "z0" if what == "fixed_point" else "y0"
        original = Packer(tf.nest.map_structure(tf.convert_to_tensor, y0), batch_dims, what=label)
        self.original_dtype = original.dtype
        self.dtype = compute_dtype(original.dtype)
        # the solve runs in the compute dtype (float32 for half-precision inputs)
        cast = tf.nest.map_structure(lambda t: tf.cast(t, self.dtype), original.structure)
        self.packer = Packer(cast, batch_dims, what=label)
        # fn computes in its own precision, so residuals cannot drop much below its
        # roundoff: tolerances are floored there instead of never being met
        self.tol_floor = _policy.tol_floor(self.original_dtype, _policy.RESIDUAL_FLOOR_ULPS)

    def to_user(self, y):
        """y in the dtype fn was written for (the solver's state may be wider)."""
        if self.original_dtype == self.dtype:
            return y
        return tf.nest.map_structure(lambda t: tf.cast(t, self.original_dtype), y)

    def floor_tol(self, tol: float, *, what: str, name: str = "tol") -> float:
        """`tol` raised to the dtype's floor (said once per process and setting)."""
        if tol >= self.tol_floor:
            return tol
        _warn_floor(what, name, tol, self.tol_floor, self.original_dtype)
        return self.tol_floor

    def floor(self, solver, *, what: str, name: str = "tol"):
        """The solver with its tolerance raised to the dtype's floor."""
        tol = self.floor_tol(solver.tol, what=what, name=name)
        return solver if tol == solver.tol else solver.with_options(tol=tol)

    def cast_output(self, out, *, name="fn"):
        """Checks that `out` has y's structure and dtype, and casts it to the compute dtype."""
        try:
            tf.nest.assert_same_structure(self.packer.structure, out, check_types=False)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"`{name}` must return a value with the structure of its first argument. "
                f"Received: {tf.nest.map_structure(lambda t: getattr(t, 'shape', t), out)!r}"
            ) from error
        leaves = [tf.convert_to_tensor(leaf) for leaf in tf.nest.flatten(out)]
        for leaf in leaves:
            if leaf.dtype not in (self.original_dtype, self.dtype):
                raise ValueError(
                    f"`{name}` must return {self.original_dtype.name} values like its first "
                    f"argument. Received dtype: {leaf.dtype.name}"
                )
        leaves = [tf.cast(leaf, self.dtype) for leaf in leaves]
        return tf.nest.pack_sequence_as(self.packer.structure, leaves)


def _prepare(fn, y0, args, batch_dims, what):
    batch_dims = _validation.non_negative_int("batch_dims", batch_dims)
    if not callable(fn):
        raise ValueError(f"`fn` must be callable. Received: fn={fn!r}")
    problem = _Problem(y0, batch_dims, what=what)
    y0 = problem.packer.structure
    args = tf.nest.map_structure(lambda a: _to_tensor(a, problem.dtype), args)
    return problem, y0, args


def _implicit(
    problem: _Problem,
    root_fn,
    y0,
    args,
    forward,
    *,
    linear_solver,
    check_tol,
    on_failure,
    return_stats,
    backward_callback,
    what,
    pause_tapes=True,
):
    """Runs `forward` (recording paused if `pause_tapes`), then attaches the implicit gradient.

    root_fn(y, *args): the residual F on structures (already cast), zero at the solution.
    forward(y0, args) -> (y, iterations or None), called on stopped arguments.
    """
    packer = problem.packer
    on_failure = _policy.check_policy(on_failure)
    check_tol = problem.floor_tol(check_tol, what=what)
    linear_solver = problem.floor(linear_solver, what=what, name="backward_tol")
    stopped = tf.nest.map_structure(tf.stop_gradient, args)
    # Solvers that take gradients themselves (argmin's L-BFGS, a user's solver) need
    # tapes recording; stop_gradient on their output still keeps the outer gradient out
    # of the loop (in graphs that is all it takes: nothing differentiates through the
    # loop, so it keeps no intermediates).
    with _tape_paused() if pause_tapes else contextlib.nullcontext():
        y_star, iterations = forward(y0, stopped)
    y_star = tf.nest.map_structure(tf.stop_gradient, packer.unpack(packer.pack(y_star)))

    y_leaves = tf.nest.flatten(y_star)
    arg_leaves = tf.nest.flatten(args)
    n_y = len(y_leaves)
    report = {}

    def packed_residual(y_packed, arg_values):
        arg_struct = tf.nest.pack_sequence_as(args, list(arg_values))
        return packer.pack(root_fn(packer.unpack(y_packed), *arg_struct), what="fn(z0)")

    @tf.custom_gradient
    def attach(*inputs):
        ys, xs = inputs[:n_y], inputs[n_y:]
        y_packed = packer.pack(tf.nest.pack_sequence_as(y_star, list(ys)))
        # Evaluating F at the solution both measures the true final residual and lets
        # custom_gradient see which variables fn reads (their gradients are returned).
        residual = row_norm(packed_residual(y_packed, xs)) / (1.0 + row_norm(y_packed))
        converged = tf.logical_and(residual <= check_tol, tf.math.is_finite(residual))
        report["residual"], report["converged"] = residual, converged
        y_out = _policy.apply(
            y_packed,
            converged,
            residual,
            on_failure=on_failure,
            what=f"{what}: forward solve",
            tol=check_tol,
            iterations=iterations,
        )

        def grad_fn(*upstream, variables=None):
            cotangent = packer.pack(
                [
                    tf.zeros_like(y) if g is None else tf.cast(g, y.dtype)
                    for g, y in zip(upstream, ys)
                ]
            )
            # Rows whose solution, batched inputs or cotangent are not finite send no
            # gradient, and the linearization point is made finite: a VJP multiplies a
            # zero cotangent by the local derivative, and 0 * NaN would leak a broken
            # row into every parameter gradient (a sum over the batch). Inputs are
            # cleaned entry by entry, not by row: whether a tensor's leading axis is the
            # batch cannot be told from its shape (a [B, B] weight looks batched).
            ok_rows = finite_rows(y_packed) & finite_rows(cotangent)
            for x in xs:
                if packer.is_batched_like(x) and x.dtype.is_floating:
                    ok_rows &= packer.finite_batch_rows(x)
            y_safe = tf.where(ok_rows[:, None], y_packed, tf.zeros_like(y_packed))
            cotangent = tf.where(ok_rows[:, None], cotangent, tf.zeros_like(cotangent))

            def sanitized(values):
                return [
                    tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))
                    if x.dtype.is_floating
                    else x
                    for x in values
                ]

            xs_safe = sanitized(xs)

            # F is evaluated once; every matvec reuses its recorded linearization
            # (only the VJP runs inside the solver's loop, as jax.vjp would do)
            with tf.GradientTape(watch_accessed_variables=False, persistent=True) as linear:
                linear.watch(y_safe)
                residual_at_solution = packed_residual(y_safe, xs_safe)

            def matvec(v):  # (dF/dy)^T v
                return linear.gradient(
                    residual_at_solution,
                    y_safe,
                    output_gradients=v,
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )

            w, stats = linear_solver(matvec, cotangent)
            ok_rows &= finite_rows(w)
            w = tf.where(ok_rows[:, None], w, tf.zeros_like(w))
            back_converged = tf.logical_and(stats.converged, ok_rows)
            w = _policy.apply(
                w,
                back_converged,
                stats.residual,
                on_failure=on_failure,
                what=f"{what}: backward linear solve ({linear_solver.name})",
                tol=linear_solver.tol,
                iterations=stats.iterations,
            )
            if backward_callback is not None:
                backward_callback(
                    SolverStats(
                        packer.unbatch_stats(stats.iterations),
                        packer.unbatch_stats(stats.residual),
                        packer.unbatch_stats(back_converged),
                    )
                )

            differentiable = [i for i, x in enumerate(xs) if x.dtype.is_floating]
            sources = [xs[i] for i in differentiable] + list(variables or [])
            if sources:
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    tape.watch(sources)
                    out = packed_residual(y_safe, sanitized(xs))
                grads = tape.gradient(
                    out,
                    sources,
                    output_gradients=-w,
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
            else:
                grads = []
            arg_grads = [None] * len(xs)
            for i, g in zip(differentiable, grads):
                arg_grads[i] = g
            input_grads = [None] * n_y + arg_grads
            if variables is None:
                return input_grads
            return input_grads, grads[len(differentiable) :]

        return tf.nest.flatten(packer.unpack(y_out)), grad_fn

    out = attach(*y_leaves, *arg_leaves)
    out = tf.nest.pack_sequence_as(y_star, tf.nest.flatten(out))
    if problem.original_dtype != problem.dtype:
        out = tf.nest.map_structure(lambda t: tf.cast(t, problem.original_dtype), out)
    if not return_stats:
        return out
    if iterations is None:
        iterations = tf.fill(tf.shape(report["residual"]), -1)
    stats = SolverStats(
        packer.unbatch_stats(iterations),
        packer.unbatch_stats(report["residual"]),
        packer.unbatch_stats(report["converged"]),
    )
    return out, stats


def _builtin_forward(problem, solve):
    """Adapts a packed-tensor solver method to structures."""
    packer = problem.packer

    def forward(y0, args):
        y, stats = solve(packer.pack(y0), args)
        return packer.unpack(y), stats.iterations

    return forward


def _run_builtin(kind, fn, y0, args, settings, build):
    """What fixed_point, root and argmin share: resolve solvers, prepare, solve, attach.

    `build(problem, forward_solver) -> (root_fn, solve)` supplies the residual F on
    structures and `solve(packed y0, args) -> (packed y, SolverStats)`.
    """
    forward_solver = solvers.get(
        settings["solver"], tol=settings["tol"], max_iter=settings["max_iter"]
    )
    backward = linalg.get(
        settings["linear_solver"],
        tol=settings["backward_tol"],
        max_iter=settings["backward_max_iter"],
        ridge=settings["backward_ridge"],
    )
    with tf.name_scope(kind):
        problem, y0, args = _prepare(fn, y0, args, settings["batch_dims"], kind)
        forward_solver = problem.floor(forward_solver, what=kind)
        root_fn, solve = build(problem, forward_solver)
        return _implicit(
            problem,
            root_fn,
            y0,
            args,
            _builtin_forward(problem, solve),
            linear_solver=backward,
            check_tol=forward_solver.tol,
            on_failure=settings["on_failure"],
            return_stats=settings["return_stats"],
            backward_callback=settings["backward_callback"],
            what=kind,
            # argmin's L-BFGS takes gradients of f itself, so tapes must record there
            pause_tapes=kind != "argmin",
        )


def _settings(local_vars):
    """The keyword settings of an entry point, from its locals()."""
    keys = (
        "solver",
        "linear_solver",
        "tol",
        "max_iter",
        "backward_tol",
        "backward_max_iter",
        "backward_ridge",
        "batch_dims",
        "on_failure",
        "return_stats",
        "backward_callback",
    )
    return {key: local_vars[key] for key in keys}


def fixed_point(
    fn,
    z0,
    *args,
    solver="anderson",
    linear_solver="gmres",
    tol=None,
    max_iter=None,
    backward_tol=None,
    backward_max_iter=None,
    backward_ridge=None,
    batch_dims=0,
    on_failure="warn",
    return_stats=False,
    backward_callback=None,
):
    """Returns z with z = fn(z, *args), differentiable w.r.t. args and captured variables.

    Args:
        fn: callable (z, *args) -> value with the structure, shapes and dtype of z.
        z0: initial guess: a tensor or a flat structure of tensors (`tf.nest`).
        *args: tensors (or structures) fn depends on; gradients flow to them.
        solver: forward solver, a name ("anderson", "broyden", "fixed_point_iteration")
            or a `ki.solvers.Solver`.
        linear_solver: backward solver for (I - J^T) u = g: "gmres" (default, general),
            "bicgstab", "broyden", "neumann", "dense", "cg" (only if J is symmetric),
            or a `ki.linalg.LinearSolver`.
        tol, max_iter: forward settings (override the solver object's). Tolerances
            (forward and backward) below two machine epsilons of z0's dtype are raised
            to that floor, with one ConvergenceWarning per setting. The solver returns
            its best iterate per row (lowest residual), not its last.
        backward_tol, backward_max_iter, backward_ridge: backward settings.
        batch_dims: number of leading batch dimensions of z whose rows are independent
            problems (1 for a DEQ batch): convergence is then judged per row.
        on_failure: "warn" (default), "raise" or "ignore" when the forward or backward
            solve does not reach its tolerance or produces non-finite values.
        return_stats: also return the forward `SolverStats`.
        backward_callback: called with the backward `SolverStats` when the gradient is
            computed (may assign to tf.Variables; works in graphs and under XLA).
    """
    settings = _settings(locals())

    def build(problem, forward_solver):
        def mapped(z, *a):
            return problem.cast_output(fn(problem.to_user(z), *a))

        def root_fn(z, *a):
            return tf.nest.map_structure(tf.subtract, z, mapped(z, *a))

        def solve(zp, a):
            packer = problem.packer
            return forward_solver.solve_fixed_point(
                lambda v: packer.pack(mapped(packer.unpack(v), *a)), zp
            )

        return root_fn, solve

    return _run_builtin("fixed_point", fn, z0, args, settings, build)


def root(
    fn,
    y0,
    *args,
    solver="broyden",
    linear_solver="gmres",
    tol=None,
    max_iter=None,
    backward_tol=None,
    backward_max_iter=None,
    backward_ridge=None,
    batch_dims=0,
    on_failure="warn",
    return_stats=False,
    backward_callback=None,
):
    """Returns y with fn(y, *args) = 0, differentiable w.r.t. args and captured variables.

    The backward pass solves (dfn/dy)^T w = g. Forward solvers other than Broyden iterate
    y <- y - fn(y), which needs dfn/dy close to the identity. Arguments as `fixed_point`.
    """
    settings = _settings(locals())

    def build(problem, forward_solver):
        def root_fn(y, *a):
            return problem.cast_output(fn(problem.to_user(y), *a))

        def solve(yp, a):
            packer = problem.packer
            return forward_solver.solve_root(
                lambda v: packer.pack(root_fn(packer.unpack(v), *a)), yp
            )

        return root_fn, solve

    return _run_builtin("root", fn, y0, args, settings, build)


def argmin(
    f,
    x0,
    *args,
    solver="lbfgs",
    linear_solver="cg",
    tol=None,
    max_iter=None,
    backward_tol=None,
    backward_max_iter=None,
    backward_ridge=None,
    batch_dims=0,
    on_failure="warn",
    return_stats=False,
    backward_callback=None,
):
    """Returns a minimizer x of a smooth f(x, *args), differentiable w.r.t. args.

    The optimality condition grad_x f = 0 is differentiated implicitly: the backward
    solves H w = g with H the Hessian (symmetric, so conjugate gradient by default,
    through Hessian-vector products; no Hessian is formed).

    Eager-mode caveat: the forward needs gradients of f, so it runs with tapes
    recording; if f reads trainable variables while an outer tape is active, eager
    execution keeps each iteration's activations until that tape is released (graphs,
    `tf.function` and `model.fit`, are unaffected).

    Args:
        f: callable (x, *args) -> scalar (batch_dims=0) or one value per batch row.
        solver: "lbfgs" (TFP's L-BFGS, default) or a root solver applied to grad f.
        Other arguments as `fixed_point`; convergence: ||grad f|| / (1 + ||x||) <= tol.
    """
    settings = _settings(locals())

    def build(problem, forward_solver):
        packer = problem.packer

        def objective(x, *a):
            value = tf.cast(tf.convert_to_tensor(f(problem.to_user(x), *a)), problem.dtype)
            if batch_dims == 0 and value.shape.rank not in (None, 0):
                raise ValueError(
                    f"`f` must return a scalar when batch_dims=0. Received shape: {value.shape}"
                )
            return tf.reshape(value, [-1])

        def root_fn(x, *a):
            leaves = tf.nest.flatten(x)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(leaves)
                value = tf.reduce_sum(objective(tf.nest.pack_sequence_as(x, leaves), *a))
            grads = tape.gradient(value, leaves, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.nest.pack_sequence_as(x, grads)

        if isinstance(forward_solver, solvers.LBFGS):

            def solve(xp, a):
                def value_and_gradient(v):
                    with tf.GradientTape(watch_accessed_variables=False) as tape:
                        tape.watch(v)
                        value = objective(packer.unpack(v), *a)
                    return value, tape.gradient(value, v)

                return forward_solver.minimize(value_and_gradient, xp)
        else:

            def solve(xp, a):
                return forward_solver.solve_root(
                    lambda v: packer.pack(root_fn(packer.unpack(v), *a)), xp
                )

        return root_fn, solve

    return _run_builtin("argmin", f, x0, args, settings, build)


def _custom(
    kind,
    fn,
    linear_solver,
    tol,
    backward_tol,
    backward_max_iter,
    backward_ridge,
    batch_dims,
    on_failure,
    return_stats,
    backward_callback,
):
    backward = linalg.get(
        linear_solver, tol=backward_tol, max_iter=backward_max_iter, ridge=backward_ridge
    )
    check_tol = _validation.non_negative_float("tol", tol)
    _policy.check_policy(on_failure)

    def decorator(solver):
        if not callable(solver):
            raise ValueError(f"The decorated solver must be callable. Received: {solver!r}")

        @functools.wraps(solver)
        def solve(y0, *args):
            with tf.name_scope(f"custom_{kind}"):
                problem, y0_, args_ = _prepare(fn, y0, args, batch_dims, kind)

                def root_fn(y, *a):
                    out = problem.cast_output(fn(problem.to_user(y), *a))
                    if kind == "fixed_point":
                        return tf.nest.map_structure(tf.subtract, y, out)
                    return out

                def forward(y, a):
                    result = solver(problem.to_user(y), *a)
                    return problem.cast_output(result, name="the solver"), None

                return _implicit(
                    problem,
                    root_fn,
                    y0_,
                    args_,
                    forward,
                    linear_solver=backward,
                    check_tol=check_tol,
                    on_failure=on_failure,
                    return_stats=return_stats,
                    backward_callback=backward_callback,
                    what=f"custom_{kind}",
                    pause_tapes=False,
                )

        return solve

    return decorator


def custom_fixed_point(
    fn,
    linear_solver="gmres",
    *,
    tol=1e-5,
    backward_tol=None,
    backward_max_iter=None,
    backward_ridge=None,
    batch_dims=0,
    on_failure="warn",
    return_stats=False,
    backward_callback=None,
):
    """Decorator giving any fixed-point solver of `fn` implicit gradients.

    `solver(z0, *args)` may be anything that returns a fixed point of fn(., *args),
    even a non-differentiable routine (a numpy solver behind `tf.numpy_function`): no
    gradient flows through it; the gradient comes from the implicit function theorem
    at the returned point. `tol` judges the returned point (residual
    ||z - fn(z)|| / (1 + ||z||)) under `on_failure`. Other arguments as `fixed_point`.

    The solver runs with tapes recording, so it may take gradients itself; in eager
    mode one that reads trainable variables under an outer tape therefore keeps its
    activations until that tape is released (graph mode is unaffected).
    """
    return _custom(
        "fixed_point",
        fn,
        linear_solver,
        tol,
        backward_tol,
        backward_max_iter,
        backward_ridge,
        batch_dims,
        on_failure,
        return_stats,
        backward_callback,
    )


def custom_root(
    fn,
    linear_solver="gmres",
    *,
    tol=1e-5,
    backward_tol=None,
    backward_max_iter=None,
    backward_ridge=None,
    batch_dims=0,
    on_failure="warn",
    return_stats=False,
    backward_callback=None,
):
    """Decorator giving any root solver of `fn` implicit gradients (see custom_fixed_point)."""
    return _custom(
        "root",
        fn,
        linear_solver,
        tol,
        backward_tol,
        backward_max_iter,
        backward_ridge,
        batch_dims,
        on_failure,
        return_stats,
        backward_callback,
    )


__all__ = ["argmin", "custom_fixed_point", "custom_root", "fixed_point", "root"]
