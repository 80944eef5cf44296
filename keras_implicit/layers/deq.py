"""Deep equilibrium layer: the output is the fixed point z* = cell(z*, x).

The forward pass runs a fixed-point solver (`ki.fixed_point`) with gradient recording
paused, so training memory does not grow with the number of solver iterations. The
backward pass is either

* "implicit": the implicit function theorem, (I - J^T) u = g solved by a matrix-free
  linear solver (GMRES by default) at z*, gradients flowing to x and to every weight
  of the cell; or
* "phantom": a cheap approximation (Geng et al. 2021): from z* (gradient stopped),
  `phantom_steps` damped unrolled steps z <- (1 - d) z + d cell(z, x) are taken with
  the tape recording, and ordinary backprop through those steps gives the gradient.

Solver statistics are layer metrics (`keras.metrics.Mean`), so they show up in
`model.fit` logs, `History` and TensorBoard, also under `jit_compile=True` (they are
variables updated in the compiled step, not Python side effects):
`<name>_forward_iterations`, `<name>_forward_residual`, `<name>_forward_converged`
(fraction of samples) and, for the implicit backward,
`<name>_backward_iterations`, `<name>_backward_residual` (assigned from the core's
`backward_callback` while the gradient is computed).

Bad samples: rows of x that are not finite are solved as zeros but reported broken
(the failure policy fires, `*_forward_converged` drops), and their output rows are
zero, so a NaN sample cannot reach the loss and turn the batch's gradient into NaN.
With `on_failure="raise"` under XLA the core's NaN rows are kept (that is what the user
asked for).
"""

from __future__ import annotations

import inspect
import numbers

import keras
import tensorflow as tf

from keras_implicit import _policy, _validation, linalg, solvers
from keras_implicit.implicit import fixed_point

__all__ = ["DEQ"]

_BACKWARD = ("implicit", "phantom")


def _optional(check, name, value):
    return None if value is None else check(name, value)


def _state_spec(shape):
    if shape is None:
        return None
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        shape = None
    if not shape or any(
        isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape
    ):
        raise ValueError(
            f"`state_shape` must be a tuple of positive integers (without the batch axis). "
            f"Received: state_shape={shape!r}"
        )
    return tuple(int(s) for s in shape)


def _dynamic_state_shape(x, z_shape):
    """(batch, *z_shape) as a tensor; unknown state axes are x's axes at the same position."""
    dims = [tf.shape(x)[0]]
    for axis, size in enumerate(z_shape):
        if size is not None:
            dims.append(tf.constant(size, tf.int32))
        elif len(z_shape) == x.shape.rank - 1:
            dims.append(tf.shape(x)[axis + 1])
        else:
            raise ValueError(
                f"The state shape (batch, *{tuple(z_shape)}) has an unknown axis that cannot be "
                f"read from the input (rank {x.shape.rank}): pass `state_shape`. "
                f"Received: input shape {tuple(x.shape)}"
            )
    return tf.stack(dims)


def _unit_rows(v):
    """Each row of v scaled to unit norm (zero or non-finite rows become zero)."""
    norms = tf.norm(tf.reshape(v, tf.stack([tf.shape(v)[0], -1])), axis=-1)
    scale = tf.math.divide_no_nan(tf.ones_like(norms), norms)
    scale = tf.where(tf.math.is_finite(scale), scale, tf.zeros_like(scale))
    v = v * tf.reshape(
        scale, tf.concat([tf.shape(norms), tf.ones([v.shape.rank - 1], tf.int32)], 0)
    )
    return tf.where(tf.math.is_finite(v), v, tf.zeros_like(v))


def _finite_rows(x):
    flat = tf.reshape(x, tf.stack([tf.shape(x)[0], -1]))
    return tf.reduce_all(tf.math.is_finite(flat), axis=-1)


def _where_rows(rows, a, b):
    mask = tf.reshape(rows, tf.concat([tf.shape(rows), tf.ones([a.shape.rank - 1], tf.int32)], 0))
    return tf.where(mask, a, b)


