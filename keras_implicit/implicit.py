"""Implicit differentiation: fixed points, roots and minima as differentiable ops.

Every entry point reduces to a root y*(x) of F(y, x) = 0:
  fixed_point: F(z, x) = z - fn(z, x);  root: F = fn;  argmin: F = grad_y f(y, x).
The forward solver runs unrecorded (its iterations are never stored: memory does not
grow with iterations). One recorded op then attaches the implicit derivatives. Reverse
mode (tapes): for a cotangent g on y*, solve (dF/dy)^T w = g with a matrix-free linear
solver and return -(dF/dx)^T w to the arguments and to every variable fn reads (Keras
weights). Forward mode (`tf.autodiff.ForwardAccumulator`, eagerly, in `tf.function`
and under XLA): for tangents t_x on the arguments and variables, solve
(dF/dy) t_y = -(dF/dx) t_x with the same linear solver (jaxopt's root_jvp); a solve that
fails is reported as the "tangent linear solve". fn may open tapes of its own.

With nonsmooth fn, backpropagation through fn yields one element of a conservative
Jacobian, which the nonsmooth implicit function theorem (Bolte, Le, Pauwels,
Silveti-Falls 2021) accepts as long as dF/dy is invertible; the backward solve failing
to converge is the symptom of that condition failing, and is reported.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import functools

import tensorflow as tf
from tensorflow.python import pywrap_tfe
from tensorflow.python.eager import context as tf_context
from tensorflow.python.eager import forwardprop_util, record

from keras_implicit import _policy, _validation, linalg, solvers
from keras_implicit._structure import Packer, compute_dtype, finite_rows, row_norm
from keras_implicit.solvers import SolverStats

_tape_paused = record.stop_recording


@contextlib.contextmanager
def _recording_resumed():
    """Undoes `_tape_paused` for a block (tapes opened inside record again)."""
    stopped = pywrap_tfe.TFE_Py_TapeSetIsStopped()
    if stopped:
        pywrap_tfe.TFE_Py_TapeSetRestartOnThread()
    try:
        yield
    finally:
        if stopped:
            pywrap_tfe.TFE_Py_TapeSetStopOnThread()


def _call(fn, *args, **kwargs):
    """Calls the user's fn; tapes it opens itself record even inside `_tape_paused`."""
    with _recording_resumed():
        return fn(*args, **kwargs)


def _unrecorded(forward, *args):
    """forward(*args) where no tape or forward accumulator of the caller records it.

    With a tape recording, each iteration that reads a watched variable would keep
    its activations alive (memory growing with iterations); an accumulator watching
    such a variable would differentiate the whole loop. Tapes live per thread:
    eagerly, `forward` runs in a thread of its own, so that tapes `fn` opens itself
    still work. A graph is traced on the caller's thread: there recording is paused
    around the loop, and `_call` resumes it inside fn (in a graph that costs no
    memory: a loop op that is never differentiated keeps no intermediates).
    """
    if not tf.executing_eagerly():
        with _tape_paused():
            return forward(*args)
    device = tf_context.context().device_name
    keras_state = _keras_thread_state()

    def run():
        # The caller waits meanwhile, so sharing its Keras state (dtype policy,
        # autocast scope, call context) is as if forward ran on the caller's thread.
        for tracker, values in keras_state:
            vars(tracker).update(values)
        with tf.device(device):
            return forward(*args)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(contextvars.copy_context().run, run).result()


def _keras_thread_state():
    """(tracker, values) pairs of Keras' thread-local global state on this thread."""
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # pragma: no cover - Keras layout changed
        return []
    trackers = (global_state.GLOBAL_STATE_TRACKER, global_state.GLOBAL_SETTINGS_TRACKER)
    return [(tracker, dict(vars(tracker))) for tracker in trackers]


def _to_tensor(value, dtype):
    """Python scalars take the problem's dtype; tensors and arrays keep theirs."""
    if isinstance(value, (float, int)) and not isinstance(value, bool):
        return tf.constant(value, dtype)
    return tf.convert_to_tensor(value)


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
        # roundoff: tolerances are floored there, where they can be met
        self.tol_floor = _policy.tol_floor(self.original_dtype, _policy.RESIDUAL_FLOOR_ULPS)

    def to_user(self, y):
        """y in the dtype fn was written for (the solver's state may be wider)."""
        if self.original_dtype == self.dtype:
            return y
        return tf.nest.map_structure(lambda t: tf.cast(t, self.original_dtype), y)

    def floor_tol(self, tol: float, *, what: str, name: str = "tol") -> float:
        """`tol` raised to the dtype's floor (said once per process and setting)."""
        return _policy.floored_tols(
            {name: tol},
            self.original_dtype,
            what=what,
            ulps=_policy.RESIDUAL_FLOOR_ULPS,
            once=True,
        )[name]

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


