"""The failure policy: what happens when a solve does not reach its tolerance.

The paper's condition for trusting an implicit gradient is that the implicit linear
system is invertible; in practice the symptom is a solve that does not converge.
That must never pass silently. Eagerly we warn or raise in Python; in a graph we use
`tf.print` / `tf.debugging.Assert`; under XLA neither exists at run time (XLA drops
Assert ops and cannot compile prints), so there the outcome is carried by the
returned `SolverStats` and, for "raise", by NaN in the failed rows so that the failure
cannot be mistaken for a result.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import tensorflow as tf

from keras_implicit import _validation
from keras_implicit.errors import ConvergenceError, ConvergenceWarning

POLICIES = ("warn", "raise", "ignore")


def check_policy(on_failure: str) -> str:
    return _validation.one_of("on_failure", on_failure, POLICIES)


def in_xla_context() -> bool:
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - TF layout changed
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


_warned_xla = set()
_LIBRARY_PATHS = (
    "keras_implicit",
    "tensorflow",
    "keras",
    "tensorflow_probability",
    "<frozen",
    "__autograph_generated",
)


def user_stacklevel() -> int:
    """The `stacklevel` that makes a warning point at the first caller outside the libraries."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if not any(f"/{name}" in path or path.startswith(name) for name in _LIBRARY_PATHS):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def _xla_notice(what: str, on_failure: str, hint: str | None = None) -> None:
    # once per process, entry point and policy: a compiled training step would otherwise
    # repeat it
    if (what, on_failure) in _warned_xla:
        return
    _warned_xla.add((what, on_failure))
    outcome = (
        "failed rows are set to NaN"
        if on_failure == "raise"
        else hint
        or "read failures from the returned SolverStats (return_stats=True) or the layer metrics"
    )
    warnings.warn(
        f"{what}: on_failure={on_failure!r} cannot print or raise inside an XLA-compiled "
        f"function; {outcome}.",
        ConvergenceWarning,
        stacklevel=user_stacklevel(),
    )


# Solvers iterating in a floating dtype cannot push relative residuals much below its
# roundoff: a tolerance under the floor is raised to it instead of ending every row at
# max_iter. Convex-program ADMM (QP, cone programs) accumulates roundoff over its
# splitting and certificates: TOL_FLOOR_ULPS machine epsilons (float32: 1.19e-5,
# float64: 2.2e-14). A fixed point, root or argmin residual is relative to the iterate
# and bounded below by about one epsilon of fn's dtype: RESIDUAL_FLOOR_ULPS.
TOL_FLOOR_ULPS = 100
RESIDUAL_FLOOR_ULPS = 2
_HALF_EPS = {tf.float16: 2.0**-10, tf.bfloat16: 2.0**-7}


def machine_eps(dtype) -> float:
    """Machine epsilon of a floating dtype, half precision (bfloat16 too) included."""
    dtype = tf.as_dtype(dtype)
    return _HALF_EPS.get(dtype) or float(np.finfo(dtype.as_numpy_dtype).eps)


def tol_floor(dtype, ulps: float = TOL_FLOOR_ULPS) -> float:
    """The smallest tolerance a solve in `dtype` is asked for: `ulps` machine epsilons."""
    return float(ulps * machine_eps(dtype))


_floor_warned = set()


def floored_tols(
    tols: dict, dtype, *, what: str, ulps: float = TOL_FLOOR_ULPS, once: bool = False
) -> dict:
    """`tols` (name -> value) raised to `tol_floor(dtype)`; one warning names the raised ones.

    Callers that hold state (a layer) call it once, so the warning is given once;
    stateless callers (the functional API) pass `once=True`: one warning per process
    and (what, settings, dtype).
    """
    dtype = tf.as_dtype(dtype)
    floor = tol_floor(dtype, ulps)
    low = {name: value for name, value in tols.items() if value < floor}
    key = (what, tuple(low.items()), dtype.name, ulps)
    if low and not (once and key in _floor_warned):
        _floor_warned.add(key)
        given = ", ".join(f"{name}={value:.3g}" for name, value in low.items())
        names = ", ".join(f"{name}={floor:.3g}" for name in low)
        received = ", ".join(f"{name}={value!r}" for name, value in low.items())
        verb = "is" if len(low) == 1 else "are"
        warnings.warn(
            f"{what}: {given} {verb} below what a solve in {dtype.name} can reach "
            f"({ulps:g} machine epsilons); using {names}. Received: {received}",
            ConvergenceWarning,
            stacklevel=user_stacklevel(),
        )
    return {name: max(value, floor) for name, value in tols.items()}


def apply(
    packed,
    converged: tf.Tensor,
    residual: tf.Tensor | None = None,
    *,
    on_failure: str,
    what: str,
    tol: float | None = None,
    iterations=None,
    message=None,
    graph_message: str | None = None,
    xla_hint: str | None = None,
):
    """Applies the policy to `packed` (a [B, ...] tensor or a structure of them).

    converged: per-row bool [B]; residual: per-row residual [B] (optional when
    `message` is given). message: optional callable taking the numpy bool mask of the
    failed rows and returning the eager warning/error text; by default the text names
    the worst residual against `tol`. graph_message: the text printed (or asserted) in
    a graph before the count of failed rows. xla_hint: where to read failures under XLA
    (said once, with "warn").
    Returns `packed`, possibly with control dependencies (graph) or NaN rows (XLA, raise).
    """
    if on_failure == "ignore":
        return packed
    if tf.executing_eagerly():
        ok = converged.numpy()
        if not ok.all():
            bad = ~ok
            if message is not None:
                msg = message(bad)
            else:
                res = residual.numpy()
                iters = (
                    ""
                    if iterations is None
                    else f" after {int(tf.reduce_max(iterations))} iterations"
                )
                msg = (
                    f"{what} did not converge for {int(bad.sum())} of {bad.size} batch "
                    f"elements{iters} (worst residual {float(res[bad].max()):.3g}, tol "
                    f"{tol:.3g}). The result (and any implicit gradient built on it) is not "
                    "trustworthy; raise max_iter, loosen tol, or check invertibility with "
                    "ki.diagnostics."
                )
            if on_failure == "raise":
                raise ConvergenceError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=user_stacklevel())
        return packed
    if in_xla_context():
        _xla_notice(what, on_failure, xla_hint)
        if on_failure == "raise":

            def poison(t):
                nan = tf.constant(float("nan"), t.dtype)
                mask = tf.reshape(converged, [-1] + [1] * (t.shape.rank - 1))
                return tf.where(mask, t, nan)

            packed = tf.nest.map_structure(poison, packed)
        return packed
    all_ok = tf.reduce_all(converged)
    n_bad = tf.reduce_sum(tf.cast(tf.logical_not(converged), tf.int32))
    if graph_message is None:
        graph_message = f"{what} did not converge (tol {tol:.3g}); failed elements:"
    details = [graph_message, n_bad]
    if residual is not None:
        worst = tf.reduce_max(tf.where(converged, tf.zeros_like(residual), residual))
        details += ["worst residual:", worst]
    if on_failure == "raise":
        check = tf.debugging.Assert(all_ok, details)
    else:

        def report():
            with tf.control_dependencies(
                [tf.print("ConvergenceWarning:", *details, output_stream=sys.stderr)]
            ):
                return tf.constant(True)

        check = tf.cond(all_ok, lambda: tf.constant(True), report)
    with tf.control_dependencies([check]):
        return tf.nest.map_structure(tf.identity, packed)
