"""`CvxpyLayer`: a disciplined parametrized cvxpy problem as a differentiable Keras layer.

At construction the problem is canonicalized once with cvxpy's DPP machinery: cvxpy
compiles a DPP problem for a conic solver into a *parametrized* cone program whose data
are linear in the stacked parameter vector p = [vec(P_1), ..., vec(P_k), 1] (each
parameter flattened in column-major order, the trailing 1 for constants):

    c(p) = C p,   P(p) = reshape(Q p),   [-A(p) | b(p)] = reshape(M p)   (column-major)
    x*(p) = argmin 1/2 x'P x + c'x  s.t.  A x + s = b,  s in K

with sparse C, Q and M. Those sparse maps and the cone dimensions are all the layer
keeps (and all its config stores), so a saved model loads without cvxpy. A call stacks
the parameter tensors, applies the maps in TensorFlow (gathers and segment sums),
solves the batch with `ConeProgram`'s conic ADMM (implicit gradient, per-row status,
`on_failure`), and slices the requested variables out of x in their cvxpy shapes.
Gradients reach every parameter through the maps (autodiff) and the solve (implicit).

Quadratic objectives (sum_squares, quad_form, ...) stay quadratic: cvxpy also gives the
map p -> P of 1/2 x'Px, and the conic solver takes P natively (COSMO's form) instead of
an extra second-order cone per quadratic term.
Geometric programs (`gp=True`) are solved in log-log form: parameters enter as their
logarithms and variables come back exponentiated, as in cvxpylayers.
"""

from __future__ import annotations

import keras
import numpy as np
import scipy.sparse
import tensorflow as tf

from keras_implicit.layers._program import solve_dtype
from keras_implicit.layers.cone_program import ConeProgram

__all__ = ["CvxpyLayer", "canonicalize"]

_DPP_HELP = (
    "CvxpyLayer needs a problem that is DPP (disciplined parametrized programming): "
    "its problem data must be affine in the parameters, so that it is canonicalized "
    "once and only the parameter values change per call. Rewrite products of "
    "parameters (e.g. introduce a parameter for their product). See "
    "https://www.cvxpy.org/tutorial/dpp/index.html"
)
_SOLVER_CONES = {"zero": "z", "nonneg": "l", "soc": "q", "psd": "s", "exp": "ep"}


def _import_cvxpy():
    try:
        import cvxpy
    except ImportError as error:
        raise ImportError(
            "Building a CvxpyLayer from a cvxpy problem needs cvxpy: "
            "pip install 'keras-implicit[cvxpy]'. (Loading a saved CvxpyLayer does not.)"
        ) from error
    return cvxpy


def _coo(matrix) -> dict:
    coo = matrix.tocoo()
    return {
        "rows": coo.row.astype("int64").tolist(),
        "cols": coo.col.astype("int64").tolist(),
        "values": coo.data.astype("float64").tolist(),
        "shape": [int(s) for s in coo.shape],
    }


def _cone_dict(dims) -> dict:
    if getattr(dims, "p3d", None) or getattr(dims, "pnd", None):
        raise ValueError(
            f"CvxpyLayer supports zero, non-negative, second-order, PSD and exponential "
            f"cones; this problem needs power cones. Received cone dimensions: {dims}"
        )
    return {
        "z": int(dims.zero),
        "l": int(dims.nonneg),
        "q": [int(d) for d in dims.soc],
        "s": [int(d) for d in dims.psd],
        "ep": int(dims.exp),
    }


def _check_lists(problem, parameters, variables, cp):
    if not isinstance(problem, cp.Problem):
        raise ValueError(f"`problem` must be a cvxpy.Problem. Received: problem={problem!r}")
    for name, items, kind in (
        ("parameters", parameters, cp.Parameter),
        ("variables", variables, cp.Variable),
    ):
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, kind) for v in items):
            raise ValueError(
                f"`{name}` must be a list of cvxpy.{kind.__name__} objects. "
                f"Received: {name}={items!r}"
            )
    if not variables:
        raise ValueError("`variables` must name at least one variable. Received: variables=[]")
    if set(problem.parameters()) != set(parameters):
        raise ValueError(
            "`parameters` must list exactly the parameters of the problem. Received "
            f"{[p.name() for p in parameters]}; the problem has "
            f"{[p.name() for p in problem.parameters()]}"
        )
    missing = [v.name() for v in variables if v not in set(problem.variables())]
    if missing:
        raise ValueError(f"`variables` must be variables of the problem. Received: {missing}")


def _reduced_variables(chain, inverse) -> dict:
    """Variables that cvxpy lowered to fewer entries (symmetric, PSD, diag, ...): id -> lowered."""
    for reduction, data in zip(chain.reductions, inverse):
        if type(reduction).__name__ == "CvxAttr2Constr" and data:
            return data[0]
    return {}


