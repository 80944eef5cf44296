"""Every public layer through Keras' own layer-test harness, mixed precision included.

`keras.src.testing.TestCase.run_layer_test` is what Keras judges its own layers by:
build, symbolic and eager calls, the config round trip, a compiled `fit` step, and a
call under `mixed_float16` whose outputs must come back in the compute dtype with
float32 weights. `mixed_bfloat16` is checked here the same way, and under both
policies the output must agree with the float32 layer to the half dtype's precision
(every solve runs in float32).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.testing import TestCase

import keras_implicit as ki

RNG = np.random.default_rng(0)
A_ROW = RNG.normal(size=5).astype("float32")
A_MAT = RNG.normal(size=(2, 5)).astype("float32")
B_VEC = RNG.normal(size=2).astype("float32")


def _sym(n=3, batch=2):
    m = RNG.normal(size=(batch, n, n)).astype("float32")
    return (m + np.swapaxes(m, -1, -2)) / 2


def _deq_class(cell_factory, name):
    """A DEQ subclass whose cell is made fresh per instance, in the layer's dtype policy."""

    def __init__(self, cell=None, **kwargs):
        if cell is None:
            cell = cell_factory(kwargs.get("dtype"))
        ki.layers.DEQ.__init__(self, cell, **kwargs)

    cls = type(name, (ki.layers.DEQ,), {"__init__": __init__})
    return keras.saving.register_keras_serializable(package="keras_implicit_tests")(cls)


DenseDEQ = _deq_class(lambda dtype: ki.layers.DenseCell(6, dtype=dtype), "DenseDEQ")
MonotoneDEQ = _deq_class(lambda dtype: ki.layers.MonotoneDenseCell(6, dtype=dtype), "MonotoneDEQ")
ConvDEQ = _deq_class(lambda dtype: ki.layers.ConvCell(4, dtype=dtype), "ConvDEQ")
SpectralDropoutDEQ = _deq_class(
    lambda dtype: ki.layers.DenseCell(6, kernel_norm="spectral", dropout=0.2, seed=0, dtype=dtype),
    "SpectralDropoutDEQ",
)
WeightNormDEQ = _deq_class(
    lambda dtype: ki.layers.DenseCell(6, kernel_norm="weight", dropout=0.2, seed=0, dtype=dtype),
    "WeightNormDEQ",
)

QP_PARAMS = {
    "Q": np.eye(4) * 2.0,
    "A": np.ones((1, 4)),
    "b": np.ones(1),
    "G": -np.eye(4),
    "h": np.zeros(4),
}
# min c^T x over the simplex, in SCS form A x + s = b: s_0 = 1 - sum x = 0 (zero cone)
# and s = x >= 0 (non-negative cone)
CONE_PARAMS = {
    "cone": {"z": 1, "l": 4},
    "A": np.concatenate([np.ones((1, 4)), -np.eye(4)]),
    "b": np.concatenate([np.ones(1), np.zeros(4)]),
}


def _simplex_qp_problem():
    """min 1/2 ||x||^2 - q^T x over the simplex, as a cvxpy problem (None without cvxpy)."""
    try:
        import cvxpy as cp
    except ImportError:
        return None
    q, x = cp.Parameter(4), cp.Variable(4)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) - q @ x), [x >= 0, cp.sum(x) == 1])
    return {"problem": problem, "parameters": [q], "variables": [x]}


CVXPY_PARAMS = _simplex_qp_problem()

