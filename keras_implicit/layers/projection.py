"""Keras layers for the projections of `keras_implicit.ops`.

`Projection(kind, **params)` wraps every projection (and sparsemax); the named
classes (`Sparsemax`, `SimplexProjection`, `L2BallProjection`, ...) are the same
layer with the kind fixed. Gradients are the ops' closed-form/implicit ones.

Set parameters can be learned: `trainable_params=True` makes all of the kind's
parameters weights, or pass a list of names (e.g. `["upper"]`).

* `radius` and `value` must stay positive, so they are stored as an unconstrained
  weight `raw` with `param = softplus(raw)`, initialized so that the initial value is
  the one given. `layer.get_param("radius")` returns the current value.
* Box bounds `lower` / `upper`, the hyperplane/halfspace normal `a` and the box
  section's weights `w` become one weight per feature (shape `(n,)`) when given as
  a number; `b`, `A`, `c` keep the shape they were given. They are unconstrained (a
  learned box with lower > upper returns `upper` where the bounds cross).
* The sparse simplex's `max_nonzeros`, the transport marginals `a`, `b` and the
  `divergence` of the transport and Birkhoff kinds are fixed (not learnable).
"""

from __future__ import annotations

import dataclasses
import numbers

import keras
import numpy as np
import tensorflow as tf

from keras_implicit import _validation
from keras_implicit import ops as kops
from keras_implicit._structure import compute_dtype

__all__ = [
    "AffineSetProjection",
    "BoxProjection",
    "ExpConeProjection",
    "HalfspaceProjection",
    "HyperplaneProjection",
    "L1BallProjection",
    "L1SphereProjection",
    "L2BallProjection",
    "L2SphereProjection",
    "LinfBallProjection",
    "NonNegativeProjection",
    "PSDProjection",
    "Projection",
    "SOCProjection",
    "SimplexProjection",
    "Sparsemax",
]

_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class _Param:
    name: str
    default: object = _REQUIRED
    # "scalar": one number (weight shape as given); "vector": per feature, a number
    # becomes a weight of shape (n,); "array": weight shape as given; "int": a
    # positive Python int (a static size); "choice": one of `choices` (a string).
    layout: str = "scalar"
    positive: bool = False  # stored through softplus when trainable
    learnable: bool = True
    choices: tuple = ()


@dataclasses.dataclass(frozen=True)
class _Kind:
    op: object
    params: tuple = ()
    # rank the input must have at least, and a check of the static input shape
    min_rank: int = 2


_RADIUS = (_Param("radius", 1.0, positive=True),)
_HYPER = (_Param("a", layout="vector"), _Param("b", 0.0))
_BOUNDS = (_Param("lower", 0.0, layout="vector"), _Param("upper", 1.0, layout="vector"))
_DIVERGENCE = _Param(
    "divergence", "euclidean", layout="choice", learnable=False, choices=("euclidean", "kl")
)
_MARGINALS = (
    _Param("a", layout="array", positive=True, learnable=False),
    _Param("b", layout="array", positive=True, learnable=False),
    _DIVERGENCE,
)

KINDS = {
    "non_negative": _Kind(kops.projection_non_negative),
    "box": _Kind(kops.projection_box, _BOUNDS),
    "box_section": _Kind(
        kops.projection_box_section,
        (*_BOUNDS, _Param("w", 1.0, layout="vector"), _Param("c", 1.0)),
    ),
    "hyperplane": _Kind(kops.projection_hyperplane, _HYPER),
    "halfspace": _Kind(kops.projection_halfspace, _HYPER),
    "affine_set": _Kind(
        kops.projection_affine_set, (_Param("A", layout="array"), _Param("b", layout="array"))
    ),
    "simplex": _Kind(kops.projection_simplex, (_Param("value", 1.0, positive=True),)),
    "sparsemax": _Kind(kops.sparsemax),
    "sparse_simplex": _Kind(
        kops.projection_sparse_simplex,
        (
            _Param("max_nonzeros", layout="int", learnable=False),
            _Param("value", 1.0, positive=True),
        ),
    ),
    "l1_ball": _Kind(kops.projection_l1_ball, _RADIUS),
    "l1_sphere": _Kind(kops.projection_l1_sphere, _RADIUS),
    "l2_ball": _Kind(kops.projection_l2_ball, _RADIUS),
    "l2_sphere": _Kind(kops.projection_l2_sphere, _RADIUS),
    "linf_ball": _Kind(kops.projection_linf_ball, _RADIUS),
    "second_order_cone": _Kind(kops.projection_second_order_cone),
    "psd_cone": _Kind(kops.projection_psd_cone, min_rank=3),
    "exp_cone": _Kind(kops.projection_exp_cone),
    "transport": _Kind(kops.projection_transport, _MARGINALS, min_rank=3),
    "birkhoff": _Kind(kops.projection_birkhoff, (_DIVERGENCE,), min_rank=3),
}