def _recovery_matrix(variable, lowered_size):
    """The linear map from a lowered variable to the original's column-major entries."""
    from cvxpy.reductions.cvx_attr2constr import recover_value_for_leaf

    columns = []
    for k in range(lowered_size):
        unit = np.zeros(lowered_size)
        unit[k] = 1.0
        value = recover_value_for_leaf(variable, unit, project=False)
        columns.append(np.asarray(value, dtype="float64").reshape(-1, order="F"))
    return scipy.sparse.coo_array(np.stack(columns, axis=1))


def _dual_maps(problem, constraints, chain, inverse, n, m) -> list:
    """Each constraint's dual as a linear map of the conic dual y (m,): cvxpy's own
    solution recovery (slicing, sign and PSD scaling conventions) applied to unit vectors."""
    columns = []
    for k in range(m):
        unit = np.zeros(m)
        unit[k] = 1.0
        raw = {
            "x": np.zeros(n),
            "y": unit,
            "s": np.zeros(m),
            "info": {"status_val": 1, "solve_time": 0, "setup_time": 0, "iter": 0, "pobj": 0.0},
        }
        problem.unpack_results(raw, chain, inverse)
        columns.append([np.asarray(c.dual_value, dtype="float64") for c in constraints])
    maps = []
    for index in range(len(constraints)):
        matrix = np.stack([col[index].reshape(-1, order="F") for col in columns], axis=1)
        shape = list(np.shape(columns[0][index]))
        maps.append({"shape": shape, "map": _coo(scipy.sparse.coo_array(matrix))})
    # leave the user's problem without the probes' values
    for variable in problem.variables():
        variable.value = None
    for constraint in problem.constraints:
        for dual in constraint.dual_variables:
            dual.value = None
    return maps


def canonicalize(problem, parameters, variables, gp=False, duals=()) -> dict:
    """The parametrized cone program of a DPP cvxpy problem, as plain lists (JSON-able).

    Returns a dict with the cone dims, the sparse maps `c_map` ((n + 1) x (P + 1)) and
    `A_map` (m (n + 1) x (P + 1)), each parameter's shape and column offset in p, each
    requested variable's shape and offset in x, and each requested dual's map from y.
    """
    cp = _import_cvxpy()
    _check_lists(problem, parameters, variables, cp)
    duals = list(duals)
    unknown = [c for c in duals if not any(c is own for own in problem.constraints)]
    if unknown:
        raise ValueError(f"`duals` must be constraints of the problem. Received: {unknown!r}")
    dpp = problem.is_dgp(dpp=True) if gp else problem.is_dcp(dpp=True)
    if not dpp:
        kind = "DGP" if gp else "DCP"
        raise ValueError(f"The problem is not {kind} under DPP rules. {_DPP_HELP}")
    data, chain, inverse = problem.get_problem_data(
        solver=cp.SCS, gp=gp, solver_opts={"use_quad_obj": True}
    )
    program = data[cp.settings.PARAM_PROB]
    param_map = var_map = {}
    if gp:
        dgp = chain.get(cp.reductions.Dgp2Dcp)
        param_map = dgp.canon_methods._parameters
        var_map = dgp.canon_methods._variables
    param_entries = []
    for param in parameters:
        inner = param_map.get(param, param)
        col = program.param_id_to_col.get(inner.id)
        param_entries.append(
            {
                "name": param.name(),
                "shape": list(param.shape),
                "col": col,
                # DGP's log-log change of variables: positive parameters enter as logs
                "log": param in param_map,
            }
        )
    reduced = _reduced_variables(chain, inverse)
    var_entries = []
    for var in variables:
        inner = var_map.get(var, var)
        entry = {
            "name": var.name(),
            "shape": list(var.shape),
            "offset": program.var_id_to_col[inner.id],
            "size": int(inner.size),
            "recover": None,
        }
        if inner.id in reduced:
            entry["size"] = int(reduced[inner.id].size)
            entry["recover"] = _coo(_recovery_matrix(inner, entry["size"]))
        var_entries.append(entry)
    return {
        "cone": _cone_dict(data["dims"]),
        "n": int(program.x.size),
        "n_params": int(program.total_param_size),
        "c_map": _coo(program.q),
        "P_map": None if program.P is None or program.P.nnz == 0 else _coo(program.P),
        "A_map": _coo(program.A),
        "parameters": param_entries,
        "variables": var_entries,
        "duals": _dual_maps(problem, duals, chain, inverse, program.x.size, data["A"].shape[0])
        if duals
        else [],
        "gp": bool(gp),
    }


