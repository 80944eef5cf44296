"""`ConeProgram`: a differentiable, batched conic program as a Keras layer.

    x*(c, A, b) = argmin_x c^T x   s.t.   A x + s = b,   s in K

K is a product of cones given by an SCS-style spec dict, in this order along s:
``{"z": 2, "l": 3, "q": [3], "s": [2], "ep": 1}``
  z   zero cone of that dimension (equalities A_i x = b_i)
  l   nonnegative orthant (inequalities A_i x <= b_i)
  q   list of second-order cone sizes; each block (t, v) with ||v|| <= t (t first)
  s   list of PSD matrix orders k; each block holds k(k+1)/2 entries, SCS's
      vectorization: the lower triangle column by column, off-diagonal entries
      scaled by sqrt(2) (so that the vector inner product is the trace one)
  ep  number of exponential cones, each (x, y, z) with y exp(x/y) <= z

Forward (`keras_implicit.programs.cone`): ADMM on the splitting A x + s = b, s in K (the
conic operator splitting of Garstka, Cannon, Goulart, "COSMO", JOTA 2021, a
generalization of OSQP's): the x-update solves (sigma I + rho A^T A) x = ... with an
explicit per-row inverse, the s-update projects onto K with the `keras_implicit.ops`
cone projections. We use this rather than SCS's homogeneous self-dual embedding because
the iterate (x, s, y) is the primal-dual solution itself, so the solution map is
directly the fixed point of one map. Per-row convergence checks (primal/dual residuals),
frozen finished rows. Infeasibility: every `check_interval` steps the iterate
differences are tested as certificates (COSMO's, the ADMM analogue of SCS's tau -> 0,
kappa > 0 rays of the homogeneous embedding): dy in K*, A^T dy ~ 0, b^T dy < 0 flags a
row primal infeasible; -A dx in K, c^T dx < 0 flags it dual infeasible (unbounded). Both
tests are relative to the size of the difference, with tolerance 1e-5 (at least 1e3
machine epsilons of the solve dtype: float32 rounding hides smaller ones).

Backward: implicit differentiation of that fixed point with `ki.custom_fixed_point`
(matrix-free GMRES on (I - J^T) u = g, J the Jacobian of the ADMM map, whose cone
projections contribute their closed-form Jacobians). Rows whose status is not 0
(solved) get an exactly zero gradient; the other rows are unaffected.

Outputs: x (B, n); with `return_duals=True` also y (B, m) (the dual, in K*); with
`return_status=True` also status (B,) int32, the codes of `QuadraticProgram`:
0 solved, 1 max_iter, 2 primal infeasible, 3 dual infeasible (unbounded),
4 numerical error (`ConeProgram.STATUS_NAMES`). Rows not solved hold the last
iterate: mask them with the status. They are reported under `on_failure` ("warn",
"raise" or "ignore"), through the same policy as `QuadraticProgram`, and so are rows
whose gradient solve (GMRES) does not reach `backward_tol` ("custom_fixed_point:
backward linear solve (gmres) did not converge ...").
"""

from __future__ import annotations

from typing import ClassVar

import keras
import tensorflow as tf

from keras_implicit import _validation
from keras_implicit.layers._program import ProgramLayer
from keras_implicit.programs.cone import (
    STATUS_NAMES,
    cone_dim,
    project_cone,
    solve_cone_program,
    validate_cone,
)

__all__ = ["ConeProgram", "project_cone", "validate_cone"]

INPUT_NAMES = ("c", "A", "b")
# P (a quadratic objective) is an input only when named: in a dict or in `input_names`
ALL_INPUT_NAMES = (*INPUT_NAMES, "P")


