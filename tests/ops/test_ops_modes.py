"""Execution modes, dtypes, dynamic batch, NaN isolation and input validation."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import run_in_mode

import keras_implicit.ops as ops
from keras_implicit.ops import _common

RNG = np.random.default_rng(21)
A_VEC = np.array([1.0, -2.0, 0.5, 0.3, 1.5])
A_MAT = np.array([[1.0, 2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 1.0, 1.0, -2.0]])
# transport marginals: rows MARG_A, columns p * MARG_B (equal masses at p = 1.5)
MARG_A = np.array([0.5, 1.5, 1.0])
MARG_B = np.array([0.25, 0.75, 0.5, 0.5])

# name -> (fn(x, p), sample shape of one x row, parameter value p or None)
OPS = {
    "non_negative": (lambda x, p: ops.projection_non_negative(x), (5,), None),
    "box": (lambda x, p: ops.projection_box(x, -p, p), (5,), 0.4),
    "hyperplane": (lambda x, p: ops.projection_hyperplane(x, A_VEC, p), (5,), 0.3),
    "halfspace": (lambda x, p: ops.projection_halfspace(x, A_VEC, p), (5,), 0.3),
    "affine_set": (lambda x, p: ops.projection_affine_set(x, A_MAT, p * np.ones(2)), (5,), 0.3),
    "simplex": (lambda x, p: ops.projection_simplex(x, p), (5,), 1.3),
    "sparsemax": (lambda x, p: ops.sparsemax(x), (5,), None),
    "l1_ball": (lambda x, p: ops.projection_l1_ball(x, p), (5,), 1.1),
    "l1_sphere": (lambda x, p: ops.projection_l1_sphere(x, p), (5,), 1.1),
    "l2_ball": (lambda x, p: ops.projection_l2_ball(x, p), (5,), 1.1),
    "l2_sphere": (lambda x, p: ops.projection_l2_sphere(x, p), (5,), 1.1),
    "linf_ball": (lambda x, p: ops.projection_linf_ball(x, p), (5,), 0.7),
    "second_order_cone": (lambda x, p: ops.projection_second_order_cone(x), (5,), None),
    "psd_cone": (lambda x, p: ops.projection_psd_cone(x), (3, 3), None),
    "exp_cone": (lambda x, p: ops.projection_exp_cone(x), (3,), None),
    "prox_lasso": (lambda x, p: ops.prox_lasso(x, p, 0.5), (5,), 0.6),
    "prox_elastic_net": (lambda x, p: ops.prox_elastic_net(x, p, 0.5, 0.8), (5,), 0.6),
    "prox_group_lasso": (lambda x, p: ops.prox_group_lasso(x, p), (5,), 1.2),
    "prox_ridge": (lambda x, p: ops.prox_ridge(x, p), (5,), 0.6),
    "prox_non_negative_lasso": (lambda x, p: ops.prox_non_negative_lasso(x, p), (5,), 0.2),
    "prox_non_negative_ridge": (lambda x, p: ops.prox_non_negative_ridge(x, p), (5,), 0.6),
    "box_section": (lambda x, p: ops.projection_box_section(x, -1.0, 1.0, A_VEC, p), (5,), 0.4),
    "sparse_simplex": (lambda x, p: ops.projection_sparse_simplex(x, 3, p), (5,), 1.3),
    "transport": (lambda x, p: ops.projection_transport(x, MARG_A, p * MARG_B), (3, 4), 1.5),
    "transport_kl": (
        lambda x, p: ops.projection_transport(x, MARG_A, p * MARG_B, divergence="kl"),
        (3, 4),
        1.5,
    ),
}


def _value_and_grads(fn, x, p, w):
    """Output, d<w, y>/dx and d<w, y>/dp (p may be None)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        if p is not None:
            tape.watch(p)
        y = fn(x, p)
        loss = tf.reduce_sum(w * y)
    gx, gp = tape.gradient(loss, [x, p if p is not None else x])
    return y, gx, (gp if p is not None else tf.zeros([], x.dtype))