def _apply_sparse(coo: dict, p: tf.Tensor) -> tf.Tensor:
    """Rows of (M p^T)^T for the sparse M in `coo`: (B, cols) -> (B, rows).

    A gather and a segment sum (nnz work; XLA compiles both, unlike sparse matmul ops).
    """
    values = tf.constant(coo["values"], p.dtype)
    cols = tf.constant(coo["cols"], tf.int64)
    rows = tf.constant(coo["rows"], tf.int64)
    terms = tf.gather(p, cols, axis=1) * values  # (B, nnz)
    out = tf.math.unsorted_segment_sum(tf.transpose(terms), rows, coo["shape"][0])
    return tf.transpose(out)


def _flatten_column_major(t: tf.Tensor, event_rank: int) -> tf.Tensor:
    """(B, *shape) -> (B, prod(shape)) in cvxpy's (Fortran) element order."""
    if event_rank > 1:
        t = tf.transpose(t, [0, *range(event_rank, 0, -1)])
    return tf.reshape(t, [tf.shape(t)[0], -1])


def _unflatten_column_major(t: tf.Tensor, shape) -> tf.Tensor:
    if len(shape) <= 1:
        return tf.reshape(t, [-1, *shape])
    t = tf.reshape(t, [-1, *reversed(shape)])
    return tf.transpose(t, [0, *range(len(shape), 0, -1)])