_ALL_PARAM_NAMES = sorted({p.name for k in KINDS.values() for p in k.params})


def _softplus_inverse(value: np.ndarray) -> np.ndarray:
    # log(exp(v) - 1) written so that it neither overflows for large v nor loses
    # precision for small v.
    return value + np.log(-np.expm1(-value))


def _to_config_value(value):
    """Python int, str, float or nested list: what get_config can hold."""
    if isinstance(value, (int, str)):
        return value
    arr = np.asarray(value, dtype=np.float64)
    return float(arr) if arr.ndim == 0 else arr.tolist()


@keras.saving.register_keras_serializable(package="keras_implicit")
class Projection(keras.layers.Layer):
    """Euclidean projection of the last axis of its input onto a convex set or cone.

    Args:
      kind: which projection; one of `keras_implicit.layers.projection.KINDS`:
        "non_negative", "box" (lower=0, upper=1), "hyperplane" (a, b=0),
        "halfspace" (a, b=0), "affine_set" (A, b), "simplex" (value=1), "sparsemax",
        "l1_ball", "l1_sphere", "l2_ball", "l2_sphere", "linf_ball" (radius=1),
        "second_order_cone", "psd_cone" (input (..., n, n)), "exp_cone" (last axis 3),
        "box_section" (lower=0, upper=1, w=1, c=1: {lower <= y <= upper, w^T y = c}),
        "sparse_simplex" (max_nonzeros, value=1), "transport" (marginals a, b,
        divergence="euclidean" or "kl"; input (..., m, n)), "birkhoff"
        (divergence="euclidean"; input (..., n, n)). The op is
        `keras_implicit.ops.projection_<kind>` (or `ops.sparsemax`).
      trainable_params: False, True (all of the kind's parameters), or a list of
        parameter names to learn. See the module docstring for the parametrization.
      **params: the kind's set parameters (numbers, lists or numpy arrays), plus the
        usual Keras layer keyword arguments (`name`, `dtype`, ...).

    Call: `layer(x)` with `x` of shape `(batch, ..., n)` (`(batch, ..., n, n)` for
    "psd_cone"); returns the projection, same shape. The batch and the other
    leading dimensions may be unknown (`None`), and so may `n` unless a parameter
    is a learned per-feature weight. Under a mixed policy (`mixed_float16`,
    `mixed_bfloat16`) the projection is computed in float32 and returned in the
    compute dtype.
    """

    def __init__(self, kind, trainable_params=False, **kwargs):
        if not isinstance(kind, str) or kind not in KINDS:
            raise ValueError(
                f"Unknown projection kind. Known kinds: {sorted(KINDS)}. Received: kind={kind!r}"
            )
        spec = KINDS[kind]
        own = {p.name for p in spec.params}
        params = {}
        for name in list(kwargs):
            if name in own:
                params[name] = kwargs.pop(name)
            elif name in _ALL_PARAM_NAMES:
                raise ValueError(
                    f"`{name}` is not a parameter of kind {kind!r} (its parameters: "
                    f"{sorted(own)}). Received: {name}={kwargs[name]!r}"
                )
        super().__init__(**kwargs)
        self.kind = kind
        self._spec = spec
        self.trainable_params = self._resolve_trainable(trainable_params)
        self._values = {}
        for p in spec.params:
            value = params.get(p.name, p.default)
            if value is _REQUIRED:
                raise ValueError(
                    f"Kind {kind!r} requires the parameter `{p.name}`. Received: {p.name}=None"
                )
            self._values[p.name] = self._validate_value(p, value)
        if kind in ("box", "box_section"):
            self._check_box_order()
        self._weights_by_name = {}

    # ------------------------------------------------------------------ validation

    def _resolve_trainable(self, trainable_params):
        names = [p.name for p in self._spec.params if p.learnable]
        if isinstance(trainable_params, bool):
            return list(names) if trainable_params else []
        requested = [trainable_params] if isinstance(trainable_params, str) else trainable_params
        try:
            requested = list(requested)
        except TypeError:
            raise ValueError(
                "`trainable_params` must be a bool or a list of parameter names. "
                f"Received: trainable_params={trainable_params!r}"
            ) from None
        unknown = [n for n in requested if n not in names]
        if unknown:
            raise ValueError(
                f"Unknown parameter name(s) {unknown} in `trainable_params` for kind "
                f"{self.kind!r}; its learnable parameters are {names}. "
                f"Received: trainable_params={trainable_params!r}"
            )
        return [n for n in names if n in requested]

    def _validate_value(self, p, value):
        if p.layout == "int":
            return _validation.positive_int(p.name, value)
        if p.layout == "choice":
            if value not in p.choices:
                raise ValueError(
                    f"`{p.name}` must be one of {list(p.choices)}. Received: {p.name}={value!r}"
                )
            return value
        if tf.is_tensor(value) or isinstance(value, tf.Variable):
            value = np.asarray(value)  # configs hold plain numbers
        if isinstance(value, bool) or not isinstance(
            value, (numbers.Real, list, tuple, np.ndarray)
        ):
            raise ValueError(
                f"`{p.name}` must be a number, a list or a numpy array. "
                f"Received: {p.name}={value!r}"
            )
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"`{p.name}` must be numeric. Received: {p.name}={value!r}") from None
        if not np.all(np.isfinite(arr)) and p.name not in ("lower", "upper"):
            raise ValueError(f"`{p.name}` must be finite. Received: {p.name}={value!r}")
        if np.any(np.isnan(arr)):
            raise ValueError(f"`{p.name}` must not be NaN. Received: {p.name}={value!r}")
        if p.positive:
            trainable = p.name in self.trainable_params
            ok = np.all(arr > 0) if trainable else np.all(arr >= 0)
            if not ok:
                need = "positive (it is learned through softplus)" if trainable else "non-negative"
                raise ValueError(f"`{p.name}` must be {need}. Received: {p.name}={value!r}")
        if p.name == "A" and arr.ndim != 2:
            raise ValueError(f"`A` must be a matrix (m, n). Received: A.shape={arr.shape}")
        if p.name == "b" and p.layout == "array":
            a_rows = np.shape(self._values["A"])[0] if "A" in self._values else None
            if arr.ndim != 1 or (a_rows is not None and arr.shape[0] != a_rows):
                raise ValueError(
                    f"`b` must be a vector with one entry per row of `A`. "
                    f"Received: b.shape={arr.shape}, A.shape={np.shape(self._values.get('A'))}"
                )
        return arr

    def _check_box_order(self):
        lo, hi = self._values["lower"], self._values["upper"]
        try:
            bad = np.any(lo > hi)
        except ValueError:  # shapes that do not broadcast; caught again in build
            bad = False
        if bad:
            raise ValueError(
                "`lower` must not exceed `upper`. Received: "
                f"lower={_to_config_value(lo)!r}, upper={_to_config_value(hi)!r}"
            )

    def _check_input_shape(self, input_shape):
        shape = tuple(input_shape)
        rank = len(shape)
        if rank < self._spec.min_rank:
            raise ValueError(
                f"Projection(kind={self.kind!r}) needs inputs of rank >= "
                f"{self._spec.min_rank} (batch first). Received: input_shape={shape}"
            )
        n = shape[-1]
        if self.kind == "exp_cone" and n is not None and n != 3:
            raise ValueError(
                "The exponential cone acts on a last axis of size 3 (x, y, z). "
                f"Received: input_shape={shape}"
            )
        if self.kind == "psd_cone" and None not in shape[-2:] and shape[-1] != shape[-2]:
            raise ValueError(
                f"The PSD cone acts on square matrices (..., n, n). Received: input_shape={shape}"
            )
        if self.kind == "birkhoff" and None not in shape[-2:] and n != shape[-2]:
            raise ValueError(
                "The Birkhoff polytope holds square matrices (..., n, n). "
                f"Received: input_shape={shape}"
            )
        if self.kind == "transport":
            for name, dim in (("a", shape[-2]), ("b", n)):
                size = np.shape(self._values[name])[-1]
                if dim is not None and size != dim:
                    raise ValueError(
                        f"`{name}` must have {dim} entries (input_shape={shape}). "
                        f"Received: {name}.shape={np.shape(self._values[name])}"
                    )
            return
        if n is None:
            return
        for name, arr in self._values.items():
            p = next(q for q in self._spec.params if q.name == name)
            if p.layout == "vector" and arr.ndim >= 1 and arr.shape[-1] not in (1, n):
                raise ValueError(
                    f"`{name}` must have {n} entries (the input's last axis) or be a number. "
                    f"Received: {name}.shape={arr.shape}, input_shape={shape}"
                )
            if name == "A" and arr.shape[-1] != n:
                raise ValueError(
                    f"`A` must have {n} columns (the input's last axis). "
                    f"Received: A.shape={arr.shape}, input_shape={shape}"
                )
            if name == "A" and arr.shape[0] > n:
                raise ValueError(
                    f"`A` must have at most as many rows as columns. Received: A.shape={arr.shape}"
                )

    # ------------------------------------------------------------------ keras API

    def build(self, input_shape):
        self._check_input_shape(input_shape)
        n = input_shape[-1]
        for p in self._spec.params:
            if p.name not in self.trainable_params:
                continue
            init = self._values[p.name]
            if p.layout == "vector" and init.ndim == 0:
                if n is None:
                    raise ValueError(
                        f"A trainable `{p.name}` given as a number needs a known last "
                        f"input dimension. Received: input_shape={tuple(input_shape)}"
                    )
                init = np.full((n,), float(init))
            raw = _softplus_inverse(init) if p.positive else init
            self._weights_by_name[p.name] = self.add_weight(
                name=("raw_" + p.name) if p.positive else p.name,
                shape=raw.shape,
                initializer=lambda shape, dtype, raw=raw: tf.cast(
                    tf.reshape(tf.constant(raw), shape), dtype
                ),
                trainable=True,
            )
        self.built = True

    def get_param(self, name):
        """Current value of a set parameter (a tensor for learned ones, else numpy)."""
        if name not in self._values:
            raise ValueError(
                f"Kind {self.kind!r} has no parameter {name!r}; its parameters are "
                f"{[p.name for p in self._spec.params]}. Received: name={name!r}"
            )
        if name in self._weights_by_name:
            weight = self._weights_by_name[name]
            p = next(q for q in self._spec.params if q.name == name)
            return tf.nn.softplus(weight) if p.positive else tf.convert_to_tensor(weight)
        return self._values[name]

    def call(self, inputs):
        x = tf.convert_to_tensor(inputs)
        out_dtype = x.dtype
        # Under a mixed policy the projection runs in float32 (norms, sums and
        # thresholds need its range; learned parameters keep their float32 value)
        # and the result comes back in the compute dtype.
        x = tf.cast(x, compute_dtype(x.dtype))
        params = {}
        for p in self._spec.params:
            value = self.get_param(p.name)
            params[p.name] = tf.cast(value, x.dtype) if tf.is_tensor(value) else value
        return tf.cast(self._spec.op(x, **params), out_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "kind": self.kind,
                "trainable_params": list(self.trainable_params),
                **{name: _to_config_value(v) for name, v in self._values.items()},
            }
        )
        return config