# Ops whose graphs contain loops or linear algebra: XLA is exercised with two batch
# sizes through one dynamic-batch trace. The others compile once (at batch 3) from
# the same kind of trace, which keeps the suite fast (the exp cone's XLA compile is
# the slowest of all; it runs at a second batch size in test_ops_exp_cone.py).
_TWO_SIZES_UNDER_XLA = {"simplex", "l1_ball", "psd_cone", "box_section"}
# Ops with a hand-written (tf.custom_gradient) derivative. For the others the
# gradient is TF's own autodiff, so in plain graph mode only values are compared
# (their gradients are still compared under XLA, which also runs in graph mode).
_CUSTOM_GRADIENT = {
    "simplex",
    "sparsemax",
    "l1_ball",
    "l1_sphere",
    "second_order_cone",
    "psd_cone",
    "exp_cone",
    "sparse_simplex",
    "transport",
    "transport_kl",
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_modes_with_dynamic_batch(name, mode):
    fn, row_shape, param = OPS[name]
    dtype = tf.float64
    p = None if param is None else tf.constant(param, dtype)
    spec = tf.TensorSpec([None, *row_shape], dtype)

    with_grads = mode != "function" or name in _CUSTOM_GRADIENT

    def compute(x, w):
        if not with_grads:
            return (fn(x, p),)
        return _value_and_grads(fn, x, p, w)

    wrapped = run_in_mode(compute, mode)
    if mode != "eager":
        wrapped = wrapped.get_concrete_function(spec, spec)  # batch size unknown
        assert wrapped.structured_outputs[0].shape.as_list()[0] is None
    sizes = (1, 4) if mode != "xla" or name in _TWO_SIZES_UNDER_XLA else (3,)
    for batch in sizes:
        x = tf.constant(RNG.normal(size=(batch, *row_shape)), dtype)
        w = tf.constant(RNG.normal(size=(batch, *row_shape)), dtype)
        got = wrapped(x, w)
        expected = _value_and_grads(fn, x, p, w)[: len(got)]
        # XLA's own eigh/QR kernels differ from LAPACK's by ~1e-10.
        tol = {"rtol": 1e-7, "atol": 1e-9} if mode == "xla" else {"rtol": 1e-9, "atol": 1e-10}
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), **tol)


