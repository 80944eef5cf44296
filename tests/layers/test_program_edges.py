"""QuadraticProgram and ConeProgram at their edges: precision, failure policy, inputs.

Infeasibility certificates and tolerances in the precision the layer computes in,
one failure policy for both layers (eager, graph, XLA), the same input forms, mixed
precision, unknown batch dimensions, and bad rows that never touch the good ones.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_implicit.errors import ConvergenceError, ConvergenceWarning
from keras_implicit.layers import ConeProgram, QuadraticProgram
from keras_implicit.programs import _admm as codes
from keras_implicit.programs.qp import Settings, solve_qp

NAMES = ("Q", "q", "A", "b", "G", "h")


DEFAULTS = Settings()


def _solve(d, dtype, settings=DEFAULTS):
    params = {k: tf.constant(v, dtype) for k, v in d.items()}
    return tf.function(lambda p: solve_qp(p, dict.fromkeys(NAMES, True), settings))(params)


def box_section_qps(rng, batch=4, n=5):
    """min 1/2 |z|^2 + q^T z  s.t.  w^T z = 1,  lower <= z <= upper with lower > upper."""
    lower = rng.uniform(0.5, 1.0, (batch, n))
    upper = lower - rng.uniform(0.1, 1.0, (batch, n))
    return {
        "Q": np.broadcast_to(np.eye(n), (batch, n, n)),
        "q": rng.standard_normal((batch, n)),
        "A": rng.uniform(0.5, 1.5, (batch, 1, n)),
        "b": np.ones((batch, 1)),
        "G": np.broadcast_to(np.concatenate([np.eye(n), -np.eye(n)]), (batch, 2 * n, n)),
        "h": np.concatenate([upper, -lower], axis=1),
    }


def unbounded_lps(rng, batch=4, n=5):
    """min q^T z, q > 0, z <= 1, in box_section_qps's shapes (0 = 0, and 0 <= 1 rows)."""
    G = np.concatenate([np.eye(n), np.zeros((n, n))])
    return {
        "Q": np.zeros((batch, n, n)),
        "q": rng.uniform(0.5, 1.0, (batch, n)),
        "A": np.zeros((batch, 1, n)),
        "b": np.zeros((batch, 1)),
        "G": np.broadcast_to(G, (batch, 2 * n, n)),
        "h": np.ones((batch, 2 * n)),
    }


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_infeasible_and_unbounded_certified_in_the_compute_dtype(dtype):
    rng = np.random.default_rng(7)
    infeasible, unbounded = box_section_qps(rng, batch=8), unbounded_lps(rng)
    d = {k: np.concatenate([infeasible[k], unbounded[k]]) for k in NAMES}
    _, _, _, status, iters = _solve(d, dtype)
    expected = [codes.PRIMAL_INFEASIBLE] * 8 + [codes.DUAL_INFEASIBLE] * 4
    assert status.numpy().tolist() == expected
    # certified within a quarter of the 4000-iteration budget (float32 used to run it out)
    assert iters.numpy().max() <= 1000


# ------------------------------------------------------------------ tolerance floors

QP_Q = 2.0 * np.eye(4) + 0.5
QP_KW = {"Q": QP_Q, "A": np.ones((1, 4)), "b": np.ones(1), "G": -np.eye(4), "h": np.zeros(4)}
# min c^T x over the unit ball ||x|| <= 1 (s = (1, x) in the second-order cone):
# x* = -c / ||c||, smooth in c
CONE_KW = {
    "cone": {"q": [5]},
    "A": np.concatenate([np.zeros((1, 4)), -np.eye(4)]),
    "b": np.eye(5)[0],
}
Q_ROWS = np.array([[0.3, -0.2, 0.1, 0.0], [-1.0, 0.5, 0.2, 0.1], [0.1, 0.1, -0.3, 0.2]])


def _value_and_grad(layer, q, weights):
    """Values, status and gradient in a graph (the eager ADMM loop is slow)."""

    @tf.function
    def run(q):
        with tf.GradientTape() as tape:
            tape.watch(q)
            x, status = layer(q)
            loss = tf.reduce_sum(tf.constant(weights, x.dtype) * x)
        return x, status, tape.gradient(loss, q)

    return tuple(t.numpy() for t in run(tf.constant(q, layer.compute_dtype)))