class _FixedKindProjection(Projection):
    """A Projection whose kind is fixed by the subclass (configs omit `kind`)."""

    _KIND = None

    def __init__(self, trainable_params=False, **kwargs):
        kwargs.pop("kind", None)  # tolerated in configs written by the base class
        super().__init__(self._KIND, trainable_params=trainable_params, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.pop("kind")
        return config


def _register(cls):
    return keras.saving.register_keras_serializable(package="keras_implicit")(cls)


@_register
class Sparsemax(_FixedKindProjection):
    """Sparsemax activation (Martins & Astudillo, 2016): projection onto the probability simplex.

    A sparse alternative to softmax along the last axis: outputs are non-negative,
    sum to 1 and are often exactly 0. Jacobian `diag(s) - s s^T/|s|` on the support s.
    """

    _KIND = "sparsemax"

    def __init__(self, **kwargs):
        kwargs.pop("trainable_params", None)  # no parameters
        super().__init__(**kwargs)


@_register
class SimplexProjection(_FixedKindProjection):
    """Projection onto {y >= 0, sum(y) = value}; `value` optionally trainable (softplus)."""

    _KIND = "simplex"

    def __init__(self, value=1.0, trainable_params=False, **kwargs):
        super().__init__(value=value, trainable_params=trainable_params, **kwargs)


@_register
class L1BallProjection(_FixedKindProjection):
    """Projection onto the l1 ball {||y||_1 <= radius}; radius optionally trainable."""

    _KIND = "l1_ball"

    def __init__(self, radius=1.0, trainable_params=False, **kwargs):
        super().__init__(radius=radius, trainable_params=trainable_params, **kwargs)


@_register
class L1SphereProjection(_FixedKindProjection):
    """Projection onto the l1 sphere {||y||_1 = radius}; radius optionally trainable."""

    _KIND = "l1_sphere"

    def __init__(self, radius=1.0, trainable_params=False, **kwargs):
        super().__init__(radius=radius, trainable_params=trainable_params, **kwargs)


@_register
class L2BallProjection(_FixedKindProjection):
    """Projection onto the l2 ball {||y||_2 <= radius}; radius optionally trainable."""

    _KIND = "l2_ball"

    def __init__(self, radius=1.0, trainable_params=False, **kwargs):
        super().__init__(radius=radius, trainable_params=trainable_params, **kwargs)


@_register
class L2SphereProjection(_FixedKindProjection):
    """Projection onto the l2 sphere {||y||_2 = radius}; radius optionally trainable."""

    _KIND = "l2_sphere"

    def __init__(self, radius=1.0, trainable_params=False, **kwargs):
        super().__init__(radius=radius, trainable_params=trainable_params, **kwargs)


@_register
class LinfBallProjection(_FixedKindProjection):
    """Projection onto {||y||_inf <= radius} (clipping); radius optionally trainable."""

    _KIND = "linf_ball"

    def __init__(self, radius=1.0, trainable_params=False, **kwargs):
        super().__init__(radius=radius, trainable_params=trainable_params, **kwargs)


@_register
class BoxProjection(_FixedKindProjection):
    """Projection onto the box [lower, upper] (per feature or shared), bounds optionally learned."""

    _KIND = "box"

    def __init__(self, lower=0.0, upper=1.0, trainable_params=False, **kwargs):
        super().__init__(lower=lower, upper=upper, trainable_params=trainable_params, **kwargs)


@_register
class NonNegativeProjection(_FixedKindProjection):
    """Projection onto the non-negative orthant (relu, with relu'(0) = 0)."""

    _KIND = "non_negative"

    def __init__(self, **kwargs):
        kwargs.pop("trainable_params", None)
        super().__init__(**kwargs)


@_register
class HyperplaneProjection(_FixedKindProjection):
    """Projection onto {y : a^T y = b}; `a` and `b` optionally trainable."""

    _KIND = "hyperplane"

    def __init__(self, a, b=0.0, trainable_params=False, **kwargs):
        super().__init__(a=a, b=b, trainable_params=trainable_params, **kwargs)


@_register
class HalfspaceProjection(_FixedKindProjection):
    """Projection onto {y : a^T y <= b}; `a` and `b` optionally trainable."""

    _KIND = "halfspace"

    def __init__(self, a, b=0.0, trainable_params=False, **kwargs):
        super().__init__(a=a, b=b, trainable_params=trainable_params, **kwargs)


@_register
class AffineSetProjection(_FixedKindProjection):
    """Projection onto {y : A y = b}, A (m, n) of full row rank; A, b optionally trainable."""

    _KIND = "affine_set"

    def __init__(self, A, b, trainable_params=False, **kwargs):
        super().__init__(A=A, b=b, trainable_params=trainable_params, **kwargs)


@_register
class SOCProjection(_FixedKindProjection):
    """Projection onto the second-order cone {(t, v) : ||v|| <= t}, t first (SCS order)."""

    _KIND = "second_order_cone"

    def __init__(self, **kwargs):
        kwargs.pop("trainable_params", None)
        super().__init__(**kwargs)


@_register
class PSDProjection(_FixedKindProjection):
    """Projection of matrices (batch, ..., n, n) onto the PSD cone (symmetrized first)."""

    _KIND = "psd_cone"

    def __init__(self, **kwargs):
        kwargs.pop("trainable_params", None)
        super().__init__(**kwargs)


@_register
class ExpConeProjection(_FixedKindProjection):
    """Projection onto the exponential cone; the last axis holds (x, y, z) (SCS order)."""

    _KIND = "exp_cone"

    def __init__(self, **kwargs):
        kwargs.pop("trainable_params", None)
        super().__init__(**kwargs)