@keras.saving.register_keras_serializable(package="keras_implicit")
class ConeProgram(ProgramLayer):
    """Batched differentiable conic program  min 1/2 x'Px + c'x  s.t.  A x + s = b,  s in K.

    P (positive semidefinite, (B, n, n)) is optional: pass it in the input dict (or name
    it in `input_names`) for a quadratic objective; without it the objective is c'x.

    Args:
      cone: SCS-style dict (see the module docstring).
      A, b: optional arrays held by the layer (constant; learnable if named in
        `trainable_params`); otherwise passed in `call`.
      input_names: the parameters `call` receives, in order, when `call` gets a
        list/tuple or a single tensor. Default: those of c, A, b not given as arrays,
        in that order. Not needed when `call` gets a dict.
      return_duals, return_status: extra outputs (dual y in K*, int32 status).
      tol: ADMM tolerance (default 1e-7 in float64, 1e-4 otherwise). max_iter, rho
        (the step size; 0.3, the fastest start on benchmarks/bench_cvxpy_layer.py's
        problems), sigma, alpha, check_interval: ADMM settings.
      adaptive_rho: rebalance each row's step size rho from its primal and dual
        residuals every `check_interval` steps (`rho` is then the initial value).
        The solution does not depend on rho; the number of iterations does.
      backward_tol, backward_max_iter: the GMRES solve of the implicit gradient
        (backward_tol default 1e-9 in float64, 1.2e-5 otherwise). Tolerances below 100
        machine epsilons of the solve dtype are raised to that floor, with one warning.
      on_failure: "warn" (default), "raise" or "ignore" for rows not solved, as for
        `QuadraticProgram` (under XLA: "raise" sets those rows to NaN; read the status),
        and for rows whose gradient solve does not converge.

    STATUS_NAMES: status code -> name (0 solved, 1 max_iter, 2 primal_infeasible,
      3 dual_infeasible, 4 numerical_error), as for QuadraticProgram.

    Call: a dict with "c" (B, n) and, unless held by the layer, "A" (B, m, n) and
    "b" (B, m) (m must equal the cone dimension); or a list/tuple in the order of
    `input_names`; or one tensor when exactly one parameter is an input.
    Under a mixed precision policy the solve runs in float32 and the outputs come
    back in the compute dtype.
    """

    STATUS_NAMES: ClassVar[dict] = STATUS_NAMES
    _NAMES = ALL_INPUT_NAMES
    _DIMS: ClassVar[dict] = {"c": ("n",), "A": ("m", "n"), "b": ("m",), "P": ("n", "n")}
    _SIZE_LABEL = "ConeProgram"

    def __init__(
        self,
        cone,
        A=None,
        b=None,
        trainable_params=(),
        input_names=None,
        return_duals=False,
        return_status=False,
        tol=None,
        max_iter=5000,
        rho=0.3,
        adaptive_rho=True,
        sigma=1e-6,
        alpha=1.6,
        check_interval=25,
        backward_tol=None,
        backward_max_iter=200,
        on_failure="warn",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.cone = validate_cone(cone)
        self._cone_config = dict(cone)
        self._hold_parameters(
            {"A": A, "b": b}, trainable_params, input_names, return_duals, return_status, on_failure
        )
        m = cone_dim(self.cone)
        for k, axis, what in (("A", 0, "rows"), ("b", 0, "entries")):
            if k in self._arrays and self._arrays[k].shape[axis] != m:
                raise ValueError(
                    f"{k} must have {m} {what} (the cone dimension of {self._cone_config}). "
                    f"Received: {k}.shape={self._arrays[k].shape}"
                )
        settings = self._admm_settings(tol, max_iter, rho, sigma, alpha, check_interval)
        self.settings = dict(
            settings,
            adaptive_rho=bool(adaptive_rho),
            backward_tol=(
                None
                if backward_tol is None
                else _validation.positive_float("backward_tol", backward_tol)
            ),
            backward_max_iter=_validation.positive_int("backward_max_iter", backward_max_iter),
        )
        wide = self._solve_dtype() == tf.float64
        # float32's default backward_tol is the floor itself
        defaults = {"tol": 1e-7 if wide else 1e-4, "backward_tol": 1e-9 if wide else 0.0}
        given = {k: self.settings[k] for k in defaults}
        self._solve_settings = {**self.settings, **self._solve_tols(given, defaults)}

    def _names_for(self, inputs):
        if isinstance(inputs, dict) or (self.input_names and "P" in self.input_names):
            return ALL_INPUT_NAMES
        return INPUT_NAMES

    def _check_shapes(self, shapes):
        """Ranks, n and m of the input shapes (batch axis first); unknown sizes pass."""
        for k in ("A", "b"):
            if (k in shapes) == (k in self._arrays):
                raise ValueError(
                    f"`{k}` must be either a layer array or an input, not both/neither. "
                    f"Received input keys {sorted(shapes)} with arrays {sorted(self._arrays)}"
                )
        if "c" not in shapes:
            raise ValueError(
                f"ConeProgram needs `c` as an input. Received input keys {sorted(shapes)}"
            )
        return self._resolve_sizes(shapes, known={"m": (cone_dim(self.cone), "the cone")})

    def _dual_sizes(self, sizes):
        return (sizes["m"],)

    def _solve(self, inputs, dtype):
        c = self._parameter(inputs, "c", dtype)
        batch = tf.shape(c)[0]

        def batched(k):
            t = self._parameter(inputs, k, dtype)
            if k in inputs:
                return t
            return tf.broadcast_to(t, tf.concat([[batch], tf.shape(t)], 0))

        P = self._parameter(inputs, "P", dtype)
        # a row whose gradient solve fails is reported under the layer's policy too
        settings = {**self._solve_settings, "backward_on_failure": self.on_failure}
        x, y, status = solve_cone_program(c, batched("A"), batched("b"), self.cone, settings, P)
        return x, (y,), status

    def get_config(self):
        config = super().get_config()
        config.update(self._program_config())
        config.update(cone=self._cone_config, **self.settings)
        return config