@keras.saving.register_keras_serializable(package="keras_implicit")
class CvxpyLayer(keras.layers.Layer):
    """A DPP cvxpy problem as a layer: parameter tensors in, optimal variables out.

    Args:
      problem: a `cvxpy.Problem` that is DPP (DGP with `gp=True`).
      parameters: the problem's `cvxpy.Parameter`s, in the order `call` receives them.
      variables: the `cvxpy.Variable`s to return, in that order.
      gp: solve a log-log convex (geometric) program.
      duals: constraints of the problem whose optimal dual values to return too (after
        the variables, in cvxpy's shapes and sign conventions).
      return_status: also return the int32 per-row status (0 solved; the codes of
        `ConeProgram.STATUS_NAMES`).
      canonical: the canonical form `canonicalize` returns (what `get_config` stores);
        given instead of a problem, it rebuilds the layer without cvxpy.
      **solver_settings: passed to the conic solver (`ConeProgram`): tol, max_iter,
        rho, sigma, alpha, check_interval, backward_tol, backward_max_iter, on_failure.

    Call: the parameter values as a list (or one tensor for one parameter), each of the
    parameter's shape or with one leading batch axis; batched and unbatched values mix
    (the unbatched ones are shared by the batch). Returns the variables (a list, or one
    tensor for one variable), then the requested duals, then the status if asked, each
    with a leading batch axis when any input had one.
    """

    def __init__(
        self,
        problem=None,
        parameters=None,
        variables=None,
        gp=False,
        duals=(),
        return_status=False,
        canonical=None,
        **kwargs,
    ):
        layer_keys = ("name", "dtype", "trainable", "autocast")
        layer_kwargs = {k: kwargs.pop(k) for k in layer_keys if k in kwargs}
        super().__init__(**layer_kwargs)
        if canonical is None:
            canonical = canonicalize(problem, parameters or [], variables or [], gp=gp, duals=duals)
        elif problem is not None:
            raise ValueError("Pass either a cvxpy `problem` or its `canonical` form, not both.")
        self.canonical = canonical
        self.return_status = bool(return_status)
        self.solver_settings = dict(kwargs)
        self.program = ConeProgram(
            canonical["cone"],
            return_status=True,
            return_duals=bool(canonical["duals"]),
            dtype=self.dtype_policy,
            name="cone_program",
            **self.solver_settings,
        )
        self._param_specs = [tuple(p["shape"]) for p in canonical["parameters"]]

    # ------------------------------------------------------------------ inputs

    def _as_list(self, inputs):
        if not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        if len(inputs) != len(self._param_specs):
            names = [p["name"] for p in self.canonical["parameters"]]
            raise ValueError(
                f"CvxpyLayer expects {len(names)} parameter values {names}. "
                f"Received: {len(inputs)} inputs"
            )
        return list(inputs)

    def _batched(self, value, shape, name):
        """Whether `value` carries a leading batch axis before the parameter's shape."""
        value_shape = tf.TensorShape(value.shape)
        rank = value_shape.rank
        if rank == len(shape) + 1:
            event = value_shape[1:]
        elif rank == len(shape):
            event = value_shape
        else:
            raise ValueError(
                f"Parameter {name} has shape {shape}; its value must have that shape, "
                f"optionally with one leading batch axis. Received: shape {value.shape}"
            )
        if not event.is_compatible_with(shape):
            raise ValueError(
                f"Parameter {name} has shape {shape}. Received: a value of shape {value.shape}"
            )
        return rank == len(shape) + 1

    def _parameter_vector(self, values, dtype):
        """p = [vec(P_1), ..., 1] per batch row, (B, n_params + 1); and whether batched."""
        batched = []
        for value, spec, entry in zip(values, self._param_specs, self.canonical["parameters"]):
            batched.append(self._batched(value, spec, entry["name"]))
        any_batched = any(batched)
        batch = 1
        for value, is_batched in zip(values, batched):
            if is_batched:
                batch = tf.shape(value)[0]
                break
        pieces = []
        for value, spec, entry, is_batched in zip(
            values, self._param_specs, self.canonical["parameters"], batched
        ):
            if entry["col"] is None:  # the parameter does not enter the program data
                continue
            value = tf.cast(value, dtype)
            if entry.get("log"):
                value = tf.math.log(value)
            if not is_batched:
                value = tf.broadcast_to(value[None], tf.concat([[batch], tf.shape(value)], 0))
            pieces.append((entry["col"], _flatten_column_major(value, len(spec))))
        pieces.sort(key=lambda item: item[0])
        ones = tf.ones(tf.stack([batch, 1]), dtype)
        p = tf.concat([piece for _, piece in pieces] + [ones], axis=1)
        return p, any_batched

    def build(self, input_shape=None):
        n = self.canonical["n"]
        m = self.canonical["A_map"]["shape"][0] // (n + 1)
        shapes = {"c": (None, n), "A": (None, m, n), "b": (None, m)}
        if self.canonical.get("P_map") is not None:
            shapes["P"] = (None, n, n)
        self.program.build(shapes)

    # ------------------------------------------------------------------ call

    def _program_data(self, p):
        """c (B, n), A (B, m, n), b (B, m) and P (B, n, n) or None from p (B, P + 1)."""
        n = self.canonical["n"]
        c_full = _apply_sparse(self.canonical["c_map"], p)
        stacked = _apply_sparse(self.canonical["A_map"], p)
        m = self.canonical["A_map"]["shape"][0] // (n + 1)
        # column-major (m, n + 1): entry k sits at row k % m, column k // m
        matrix = tf.transpose(tf.reshape(stacked, [-1, n + 1, m]), [0, 2, 1])
        P = None
        if self.canonical.get("P_map") is not None:
            # column-major n x n: entry k at row k % n, column k // n
            P = tf.linalg.matrix_transpose(
                tf.reshape(_apply_sparse(self.canonical["P_map"], p), [-1, n, n])
            )
        return c_full[:, :n], -matrix[:, :, :n], matrix[:, :, n], P

    def call(self, inputs):
        values = [tf.convert_to_tensor(v) for v in self._as_list(inputs)]
        dtype = solve_dtype(self)  # float32 under a mixed policy: the maps are data too
        p, any_batched = self._parameter_vector(values, dtype)
        c, A, b, P = self._program_data(p)
        data = {"c": c, "A": A, "b": b} if P is None else {"c": c, "A": A, "b": b, "P": P}
        x, *y, status = self.program(data)
        outputs = []
        for entry in self.canonical["variables"]:
            piece = x[:, entry["offset"] : entry["offset"] + entry["size"]]
            if entry["recover"] is not None:  # lowered (e.g. symmetric) back to full
                piece = _apply_sparse(entry["recover"], piece)
            value = _unflatten_column_major(piece, entry["shape"])
            if self.canonical["gp"]:
                value = tf.exp(value)
            outputs.append(value if any_batched else value[0])
        for entry in self.canonical["duals"]:
            dual = _unflatten_column_major(_apply_sparse(entry["map"], y[0]), entry["shape"])
            outputs.append(dual if any_batched else dual[0])
        if self.return_status:
            outputs.append(status if any_batched else status[0])
        return outputs[0] if len(outputs) == 1 else outputs

    def compute_output_spec(self, inputs):
        values = self._as_list(inputs)
        batched = [
            self._batched(v, s, e["name"])
            for v, s, e in zip(values, self._param_specs, self.canonical["parameters"])
        ]
        batch = next((v.shape[0] for v, b in zip(values, batched) if b), None)
        lead = (batch,) if any(batched) else ()
        specs = [
            keras.KerasTensor(lead + tuple(e["shape"]), dtype=self.compute_dtype)
            for e in self.canonical["variables"]
        ]
        specs += [
            keras.KerasTensor(lead + tuple(e["shape"]), dtype=self.compute_dtype)
            for e in self.canonical["duals"]
        ]
        if self.return_status:
            specs.append(keras.KerasTensor(lead, dtype="int32"))
        return specs[0] if len(specs) == 1 else specs

    def get_config(self):
        config = super().get_config()
        config.update(
            canonical=self.canonical, return_status=self.return_status, **self.solver_settings
        )
        return config