@pytest.mark.parametrize("name", sorted(OPS))
def test_float32_matches_float64(name):
    fn, row_shape, param = OPS[name]
    x64 = RNG.normal(size=(6, *row_shape))
    p64 = None if param is None else tf.constant(param, tf.float64)
    p32 = None if param is None else tf.constant(param, tf.float32)
    y64 = np.asarray(fn(tf.constant(x64), p64))
    y32 = fn(tf.constant(x64, tf.float32), p32)
    assert y32.dtype == tf.float32
    np.testing.assert_allclose(np.asarray(y32), y64, atol=2e-5, rtol=2e-5)
    # XLA's float32 eigh differs from LAPACK's; the iterative ops run under XLA in
    # float32 elsewhere (exp cone: test_ops_exp_cone.py; simplex: the jit-compiled
    # Keras model in tests/layers).
    if name == "psd_cone":
        y32_xla = tf.function(lambda x: fn(x, p32), jit_compile=True)(tf.constant(x64, tf.float32))
        np.testing.assert_allclose(np.asarray(y32_xla), y64, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", sorted(OPS))
def test_nan_row_does_not_leak(name):
    fn, row_shape, param = OPS[name]
    x = RNG.normal(size=(4, *row_shape))
    clean = np.asarray(fn(tf.constant(x), param))
    dirty_x = x.copy()
    dirty_x[1].flat[0] = np.nan
    dirty = np.asarray(fn(tf.constant(dirty_x), param))
    keep = [0, 2, 3]
    np.testing.assert_allclose(dirty[keep], clean[keep], rtol=1e-12, atol=1e-12)
    if name not in (
        "non_negative",
        "box",
        "linf_ball",
        "prox_lasso",
        "prox_elastic_net",
        "prox_ridge",
        "prox_non_negative_lasso",
        "prox_non_negative_ridge",
    ):
        # Row-coupled ops: the whole row becomes NaN rather than plausible garbage.
        assert np.all(np.isnan(dirty[1]))
    else:
        assert np.isnan(dirty[1].flat[0])


# Ops whose output couples the entries of a row: an infinite entry leaves the
# projection undefined (no finite nearest point is singled out), so the row is NaN.
_ROW_NAN_ON_INF = {
    "simplex",
    "sparsemax",
    "l1_ball",
    "l1_sphere",
    "l2_ball",
    "l2_sphere",
    "psd_cone",
    "exp_cone",
    "box_section",
    "sparse_simplex",
    "transport",
    "transport_kl",
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_infinite_entry_does_not_leak(name):
    """An inf entry changes neither the other rows' outputs nor their gradients."""
    fn, row_shape, param = OPS[name]
    param = None if param is None else tf.constant(param, tf.float64)
    x = RNG.normal(size=(4, *row_shape))
    w = tf.constant(RNG.normal(size=x.shape))
    clean, clean_grad, _ = _value_and_grads(fn, tf.constant(x), param, w)
    dirty_x = x.copy()
    dirty_x[1].flat[0] = np.inf
    dirty, dirty_grad, _ = _value_and_grads(fn, tf.constant(dirty_x), param, w)
    keep = [0, 2, 3]
    np.testing.assert_allclose(np.asarray(dirty)[keep], np.asarray(clean)[keep], rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(dirty_grad)[keep], np.asarray(clean_grad)[keep], rtol=1e-12
    )
    if name in _ROW_NAN_ON_INF:
        assert np.all(np.isnan(np.asarray(dirty)[1]))


def test_python_and_numpy_inputs():
    y = ops.projection_simplex([3, 1, 2])  # ints are promoted to float32
    assert y.dtype == tf.float32
    np.testing.assert_allclose(np.asarray(y), [1.0, 0.0, 0.0])
    y64 = ops.projection_simplex(np.array([0.2, 0.3, 0.1]), value=np.float64(0.6))
    assert y64.dtype == tf.float64
    np.testing.assert_allclose(np.asarray(y64), [0.2, 0.3, 0.1], atol=1e-15)


def test_variable_parameters_receive_gradients():
    radius = tf.Variable(0.5, dtype=tf.float32)
    x = tf.constant([[3.0, 4.0]])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(ops.projection_l2_ball(x, radius))
    # d/dr sum(r x/||x||) = sum(x)/||x|| = 7/5
    np.testing.assert_allclose(np.asarray(tape.gradient(loss, radius)), 1.4, rtol=1e-6)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.projection_l2_ball([1.0, 2.0], radius=-1.0), r"Received: radius=-1\.0"),
        (lambda: ops.projection_simplex([1.0, 2.0], value=-2), r"Received: value=-2"),
        (lambda: ops.projection_simplex([1.0, 2.0], value=float("nan")), r"Received: value=nan"),
        (lambda: ops.projection_l1_ball([1.0], radius=[1.0, -1.0]), r"Received: radius="),
        (lambda: ops.projection_box([1.0], 2.0, 1.0), r"Received: lower=2\.0, upper=1\.0"),
        (lambda: ops.projection_box([1.0], float("nan"), 1.0), r"Received: lower=nan"),
        (lambda: ops.projection_exp_cone(np.ones((2, 4))), r"Received: x.shape=\(2, 4\)"),
        (lambda: ops.projection_psd_cone(np.ones((2, 3))), r"Received: x.shape=\(2, 3\)"),
        (lambda: ops.projection_affine_set(np.ones(3), np.ones((2, 4)), np.ones(2)), r"A.shape"),
        (lambda: ops.projection_affine_set(np.ones(2), np.ones((3, 2)), np.ones(3)), r"A.shape"),
        (lambda: ops.prox_lasso([1.0], l1reg=-0.1), r"Received: l1reg=-0\.1"),
        (lambda: ops.prox_non_negative_ridge([1.0], l2reg=-1.0), r"Received: l2reg=-1\.0"),
        (lambda: ops.projection_hyperplane([1.0], [1.0], b=float("inf")), r"Received: b=inf"),
        (lambda: ops.projection_simplex(5.0), r"rank >= 1"),
        (lambda: ops.projection_simplex([1.0], value=True), r"Received: value=True"),
    ],
)
def test_bad_arguments_raise_value_error_quoting_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_integer_tensor_rejected():
    with pytest.raises(TypeError, match=r"Received: x.dtype=int32"):
        ops.projection_simplex(tf.constant([1, 2, 3]))


