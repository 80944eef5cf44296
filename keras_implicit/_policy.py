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


def _xla_notice(what: str, on_failure: str) -> None:
    # once per process and policy: a compiled training step would otherwise repeat it
    if on_failure in _warned_xla:
        return
    _warned_xla.add(on_failure)
    outcome = (
        "failed rows are set to NaN"
        if on_failure == "raise"
        else "read failures from the returned SolverStats (return_stats=True) or the layer metrics"
    )
    warnings.warn(
        f"{what}: on_failure={on_failure!r} cannot print or raise inside an XLA-compiled "
        f"function; {outcome}.",
        ConvergenceWarning,
        stacklevel=user_stacklevel(),
    )


def apply(
    packed: tf.Tensor,
    converged: tf.Tensor,
    residual: tf.Tensor,
    *,
    on_failure: str,
    what: str,
    tol: float,
    iterations=None,
) -> tf.Tensor:
    """Applies the policy to `packed` ([B, D]) given per-row `converged` and `residual`.

    Returns `packed`, possibly with control dependencies (graph) or NaN rows (XLA, raise).
    """
    if on_failure == "ignore":
        return packed
    if tf.executing_eagerly():
        ok = converged.numpy()
        if not ok.all():
            res = residual.numpy()
            bad = ~ok
            iters = (
                "" if iterations is None else f" after {int(tf.reduce_max(iterations))} iterations"
            )
            msg = (
                f"{what} did not converge for {int(bad.sum())} of {bad.size} batch elements"
                f"{iters} (worst residual {float(res[bad].max()):.3g}, tol {tol:.3g}). "
                "The result (and any implicit gradient built on it) is not trustworthy; "
                "raise max_iter, loosen tol, or check invertibility with ki.diagnostics."
            )
            if on_failure == "raise":
                raise ConvergenceError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=user_stacklevel())
        return packed
    if in_xla_context():
        _xla_notice(what, on_failure)
        if on_failure == "raise":
            nan = tf.constant(float("nan"), packed.dtype)
            packed = tf.where(converged[:, None], packed, nan)
        return packed
    all_ok = tf.reduce_all(converged)
    n_bad = tf.reduce_sum(tf.cast(tf.logical_not(converged), tf.int32))
    worst = tf.reduce_max(tf.where(converged, tf.zeros_like(residual), residual))
    prefix = f"{what} did not converge (tol {tol:.3g}); failed elements:"
    if on_failure == "raise":
        check = tf.debugging.Assert(all_ok, [prefix, n_bad, "worst residual:", worst])
    else:

        def report():
            with tf.control_dependencies(
                [
                    tf.print(
                        "ConvergenceWarning:",
                        prefix,
                        n_bad,
                        "worst residual:",
                        worst,
                        output_stream=sys.stderr,
                    )
                ]
            ):
                return tf.constant(True)

        check = tf.cond(all_ok, lambda: tf.constant(True), report)
    with tf.control_dependencies([check]):
        return tf.identity(packed)
