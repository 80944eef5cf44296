"""`ProgramLayer`: what the convex-program layers share.

QuadraticProgram, ConeProgram (and CvxpyLayer through ConeProgram) hold some problem
parameters as arrays (constant or trainable weights) and take the others as batched
inputs: a dict, a list/tuple in the order of `input_names`, or one tensor. They solve
in float32 under a half-precision policy, floor tolerances at what that dtype can
reach, return the solution [, duals] [, int32 status per row], give rows that are not
solved a zero gradient, and report those rows under `on_failure` (`_policy.apply`).
A subclass names its parameters (`_NAMES`, `_DIMS`), checks its shapes
(`_check_shapes`) and solves (`_solve`).
"""

from __future__ import annotations

import numbers
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from keras_implicit import _policy, _validation
from keras_implicit._structure import compute_dtype
from keras_implicit.programs._admm import SOLVED, STATUS_NAMES


def normalize_inputs(inputs, names, held, input_names, what):
    """A program layer's inputs (dict, list/tuple, one tensor, or their shapes) -> dict.

    names: every parameter name in order; held: names given as arrays (not inputs);
    input_names: the order of positional inputs (default: the names not held).
    """
    if isinstance(inputs, dict):
        bad = [k for k in inputs if k not in names or k in held]
        if bad:
            raise ValueError(
                f"{what} inputs must be keyed by names from {names} that were not given as "
                f"arrays (given: {sorted(held)}). Received keys: {sorted(inputs)}"
            )
        return dict(inputs)
    order = tuple(input_names or (k for k in names if k not in held))
    seq = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    # a bare shape tuple (ints or None) is one input
    if isinstance(inputs, (list, tuple)) and inputs and not hasattr(inputs[0], "__len__"):
        seq = [inputs]
    if len(seq) != len(order):
        raise ValueError(
            f"{what} expected {len(order)} input(s) {order} (set `input_names` or pass a "
            f"dict). Received: {len(seq)} input(s)"
        )
    return dict(zip(order, seq))


def check_input_names(input_names, names, held):
    """Validates a program layer's `input_names` (None: the names not held, in order)."""
    if input_names is None:
        return None
    input_names = (input_names,) if isinstance(input_names, str) else tuple(input_names)
    bad = [k for k in input_names if k not in names or k in held]
    if bad or len(set(input_names)) != len(input_names):
        raise ValueError(
            f"`input_names` must be distinct names from {names} not given as arrays "
            f"(given: {sorted(held)}). Received: input_names={input_names!r}"
        )
    return input_names


def cast_input(name, value, dtype, what):
    """A program layer's input as a `dtype` tensor; non-real dtypes are refused."""
    t = tf.convert_to_tensor(value)
    if not (t.dtype.is_floating or t.dtype.is_integer) or t.dtype.is_complex:
        raise ValueError(
            f"{what} input `{name}` must hold real numbers. Received: {name}.dtype={t.dtype.name}"
        )
    return tf.cast(t, dtype)


def solve_dtype(layer) -> tf.DType:
    """The dtype a program layer solves in: its compute dtype, float32 for half ones."""
    return compute_dtype(tf.as_dtype(layer.compute_dtype))


def to_compute_dtype(layer, outputs):
    """Floating outputs cast to the layer's compute dtype (mixed policies)."""
    dtype = tf.as_dtype(layer.compute_dtype)
    return tf.nest.map_structure(lambda t: t if t.dtype == dtype else tf.cast(t, dtype), outputs)


def report_status(outputs, status, on_failure, what):
    """The failure policy (`_policy.apply`) on the rows whose status is not SOLVED.

    outputs: a structure of [B, ...] tensors; eagerly the message counts the rows by
    status name; in a graph the count is printed (or asserted); under XLA "raise" sets
    the failed rows to NaN (the status output carries the rest).
    """

    def message(bad):
        codes = status.numpy()
        counts = {STATUS_NAMES[int(c)]: int((codes == c).sum()) for c in np.unique(codes[bad])}
        return (
            f"{what}: {int(bad.sum())} of {codes.size} problems not solved {counts}; "
            "their rows are the last iterate and get a zero gradient "
            "(use return_status=True to mask them)."
        )

    return _policy.apply(
        outputs,
        tf.equal(status, SOLVED),
        on_failure=on_failure,
        what=what,
        message=message,
        graph_message=f"{what}: problems not solved (see the status output):",
        xla_hint="read failures from the status output (return_status=True)",
    )


