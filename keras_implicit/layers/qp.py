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
polishing (see `_qp_solver`), one fixed-shape `tf.while_loop`, XLA-compilable.
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
eigenvalue below -tol * max(1, max |eigenvalue|) (tol 1e-8 in float64, 1e-5
otherwise) is not solved, gets status 5 (non_convex), NaN outputs and a zero
gradient, and is reported under `on_failure` ("warn" / "raise" / "ignore") like any
other unsolved row; the other rows are unaffected.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from keras_implicit import _policy, _validation
from keras_implicit._structure import compute_dtype
from keras_implicit.layers import _qp_solver as qps

__all__ = ["QuadraticProgram", "solve_qp"]

NAMES = ("Q", "q", "A", "b", "G", "h")
_RANK = {"Q": 2, "q": 1, "A": 2, "b": 1, "G": 2, "h": 1}
# which axis of each parameter (unbatched) is n, p (equalities) or m (inequalities)
_DIMS = {
    "Q": ("n", "n"),
    "q": ("n",),
    "A": ("p", "n"),
    "b": ("p",),
    "G": ("m", "n"),
    "h": ("m",),
}
NOT_CONVEX = 5  # Q (a batched input or a trained weight) is not PSD
STATUS_NAMES = dict(qps.STATUS_NAMES)
STATUS_NAMES[NOT_CONVEX] = "non_convex"


# ------------------------------------------------------------------ functional core


def _kkt_residual(x, nu, lam, mask_in, Q, q, A, b, G, h):
    """F of the module docstring (batched; unbatched parameters broadcast)."""
    P = qps.symmetrize(Q)
    stat = (
        tf.linalg.matvec(P, x)
        + q
        + tf.linalg.matvec(A, nu, transpose_a=True)
        + tf.linalg.matvec(G, lam, transpose_a=True)
    )
    stat = tf.broadcast_to(stat, tf.shape(x))
    eq = tf.linalg.matvec(A, x) - b
    eq = tf.broadcast_to(eq, tf.shape(nu))
    ineq = mask_in * (tf.linalg.matvec(G, x) - h) + (1.0 - mask_in) * lam
    return tf.concat([stat, eq, ineq], axis=-1)


def _rows_finite(t, batched):
    if not batched:
        return None
    axes = list(range(1, t.shape.rank))
    return tf.reduce_all(tf.math.is_finite(t), axis=axes) if axes else tf.math.is_finite(t)


def psd_tolerance(dtype) -> float:
    """Relative tolerance of the PSD check: min eig >= -tol * max(1, max |eig|)."""
    return 1e-8 if tf.as_dtype(dtype) == tf.float64 else 1e-5


def psd_rows(Q):
    """Per row (B,) bool: is the symmetric part of Q (B, n, n) PSD (within tolerance)."""
    eig = tf.linalg.eigvalsh(qps.symmetrize(Q))
    # the appended 0 / 1 keep n = 0 (empty Q) well defined
    pad = tf.zeros(tf.concat([tf.shape(eig)[:-1], [1]], 0), Q.dtype)
    scale = tf.maximum(tf.reduce_max(tf.abs(tf.concat([eig, pad], -1)), axis=-1), 1.0)
    smallest = tf.reduce_min(tf.concat([eig, pad], -1), -1)
    return smallest >= -psd_tolerance(Q.dtype) * scale


def check_psd_array(Q):
    """Raises a ValueError quoting the minimum eigenvalue if `Q`'s symmetric part is not PSD."""
    arr = np.asarray(Q, dtype="float64")
    if arr.size == 0:
        return
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`Q` must be finite. Received: Q={np.asarray(Q)!r}")
    eig = np.linalg.eigvalsh(0.5 * (arr + arr.T))
    tol = psd_tolerance("float64" if np.asarray(Q).dtype == np.float64 else "float32")
    bound = tol * max(1.0, float(np.abs(eig).max()))
    if eig.min() < -bound:
        raise ValueError(
            "`Q` must be symmetric positive semidefinite (only then is the QP convex); "
            f"the minimum eigenvalue of its symmetric part (Q + Q^T)/2 is {eig.min():.6g} "
            f"(tolerance {-bound:.3g}). Received: Q with eigenvalues in "
            f"[{eig.min():.6g}, {eig.max():.6g}]"
        )