def _sanitized(values):
    """Floating tensors with non-finite entries replaced by zero (a finite linearization point)."""
    return [
        tf.where(tf.math.is_finite(x), x, tf.zeros_like(x)) if x.dtype.is_floating else x
        for x in values
    ]


def _strip_aux(value, has_aux: bool, name: str):
    """(value, aux) from what `fn` returned; aux is None without has_aux."""
    if not has_aux:
        return value, None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(
            f"With has_aux=True, `{name}` must return a pair (value, aux). "
            f"Received: {type(value).__name__} {value!r}"
        )
    return value[0], value[1]


def _constant(structure):
    """`structure` with gradients stopped at its tensors (other leaves kept as they are)."""

    def stop(leaf):
        if isinstance(leaf, (tf.Tensor, tf.Variable)):
            return tf.stop_gradient(leaf)
        return leaf

    return tf.nest.map_structure(stop, structure)


class _ImplicitOp:
    """The solution y*(x) as one differentiable op.

    Tapes get the VJP -(dF/dx)^T w with (dF/dy)^T w = g; forward accumulators get the
    JVP t_y with (dF/dy) t_y = -(dF/dx) t_x (jaxopt's root_jvp). Both solve with the
    same matrix-free linear solver, at a finite linearization point.
    """

    def __init__(
        self,
        problem,
        root_fn,
        y_star,
        args,
        *,
        linear_solver,
        on_failure,
        backward_on_failure,
        what,
    ):
        self.packer = problem.packer
        self.root_fn = root_fn
        self.y_star = y_star
        self.args = args
        self.n_y = len(tf.nest.flatten(y_star))
        self.linear_solver = linear_solver
        self.on_failure = on_failure
        self.backward_on_failure = backward_on_failure
        self.what = what

    def residual(self, y_packed, xs):
        """Packed F(y, *args) and fn's aux (None without has_aux)."""
        arg_struct = tf.nest.pack_sequence_as(self.args, list(xs))
        value, aux = self.root_fn(self.packer.unpack(y_packed), *arg_struct)
        return self.packer.pack(value, what="fn(z0)"), aux

    def linearization_point(self, y_packed, xs):
        """Rows to keep (finite solution and batched inputs), y and inputs made finite.

        Inputs are cleaned entry by entry, not by row: whether a tensor's leading axis
        is the batch cannot be told from its shape (a [B, B] weight looks batched).
        """
        ok_rows = finite_rows(y_packed)
        for x in xs:
            if self.packer.is_batched_like(x) and x.dtype.is_floating:
                ok_rows &= self.packer.finite_batch_rows(x)
        y_safe = tf.where(ok_rows[:, None], y_packed, tf.zeros_like(y_packed))
        return ok_rows, y_safe, _sanitized(xs)

    def linear_solve(self, matvec, rhs, ok_rows, *, direction):
        """Solves matvec(u) = rhs under the failure policy; failed rows come back zero."""
        u, stats = self.linear_solver(matvec, rhs)
        ok_rows &= finite_rows(u)
        u = tf.where(ok_rows[:, None], u, tf.zeros_like(u))
        converged = tf.logical_and(stats.converged, ok_rows)
        u = _policy.apply(
            u,
            converged,
            stats.residual,
            on_failure=self.backward_on_failure,
            what=f"{self.what}: {direction} linear solve ({self.linear_solver.name})",
            tol=self.linear_solver.tol,
            iterations=stats.iterations,
        )
        return u, SolverStats(stats.iterations, stats.residual, converged)

    def vjp(self, inputs, upstream, variables):
        """Gradients for the args and `variables`, for cotangents `upstream` on y."""
        ys, xs = inputs[: self.n_y], inputs[self.n_y :]
        y_packed = self.packer.pack(tf.nest.pack_sequence_as(self.y_star, list(ys)))
        cotangent = self.packer.pack(
            [tf.zeros_like(y) if g is None else tf.cast(g, y.dtype) for g, y in zip(upstream, ys)]
        )
        # Rows whose solution, batched inputs or cotangent are not finite send no
        # gradient: a VJP multiplies a zero cotangent by the local derivative, and
        # 0 * NaN would leak a broken row into every parameter gradient (a sum over
        # the batch).
        ok_rows, y_safe, xs_safe = self.linearization_point(y_packed, xs)
        ok_rows &= finite_rows(cotangent)
        cotangent = tf.where(ok_rows[:, None], cotangent, tf.zeros_like(cotangent))

        # F is evaluated once; every matvec reuses its recorded linearization
        # (only the VJP runs inside the solver's loop, as jax.vjp would do)
        with tf.GradientTape(watch_accessed_variables=False, persistent=True) as linear:
            linear.watch(y_safe)
            residual_at_solution, _ = self.residual(y_safe, xs_safe)

        def matvec(v):  # (dF/dy)^T v
            return linear.gradient(
                residual_at_solution,
                y_safe,
                output_gradients=v,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )

        w, stats = self.linear_solve(matvec, cotangent, ok_rows, direction="backward")
        differentiable = [i for i, x in enumerate(xs) if x.dtype.is_floating]
        sources = [xs_safe[i] for i in differentiable] + list(variables)
        grads = []
        if sources:
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(sources)
                out, _ = self.residual(y_safe, xs_safe)
            grads = tape.gradient(
                out,
                sources,
                output_gradients=-w,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
        arg_grads = [None] * len(xs)
        for i, g in zip(differentiable, grads):
            arg_grads[i] = g
        return arg_grads, list(grads[len(differentiable) :]), stats

    def jvp_linearization(self, inputs, variables, tangents):
        """Tapes whose transposed VJPs give F's JVPs, for the tangents of the inputs.

        `tangents` are those of the inputs (y's own, the args', the variables'). Every
        JVP of F is the transpose of its VJP u -> (dF/d.)^T u (linear in u, so any u
        will do): F is evaluated once, and no forward accumulator of its own runs.
        """
        # stopped, so that an outer accumulator does not differentiate this computation
        inputs = [tf.stop_gradient(t) for t in inputs]
        ys, xs = inputs[: self.n_y], inputs[self.n_y :]
        y_packed = self.packer.pack(tf.nest.pack_sequence_as(self.y_star, list(ys)))
        ok_rows, y_safe, xs_safe = self.linearization_point(y_packed, xs)
        sources, directions = [], []
        for x, t in zip(xs_safe, tangents[self.n_y : len(inputs)]):
            if x.dtype.is_floating and t is not None:
                sources.append(x)
                directions.append(tf.cast(t, x.dtype))
        for v, t in zip(variables, tangents[len(inputs) :]):
            if t is not None:
                sources.append(v)
                directions.append(tf.cast(t, v.dtype))
        zero = tf.UnconnectedGradients.ZERO
        with tf.GradientTape(persistent=True) as transpose:
            u = tf.zeros_like(y_safe)
            transpose.watch(u)
            with tf.GradientTape(watch_accessed_variables=False) as linear:
                linear.watch([y_safe, *sources])
                out, _ = self.residual(y_safe, xs_safe)
            vjp_y, *vjp_sources = linear.gradient(
                out, [y_safe, *sources], output_gradients=u, unconnected_gradients=zero
            )
        return ok_rows, transpose, u, vjp_y, (vjp_sources, directions)

    def tangent(self, ok_rows, transpose, u, vjp_y, sources):
        """Solves (dF/dy) t_y = -(dF/dx) t_x - (dF/dv) t_v on `jvp_linearization`'s tapes."""
        zero = tf.UnconnectedGradients.ZERO
        vjp_sources, directions = sources
        if vjp_sources:
            rhs = -transpose.gradient(
                vjp_sources, u, output_gradients=directions, unconnected_gradients=zero
            )
        else:
            rhs = tf.zeros_like(u)
        ok_rows &= finite_rows(rhs)
        rhs = tf.where(ok_rows[:, None], rhs, tf.zeros_like(rhs))

        def matvec(v):  # (dF/dy) v
            return transpose.gradient(vjp_y, u, output_gradients=v, unconnected_gradients=zero)

        t_y, _ = self.linear_solve(matvec, rhs, ok_rows, direction="tangent")
        return tf.nest.flatten(self.packer.unpack(t_y))

    def checked_solution(self, inputs, report, *, check_tol, iterations):
        """y* leaves through the failure policy; F's residual and aux there go to `report`."""
        ys, xs = inputs[: self.n_y], inputs[self.n_y :]
        y_packed = self.packer.pack(tf.nest.pack_sequence_as(self.y_star, list(ys)))
        # Evaluating F at the solution measures the true final residual, gives fn's
        # aux there, and shows which variables fn reads. It records (argmin's F takes
        # a gradient), on stopped inputs: the caller's tapes and accumulators get the
        # derivatives from this op alone.
        with _recording_resumed():
            value, report["aux"] = self.residual(y_packed, _constant(list(xs)))
        residual = row_norm(value) / (1.0 + row_norm(y_packed))
        converged = tf.logical_and(residual <= check_tol, tf.math.is_finite(residual))
        report["residual"], report["converged"] = residual, converged
        y_out = _policy.apply(
            y_packed,
            converged,
            residual,
            on_failure=self.on_failure,
            what=f"{self.what}: forward solve",
            tol=check_tol,
            iterations=iterations,
        )
        return tf.nest.flatten(self.packer.unpack(y_out))

    def attach(self, y_leaves, arg_leaves, *, check_tol, iterations, backward_callback):
        """y* as an op of the args and the variables fn reads; also F's report and aux."""
        report = {}

        @tf.custom_gradient
        def attach(*inputs):
            def grad_fn(*upstream, variables=None):
                return backward(inputs, upstream, variables)

            out = self.checked_solution(inputs, report, check_tol=check_tol, iterations=iterations)
            return out, grad_fn

        def backward(inputs, upstream, variables):
            arg_grads, var_grads, stats = self.vjp(inputs, upstream, variables or [])
            if backward_callback is not None:
                backward_callback(SolverStats(*map(self.packer.unbatch_stats, stats)))
            input_grads = [None] * self.n_y + arg_grads
            return input_grads if variables is None else (input_grads, var_grads)

        inputs = list(y_leaves) + list(arg_leaves)
        # tf.custom_gradient runs unrecorded: in graphs it still gives the symbolic
        # gradient (tf.gradients, an outer tape around a tf.function); tapes and
        # forward accumulators get this op recorded below with its JVP as well.
        with _tape_paused(), record.VariableWatcher() as watcher:
            outputs = attach(*inputs)
        variables = _unique_variables(watcher.watched_variables())
        recorded = inputs + [tf.convert_to_tensor(v) for v in variables]

        def backward_function(*upstream):
            input_grads, var_grads = backward(inputs, upstream, variables)
            return list(input_grads) + list(var_grads)

        def forward_function(*tangents):
            # Tapes record while an accumulator processes an op only under a pushed
            # state; the solve's loop runs outside it, so that the accumulator does
            # not differentiate it too (a variable it watches reaches the loop).
            with forwardprop_util.push_forwardprop_state():
                linearization = self.jvp_linearization(inputs, variables, tangents)
            return self.tangent(*linearization)

        record.record_operation(
            f"implicit_{self.what}", outputs, recorded, backward_function, forward_function
        )
        return outputs, report


def _unique_variables(variables):
    seen, unique = set(), []
    for v in variables:
        if v.ref() not in seen:
            seen.add(v.ref())
            unique.append(v)
    return unique


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
    backward_callback,
    what,
    pause_tapes=True,
    backward_on_failure=None,
):
    """Runs `forward` (recording paused if `pause_tapes`), then attaches the implicit derivatives.

    root_fn(y, *args) -> (F, aux): the residual F on structures (already cast), zero at
    the solution, and fn's aux (None without has_aux).
    forward(y0, args) -> (y, iterations or None, aux or None), called on stopped
    arguments; its aux (a solver's, for custom_*) takes precedence over fn's.
    Returns (y, stats, aux), aux with gradients stopped.
    """
    packer = problem.packer
    on_failure = _policy.check_policy(on_failure)
    backward_on_failure = _policy.check_policy(backward_on_failure or on_failure)
    check_tol = problem.floor_tol(check_tol, what=what)
    linear_solver = problem.floor(linear_solver, what=what, name="backward_tol")
    stopped = tf.nest.map_structure(tf.stop_gradient, args)
    # Solvers that take gradients themselves (argmin's L-BFGS, a user's solver) need
    # tapes recording; stop_gradient on their output still keeps the outer gradient out
    # of the loop (in graphs that is all it takes: nothing differentiates through the
    # loop, so it keeps no intermediates).
    if pause_tapes:
        y_star, iterations, solver_aux = _unrecorded(forward, y0, stopped)
    else:
        y_star, iterations, solver_aux = forward(y0, stopped)
    y_star = tf.nest.map_structure(tf.stop_gradient, packer.unpack(packer.pack(y_star)))

    op = _ImplicitOp(
        problem,
        root_fn,
        y_star,
        args,
        linear_solver=linear_solver,
        on_failure=on_failure,
        backward_on_failure=backward_on_failure,
        what=what,
    )
    out, report = op.attach(
        tf.nest.flatten(y_star),
        tf.nest.flatten(args),
        check_tol=check_tol,
        iterations=iterations,
        backward_callback=backward_callback,
    )
    out = tf.nest.pack_sequence_as(y_star, out)
    if problem.original_dtype != problem.dtype:
        out = tf.nest.map_structure(lambda t: tf.cast(t, problem.original_dtype), out)
    if iterations is None:
        iterations = tf.fill(tf.shape(report["residual"]), -1)
    stats = SolverStats(
        packer.unbatch_stats(iterations),
        packer.unbatch_stats(report["residual"]),
        packer.unbatch_stats(report["converged"]),
    )
    aux = solver_aux if solver_aux is not None else report["aux"]
    return out, stats, _constant(aux)


