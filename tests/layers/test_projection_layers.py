"""Projection layers: build, symbolic/eager calls, fit, XLA, save/load, bad inputs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_implicit.layers as L
import keras_implicit.ops as ops

RNG = np.random.default_rng(0)


A_VEC = [1.0, -2.0, 0.5, 0.3]
W_VEC = [1.0, 2.0, 0.5, 1.0]
MARG_A, MARG_B = [0.5, 1.0, 1.5], [2.0, 1.0]

# (layer factory, input shape without batch, reference op on the same input)
LAYERS = {
    "non_negative": (lambda: L.NonNegativeProjection(), (4,), ops.projection_non_negative),
    "box": (
        lambda: L.BoxProjection(-0.5, [0.5, 1.0, 0.2, 0.3]),
        (4,),
        lambda x: ops.projection_box(x, -0.5, [0.5, 1.0, 0.2, 0.3]),
    ),
    "hyperplane": (
        lambda: L.HyperplaneProjection(A_VEC, 0.2),
        (4,),
        lambda x: ops.projection_hyperplane(x, A_VEC, 0.2),
    ),
    "halfspace": (
        lambda: L.HalfspaceProjection(A_VEC, 0.2),
        (4,),
        lambda x: ops.projection_halfspace(x, A_VEC, 0.2),
    ),
    "affine_set": (
        lambda: L.AffineSetProjection([[1.0, 1, 1, 1]], [1.0]),
        (4,),
        lambda x: ops.projection_affine_set(x, [[1.0, 1, 1, 1]], [1.0]),
    ),
    "simplex": (lambda: L.SimplexProjection(2.0), (4,), lambda x: ops.projection_simplex(x, 2.0)),
    "sparsemax": (lambda: L.Sparsemax(), (4,), ops.sparsemax),
    "l1_ball": (lambda: L.L1BallProjection(0.5), (4,), lambda x: ops.projection_l1_ball(x, 0.5)),
    "l1_sphere": (
        lambda: L.L1SphereProjection(0.5),
        (4,),
        lambda x: ops.projection_l1_sphere(x, 0.5),
    ),
    "l2_ball": (lambda: L.L2BallProjection(0.5), (4,), lambda x: ops.projection_l2_ball(x, 0.5)),
    "l2_sphere": (
        lambda: L.L2SphereProjection(0.5),
        (4,),
        lambda x: ops.projection_l2_sphere(x, 0.5),
    ),
    "linf_ball": (
        lambda: L.LinfBallProjection(0.5),
        (4,),
        lambda x: ops.projection_linf_ball(x, 0.5),
    ),
    "second_order_cone": (lambda: L.SOCProjection(), (4,), ops.projection_second_order_cone),
    "psd_cone": (lambda: L.PSDProjection(), (3, 3), ops.projection_psd_cone),
    "exp_cone": (lambda: L.ExpConeProjection(), (3,), ops.projection_exp_cone),
    "box_section": (
        lambda: L.Projection("box_section", lower=-0.5, upper=[0.5, 1.0, 0.2, 0.3], w=W_VEC, c=0.4),
        (4,),
        lambda x: ops.projection_box_section(x, -0.5, [0.5, 1.0, 0.2, 0.3], W_VEC, 0.4),
    ),
    "sparse_simplex": (
        lambda: L.Projection("sparse_simplex", max_nonzeros=2, value=1.5),
        (4,),
        lambda x: ops.projection_sparse_simplex(x, 2, 1.5),
    ),
    "transport": (
        lambda: L.Projection("transport", a=MARG_A, b=MARG_B),
        (3, 2),
        lambda x: ops.projection_transport(x, MARG_A, MARG_B),
    ),
    "birkhoff": (
        lambda: L.Projection("birkhoff", divergence="kl"),
        (3, 3),
        lambda x: ops.projection_birkhoff(x, divergence="kl"),
    ),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_symbolic_and_eager_call_match_the_op(kind):
    make, shape, op = LAYERS[kind]
    layer = make()
    inp = keras.Input(shape)
    out = layer(inp)
    assert tuple(out.shape) == (None, *shape)
    assert layer.compute_output_shape((None, *shape)) == (None, *shape)
    x = RNG.normal(size=(5, *shape)).astype("float32")
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(op(x)), rtol=1e-6, atol=1e-6)
    # The generic layer with the same kind and parameters is the same function.
    config = layer.get_config()
    generic = L.Projection(
        kind,
        **{k: v for k, v in config.items() if k not in ("name", "trainable", "dtype", "kind")},
    )
    np.testing.assert_allclose(np.asarray(generic(x)), np.asarray(layer(x)), rtol=1e-6)
    # Dynamic batch through a functional model: batches of 4 and 3 in one predict.
    model = keras.Model(inp, out)
    xb = RNG.normal(size=(7, *shape)).astype("float32")
    got = model.predict(xb, batch_size=4, verbose=0)
    np.testing.assert_allclose(got, np.asarray(op(xb)), atol=1e-5)


def test_float64_layer():
    layer = L.L1BallProjection(1.0, dtype="float64")
    x = RNG.normal(size=(3, 6))
    y = layer(x)
    assert y.dtype == tf.float64
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(ops.projection_l1_ball(x, 1.0)), atol=1e-14
    )


def _blobs(n=240):
    rng = np.random.default_rng(1)
    centers = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    labels = rng.integers(0, 3, size=n)
    x = centers[labels] + 0.5 * rng.normal(size=(n, 2))
    return x.astype("float32"), np.eye(3, dtype="float32")[labels], labels


def test_fit_sparsemax_classifier():
    """A linear model with a Sparsemax output learns a 3-class toy problem."""
    keras.utils.set_random_seed(0)
    x, y, labels = _blobs()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3), L.Sparsemax()])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    probs = model.predict(x, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.5 * first
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert probs.min() >= 0.0 and (probs == 0).mean() > 0.3  # sparse outputs
    assert (probs.argmax(-1) == labels).mean() > 0.95


def test_fit_learns_the_radius():
    """Only the radius is trainable; targets lie on the sphere of radius 2.5."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(2)
    x = (5.0 * rng.normal(size=(256, 3))).astype("float32")
    x = x[np.linalg.norm(x, axis=-1) > 3.0]  # all outside the ball during training
    target = 2.5 * x / np.linalg.norm(x, axis=-1, keepdims=True)
    layer = L.L2BallProjection(1.0, trainable_params=True)
    model = keras.Sequential([keras.Input((3,)), layer])
    # Full batch: loss = (r - 2.5)^2 / 3, so plain gradient descent converges fast.
    model.compile(optimizer=keras.optimizers.SGD(2.0), loss="mse")
    model.fit(x, target, epochs=30, batch_size=len(x), verbose=0)
    np.testing.assert_allclose(float(layer.get_param("radius")), 2.5, atol=0.05)
    assert len(layer.trainable_weights) == 1


