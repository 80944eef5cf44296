"""`QuadraticProgram`: a differentiable, batched convex QP as a Keras layer.

    z*(theta) = argmin_z 1/2 z^T Q z + q^T z   s.t.   A z = b,   G z <= h

Each of Q, q, A, b, G, h is either

* a **layer input** (a batched tensor, leading batch axis): pass it in `call`, or
* a **constant** given at construction as an array (stored as a non-trainable
  weight), made **learnable** by naming it in `trainable=(...)`, or
* **absent**: Q = 0 (a linear program), q = 0, no equality constraints (A, b),
  no inequality constraints (G, h). A and b (G and h) come as a pair.

Shapes (batch axis only on inputs): Q (n, n), q (n,), A (p, n), b (p,), G (m, n),
h (m,). Q must be symmetric positive semidefinite; only its symmetric part
(Q + Q^T)/2 is used, so gradients w.r.t. Q are symmetric.

Forward: OSQP-style ADMM with per-row adaptive rho, infeasibility detection and
polishing (`keras_implicit.programs.qp_admm`), one fixed-shape `tf.while_loop`, XLA-compilable.
Backward: implicit differentiation of the KKT conditions at the solution, one dense
solve per row (exact; the problems a layer holds are small). Rows whose status is not
SOLVED get a zero gradient; the others are unaffected.

Outputs: z (B, n); with `return_duals=True` also nu (B, p) (equality duals) and
lam (B, m) (inequality duals, >= 0); with `return_status=True` also status (B,)
int32: 0 solved, 1 max_iter, 2 primal infeasible, 3 dual infeasible (unbounded),
4 numerical error (non-finite input or iterate), 5 non_convex (Q not PSD).
Rows not solved hold the last iterate (NaN for non-finite inputs and non-convex
rows): mask them with the status.

PSD check on Q: an array Q given at construction (constant or trainable) is checked
there, and a non-PSD one raises a ValueError quoting the minimum eigenvalue of
(Q + Q^T)/2. A batched input Q, and a trainable Q (which training may move out of
the cone), are checked per row at every call: a row whose symmetric part has an
eigenvalue below -tol * max(1, ||(Q + Q^T)/2||_F) (tol 1e-8 in float64, 1e-5
otherwise) is not solved, gets status 5 (non_convex), NaN outputs and a zero
gradient, and is reported under `on_failure` ("warn" / "raise" / "ignore") like any
other unsolved row; the other rows are unaffected.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import keras
import tensorflow as tf

from keras_implicit import _validation
from keras_implicit.layers._program import ProgramLayer
from keras_implicit.programs import qp_admm
from keras_implicit.programs._admm import STATUS_NAMES
from keras_implicit.programs.qp import NAMES, check_psd_array, solve_qp

__all__ = ["QuadraticProgram", "solve_qp"]

# which axis of each parameter (unbatched) is n, p (equalities) or m (inequalities)
_DIMS = {
    "Q": ("n", "n"),
    "q": ("n",),
    "A": ("p", "n"),
    "b": ("p",),
    "G": ("m", "n"),
    "h": ("m",),
}


@keras.saving.register_keras_serializable(package="keras_implicit")
class QuadraticProgram(ProgramLayer):
    """Batched differentiable QP  min 1/2 z^T Q z + q^T z  s.t.  A z = b,  G z <= h.

    Args:
      Q, q, A, b, G, h: arrays for the parameters held by the layer (see the module
        docstring); `None` for those passed in `call` or absent.
      trainable: names (subset of the arrays given) that become trainable weights.
      input_names: the parameters `call` receives, in order, when `call` gets a
        list/tuple or a single tensor. Default: all names not given as arrays, in
        the order Q, q, A, b, G, h. Not needed when `call` gets a dict.
      return_duals: also return nu (equalities) and lam (inequalities).
      return_status: also return the int32 status per row (0 = solved).
      tol: absolute and relative tolerance of the ADMM residuals (default 1e-6 in
        float64, 1e-4 in float32; polishing usually ends far below it). Rows whose data
        is smaller than 1 are measured in normalized units (see `solve_qp`); a tol below
        100 machine epsilons of the solve dtype is raised to that floor, with one
        warning per layer.
      max_iter: maximum ADMM iterations. rho, sigma, alpha: ADMM step, proximal
        regularization and over-relaxation (OSQP's meaning). check_interval:
        iterations between convergence checks / rho updates. polish: finish with a
        direct KKT solve on the detected active set. scaling: passes of Ruiz
        equilibration (OSQP's problem scaling) before ADMM, so that problems whose
        variables or constraints are in very different units do not need many more
        iterations; 0 turns it off. Tolerances, duals and outputs are always in the
        original units.
      on_failure: "warn" (default), "raise" or "ignore" for rows not solved (same
        semantics as `ki.fixed_point` and `ConeProgram`; under XLA, "raise" sets those
        rows to NaN and the status output carries the rest).

    Under a mixed precision policy the solve runs in float32 (Cholesky has no half
    kernel) and the outputs come back in the compute dtype.

    Call:
      inputs: dict name -> batched tensor, or list/tuple (see `input_names`), or one
        tensor when exactly one parameter is an input.
    """

    STATUS_NAMES: ClassVar[dict] = dict(STATUS_NAMES)
    _NAMES = NAMES
    _DIMS = _DIMS
    _SIZE_LABEL = "QP"

    def __init__(
        self,
        Q=None,
        q=None,
        A=None,
        b=None,
        G=None,
        h=None,
        trainable_params=(),
        input_names=None,
        return_duals=False,
        return_status=False,
        tol=None,
        max_iter=4000,
        rho=0.1,
        sigma=1e-6,
        alpha=1.6,
        check_interval=25,
        polish=True,
        scaling=10,
        on_failure="warn",
        **kwargs,
    ):
        # `trainable=(names)` names trainable parameters; Keras' boolean `trainable` passes
        if "trainable" in kwargs and not isinstance(kwargs["trainable"], bool):
            trainable_params = kwargs.pop("trainable")
        super().__init__(**kwargs)
        arrays = {"Q": Q, "q": q, "A": A, "b": b, "G": G, "h": h}
        self._hold_parameters(
            arrays, trainable_params, input_names, return_duals, return_status, on_failure
        )
        if "Q" in self._arrays:
            check_psd_array(self._arrays["Q"])
        admm = self._admm_settings(tol, max_iter, rho, sigma, alpha, check_interval)
        self.settings = qp_admm.Settings(
            **admm,
            polish=bool(polish),
            scaling=_validation.non_negative_int("scaling", scaling),
        )
        wide = self._solve_dtype() == tf.float64
        tols = self._solve_tols({"tol": self.settings.tol}, {"tol": 1e-6 if wide else 1e-4})
        self._solve_settings = dataclasses.replace(self.settings, **tols)

    # ------------------------------------------------------------ inputs and shapes

    def _check_shapes(self, shapes):
        """n, p, m from the arrays and input shapes (batched: leading axis dropped)."""
        sizes = self._resolve_sizes(shapes)
        given = set(self._arrays) | set(shapes)
        for a, c in (("A", "b"), ("G", "h")):
            if (a in given) != (c in given):
                have, miss = (a, c) if a in given else (c, a)
                raise ValueError(
                    f"`{a}` and `{c}` come as a pair: `{have}` is given but `{miss}` is neither "
                    f"an array nor an input. Received: {sorted(given)}"
                )
        if "n" not in sizes:
            raise ValueError(
                "Cannot infer the number of variables n: give Q, q, A or G (array or input "
                f"with a known last axis). Received: {sorted(given)}"
            )
        return {d: sizes.get(d, 0) for d in ("n", "p", "m")}

    def build(self, input_shape):
        shapes = self._normalize(input_shape)
        if not shapes:
            raise ValueError("QuadraticProgram needs at least one batched input.")
        sizes = self._check_shapes(shapes)
        self._n, self._p, self._m = sizes["n"], sizes["p"], sizes["m"]
        super().build(input_shape)

    def _dual_sizes(self, sizes):
        return sizes["p"], sizes["m"]

    def _solve(self, inputs, dtype):
        n, p, m = self._n, self._p, self._m
        absent = {"Q": [n, n], "q": [n], "A": [p, n], "b": [p], "G": [m, n], "h": [m]}
        params, batched = {}, {}
        for k in NAMES:
            params[k] = self._parameter(inputs, k, dtype)
            batched[k] = k in inputs
            if params[k] is None:
                params[k] = tf.zeros(absent[k], dtype)
        check = batched["Q"] or "Q" in self.trainable_params
        x, nu, lam, status, _ = solve_qp(
            params,
            batched,
            self._solve_settings,
            check_psd=check,
            backward_on_failure=self.on_failure,
        )
        return x, (nu, lam), status

    def get_config(self):
        config = super().get_config()
        config.update(self._program_config())
        s = self.settings
        config.update(
            tol=s.tol,
            max_iter=s.max_iter,
            rho=s.rho,
            sigma=s.sigma,
            alpha=s.alpha,
            check_interval=s.check_interval,
            polish=s.polish,
            scaling=s.scaling,
        )
        return config