def program_output_spec(layer, shapes):
    """Output specs of a program layer from its output shapes: solution [, duals] [, status]."""
    single = not (layer.return_duals or layer.return_status)
    shapes = [shapes] if single else list(shapes)
    specs = [keras.KerasTensor(s, dtype=layer.compute_dtype) for s in shapes]
    if layer.return_status:
        specs[-1] = keras.KerasTensor(shapes[-1], dtype="int32")
    return specs[0] if single else tuple(specs)


class ProgramLayer(keras.layers.Layer):
    """Base of the convex-program layers (see the module docstring)."""

    STATUS_NAMES: ClassVar[dict] = {}
    _NAMES = ()  # every parameter, in positional order
    _DIMS: ClassVar[dict] = {}  # parameter -> names of its unbatched axes
    _SIZE_LABEL = ""  # how size errors name the program

    # ------------------------------------------------------------ construction

    def _hold_parameters(
        self, arrays, trainable_params, input_names, return_duals, return_status, on_failure
    ):
        """Validates and stores the arguments every program layer takes."""
        self._arrays = {k: self._as_array(k, v) for k, v in arrays.items() if v is not None}
        if isinstance(trainable_params, str):
            trainable_params = (trainable_params,)
        trainable_params = tuple(trainable_params or ())
        if any(k not in self._arrays for k in trainable_params):
            raise ValueError(
                "`trainable_params` may only name parameters given as arrays "
                f"({sorted(self._arrays)}). Received: trainable_params={trainable_params!r}"
            )
        self.trainable_params = trainable_params
        self.input_names = check_input_names(input_names, self._NAMES, self._arrays)
        self.return_duals = bool(return_duals)
        self.return_status = bool(return_status)
        self.on_failure = _policy.check_policy(on_failure)
        self._weights_by_name = {}
        self._input_keys = None

    def _as_array(self, name, value):
        arr = np.asarray(value)
        rank = len(self._DIMS[name])
        if arr.ndim != rank or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(
                f"`{name}` must be a numeric array of rank {rank} "
                f"(shape {tuple(self._DIMS[name])}). Received: {name} with shape {arr.shape}"
            )
        return arr

    @staticmethod
    def _admm_settings(tol, max_iter, rho, sigma, alpha, check_interval) -> dict:
        """The ADMM arguments both solvers take, validated once."""
        if not (isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and 0 < alpha < 2):
            raise ValueError(f"`alpha` must be in (0, 2). Received: alpha={alpha!r}")
        return {
            "tol": None if tol is None else _validation.positive_float("tol", tol),
            "max_iter": _validation.positive_int("max_iter", max_iter),
            "rho": _validation.positive_float("rho", rho),
            "sigma": _validation.positive_float("sigma", sigma),
            "alpha": float(alpha),
            "check_interval": _validation.positive_int("check_interval", check_interval),
        }

    def _solve_tols(self, given: dict, defaults: dict) -> dict:
        """Tolerances the solve runs with, raised to the solve dtype's floor.

        Defaults (name -> value per dtype) take the floor silently; the tolerances given
        (None: not given) are raised with one warning, here rather than at every call.
        """
        dtype = self._solve_dtype()
        floor = _policy.tol_floor(dtype)
        tols = {k: max(v, floor) for k, v in defaults.items()}
        given = {k: v for k, v in given.items() if v is not None}
        tols.update(_policy.floored_tols(given, dtype, what=type(self).__name__))
        return tols

    def _program_config(self) -> dict:
        """The part of `get_config` every program layer shares."""
        config = {k: v.tolist() for k, v in self._arrays.items()}
        config.update(
            trainable_params=list(self.trainable_params),
            input_names=None if self.input_names is None else list(self.input_names),
            return_duals=self.return_duals,
            return_status=self.return_status,
            on_failure=self.on_failure,
        )
        return config

    # ------------------------------------------------------------ dtype

    def _solve_dtype(self) -> tf.DType:
        return solve_dtype(self)

    # ------------------------------------------------------------ inputs and shapes

    def _names_for(self, inputs):
        """The parameter names `inputs` may carry (a subclass may widen them)."""
        return self._NAMES

    def _normalize(self, inputs):
        """inputs (or their shapes) -> dict name -> value."""
        names = self._names_for(inputs)
        return normalize_inputs(inputs, names, self._arrays, self.input_names, type(self).__name__)

    def _resolve_sizes(self, shapes, known=None):
        """Axis sizes (name -> int) from the held arrays and input shapes (batch first).

        known: sizes fixed in advance, name -> (size, where it comes from). Unknown
        (None) input sizes pass; ranks and sizes that disagree raise.
        """
        sizes = dict(known or {})
        sources = [(k, tuple(a.shape), tuple(a.shape)) for k, a in self._arrays.items()]
        for k, shape in shapes.items():
            shape, dims = tuple(shape), self._DIMS[k]
            if len(shape) != len(dims) + 1:
                raise ValueError(
                    f"Input `{k}` must have shape (batch, {', '.join(dims)}). "
                    f"Received: {k}.shape={shape}"
                )
            sources.append((k, shape[1:], shape))
        for k, event, shape in sources:
            for name, size in zip(self._DIMS[k], event):
                if size is None:
                    continue
                if name in sizes and sizes[name][0] != size:
                    raise ValueError(
                        f"Inconsistent {self._SIZE_LABEL} sizes: {name}={sizes[name][0]} "
                        f"from {sizes[name][1]} but {size} from `{k}`. "
                        f"Received: {k}.shape={shape}"
                    )
                sizes.setdefault(name, (size, f"`{k}`"))
        return {name: size for name, (size, _) in sizes.items()}

    def _check_shapes(self, shapes) -> dict:
        """Validates the input shapes; returns the axis sizes (subclasses add checks)."""
        return self._resolve_sizes(shapes)

    def build(self, input_shape):
        shapes = self._normalize(input_shape)
        self._check_shapes(shapes)
        self._input_keys = tuple(k for k in self._NAMES if k in shapes)
        for k, arr in self._arrays.items():
            self._weights_by_name[k] = self.add_weight(
                name=k,
                shape=arr.shape,
                initializer=keras.initializers.Constant(arr),
                trainable=k in self.trainable_params,
            )

    def _parameter(self, inputs, name, dtype):
        """An input (cast, batched) or a held weight (cast, unbatched); None if neither."""
        if name in inputs:
            return cast_input(name, inputs[name], dtype, type(self).__name__)
        if name in self._weights_by_name:
            return tf.cast(self._weights_by_name[name], dtype)
        return None

    # ------------------------------------------------------------ call and outputs

    def _solve(self, inputs, dtype):
        """Returns the solution (B, n), a tuple of duals and the status (B,)."""
        raise NotImplementedError

    def _dual_sizes(self, sizes) -> tuple:
        """The last-axis sizes of the duals, from `_check_shapes`' sizes."""
        raise NotImplementedError

    def call(self, inputs):
        inputs = self._normalize(inputs)
        keys = tuple(k for k in self._NAMES if k in inputs)
        if keys != self._input_keys:
            raise ValueError(
                f"{type(self).__name__} was built with inputs {self._input_keys}. Received: {keys}"
            )
        self._check_shapes({k: v.shape for k, v in inputs.items()})
        x, duals, status = self._solve(inputs, self._solve_dtype())
        x, duals = report_status((x, duals), status, self.on_failure, type(self).__name__)
        x, duals = to_compute_dtype(self, (x, duals))
        out = [x] + (list(duals) if self.return_duals else [])
        if self.return_status:
            out.append(status)
        return out[0] if len(out) == 1 else tuple(out)

    def compute_output_shape(self, input_shape):
        shapes = self._normalize(input_shape)
        sizes = self._check_shapes(shapes)
        batch = next(iter(next(iter(shapes.values()))))
        out = [(batch, sizes.get("n"))]
        if self.return_duals:
            out += [(batch, size) for size in self._dual_sizes(sizes)]
        if self.return_status:
            out.append((batch,))
        return out[0] if len(out) == 1 else tuple(out)

    def compute_output_spec(self, inputs):
        shapes = {k: v.shape for k, v in self._normalize(inputs).items()}
        return program_output_spec(self, self.compute_output_shape(shapes))