# (id, layer class, init kwargs, input shape or data, expected output shape)
CASES = [
    ("sparsemax", ki.layers.Sparsemax, {}, (2, 5), (2, 5)),
    ("projection_kind", ki.layers.Projection, {"kind": "simplex"}, (2, 5), (2, 5)),
    ("simplex", ki.layers.SimplexProjection, {"value": 2.0}, (2, 5), (2, 5)),
    (
        "simplex_trainable",
        ki.layers.SimplexProjection,
        {"value": 2.0, "trainable_params": True},
        (2, 5),
        (2, 5),
    ),
    ("l1_ball", ki.layers.L1BallProjection, {"radius": 0.5}, (2, 5), (2, 5)),
    ("l1_sphere", ki.layers.L1SphereProjection, {"radius": 0.5}, (2, 5), (2, 5)),
    ("l2_ball", ki.layers.L2BallProjection, {"radius": 0.5}, (2, 5), (2, 5)),
    ("l2_sphere", ki.layers.L2SphereProjection, {}, (2, 5), (2, 5)),
    ("linf_ball", ki.layers.LinfBallProjection, {"radius": 0.5}, (2, 5), (2, 5)),
    ("box", ki.layers.BoxProjection, {"lower": -0.5, "upper": 0.5}, (2, 5), (2, 5)),
    ("non_negative", ki.layers.NonNegativeProjection, {}, (2, 5), (2, 5)),
    ("hyperplane", ki.layers.HyperplaneProjection, {"a": A_ROW, "b": 0.3}, (2, 5), (2, 5)),
    ("halfspace", ki.layers.HalfspaceProjection, {"a": A_ROW, "b": 0.3}, (2, 5), (2, 5)),
    ("affine_set", ki.layers.AffineSetProjection, {"A": A_MAT, "b": B_VEC}, (2, 5), (2, 5)),
    ("soc", ki.layers.SOCProjection, {}, (2, 5), (2, 5)),
    ("psd", ki.layers.PSDProjection, {}, _sym(), (2, 3, 3)),
    ("exp_cone", ki.layers.ExpConeProjection, {}, (2, 3), (2, 3)),
    ("deq_dense", DenseDEQ, {}, (2, 6), (2, 6)),
    ("deq_monotone", MonotoneDEQ, {}, (2, 6), (2, 6)),
    ("deq_conv", ConvDEQ, {}, (2, 5, 5, 4), (2, 5, 5, 4)),
    ("deq_dense_spectral_dropout", SpectralDropoutDEQ, {}, (2, 6), (2, 6)),
    ("deq_dense_weight_norm_dropout", WeightNormDEQ, {}, (2, 6), (2, 6)),
    (
        "projection_box_section",
        ki.layers.Projection,
        {"kind": "box_section", "lower": -1.0, "upper": 1.0, "w": 1.0, "c": 0.5},
        (2, 5),
        (2, 5),
    ),
    (
        "projection_sparse_simplex",
        ki.layers.Projection,
        {"kind": "sparse_simplex", "max_nonzeros": 2},
        (2, 5),
        (2, 5),
    ),
    (
        "projection_transport",
        ki.layers.Projection,
        {"kind": "transport", "a": [1.0, 2.0], "b": [1.0, 1.0, 1.0]},
        (2, 2, 3),
        (2, 2, 3),
    ),
    (
        "projection_birkhoff_kl",
        ki.layers.Projection,
        {"kind": "birkhoff", "divergence": "kl"},
        (2, 3, 3),
        (2, 3, 3),
    ),
    ("qp", ki.layers.QuadraticProgram, QP_PARAMS, (2, 4), (2, 4)),
    ("cone_program", ki.layers.ConeProgram, CONE_PARAMS, (2, 4), (2, 4)),
]
if CVXPY_PARAMS is not None:
    CASES.append(("cvxpy_layer", ki.layers.CvxpyLayer, CVXPY_PARAMS, (2, 4), (2, 4)))
IDS = [case[0] for case in CASES]


def _input_data(shape_or_data, dtype="float32"):
    if isinstance(shape_or_data, tuple):
        return RNG.normal(size=shape_or_data).astype(dtype)
    return np.asarray(shape_or_data, dtype=dtype)


class _Harness(TestCase):
    def runTest(self):  # unittest needs a method to instantiate the class
        pass


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_run_layer_test(case):
    _, layer_cls, init_kwargs, data, expected_shape = case
    _Harness().run_layer_test(
        layer_cls,
        init_kwargs=init_kwargs,
        input_data=_input_data(data),
        expected_output_shape=expected_shape,
        expected_output_dtype="float32",
    )