def test_jit_compiled_model_matches_eager():
    keras.utils.set_random_seed(0)
    x, y, _ = _blobs(96)

    def build(jit):
        keras.utils.set_random_seed(3)
        model = keras.Sequential(
            [
                keras.Input((2,)),
                keras.layers.Dense(3),
                L.BoxProjection(-1.0, 1.0, trainable_params=True),
                L.SimplexProjection(1.0, trainable_params=True),
            ]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit)
        return model

    eager, xla = build(False), build(True)
    eager.fit(x, y, epochs=1, batch_size=32, verbose=0, shuffle=False)
    xla.fit(x, y, epochs=1, batch_size=32, verbose=0, shuffle=False)
    for we, wx in zip(eager.get_weights(), xla.get_weights()):
        np.testing.assert_allclose(we, wx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(eager.predict(x, verbose=0), xla.predict(x, verbose=0), atol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = keras.layers.Dense(6)(inp)
    a = L.BoxProjection(-0.5, 0.7, trainable_params=["upper"])(h)
    b = L.Projection("l1_ball", radius=1.5, trainable_params=True)(a)
    c = L.HalfspaceProjection([1.0, 0, 0, 0, 0, -1.0], 0.1, trainable_params=True)(b)
    d = L.Sparsemax()(c)
    m = keras.layers.Reshape((2, 3))(keras.layers.Dense(6)(d))
    cone = L.ExpConeProjection()(m)
    psd = L.PSDProjection()(keras.layers.Reshape((3, 3))(keras.layers.Dense(9)(d)))
    model = keras.Model(inp, [d, cone, psd])
    # Move the learned set parameters away from their configured initial values, so
    # that the round trip must restore weights, not just configs.
    for weight in model.weights:
        weight.assign(weight + 0.05 * np.ones(weight.shape, "float32"))
    x = RNG.normal(size=(16, 6)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for got, expected in zip(loaded.predict(x, verbose=0), model.predict(x, verbose=0)):
        np.testing.assert_array_equal(got, expected)
    box = next(lyr for lyr in loaded.layers if isinstance(lyr, L.BoxProjection))
    original = next(lyr for lyr in model.layers if isinstance(lyr, L.BoxProjection))
    np.testing.assert_array_equal(
        np.asarray(box.get_param("upper")), np.asarray(original.get_param("upper"))
    )
    assert box.get_param("upper").shape == (6,)  # a learned bound per feature


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_config_round_trip(kind):
    layer = LAYERS[kind][0]()
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    generic = L.Projection(
        kind, **{k: v for k, v in layer.get_config().items() if k not in ("name", "kind")}
    )
    assert L.Projection.from_config(generic.get_config()).get_config() == generic.get_config()


@pytest.mark.parametrize(
    "make,error,match",
    [
        (
            lambda: L.Projection("l3_ball"),
            ValueError,
            r"Known kinds: \[.*'simplex'.*\]. Received: kind='l3_ball'",
        ),
        (lambda: L.L2BallProjection(-1.0), ValueError, r"Received: radius=-1\.0"),
        (
            lambda: L.L2BallProjection(0.0, trainable_params=True),
            ValueError,
            r"positive.*Received: radius=0\.0",
        ),
        (
            lambda: L.Projection("simplex", radius=2.0),
            ValueError,
            r"not a parameter of kind 'simplex'",
        ),
        (
            lambda: L.Projection("l2_ball", trainable_params=["value"]),
            ValueError,
            r"Received: trainable_params=\['value'\]",
        ),
        (lambda: L.BoxProjection(1.0, 0.0), ValueError, r"Received: lower=1\.0, upper=0\.0"),
        (lambda: L.Projection("hyperplane"), ValueError, r"requires the parameter `a`"),
        (
            lambda: L.HyperplaneProjection([1.0, float("nan")]),
            ValueError,
            r"Received: a=\[1\.0, nan\]",
        ),
        (lambda: L.AffineSetProjection([1.0, 2.0], [1.0]), ValueError, r"Received: A.shape=\(2,\)"),
        (
            lambda: L.AffineSetProjection([[1.0, 2.0]], [1.0, 2.0]),
            ValueError,
            r"Received: b.shape=\(2,\)",
        ),
        (lambda: L.SimplexProjection("one"), ValueError, r"Received: value='one'"),
        (lambda: L.Projection(3), ValueError, r"Received: kind=3"),
        (
            lambda: L.Projection("sparse_simplex", max_nonzeros=1.5),
            ValueError,
            r"Received: max_nonzeros=1\.5",
        ),
        (
            lambda: L.Projection(
                "sparse_simplex", max_nonzeros=2, trainable_params=["max_nonzeros"]
            ),
            ValueError,
            r"learnable parameters are \['value'\]",
        ),
        (
            lambda: L.Projection("birkhoff", divergence="l2"),
            ValueError,
            r"Received: divergence='l2'",
        ),
        (
            lambda: L.Projection("transport", a=[-1.0, 2.0], b=[1.0]),
            ValueError,
            r"Received: a=\[-1\.0, 2\.0\]",
        ),
        (
            lambda: L.Projection("box_section", lower=1.0, upper=0.0),
            ValueError,
            r"Received: lower=1\.0, upper=0\.0",
        ),
    ],
)
def test_bad_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "layer,shape,match",
    [
        (lambda: L.ExpConeProjection(), (4,), r"size 3.*Received: input_shape=\(None, 4\)"),
        (lambda: L.PSDProjection(), (3, 4), r"square.*Received: input_shape=\(None, 3, 4\)"),
        (lambda: L.PSDProjection(), (3,), r"rank >= 3"),
        (lambda: L.HyperplaneProjection([1.0, 2.0]), (3,), r"Received: a.shape=\(2,\)"),
        (lambda: L.AffineSetProjection([[1.0, 2.0]], [1.0]), (3,), r"Received: A.shape=\(1, 2\)"),
        (lambda: L.BoxProjection(0.0, [1.0, 2.0]), (3,), r"Received: upper.shape=\(2,\)"),
        (lambda: L.Projection("birkhoff"), (3, 4), r"square.*Received: input_shape=\(None, 3, 4\)"),
        (
            lambda: L.Projection("transport", a=[1.0, 1.0], b=[2.0]),
            (3, 1),
            r"Received: a.shape=\(2,\)",
        ),
        (lambda: L.Projection("transport", a=[1.0], b=[1.0]), (1,), r"rank >= 3"),
    ],
)
def test_bad_input_shapes(layer, shape, match):
    with pytest.raises(ValueError, match=match):
        layer()(keras.Input(shape))


def test_get_param_unknown_name():
    with pytest.raises(ValueError, match=r"Received: name='radius'"):
        L.Sparsemax().get_param("radius")


def test_static_shapes_survive_eager_calls_with_many_shapes():
    """Eager calls at several shapes relax the ops' internal graph functions;
    symbolic Keras calls afterwards must still get fully static shapes."""
    for n in (3, 4, 5):
        ops.projection_simplex(np.ones((2, n), "float32"))
        ops.projection_exp_cone(np.ones((n, 3), "float32"))
    out = L.Sparsemax()(keras.layers.Dense(5)(keras.Input((2,))))
    assert tuple(out.shape) == (None, 5)
    out = L.ExpConeProjection()(keras.layers.Reshape((2, 3))(keras.Input((6,))))
    assert tuple(out.shape) == (None, 2, 3)


def _kinds(default):
    """All kinds, those outside `default` in the slow suite (XLA compiles and the
    exponential cone's traces take seconds each)."""
    return [k if k in default else pytest.param(k, marks=pytest.mark.slow) for k in sorted(LAYERS)]


@pytest.mark.parametrize("kind", _kinds(set(LAYERS) - {"exp_cone", "transport", "birkhoff"}))
def test_unknown_batch_and_feature_dims(kind):
    """tf.function traced once for an unknown batch (and once with every dimension
    unknown), and a functional model on an Input with unknown dimensions, all equal
    to the op on batches of two sizes."""
    make, shape, op = LAYERS[kind]
    layer = make()
    batch_only = tf.function(layer.__call__, input_signature=[tf.TensorSpec([None, *shape])])
    all_unknown = tf.function(
        layer.__call__, input_signature=[tf.TensorSpec([None] * (1 + len(shape)))]
    )
    inp = keras.Input([None] * len(shape))
    model = keras.Model(inp, make()(inp))
    assert tuple(model.output.shape) == (None, *([None] * len(shape)))
    for batch in (3, 1):
        x = RNG.normal(size=(batch, *shape)).astype("float32")
        expected = np.asarray(op(x))
        for fn in (batch_only, all_unknown, model):
            np.testing.assert_allclose(np.asarray(fn(x)), expected, rtol=1e-5, atol=1e-6)
    assert batch_only.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("kind", _kinds({"l2_ball", "affine_set", "box", "second_order_cone"}))
def test_unknown_batch_under_xla(kind):
    """jit_compile=True with an unknown batch: one compiled function, two batch sizes."""
    make, shape, op = LAYERS[kind]
    layer = make()
    fn = tf.function(
        layer.__call__, input_signature=[tf.TensorSpec([None, *shape])], jit_compile=True
    )
    for batch in (4, 2):
        x = RNG.normal(size=(batch, *shape)).astype("float32")
        np.testing.assert_allclose(np.asarray(fn(x)), np.asarray(op(x)), rtol=1e-5, atol=1e-5)


def test_learned_parameter_gradient_with_unknown_batch_under_xla():
    """d loss / d raw radius of a learned l2 ball, XLA with an unknown batch vs eager."""
    layer = L.L2BallProjection(1.5, trainable_params=True)
    layer.build((None, 5))
    w = tf.constant(RNG.normal(size=(1, 5)), tf.float32)

    def loss_and_grad(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(w * layer(x) ** 2)
        return loss, tape.gradient(loss, layer.trainable_weights[0])

    compiled = tf.function(
        loss_and_grad, input_signature=[tf.TensorSpec([None, 5])], jit_compile=True
    )
    for batch in (3, 6):
        x = RNG.normal(size=(batch, 5)).astype("float32")
        got, expected = compiled(x), loss_and_grad(x)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6)
        assert np.asarray(got[1]) != 0


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize(
    "make, x",
    [
        # |x| ~ 300: the squares overflow float16 (max 65504)
        (lambda **kw: L.L2BallProjection(2.0, **kw), [[300.0, -400.0, 120.0]]),
        (lambda **kw: L.L2SphereProjection(0.5, **kw), [[300.0, 400.0, 0.0]]),
        (lambda **kw: L.SOCProjection(**kw), [[100.0, 300.0, -400.0]]),
        # the threshold search near float16's largest value
        (lambda **kw: L.SimplexProjection(1.0, **kw), [[6e4, 5e4, 1e4]]),
        (lambda **kw: L.L1BallProjection(0.25, **kw), [[-6e4, 3e4, 1e4]]),
        (lambda **kw: L.AffineSetProjection([[1.0, 1.0, 1.0]], [1.0], **kw), [[1.0, 2.0, 3.0]]),
    ],
    ids=["l2_ball", "l2_sphere", "soc", "simplex", "l1_ball", "affine_set"],
)
def test_mixed_precision_projects_in_float32(make, x, policy):
    """Under a mixed policy: output in the compute dtype, equal to the float32
    projection rounded to it, also where the half dtype alone overflows."""
    x = np.asarray(x, "float32")
    expected = np.asarray(make()(x))
    layer = make(dtype=policy)
    out = layer(x)
    half = policy.removeprefix("mixed_")
    assert keras.backend.standardize_dtype(out.dtype) == half
    # the input is rounded to the half dtype first; the answer is exact to its precision
    rtol = 2.0**-9 if half == "float16" else 2.0**-6
    np.testing.assert_allclose(np.asarray(out, "float32"), expected, rtol=rtol, atol=rtol)


def test_fit_learns_box_section_bounds_and_weights():
    """All four box-section parameters are weights, and training moves them."""
    keras.utils.set_random_seed(0)
    x = RNG.normal(size=(64, 4)).astype("float32")
    target = np.asarray(ops.projection_box_section(x, -0.2, 0.6, [1.0, 1.0, 2.0, 1.0], 0.5))
    layer = L.Projection("box_section", lower=-1.0, upper=1.0, trainable_params=True)
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", jit_compile=True)
    before = model.evaluate(x, target, verbose=0)
    model.fit(x, target, epochs=15, batch_size=16, verbose=0)
    assert model.evaluate(x, target, verbose=0) < 0.3 * before
    assert sorted(w.name for w in layer.trainable_weights) == ["c", "lower", "upper", "w"]


@pytest.mark.slow
def test_transport_layer_trains_and_saves(tmp_path):
    """A Dense layer followed by the KL transport projection (Sinkhorn), fit and reloaded."""
    keras.utils.set_random_seed(0)
    x = RNG.normal(size=(32, 6)).astype("float32")
    marginals = {"a": [1.0, 2.0], "b": [1.0, 1.0, 1.0], "divergence": "kl"}
    target = np.asarray(ops.projection_transport(x.reshape(-1, 2, 3) * 2, **marginals))
    inp = keras.Input((6,))
    hidden = keras.layers.Reshape((2, 3))(keras.layers.Dense(6)(inp))
    out = L.Projection("transport", **marginals)(hidden)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    before = model.evaluate(x, target, verbose=0)
    model.fit(x, target, epochs=10, batch_size=8, verbose=0)
    assert model.evaluate(x, target, verbose=0) < 0.5 * before
    path = str(tmp_path / "transport.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