@pytest.mark.parametrize(
    "layer_cls, kwargs, data",
    [(QuadraticProgram, QP_KW, Q_ROWS), (ConeProgram, CONE_KW, Q_ROWS)],
    ids=["qp", "cone_program"],
)
def test_tolerance_below_float32_reach_is_floored_and_said_once(layer_cls, kwargs, data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = layer_cls(**kwargs, tol=1e-9, return_status=True, dtype="float32")
        weights = np.arange(1.0, 5.0)
        x, status, grad = _value_and_grad(layer, data, weights)
        _value_and_grad(layer, data, weights)  # a second call says nothing more
    floor_warnings = [w for w in caught if "below what a solve in float32" in str(w.message)]
    assert len(floor_warnings) == 1, [str(w.message) for w in caught]
    assert "using tol=1.19e-05. Received: tol=1e-09" in str(floor_warnings[0].message)
    assert status.tolist() == [0] * len(data)
    reference = layer_cls(**kwargs, tol=1e-9, return_status=True, dtype="float64")
    x64, status64, grad64 = _value_and_grad(reference, data, weights)
    assert status64.tolist() == [0] * len(data)
    np.testing.assert_allclose(x, x64, atol=2e-4)
    assert np.abs(grad).max() > 0.1
    np.testing.assert_allclose(grad, grad64, atol=1e-3)


# ------------------------------------------------------------------ one failure policy

# row 1 of the cost batch is paired with an infeasible b: the unit ball shifted so that
# s_0 = -1 (||x|| <= -1)
C_ROWS = Q_ROWS
B_ROWS = np.stack([np.eye(5)[0], -np.eye(5)[0], np.eye(5)[0]])


def _cone_inputs_layer(**kwargs):
    kw = {k: v for k, v in CONE_KW.items() if k != "b"}
    return ConeProgram(**kw, dtype="float64", **kwargs)


def _qp_infeasible_layer(**kwargs):
    return QuadraticProgram(Q=QP_Q, A=np.ones((1, 4)), b=np.ones(1), G=np.eye(4), **kwargs)


QP_H = np.stack([np.ones(4), -np.ones(4), np.ones(4)])  # row 1: x <= -1 with sum x = 1


def _policy_case(which):
    if which == "qp":

        def make(**kw):
            return _qp_infeasible_layer(dtype="float64", **kw)

        return make, [tf.constant(Q_ROWS), tf.constant(QP_H)], "QuadraticProgram"
    return _cone_inputs_layer, [tf.constant(C_ROWS), tf.constant(B_ROWS)], "ConeProgram"


@pytest.mark.parametrize("which", ["qp", "cone_program"])
def test_failure_policy_is_one_path_for_both_layers(which, capfd):
    make, inputs, name = _policy_case(which)
    expected = rf"{name}: 1 of 3 problems not solved \{{'primal_infeasible': 1\}}"
    # eager: a warning, an error, or nothing
    with pytest.warns(ConvergenceWarning, match=expected):
        _, status = make(return_status=True)(inputs)
    assert status.numpy().tolist() == [0, 2, 0]
    with pytest.raises(ConvergenceError, match=expected):
        make(on_failure="raise")(inputs)
    # a graph prints it
    tf.function(make())(inputs)
    assert f"{name}: problems not solved (see the status output): 1" in capfd.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("which", ["qp", "cone_program"])
def test_failure_policy_ignore_graph_raise_and_xla(which):
    make, inputs, _ = _policy_case(which)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = make(on_failure="ignore")(inputs).numpy()
    with pytest.raises(tf.errors.InvalidArgumentError, match="problems not solved"):
        tf.function(make(on_failure="raise"))(inputs)
    # XLA: "raise" sets the failed row to NaN, the others are untouched
    x_xla = tf.function(make(on_failure="raise"), jit_compile=True)(inputs).numpy()
    assert np.all(np.isnan(x_xla[1]))
    np.testing.assert_allclose(x_xla[[0, 2]], x[[0, 2]], atol=1e-6)


def test_both_layers_take_a_dict_a_list_or_one_tensor():
    c = tf.constant(C_ROWS[:1])
    b = tf.constant(B_ROWS[:1])
    two = _cone_inputs_layer(tol=1e-5)
    from_dict = two({"c": c, "b": b}).numpy()
    np.testing.assert_allclose(two([c, b]).numpy(), from_dict)
    swapped = _cone_inputs_layer(tol=1e-5, input_names=("b", "c"))
    np.testing.assert_allclose(swapped((b, c)), from_dict)
    np.testing.assert_allclose(-c / tf.norm(c, axis=-1, keepdims=True), from_dict, atol=1e-4)
    one = ConeProgram(**CONE_KW, dtype="float64", tol=1e-5)
    np.testing.assert_allclose(one(c).numpy(), from_dict, atol=1e-9)
    with pytest.raises(ValueError, match=r"expected 2 input\(s\) \('c', 'b'\)"):
        two(c)
    with pytest.raises(ValueError, match="`input_names` must be distinct names"):
        ConeProgram(**CONE_KW, input_names=("c", "b"))
    qp = QuadraticProgram(**QP_KW, dtype="float64")
    q = tf.constant(Q_ROWS)
    np.testing.assert_allclose(qp(q).numpy(), qp([q]).numpy())
    np.testing.assert_allclose(qp(q).numpy(), qp({"q": q}).numpy())


def test_config_round_trip_of_policy_and_input_names():
    layer = _cone_inputs_layer(on_failure="raise", input_names=("b", "c"), tol=1e-6)
    clone = ConeProgram.from_config(layer.get_config())
    assert clone.on_failure == "raise" and clone.input_names == ("b", "c")
    assert clone.get_config() == layer.get_config()
    assert ConeProgram(**CONE_KW).get_config()["tol"] is None  # dtype-dependent default


# ------------------------------------------------------------------ unknown dims, bad rows

LAYERS = [(QuadraticProgram, QP_KW), (ConeProgram, CONE_KW)]
LAYER_IDS = ["qp", "cone_program"]
WEIGHTS = np.arange(1.0, 5.0)


def _loss_grad(layer, q):
    with tf.GradientTape() as tape:
        tape.watch(q)
        x = layer(q)
        loss = tf.reduce_sum(tf.constant(WEIGHTS, x.dtype) * x)
    return x, tape.gradient(loss, q)


@pytest.mark.parametrize("layer_cls, kwargs", LAYERS, ids=LAYER_IDS)
def test_unknown_batch_dimension(layer_cls, kwargs):
    layer = layer_cls(**kwargs, dtype="float32")
    inputs = keras.Input((4,))
    assert tuple(keras.Model(inputs, layer(inputs)).output.shape) == (None, 4)
    q = tf.constant(Q_ROWS, tf.float32)
    spec = [tf.TensorSpec([None, 4], tf.float32)]
    x, grad = tf.function(lambda q: _loss_grad(layer, q), input_signature=spec)(q)
    x_eager, grad_eager = _loss_grad(layer, q)
    np.testing.assert_allclose(x.numpy(), x_eager.numpy(), atol=1e-5)
    np.testing.assert_allclose(grad.numpy(), grad_eager.numpy(), atol=1e-4)
    assert np.abs(grad.numpy()).max() > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("layer_cls, kwargs", LAYERS, ids=LAYER_IDS)
def test_unknown_batch_dimension_under_xla(layer_cls, kwargs):
    layer = layer_cls(**kwargs, dtype="float32")
    spec = [tf.TensorSpec([None, 4], tf.float32)]
    fn = tf.function(lambda q: _loss_grad(layer, q), input_signature=spec, jit_compile=True)
    for rows in (3, 2):
        q = tf.constant(Q_ROWS[:rows], tf.float32)
        x, grad = fn(q)
        x_eager, grad_eager = _loss_grad(layer, q)
        np.testing.assert_allclose(x.numpy(), x_eager.numpy(), atol=1e-5)
        np.testing.assert_allclose(grad.numpy(), grad_eager.numpy(), atol=1e-4)


@pytest.mark.parametrize("layer_cls, kwargs", LAYERS, ids=LAYER_IDS)
def test_non_finite_and_huge_rows_are_flagged_and_leave_the_others_alone(layer_cls, kwargs):
    layer = layer_cls(
        **kwargs, dtype="float64", return_status=True, on_failure="ignore", max_iter=250
    )
    rows = np.concatenate([Q_ROWS[:1], Q_ROWS[:3], Q_ROWS[2:]])
    rows[1, 0], rows[2, 1], rows[3, 2] = np.nan, np.inf, 1e300
    q = tf.constant(rows)
    with tf.GradientTape() as tape:
        tape.watch(q)
        x, status = layer(q)
        loss = tf.reduce_sum(tf.constant(WEIGHTS) * x)
    grad = tape.gradient(loss, q).numpy()
    # non-finite data: numerical_error, NaN rows, zero gradient. A 1e300 entry: the
    # QP is not solved (max_iter, zero gradient); the conic program, scale-invariant in
    # c, is solved: x* = -c / |c| ~ -e_2
    huge = codes.MAX_ITER if layer_cls is QuadraticProgram else codes.SOLVED
    assert status.numpy().tolist() == [0, codes.NUMERICAL_ERROR, codes.NUMERICAL_ERROR, huge, 0]
    assert np.all(np.isnan(x.numpy()[1:3]))
    assert np.all(grad[1:3] == 0.0) and np.all(np.isfinite(grad))
    if layer_cls is QuadraticProgram:
        assert np.all(grad[3] == 0.0)
    else:
        np.testing.assert_allclose(x.numpy()[3], -np.eye(4)[2], atol=1e-6)
    good = tf.constant(rows[[0, 4]])
    with tf.GradientTape() as tape:
        tape.watch(good)
        x_good, _ = layer(good)
        loss = tf.reduce_sum(tf.constant(WEIGHTS) * x_good)
    np.testing.assert_allclose(x.numpy()[[0, 4]], x_good.numpy(), atol=1e-12)
    np.testing.assert_allclose(grad[[0, 4]], tape.gradient(loss, good).numpy(), atol=1e-10)


@pytest.mark.parametrize("layer_cls, kwargs", LAYERS, ids=LAYER_IDS)
def test_wrong_shapes_and_dtypes_are_refused(layer_cls, kwargs):
    layer = layer_cls(**kwargs)
    name = "q" if layer_cls is QuadraticProgram else "c"
    with pytest.raises(ValueError, match="Inconsistent"):
        layer(np.zeros((3, 5), "float32"))
    with pytest.raises(ValueError, match=rf"Received: {name}.shape=\(3, 4, 1\)"):
        layer(np.zeros((3, 4, 1), "float32"))
    with pytest.raises(ValueError, match=rf"must hold real numbers. Received: {name}.dtype="):
        layer(tf.zeros((3, 4), tf.complex64))
    with pytest.raises(ValueError, match=r"Received: tol=-1"):
        layer_cls(**kwargs, tol=-1)
    with pytest.raises(ValueError, match=r"on_failure"):
        layer_cls(**kwargs, on_failure="loud")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_extreme_scales_are_solved_or_reported(dtype):
    # ConeProgram: x* does not depend on the scale of c (the ball's radius is 1)
    cone = ConeProgram(**CONE_KW, dtype=dtype, return_status=True)
    c = Q_ROWS[:1] * np.array([[1e-8], [1e-4], [1e4], [1e8]])
    x, status = cone(tf.constant(c, dtype))
    assert status.numpy().tolist() == [0] * 4
    reference = -Q_ROWS[:1] / np.linalg.norm(Q_ROWS[0])
    np.testing.assert_allclose(x.numpy(), np.repeat(reference, 4, 0), atol=2e-4)
    # QuadraticProgram: the cost scaled by s leaves x* alone; q, b, h scaled by s
    # (Q fixed) scale it by s. Tiny data used to be "solved" by the absolute tolerance.
    qp = QuadraticProgram(A=np.ones((1, 4)), G=-np.eye(4), return_status=True, dtype=dtype)
    scales = np.array([1e-8, 1e-4, 1.0, 1e4, 1e8])
    Q = QP_Q[None] * scales[:, None, None]
    q = Q_ROWS[1:2] * scales[:, None]
    inputs = {"Q": Q, "q": q, "b": np.ones((5, 1)), "h": np.zeros((5, 4))}
    x, status = qp({k: tf.constant(v, dtype) for k, v in inputs.items()})
    assert status.numpy().tolist() == [0] * 5
    np.testing.assert_allclose(x.numpy(), np.repeat(x.numpy()[2:3], 5, 0), atol=1e-4)
    units = {"Q": np.repeat(QP_Q[None], 5, 0), "q": Q_ROWS[1:2] * scales[:, None]}
    units["b"], units["h"] = scales[:, None], np.zeros((5, 4))
    x, status = qp({k: tf.constant(v, dtype) for k, v in units.items()})
    assert status.numpy().tolist() == [0] * 5
    np.testing.assert_allclose(
        x.numpy() / scales[:, None], np.repeat(x.numpy()[2:3], 5, 0), atol=1e-4
    )


def test_qp_singular_gradient_system_is_reported(capfd):
    """Two copies of one active constraint: the duals split between them and the KKT
    system of the gradient is singular. The rows are solved (status 0); their failed
    gradient solve is reported under `on_failure` (here in a graph) and their gradient
    is zero, never NaN."""
    G = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    q = tf.constant([[-1.0, 1.0], [-1.0, -2.0]], tf.float64)

    def run(on_failure):
        layer = QuadraticProgram(
            Q=np.eye(2),
            G=G,
            h=np.zeros(3),
            input_names=["q"],
            return_status=True,
            dtype="float64",
            on_failure=on_failure,
        )

        @tf.function
        def gradient(q):
            with tf.GradientTape() as tape:
                tape.watch(q)
                x, status = layer(q)
                loss = tf.reduce_sum(x**2)
            return x, status, tape.gradient(loss, q)

        return [t.numpy() for t in gradient(q)]

    capfd.readouterr()
    x, status, grad = run("ignore")
    assert "backward linear solve" not in capfd.readouterr().err
    np.testing.assert_allclose(x, [[0.0, -1.0], [0.0, 0.0]], atol=1e-8)
    assert (status == codes.SOLVED).all() and (grad == 0.0).all()
    run("warn")
    assert "custom_root: backward linear solve (kkt_qr)" in capfd.readouterr().err