@keras.saving.register_keras_serializable(package="keras_implicit")
class DEQ(keras.layers.Layer):
    """Deep equilibrium layer: returns z* with z* = cell(z*, x).

    Args:
        cell: a Keras layer called as `cell(z, x)` returning a tensor shaped like z
            (`ki.layers.DenseCell`, `ConvCell`, `MonotoneDenseCell`, or your own).
        state_shape: shape of z without the batch axis. Default: the cell's
            `state_shape(input_shape)` if it has one, else the shape of x.
        solver: forward solver name or `ki.solvers.Solver` ("anderson" default).
        max_iter, tol: forward budget and tolerance (relative residual per sample).
            Tolerances (also `inference_tol`, `backward_tol`) below 2 machine epsilons
            of the compute dtype are raised to it, with one warning per layer. Under a
            mixed policy the solve runs in float32 and z* comes back in the compute dtype.
        inference_max_iter, inference_tol: used instead when `training` is false
            (e.g. a smaller budget for prediction); default: the training values.
        backward: "implicit" (default) or "phantom".
        linear_solver, backward_max_iter, backward_tol: the implicit backward solve
            (default BiCGStab, as `ki.fixed_point`; "gmres" cannot break down on a
            nonsingular system, at more memory).
        backward_ridge: solve (I - J^T + ridge I) u = g instead (default: the linear
            solver's own, 0 unless set: the exact implicit gradient). A ridge caps the
            gradient's amplification 1 / (1 - lambda) along an eigenvalue lambda of J
            near 1, which can pull training towards the singular point with cells that
            are not contractions by construction (`ConvCell` is); the gradient is then
            biased.
        phantom_steps, phantom_damping: the phantom backward (k steps, damping in (0, 1]).
        initial_state: "zeros" (default) or a callable `x -> z0` (e.g. a registered
            function or a Keras layer); z0 gets no gradient. A state tensor passed to
            the call (`deq(x, initial_state=z_prev)`, e.g. the previous step's fixed
            point from `return_state=True`) overrides it: a warm start.
        correction_states: k >= 1. With k > 1 the call returns a list of k outputs
            sampled uniformly along the forward solve (after max_iter / k, 2 max_iter /
            k, ..., max_iter iterations, as torchdeq's `n_states`; a solve that
            converges earlier repeats its fixed point), the last one being the fixed
            point with the `backward` gradient and the others with the phantom gradient
            (`phantom_steps` damped steps from the sampled state, whose value they
            return in training). A loss on each output (e.g. a shared head and
            `loss_weights` in `compile`) is the fixed-point correction of Bai et al.
            (2022). The solve is run in k segments, each resuming from the previous
            state (exact for fixed-point iteration; Anderson restarts its history).
        return_state: also return the solver state z* (before the cell's `readout`),
            as the last element of a list: `[output(s)..., state]`, to warm-start the
            next call.
        jacobian_weight: weight of the Jacobian regularizer, a Hutchinson estimate of
            ||d cell / dz||_F^2 / dim(z) at z* (Bai et al. 2021), added with `add_loss`
            during training. 0 disables it.
        jacobian_samples: number of Gaussian probes of the estimate.
        jacobian_power_steps: power iterations of the regularizer's spectral term
            (see `_jacobian_penalty`); 0 leaves only the Frobenius estimate.
        on_failure: "warn" (default), "raise" or "ignore": the core's policy for
            solves that miss their tolerance.
        track_stats: create the solver-statistics metrics (default True).
    """

    def __init__(
        self,
        cell,
        state_shape=None,
        solver="anderson",
        max_iter=40,
        tol=1e-3,
        inference_max_iter=None,
        inference_tol=None,
        backward="implicit",
        linear_solver="bicgstab",
        backward_max_iter=40,
        backward_tol=1e-4,
        backward_ridge=None,
        phantom_steps=5,
        phantom_damping=0.5,
        initial_state="zeros",
        jacobian_weight=0.0,
        jacobian_samples=1,
        jacobian_power_steps=0,
        on_failure="warn",
        track_stats=True,
        correction_states=1,
        return_state=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(cell, keras.layers.Layer):
            raise ValueError(
                f"`cell` must be a Keras layer called as cell(z, x). Received: cell={cell!r}"
            )
        self.cell = cell
        self.state_shape = _state_spec(state_shape)
        self.solver = solvers.get(solver, tol=tol, max_iter=max_iter)
        self.inference_max_iter = _optional(
            _validation.positive_int, "inference_max_iter", inference_max_iter
        )
        self.inference_tol = _optional(
            _validation.non_negative_float, "inference_tol", inference_tol
        )
        self.backward = _validation.one_of("backward", backward, _BACKWARD)
        backward_ridge = _optional(_validation.non_negative_float, "backward_ridge", backward_ridge)
        self.linear_solver = linalg.get(
            linear_solver, tol=backward_tol, max_iter=backward_max_iter, ridge=backward_ridge
        )
        self.phantom_steps = _validation.positive_int("phantom_steps", phantom_steps)
        self.phantom_damping = _validation.float_in_range(
            "phantom_damping", phantom_damping, 0.0, 1.0, low_open=True
        )
        if not (initial_state == "zeros" or callable(initial_state)):
            raise ValueError(
                "`initial_state` must be 'zeros' or a callable x -> z0. "
                f"Received: initial_state={initial_state!r}"
            )
        self.initial_state = initial_state
        self.jacobian_weight = _validation.non_negative_float("jacobian_weight", jacobian_weight)
        self.jacobian_samples = _validation.positive_int("jacobian_samples", jacobian_samples)
        self.jacobian_power_steps = _validation.non_negative_int(
            "jacobian_power_steps", jacobian_power_steps
        )
        self.on_failure = _validation.one_of("on_failure", on_failure, ("warn", "raise", "ignore"))
        self.track_stats = bool(track_stats)
        self.correction_states = _validation.positive_int("correction_states", correction_states)
        self.return_state = bool(return_state)
        self._stats = {}
        if self.track_stats:
            kinds = ["forward_iterations", "forward_residual", "forward_converged"]
            if self.backward == "implicit":
                kinds += ["backward_iterations", "backward_residual"]
            for kind in kinds:
                self._stats[kind] = keras.metrics.Mean(name=f"{self.name}_{kind}")
            # tracked as attributes so Keras collects them into Model.metrics / logs
            self.stat_metrics = list(self._stats.values())

    # ------------------------------------------------------------------ shapes / build

    def _z_shape(self, input_shape):
        if self.state_shape is not None:
            return self.state_shape
        if hasattr(self.cell, "state_shape") and callable(self.cell.state_shape):
            return tuple(self.cell.state_shape(tuple(input_shape)))
        return tuple(input_shape[1:])

    def _floor_tolerances(self):
        """Solvers and tolerances raised to what the compute dtype can reach (warned once).

        The cell runs in the compute dtype, so the relative residual of a solve cannot
        fall much below its machine epsilon (2 epsilons: 2e-3 in float16, 1.6e-2 in
        bfloat16, 2.4e-7 in float32); a smaller tolerance would only exhaust the budget.
        """
        dtype = self.compute_dtype
        what = f"DEQ '{self.name}'"

        tols = {"tol": self.solver.tol, "backward_tol": self.linear_solver.tol}
        if self.inference_tol is not None:
            tols["inference_tol"] = self.inference_tol
        tols = _policy.floored_tols(tols, dtype, what=what, ulps=_policy.RESIDUAL_FLOOR_ULPS)
        self._run_solver = self.solver
        if tols["tol"] != self.solver.tol:
            self._run_solver = self.solver.with_options(tol=tols["tol"])
        self._run_linear_solver = self.linear_solver
        if tols["backward_tol"] != self.linear_solver.tol:
            self._run_linear_solver = self.linear_solver.with_options(tol=tols["backward_tol"])
        self._run_inference_tol = tols.get("inference_tol")

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        self._floor_tolerances()
        z_full = (input_shape[0], *self._z_shape(input_shape))
        if not self.cell.built:
            # a symbolic call builds the cell (creating its weights outside any solver loop)
            out = self.cell(
                keras.KerasTensor(z_full, dtype=self.compute_dtype),
                keras.KerasTensor(input_shape, dtype=self.compute_dtype),
            )
        else:
            out = self.cell.compute_output_spec(
                keras.KerasTensor(z_full, dtype=self.compute_dtype),
                keras.KerasTensor(input_shape, dtype=self.compute_dtype),
            )
        received = tuple(out.shape)[1:]
        if received != tuple(z_full)[1:]:
            raise ValueError(
                f"The cell '{self.cell.name}' must return a tensor shaped like the state z "
                f"(batch, *{tuple(z_full)[1:]}) for inputs of shape {input_shape}. "
                f"Received: cell output shape {tuple(out.shape)}"
            )

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        z_shape = (input_shape[0], *self._z_shape(input_shape))
        if self.correction_states == 1 and not self.return_state:
            return z_shape
        shapes = [z_shape] * self.correction_states
        return [*shapes, z_shape] if self.return_state else shapes

    # ------------------------------------------------------------------ the map

    def _map(self, training):
        """(inject, step, readout): the cell's protocol, or its plain call on (z, x).

        An `inject` that takes `training` gets it (dropout masks, power iterations).
        """
        cell = self.cell
        readout = getattr(cell, "readout", None) or (lambda z: z)
        if hasattr(cell, "inject") and hasattr(cell, "step"):
            inject = cell.inject
            if "training" in inspect.signature(inject).parameters:
                return (lambda x: inject(x, training=training)), cell.step, readout
            return inject, cell.step, readout
        return (lambda x: x), (lambda z, x: cell(z, x)), readout

    def _initial(self, x, z_shape, initial_state):
        if initial_state is not None:
            z0 = tf.cast(tf.convert_to_tensor(initial_state), x.dtype)
            expected = (x.shape[0], *z_shape)
            if not z0.shape.is_compatible_with(expected):
                raise ValueError(
                    f"`initial_state` must have the state's shape (batch, *{tuple(z_shape)}). "
                    f"Received: initial_state shape {tuple(z0.shape)}"
                )
        elif self.initial_state == "zeros":
            return tf.zeros(_dynamic_state_shape(x, z_shape), x.dtype)
        else:
            z0 = tf.convert_to_tensor(self.initial_state(x))
        z0 = tf.stop_gradient(z0)
        return tf.where(tf.math.is_finite(z0), z0, tf.zeros_like(z0))

    def _record(self, kind, value):
        metric = self._stats.get(kind)
        if metric is not None:
            metric.update_state(tf.reduce_mean(tf.cast(value, tf.float32)))

    def _backward_callback(self, stats):
        # Called by the core while the gradient is computed (also under XLA): a finite
        # mean over the rows that had a backward solve.
        residual = tf.where(tf.math.is_finite(stats.residual), stats.residual, 0.0)
        self._record("backward_iterations", stats.iterations)
        self._record("backward_residual", residual)

    # ------------------------------------------------------------------ call

    def call(self, x, training=None, initial_state=None):
        x = tf.convert_to_tensor(x)
        if x.dtype.is_integer or x.dtype == tf.bool:
            x = tf.cast(x, self.compute_dtype)
        elif not x.dtype.is_floating:
            raise ValueError(
                f"DEQ '{self.name}' takes real (floating, integer or bool) inputs. "
                f"Received dtype: {x.dtype.name}"
            )
        z_shape = self._z_shape(tuple(x.shape))
        inject, step, readout = self._map(training)
        if not hasattr(self, "_run_solver"):
            self._floor_tolerances()
        with tf.name_scope("deq"):
            ok_in = _finite_rows(x)
            # Bad samples are solved from clean (zero) inputs but start from a NaN state,
            # so the core sees them as broken rows: reported under its failure policy,
            # frozen, and given a zero gradient ...
            context = inject(_where_rows(ok_in, x, tf.zeros_like(x)))
            nan = tf.constant(float("nan"), x.dtype)
            z0 = self._initial(x, z_shape, initial_state)
            z0 = _where_rows(ok_in, z0, tf.fill(tf.shape(z0), nan))
            states, ok = self._solve(step, z0, context, ok_in, training)
            if training and self.jacobian_weight > 0:
                penalty = self._jacobian_penalty(step, states[-1], context)
                self.add_loss(self.jacobian_weight * penalty)
            outputs = []
            for z in states:
                out = readout(z)
                # a readout with an offset (ConvCell's normalization) maps zero rows elsewhere
                outputs.append(out if ok is None else _where_rows(ok, out, tf.zeros_like(out)))
            if self.return_state:
                return [*outputs, states[-1]]
            return outputs if self.correction_states > 1 else outputs[0]

    def _schedule(self, max_iter):
        """Iterations of each solve segment: k states sampled uniformly (torchdeq's n_states)."""
        k = max(min(max_iter, self.correction_states), 1)
        delta = max_iter // k
        ends = [max_iter - (k - 1 - i) * delta for i in range(k)]
        return [end - start for start, end in zip([0, *ends[:-1]], ends)]

    def _solve(self, step, z0, context, ok_in, training):
        """The sampled states (the fixed point last), each with its gradient, and the
        mask of good rows (None under on_failure="raise")."""
        inference = not training
        max_iter = self.inference_max_iter if inference else None
        tol = self._run_inference_tol if inference else None
        implicit = self.backward == "implicit"
        frozen = tf.nest.map_structure(tf.stop_gradient, context)
        segments = self._schedule(max_iter or self._run_solver.max_iter)
        z, samples, iterations = z0, [], 0
        for length in segments[:-1]:
            z, stats = fixed_point(
                step, z, frozen, solver=self._run_solver, tol=tol, max_iter=length,
                batch_dims=1, on_failure="ignore", return_stats=True,
            )  # fmt: skip
            samples.append(z)
            iterations += stats.iterations
            z = tf.stop_gradient(z)
        z, stats = fixed_point(
            step,
            z,
            context if implicit else frozen,
            solver=self._run_solver,
            linear_solver=self._run_linear_solver,
            tol=tol,
            max_iter=segments[-1] if len(segments) > 1 else max_iter,
            batch_dims=1,
            on_failure=self.on_failure,
            return_stats=True,
            backward_callback=self._backward_callback if (implicit and training) else None,
        )
        self._record("forward_iterations", stats.iterations + iterations)
        self._record(
            "forward_residual", tf.where(tf.math.is_finite(stats.residual), stats.residual, 0.0)
        )
        self._record("forward_converged", stats.converged)
        # ... and their output rows are zeroed, so they cannot reach the loss as NaN
        # (tf.where passes a zero gradient to the unselected branch). Under "raise"
        # the core's NaN rows for non-converged samples are what the user asked for.
        ok = ok_in if self.on_failure == "raise" else ok_in & _finite_rows(z)
        states = [_where_rows(ok, s, tf.zeros_like(s)) for s in [*samples, z]]
        if training:
            last = len(states) - 1
            states = [
                s
                if (i == last and implicit)
                else self._phantom(step, tf.stop_gradient(s), context, ok)
                for i, s in enumerate(states)
            ]
        return states, (None if self.on_failure == "raise" else ok)

    def _phantom(self, step, z, context, ok):
        """k damped unrolled steps from z* (recorded by the tape): the phantom gradient."""
        with tf.name_scope("phantom"):
            # the context was computed from cleaned inputs: only z rows can be broken
            d = self.phantom_damping
            for _ in range(self.phantom_steps):
                z = (1.0 - d) * z + d * step(z, context)
            return _where_rows(ok, z, tf.zeros_like(z))

    def _jacobian_penalty(self, step, z, context):
        """Jacobian regularizer at z (mean over the batch), J = d step / dz:

        a Hutchinson estimate of ||J||_F^2 / dim(z), plus, with `jacobian_power_steps`
        > 0, ||J^T v||^2 for the unit vector v reached by that many power iterations
        v <- J^T v / ||J^T v|| (an estimate of J's largest squared eigenvalue modulus).
        The Frobenius term alone averages over all dim(z) directions, so one eigenvalue
        approaching 1 (which makes z* unstable and I - J singular) barely moves it.
        """
        with tf.name_scope("jacobian_penalty"):
            z = tf.stop_gradient(z)
            rows = [tf.shape(z)[0], -1]

            def sq_norms(v):
                return tf.reduce_sum(tf.reshape(v, rows) ** 2, -1)

            with tf.GradientTape(watch_accessed_variables=False, persistent=True) as tape:
                tape.watch(z)
                out = step(z, context)

            def vjp(v):
                return tape.gradient(out, z, output_gradients=v)

            total = 0.0
            for _ in range(self.jacobian_samples):
                probe = tf.random.normal(tf.shape(z), dtype=z.dtype)
                total += tf.reduce_mean(sq_norms(vjp(probe)))
            dim = tf.cast(tf.reduce_prod(tf.shape(z)[1:]), z.dtype)
            estimate = total / (self.jacobian_samples * dim)
            if self.jacobian_power_steps:
                v = tf.random.normal(tf.shape(z), dtype=z.dtype)
                for _ in range(self.jacobian_power_steps):
                    v = _unit_rows(tf.stop_gradient(vjp(v)))
                estimate += tf.reduce_mean(sq_norms(vjp(v)))
            return tf.where(tf.math.is_finite(estimate), estimate, tf.zeros_like(estimate))

    # ------------------------------------------------------------------ config

    def get_config(self):
        initial = self.initial_state
        if initial != "zeros":
            initial = keras.saving.serialize_keras_object(initial)
        return {
            **super().get_config(),
            "cell": keras.saving.serialize_keras_object(self.cell),
            "state_shape": self.state_shape,
            "solver": keras.saving.serialize_keras_object(self.solver),
            "max_iter": self.solver.max_iter,
            "tol": self.solver.tol,
            "inference_max_iter": self.inference_max_iter,
            "inference_tol": self.inference_tol,
            "backward": self.backward,
            "linear_solver": keras.saving.serialize_keras_object(self.linear_solver),
            "backward_max_iter": self.linear_solver.max_iter,
            "backward_ridge": self.linear_solver.ridge,
            "backward_tol": self.linear_solver.tol,
            "phantom_steps": self.phantom_steps,
            "phantom_damping": self.phantom_damping,
            "initial_state": initial,
            "jacobian_weight": self.jacobian_weight,
            "jacobian_samples": self.jacobian_samples,
            "jacobian_power_steps": self.jacobian_power_steps,
            "on_failure": self.on_failure,
            "track_stats": self.track_stats,
            "correction_states": self.correction_states,
            "return_state": self.return_state,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["cell"] = keras.saving.deserialize_keras_object(config["cell"])
        if config.get("initial_state", "zeros") != "zeros":
            config["initial_state"] = keras.saving.deserialize_keras_object(config["initial_state"])
        return cls(**config)