def _returned(out, stats, aux, *, has_aux, return_stats):
    """What an entry point returns: y, then aux (has_aux), then stats (return_stats)."""
    result = (out,) + ((aux,) if has_aux else ()) + ((stats,) if return_stats else ())
    return result[0] if len(result) == 1 else result


def _builtin_forward(problem, solve):
    """Adapts a packed-tensor solver method to structures."""
    packer = problem.packer

    def forward(y0, args):
        y, stats = solve(packer.pack(y0), args)
        return packer.unpack(y), stats.iterations, None

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
        out, stats, aux = _implicit(
            problem,
            root_fn,
            y0,
            args,
            _builtin_forward(problem, solve),
            linear_solver=backward,
            check_tol=forward_solver.tol,
            on_failure=settings["on_failure"],
            backward_callback=settings["backward_callback"],
            what=kind,
            # argmin's L-BFGS takes gradients of f itself, so tapes must record there
            pause_tapes=kind != "argmin",
        )
    return _returned(
        out, stats, aux, has_aux=settings["has_aux"], return_stats=settings["return_stats"]
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
        "has_aux",
    )
    return {key: local_vars[key] for key in keys}


def fixed_point(
    fn,
    z0,
    *args,
    solver="anderson",
    linear_solver="bicgstab",
    tol=None,
    max_iter=None,
    backward_tol=None,
    backward_max_iter=None,
    backward_ridge=None,
    batch_dims=0,
    on_failure="warn",
    return_stats=False,
    backward_callback=None,
    has_aux=False,
):
    """Returns z with z = fn(z, *args), differentiable w.r.t. args and captured variables.

    Args:
        fn: callable (z, *args) -> value with the structure, shapes and dtype of z.
        z0: initial guess: a tensor or a flat structure of tensors (`tf.nest`).
        *args: tensors (or structures) fn depends on; gradients flow to them.
        solver: forward solver, a name ("anderson", "broyden", "fixed_point_iteration")
            or a `ki.solvers.Solver`.
        linear_solver: backward solver for (I - J^T) u = g: "bicgstab" (default: the
            fastest and leanest in `benchmarks/bench_core.py`; with ||J|| < 1 the
            symmetric part of I - J^T is positive definite and BiCGStab does not break
            down), "gmres" (any nonsingular system, more memory), "broyden",
            "neumann", "dense", "cg" (only if J is symmetric), or a
            `ki.linalg.LinearSolver`.
        tol, max_iter: forward settings (override the solver object's). Tolerances
            (forward and backward) below two machine epsilons of z0's dtype are raised
            to that floor, with one ConvergenceWarning per setting. The solver returns
            its best iterate per row (lowest residual), not its last.
        backward_tol, backward_max_iter, backward_ridge: backward settings.
        batch_dims: number of leading batch dimensions of z whose rows are independent
            problems (1 for a DEQ batch): convergence is then judged per row.
        on_failure: "warn" (default), "raise" or "ignore" when the forward or backward
            solve does not reach its tolerance or produces non-finite values.
        return_stats: also return the forward `SolverStats` (after aux, if any).
        backward_callback: called with the backward `SolverStats` when the gradient is
            computed (may assign to tf.Variables; works in graphs and under XLA); not
            called for forward-mode (tangent) solves.
        has_aux: fn returns a pair (value, aux); the call then returns (z, aux), or
            (z, aux, stats) with return_stats. aux is fn's auxiliary output at the
            returned z, with gradients stopped (jaxopt's has_aux): to differentiate a
            quantity of the solution, compute it from the returned z.

    Forward mode: under `tf.autodiff.ForwardAccumulator` the result carries the
    implicit JVP (tangents on args and on variables fn reads), solved by linear_solver.
    """
    settings = _settings(locals())

    def build(problem, forward_solver):
        def mapped(z, *a):
            value, aux = _strip_aux(_call(fn, problem.to_user(z), *a), has_aux, "fn")
            return problem.cast_output(value), aux

        def root_fn(z, *a):
            value, aux = mapped(z, *a)
            return tf.nest.map_structure(tf.subtract, z, value), aux

        def solve(zp, a):
            packer = problem.packer
            return forward_solver.solve_fixed_point(
                lambda v: packer.pack(mapped(packer.unpack(v), *a)[0]), zp
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
    has_aux=False,
):
    """Returns y with fn(y, *args) = 0, differentiable w.r.t. args and captured variables.

    The backward pass solves (dfn/dy)^T w = g, by GMRES by default: dfn/dy is a general
    matrix (possibly indefinite or skew), where BiCGStab can break down. Forward solvers
    other than Broyden iterate y <- y - fn(y), which needs dfn/dy close to the identity.
    Arguments, has_aux (fn returns (value, aux); the call returns y, aux[, stats]) and
    forward mode as `fixed_point`.
    """
    settings = _settings(locals())

    def build(problem, forward_solver):
        def root_fn(y, *a):
            value, aux = _strip_aux(_call(fn, problem.to_user(y), *a), has_aux, "fn")
            return problem.cast_output(value), aux

        def solve(yp, a):
            packer = problem.packer
            return forward_solver.solve_root(
                lambda v: packer.pack(root_fn(packer.unpack(v), *a)[0]), yp
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
    has_aux=False,
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
        has_aux: f returns (value, aux); the call returns x, aux[, stats], aux at the
            returned x without gradient.
        Other arguments and forward mode as `fixed_point`; convergence:
        ||grad f|| / (1 + ||x||) <= tol.
    """
    settings = _settings(locals())

    def build(problem, forward_solver):
        packer = problem.packer

        def objective(x, *a):
            value, aux = _strip_aux(_call(f, problem.to_user(x), *a), has_aux, "f")
            value = tf.cast(tf.convert_to_tensor(value), problem.dtype)
            if batch_dims == 0 and value.shape.rank not in (None, 0):
                raise ValueError(
                    f"`f` must return a scalar when batch_dims=0. Received shape: {value.shape}"
                )
            return tf.reshape(value, [-1]), aux

        def root_fn(x, *a):
            leaves = tf.nest.flatten(x)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(leaves)
                value, aux = objective(tf.nest.pack_sequence_as(x, leaves), *a)
                value = tf.reduce_sum(value)
            grads = tape.gradient(value, leaves, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.nest.pack_sequence_as(x, grads), aux

        if isinstance(forward_solver, solvers.LBFGS):

            def solve(xp, a):
                def value_and_gradient(v):
                    with tf.GradientTape(watch_accessed_variables=False) as tape:
                        tape.watch(v)
                        value = objective(packer.unpack(v), *a)[0]
                    return value, tape.gradient(value, v)

                return forward_solver.minimize(value_and_gradient, xp)
        else:

            def solve(xp, a):
                return forward_solver.solve_root(
                    lambda v: packer.pack(root_fn(packer.unpack(v), *a)[0]), xp
                )

        return root_fn, solve

    return _run_builtin("argmin", f, x0, args, settings, build)


def _custom(kind, fn, settings):
    """The decorator behind custom_fixed_point and custom_root."""
    backward = linalg.get(
        settings["linear_solver"],
        tol=settings["backward_tol"],
        max_iter=settings["backward_max_iter"],
        ridge=settings["backward_ridge"],
    )
    check_tol = _validation.non_negative_float("tol", settings["tol"])
    _policy.check_policy(settings["on_failure"])
    if settings["backward_on_failure"] is not None:
        _validation.one_of("backward_on_failure", settings["backward_on_failure"], _policy.POLICIES)
    has_aux = settings["has_aux"]

    def decorator(solver):
        if not callable(solver):
            raise ValueError(f"The decorated solver must be callable. Received: {solver!r}")

        @functools.wraps(solver)
        def solve(y0, *args, **kwargs):
            # keyword arguments reach the solver and fn as constants (not differentiated)
            kwargs = _constant(kwargs)
            with tf.name_scope(f"custom_{kind}"):
                problem, y0_, args_ = _prepare(fn, y0, args, settings["batch_dims"], kind)

                def root_fn(y, *a):
                    out = problem.cast_output(fn(problem.to_user(y), *a, **kwargs))
                    if kind == "fixed_point":
                        return tf.nest.map_structure(tf.subtract, y, out), None
                    return out, None

                def forward(y, a):
                    result = solver(problem.to_user(y), *a, **kwargs)
                    result, aux = _strip_aux(result, has_aux, "the solver")
                    return problem.cast_output(result, name="the solver"), None, aux

                out, stats, aux = _implicit(
                    problem,
                    root_fn,
                    y0_,
                    args_,
                    forward,
                    linear_solver=backward,
                    check_tol=check_tol,
                    on_failure=settings["on_failure"],
                    backward_on_failure=settings["backward_on_failure"],
                    backward_callback=settings["backward_callback"],
                    what=f"custom_{kind}",
                    pause_tapes=False,
                )
            return _returned(
                out, stats, aux, has_aux=has_aux, return_stats=settings["return_stats"]
            )

        return solve

    return decorator


def custom_fixed_point(
    fn,
    linear_solver="bicgstab",
    *,
    tol=1e-5,
    backward_tol=None,
    backward_max_iter=None,
    backward_ridge=None,
    batch_dims=0,
    on_failure="warn",
    backward_on_failure=None,
    return_stats=False,
    backward_callback=None,
    has_aux=False,
):
    """Decorator giving any fixed-point solver of `fn` implicit gradients.

    `solver(z0, *args)` may be anything that returns a fixed point of fn(., *args),
    even a non-differentiable routine (a numpy solver behind `tf.numpy_function`): no
    gradient flows through it; the gradient comes from the implicit function theorem
    at the returned point. `tol` judges the returned point (residual
    ||z - fn(z)|| / (1 + ||z||)) under `on_failure`; `backward_on_failure` (default: the
    same) applies to the backward (and tangent) linear solves, so a solver that reports
    its own failures (a status output) can pass on_failure="ignore" and still have a
    failed gradient solve reported. Other arguments as `fixed_point`.

    Keyword arguments of the decorated function, `solver(z0, *args, **kwargs)`, reach
    both the solver and `fn(z, *args, **kwargs)`; they are constants: only the
    positional args (and the variables fn reads) are differentiated, as in jaxopt.
    has_aux=True: the solver returns (z, aux) (jaxopt's custom_root has_aux); the
    call returns z, aux[, stats], aux without gradient. Forward mode as `fixed_point`.

    The solver runs with tapes recording, so it may take gradients itself; in eager
    mode one that reads trainable variables under an outer tape therefore keeps its
    activations until that tape is released (graph mode is unaffected).
    """
    return _custom("fixed_point", fn, locals())


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
    backward_on_failure=None,
    return_stats=False,
    backward_callback=None,
    has_aux=False,
):
    """Decorator giving any root solver of `fn` implicit gradients.

    Keyword arguments, backward_on_failure, has_aux and forward mode as
    `custom_fixed_point`.
    """
    return _custom("root", fn, locals())


__all__ = ["argmin", "custom_fixed_point", "custom_root", "fixed_point", "root"]