# a spectrally normalized kernel has norm 1, so that cell's map need not contract: its
# solve may stop short of a fixed point, and values compared across precisions or
# execution modes then differ by more than the tolerances below
CONTRACTIVE_CASES = [case for case in CASES if case[0] != "deq_dense_spectral_dropout"]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("case", CONTRACTIVE_CASES, ids=[case[0] for case in CONTRACTIVE_CASES])
def test_mixed_precision_matches_float32(case, policy):
    """The layer under a mixed policy: compute-dtype output, float32 weights, float32 values."""
    _, layer_cls, init_kwargs, data, expected_shape = case
    x = _input_data(data)
    reference = layer_cls(**init_kwargs)
    expected = keras.ops.convert_to_numpy(reference(x))
    mixed = layer_cls(**init_kwargs, dtype=policy)
    mixed(x)  # build
    mixed.set_weights(reference.get_weights())
    out = mixed(x)
    half = policy.removeprefix("mixed_")
    assert keras.backend.standardize_dtype(out.dtype) == half
    assert tuple(out.shape) == expected_shape
    for weight in mixed.weights:
        if weight.dtype.startswith("float"):
            assert weight.dtype == "float32", weight.path
    # the input itself is rounded to the half dtype before the solve, so agreement is
    # to a few half-precision ulps of the output's scale (bfloat16: 2^-8)
    eps = 2.0**-10 if half == "float16" else 2.0**-7
    scale = 1.0 + np.max(np.abs(expected))
    np.testing.assert_allclose(
        np.asarray(out, dtype="float32"), expected, atol=8 * eps * scale, rtol=0
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c[0] in ("simplex_trainable", "deq_conv", "deq_dense", "qp")],
    ids=lambda c: c[0],
)
def test_global_mixed_policy_fit(case, policy):
    """A model built under a global mixed policy trains: finite loss, weights move."""
    _, layer_cls, init_kwargs, data, _ = case
    x = _input_data(data)
    y = np.zeros((x.shape[0], 1), "float32")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = keras.Sequential(
            [
                keras.Input(x.shape[1:]),
                keras.layers.Dense(x.shape[-1]) if x.ndim == 2 else keras.layers.Identity(),
                layer_cls(**init_kwargs),
                keras.layers.Flatten(),
                keras.layers.Dense(1, dtype="float32"),
            ]
        )
        model.compile("adam", "mse")
        before = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
        # float16 loss scaling starts at 2^15 and skips the steps whose gradients overflow
        # until it has halved enough: a few steps move nothing by design
        history = model.fit(x, y + 1.0, epochs=6, batch_size=2, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert np.all(np.isfinite(history.history["loss"]))
    moved = [
        not np.allclose(b, keras.ops.convert_to_numpy(w))
        for b, w in zip(before, model.trainable_weights)
    ]
    assert all(moved)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("case", CONTRACTIVE_CASES, ids=[case[0] for case in CONTRACTIVE_CASES])
def test_unknown_batch_dimension(case, jit_compile):
    """Traced once for a None batch, then called with two batch sizes: eager values."""
    _, layer_cls, init_kwargs, data, _ = case
    x = _input_data(data)
    layer = layer_cls(**init_kwargs)
    expected = keras.ops.convert_to_numpy(layer(x))
    spec = tf.TensorSpec([None, *x.shape[1:]], tf.float32)
    call = tf.function(layer.__call__, input_signature=[spec], jit_compile=jit_compile)
    np.testing.assert_allclose(call(x).numpy(), expected, rtol=1e-4, atol=1e-4)
    doubled = np.concatenate([x, x])
    np.testing.assert_allclose(call(doubled).numpy()[: len(x)], expected, rtol=1e-4, atol=1e-4)
    assert call.experimental_get_tracing_count() == 1