def solve_qp(params: dict, batched: dict, settings: qps.Settings, check_psd=None):
    """Solves the batch of QPs; differentiable w.r.t. every floating tensor in `params`.

    params: name -> tensor for all six names (absent ones as zero-size/zero tensors).
    batched: name -> bool (True if the tensor has the leading batch axis).
    check_psd: test Q's PSD-ness per row (status 5 "non_convex" where it fails);
      default: when Q is batched.
    Returns x, nu, lam, status, iterations.

    Rows whose data is small are solved in normalized units, so that the absolute part
    of the tolerance does not swallow them: with tau = min(1, largest |b|, |h| (finite))
    and sigma = min(1, largest |Q|, |q| / tau), the QP (Q / sigma, q / (tau sigma), A,
    b / tau, G, h / tau) has the solution x* / tau and duals / (tau sigma), exactly (a
    cost of 1e-8 is solved as accurately as one of 1). Rows with data of size 1 or more
    are solved as given (Ruiz equilibration handles their units). The gradient through
    the stopped scales is exact: x* is homogeneous of degree 0 in (Q, q) and of degree
    1 in (q, b, h).
    """
    if check_psd is None:
        check_psd = batched["Q"]
    ref = next(params[k] for k in NAMES if batched[k])
    B = tf.shape(ref)[0]

    def full(name):
        t = params[name]
        return t if batched[name] else tf.broadcast_to(t, tf.concat([[B], tf.shape(t)], 0))

    Q, q, A, b, G, h = (full(k) for k in NAMES)

    def row_max(t):
        t = tf.abs(tf.stop_gradient(t))
        t = tf.where(tf.math.is_finite(t), t, tf.zeros_like(t))
        pad = tf.zeros([B, 1], t.dtype)  # keeps empty parameters (p = 0, m = 0) defined
        return tf.reduce_max(tf.concat([tf.reshape(t, [B, -1]), pad], -1), -1)

    def usable(scale):
        return tf.where(scale > 0, tf.minimum(scale, 1.0), tf.ones_like(scale))

    tau = usable(tf.maximum(row_max(b), row_max(h)))
    sigma = usable(tf.maximum(row_max(Q), row_max(q) / tau))
    normalized = {
        "Q": Q / sigma[:, None, None],
        "q": q / (tau * sigma)[:, None],
        "A": A,
        "b": b / tau[:, None],
        "G": G,
        "h": h / tau[:, None],
    }
    x, nu, lam, status, iters = _solve_normalized(
        normalized, settings, check_psd, dict.fromkeys(NAMES, True)
    )
    dual = (tau * sigma)[:, None]
    return x * tau[:, None], nu * dual, lam * dual, status, iters