@pytest.mark.parametrize("shape", [(7,), (5, 7), (2, 3, 7), (4, 0)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_last_axis_sum_matches_numpy(shape, dtype, mode, rng):
    # The norm-based ops sum the last axis as a product with ones (faster under XLA
    # on CPU); it must equal the plain sum for every rank, dtype and mode, including
    # shapes only known at run time, and differentiate to a broadcast of ones.
    from keras_implicit.ops import _common

    x = tf.constant(rng.normal(size=shape).astype(dtype))
    summed = _common.sum_last
    if mode != "eager":
        spec = tf.TensorSpec([None] * len(shape), dtype)
        summed = tf.function(summed, input_signature=[spec], jit_compile=mode == "xla")
    np.testing.assert_allclose(
        summed(x).numpy(), x.numpy().sum(-1, keepdims=True), rtol=1e-6, atol=1e-6
    )
    with tf.GradientTape() as tape:
        tape.watch(x)
        total = tf.reduce_sum(_common.sum_last(x))
    np.testing.assert_array_equal(tape.gradient(total, x).numpy(), np.ones(shape))


@pytest.mark.parametrize("accelerator", [False, True])
def test_last_axis_sum_is_a_reduction_where_matmuls_lose_precision(accelerator, monkeypatch):
    # GPUs (TensorFloat-32) and TPUs (bfloat16 passes) run float32 products at ~1e-3
    # precision by default: there float32 sums stay reductions, float64 ones need not.
    from keras_implicit import _structure

    monkeypatch.setattr(_structure, "_accelerator_visible", lambda: accelerator)
    ops_used = {}
    for dtype in ("float32", "float64"):
        graph = tf.function(_structure.row_sum).get_concrete_function(
            tf.TensorSpec([None, 5], dtype)
        )
        ops_used[dtype] = {op.type for op in graph.graph.get_operations()}
    assert ("MatMul" in ops_used["float32"]) is not accelerator
    assert ("Sum" in ops_used["float32"]) is accelerator
    assert "MatMul" in ops_used["float64"]


# Ops that sum along the last axis (`_common.sum_last`), whose graphs differ between
# the device branches; the others do not depend on the branch (the transport
# projection sums through `projection_simplex`, covered here).
_SUMMING = {
    "simplex",
    "sparsemax",
    "l1_ball",
    "l1_sphere",
    "sparse_simplex",
    "l2_ball",
    "l2_sphere",
    "hyperplane",
    "halfspace",
    "second_order_cone",
    "prox_group_lasso",
    "box_section",
}
_SUMMING_UNDER_XLA = {"simplex", "l2_ball", "box_section"}


@pytest.mark.parametrize("name", sorted(_SUMMING))
def test_accelerator_branch_matches_cpu_branch(name, monkeypatch):
    """The branch taken where a GPU/TPU is visible, forced on CPU: same values and gradients.

    The CPU branch is the one checked against cvxpy and finite differences everywhere
    else; here each summing op runs in a traced graph (and some under XLA) with each
    branch, and the two must agree to rounding.
    """
    fn, row_shape, param = OPS[name]
    p = None if param is None else tf.constant(param, tf.float64)
    x = tf.constant(RNG.normal(size=(3, *row_shape)))
    w = tf.constant(RNG.normal(size=(3, *row_shape)))
    results = {}
    for branch in ("cpu", "accelerator"):
        monkeypatch.setattr(_common, "_device_branch_override", branch)
        graph = tf.function(lambda x, w: _value_and_grads(fn, x, p, w))
        results[branch] = [np.asarray(v) for v in graph(x, w)]
        if name in _SUMMING_UNDER_XLA:
            compiled = tf.function(lambda x, w: _value_and_grads(fn, x, p, w), jit_compile=True)
            for got, want in zip(compiled(x, w), results[branch]):
                np.testing.assert_allclose(np.asarray(got), want, rtol=1e-7, atol=1e-9)
    for got, want in zip(results["accelerator"], results["cpu"]):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("branch", ["cpu", "accelerator"])
def test_device_branch_override_selects_the_sum(branch, monkeypatch):
    monkeypatch.setattr(_common, "_device_branch_override", branch)
    ops_used = {}
    for dtype in ("float32", "float64"):
        graph = tf.function(_common.sum_last).get_concrete_function(tf.TensorSpec([None, 5], dtype))
        ops_used[dtype] = {op.type for op in graph.graph.get_operations()}
    accelerator = branch == "accelerator"
    assert ("MatMul" in ops_used["float32"]) is not accelerator
    assert ("Sum" in ops_used["float32"]) is accelerator
    assert "MatMul" in ops_used["float64"]  # float64 products are exact on every device
    # the eager path of the iterative ops keeps one graph per branch
    x = tf.constant(RNG.normal(size=(2, 5)), tf.float32)
    np.testing.assert_allclose(np.asarray(ops.projection_simplex(x)).sum(-1), np.ones(2), rtol=1e-6)


@pytest.mark.parametrize(
    "value,expected", [("accelerator", True), ("cpu", False), (" CPU ", False), ("", None)]
)
def test_device_branch_environment_variable(value, expected, monkeypatch):
    monkeypatch.setenv(_common.DEVICE_BRANCH_ENV, value)
    _common._device_branch_setting.cache_clear()
    try:
        if expected is None:  # "auto": follows the visible devices
            expected = bool(tf.config.list_logical_devices("GPU"))
        assert _common.accelerator_branch() is expected
        monkeypatch.setenv(_common.DEVICE_BRANCH_ENV, "tpu")
        assert _common.accelerator_branch() is expected  # read once per process
        _common._device_branch_setting.cache_clear()
        with pytest.raises(ValueError, match=r"Received: KERAS_IMPLICIT_DEVICE_BRANCH='tpu'"):
            _common.accelerator_branch()
    finally:
        monkeypatch.delenv(_common.DEVICE_BRANCH_ENV)
        _common._device_branch_setting.cache_clear()