def _solve_normalized(params, settings, check_psd, batched):
    with tf.name_scope("quadratic_program"):
        ref = next(params[k] for k in NAMES if batched[k])
        dtype = ref.dtype
        B = tf.shape(ref)[0]
        p = params["b"].shape[-1]
        m_in = params["h"].shape[-1]

        def full(name):
            t = tf.stop_gradient(params[name])
            if batched[name]:
                return t
            return tf.broadcast_to(t, tf.concat([[B], tf.shape(t)], axis=0))

        Q, q, A, b, G, h = (full(k) for k in NAMES)
        # rows with non-finite data are replaced by a trivial problem and flagged
        ok_in = tf.ones([B], tf.bool)
        for k in NAMES:
            f = _rows_finite(params[k], batched[k])
            if f is not None:
                ok_in &= f
        ok3, ok2 = ok_in[:, None, None], ok_in[:, None]
        n = tf.shape(q)[-1]
        Q = tf.where(ok3, Q, tf.eye(n, batch_shape=[B], dtype=dtype))
        # rows whose Q is not PSD (a nonconvex QP) are treated the same way
        convex = tf.ones([B], tf.bool)
        if check_psd:
            convex = psd_rows(Q)
            ok_in &= convex
            ok3, ok2 = ok_in[:, None, None], ok_in[:, None]
            Q = tf.where(ok3, Q, tf.eye(n, batch_shape=[B], dtype=dtype))
        q, b, h = (tf.where(ok2, t, tf.zeros_like(t)) for t in (q, b, h))
        A, G = (tf.where(ok3, t, tf.zeros_like(t)) for t in (A, G))

        P = qps.symmetrize(Q)
        C = tf.concat([A, G], axis=-2)
        inf = tf.fill([B, m_in], tf.constant(np.inf, dtype))
        lower = tf.concat([b, -inf], axis=-1)
        upper = tf.concat([b, h], axis=-1)
        is_eq = tf.broadcast_to(
            tf.concat([tf.ones([p], tf.bool), tf.zeros([m_in], tf.bool)], axis=0), [B, p + m_in]
        )
        x, y, status, iters = qps.admm(P, q, C, lower, upper, is_eq, settings)
        status = tf.where(ok_in, status, tf.where(convex, qps.NUMERICAL_ERROR, NOT_CONVEX))
        nan = tf.constant(np.nan, dtype)
        x = tf.where(ok2, x, nan)
        y = tf.where(ok2, y, nan)
        x, y, status, iters = (tf.stop_gradient(t) for t in (x, y, status, iters))
        nu, lam = y[:, :p], y[:, p:]
        mask_in = tf.cast(tf.not_equal(lam, 0.0), dtype)

        values = [params[k] for k in NAMES]

        @tf.custom_gradient
        def attach(*theta):
            def grad(g_x, g_nu, g_lam):
                return _backward(g_x, g_nu, g_lam, theta)

            return (tf.identity(x), tf.identity(nu), tf.identity(lam)), grad

        def _backward(g_x, g_nu, g_lam, theta):
            g = tf.concat(
                [
                    tf.zeros_like(t) if gt is None else tf.cast(gt, dtype)
                    for gt, t in ((g_x, x), (g_nu, nu), (g_lam, lam))
                ],
                axis=-1,
            )
            mask = tf.concat([tf.ones_like(nu), mask_in], axis=-1)
            K = qps.kkt_matrix(P, C, mask)
            w = qps.qr_solve(K, g, adjoint=True)
            ok = (
                tf.equal(status, qps.SOLVED)
                & tf.reduce_all(tf.math.is_finite(w), axis=-1)
                & tf.reduce_all(tf.math.is_finite(g), axis=-1)
            )
            w = tf.where(ok[:, None], w, tf.zeros_like(w))
            # evaluate F's VJP at zeros on bad rows: 0 * NaN would leak into shared weights
            safe = [
                tf.where(tf.reshape(ok, [-1] + [1] * (t.shape.rank - 1)), t, tf.zeros_like(t))
                if batched[k]
                else t
                for k, t in zip(NAMES, theta)
            ]
            xs, nus, lams = (tf.where(ok[:, None], t, tf.zeros_like(t)) for t in (x, nu, lam))
            with tf.GradientTape() as tape:
                tape.watch(safe)
                F = _kkt_residual(xs, nus, lams, mask_in, *safe)
            grads = tape.gradient(
                F, safe, output_gradients=-w, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            return grads

        x, nu, lam = attach(*values)
        return x, nu, lam, status, iters


# ------------------------------------------------------------------ the layer


def report_status(outputs, status, on_failure, what):
    """The failure policy (`_policy.apply`) driven by the per-row status of a program.

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
        tf.equal(status, qps.SOLVED),
        on_failure=on_failure,
        what=what,
        message=message,
        graph_message=f"{what}: problems not solved (see the status output):",
        xla_hint="read failures from the status output (return_status=True)",
    )


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


def _as_array(name, value):
    arr = np.asarray(value)
    if arr.ndim != _RANK[name] or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(
            f"`{name}` must be a numeric array of rank {_RANK[name]} "
            f"(shape {tuple(_DIMS[name])}). Received: {name} with shape {arr.shape}"
        )
    return arr


def program_output_spec(layer, shapes):
    """Output specs of a convex-program layer: solution [, duals] [, int32 status].

    `shapes` is what the layer's compute_output_shape returned (one shape, or a tuple
    when duals or status are returned too).
    """
    single = not (layer.return_duals or layer.return_status)
    shapes = [shapes] if single else list(shapes)
    specs = [keras.KerasTensor(s, dtype=layer.compute_dtype) for s in shapes]
    if layer.return_status:
        specs[-1] = keras.KerasTensor(shapes[-1], dtype="int32")
    return specs[0] if single else tuple(specs)


@keras.saving.register_keras_serializable(package="keras_implicit")
class QuadraticProgram(keras.layers.Layer):
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

    STATUS_NAMES = STATUS_NAMES

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
        # accept the brief's spelling `trainable=(names)` without clobbering Keras'
        # boolean `trainable`
        if "trainable" in kwargs and not isinstance(kwargs["trainable"], bool):
            trainable_params = kwargs.pop("trainable")
        super().__init__(**kwargs)
        given = {"Q": Q, "q": q, "A": A, "b": b, "G": G, "h": h}
        self._arrays = {k: _as_array(k, v) for k, v in given.items() if v is not None}
        if "Q" in self._arrays:
            check_psd_array(self._arrays["Q"])
        if isinstance(trainable_params, str):
            trainable_params = (trainable_params,)
        trainable_params = tuple(trainable_params or ())
        for k in trainable_params:
            if k not in self._arrays:
                raise ValueError(
                    "`trainable_params` may only name parameters given as arrays "
                    f"({sorted(self._arrays)}). Received: trainable_params={trainable_params!r}"
                )
        self.trainable_params = trainable_params
        self.input_names = check_input_names(input_names, NAMES, self._arrays)
        self.return_duals = bool(return_duals)
        self.return_status = bool(return_status)
        self.settings = qps.Settings(
            tol=None if tol is None else _validation.positive_float("tol", tol),
            max_iter=_validation.positive_int("max_iter", max_iter),
            rho=_validation.positive_float("rho", rho),
            sigma=_validation.positive_float("sigma", sigma),
            alpha=_validation.float_in_range("alpha", alpha, 0.0, 2.0, low_open=True),
            check_interval=_validation.positive_int("check_interval", check_interval),
            polish=bool(polish),
            scaling=_validation.non_negative_int("scaling", scaling),
        )
        if alpha >= 2.0:
            raise ValueError(f"`alpha` must be in (0, 2). Received: alpha={alpha!r}")
        self.on_failure = _policy.check_policy(on_failure)
        # the settings the solve runs with: tol resolved and floored for the solve dtype
        # (warned once here, not at every call)
        dtype = solve_dtype(self)
        solve_settings = qps.resolve(self.settings, dtype)
        floored = _policy.floored_tols({"tol": solve_settings.tol}, dtype, what="QuadraticProgram")
        self._solve_settings = dataclasses.replace(solve_settings, **floored)
        self._weights_by_name = {}
        self._input_keys = None

    # ------------------------------------------------------------ inputs and shapes

    def _normalize(self, inputs):
        """inputs -> dict name -> value (tensor or shape)."""
        return normalize_inputs(inputs, NAMES, self._arrays, self.input_names, "QuadraticProgram")

    def _sizes(self, shapes):
        """Resolves n, p, m from arrays and input shapes (batched: leading axis dropped)."""
        sizes = {}
        sources = {k: tuple(v.shape) for k, v in self._arrays.items()}
        for k, s in shapes.items():
            s = tuple(s)
            if len(s) != _RANK[k] + 1:
                raise ValueError(
                    f"Input `{k}` must have shape (batch, {', '.join(_DIMS[k])}). "
                    f"Received: {k}.shape={s}"
                )
            sources[k] = s[1:]
        for k, s in sources.items():
            for dim_name, dim in zip(_DIMS[k], s):
                if dim is None:
                    continue
                if dim_name in sizes and sizes[dim_name][0] != dim:
                    raise ValueError(
                        f"Inconsistent QP sizes: {dim_name}={sizes[dim_name][0]} from "
                        f"`{sizes[dim_name][1]}` but {dim} from `{k}` (shape {s})."
                    )
                sizes.setdefault(dim_name, (dim, k))
        for a, c in (("A", "b"), ("G", "h")):
            if (a in sources) != (c in sources):
                have, miss = (a, c) if a in sources else (c, a)
                raise ValueError(
                    f"`{a}` and `{c}` come as a pair: `{have}` is given but `{miss}` is neither "
                    f"an array nor an input. Received: {sorted(sources)}"
                )
        if "n" not in sizes:
            raise ValueError(
                "Cannot infer the number of variables n: give Q, q, A or G (array or input "
                f"with a known last axis). Received: {sorted(sources)}"
            )
        return {d: sizes.get(d, (0, None))[0] for d in ("n", "p", "m")}, sources

    def build(self, input_shape):
        shapes = self._normalize(input_shape)
        if not shapes:
            raise ValueError("QuadraticProgram needs at least one batched input.")
        self._input_keys = tuple(k for k in NAMES if k in shapes)
        sizes, _ = self._sizes(shapes)
        self._n, self._p, self._m = sizes["n"], sizes["p"], sizes["m"]
        for k, arr in self._arrays.items():
            self._weights_by_name[k] = self.add_weight(
                name=k,
                shape=arr.shape,
                initializer=keras.initializers.Constant(arr),
                trainable=k in self.trainable_params,
            )

    def _param_tensors(self, inputs, dtype):
        n, p, m = self._n, self._p, self._m
        params, batched = {}, {}
        for k in NAMES:
            if k in inputs:
                params[k] = cast_input(k, inputs[k], dtype, "QuadraticProgram")
                batched[k] = True
            elif k in self._weights_by_name:
                params[k], batched[k] = tf.cast(self._weights_by_name[k], dtype), False
            else:
                shape = {"Q": [n, n], "q": [n], "A": [p, n], "b": [p], "G": [m, n], "h": [m]}[k]
                params[k], batched[k] = tf.zeros(shape, dtype), False
        return params, batched

    def call(self, inputs):
        inputs = self._normalize(inputs)
        keys = tuple(k for k in NAMES if k in inputs)
        if keys != self._input_keys:
            raise ValueError(
                f"QuadraticProgram was built with inputs {self._input_keys}. Received: {keys}"
            )
        self._sizes({k: v.shape for k, v in inputs.items()})  # shape checks with values
        params, batched = self._param_tensors(inputs, solve_dtype(self))
        check = batched["Q"] or "Q" in self.trainable_params
        x, nu, lam, status, _ = solve_qp(params, batched, self._solve_settings, check_psd=check)
        x, nu, lam = report_status((x, nu, lam), status, self.on_failure, "QuadraticProgram")
        x, nu, lam = to_compute_dtype(self, (x, nu, lam))
        out = [x]
        if self.return_duals:
            out += [nu, lam]
        if self.return_status:
            out.append(status)
        return out[0] if len(out) == 1 else tuple(out)

    def compute_output_shape(self, input_shape):
        shapes = self._normalize(input_shape)
        batch = next(iter(next(iter(shapes.values()))))
        sizes, _ = self._sizes(shapes)
        out = [(batch, sizes["n"])]
        if self.return_duals:
            out += [(batch, sizes["p"]), (batch, sizes["m"])]
        if self.return_status:
            out.append((batch,))
        return out[0] if len(out) == 1 else tuple(out)

    def compute_output_spec(self, inputs):
        shapes = self.compute_output_shape({k: v.shape for k, v in self._normalize(inputs).items()})
        return program_output_spec(self, shapes)

    def get_config(self):
        config = super().get_config()
        config.update({k: self._arrays[k].tolist() for k in self._arrays})
        s = self.settings
        config.update(
            trainable_params=list(self.trainable_params),
            input_names=None if self.input_names is None else list(self.input_names),
            return_duals=self.return_duals,
            return_status=self.return_status,
            tol=s.tol,
            max_iter=s.max_iter,
            rho=s.rho,
            sigma=s.sigma,
            alpha=s.alpha,
            check_interval=s.check_interval,
            polish=s.polish,
            scaling=s.scaling,
            on_failure=self.on_failure,
        )
        return config
