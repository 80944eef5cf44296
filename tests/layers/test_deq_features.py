"""DEQ features from torchdeq: fixed-point correction, kernel normalization computed once
per solve, variational dropout with one mask per solve, and warm starts.

Each is checked against an independent reference: unrolled autodiff through the same
iterations, numpy's SVD, or a plain cell holding the normalized kernels.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_implicit as ki

F64 = "float64"


def _x(batch=3, features=5, seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=(batch, features)), tf.float64)


def _cell(units=4, **kwargs):
    kwargs.setdefault("activation", "tanh")
    kwargs.setdefault("normalization", "none")
    return ki.layers.DenseCell(units, dtype=F64, **kwargs)


def _fpi(max_iter, tol=1e-13):
    return {"solver": "fixed_point_iteration", "tol": tol, "max_iter": max_iter}


# ------------------------------------------------------------------ fixed-point correction


def test_correction_schedule_matches_torchdeq_n_states():
    deq = ki.layers.DEQ(_cell(), correction_states=3)
    assert deq._schedule(40) == [14, 13, 13]  # states after 14, 27, 40 iterations
    assert deq._schedule(12) == [4, 4, 4]
    assert ki.layers.DEQ(_cell(), correction_states=5)._schedule(3) == [1, 1, 1]


@pytest.mark.parametrize("k", [3])
def test_correction_states_match_unrolled_phantom_reference(k):
    """Each sampled state and its phantom gradient equal an unrolled run: no gradient for
    the solver iterations, then 2 damped steps from each sample with the tape recording."""
    x = _x()
    cell = _cell()
    deq = ki.layers.DEQ(
        cell,
        **_fpi(12),
        correction_states=k,
        backward="phantom",
        phantom_steps=2,
        phantom_damping=0.7,
        on_failure="ignore",
        dtype=F64,
    )
    weights = [0.8**2, 0.8, 1.0]
    probes = [tf.constant(np.random.default_rng(i).normal(size=(3, 4))) for i in range(k)]

    def loss_of(outputs):
        return sum(w * tf.reduce_sum(o * p) for w, o, p in zip(weights, outputs, probes))

    with tf.GradientTape() as tape:
        outputs = deq(x, training=True)
        loss = loss_of(outputs)
    grads = tape.gradient(loss, cell.trainable_variables)
    assert isinstance(outputs, list) and len(outputs) == k

    # three segments of 4 map evaluations; each returns its best (last evaluated)
    # iterate, z_3, and the next segment resumes from it: z_3, z_6, z_9
    z, samples = tf.zeros((3, 4), tf.float64), []
    for i in range(9):
        z = cell(z, x)
        if (i + 1) % 3 == 0:
            samples.append(z)
    with tf.GradientTape() as tape:
        reference = []
        for s in samples:
            for _ in range(2):
                s = 0.3 * s + 0.7 * cell(s, x)
            reference.append(s)
        ref_loss = loss_of(reference)
    ref_grads = tape.gradient(ref_loss, cell.trainable_variables)
    for out, ref in zip(outputs, reference):
        np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-9, atol=1e-12)
    # the sampled states are distinct points of the trajectory
    assert np.abs(outputs[0].numpy() - outputs[-1].numpy()).max() > 1e-4


def test_correction_last_state_keeps_the_implicit_gradient():
    """With the implicit backward the last output is the plain DEQ's fixed point, with its
    implicit gradient; inference returns the sampled states without phantom steps."""
    x = _x()
    cell = _cell()
    kwargs = dict(**_fpi(60, 1e-12), on_failure="ignore", dtype=F64)
    deq = ki.layers.DEQ(cell, correction_states=2, **kwargs)
    plain = ki.layers.DEQ(cell, **kwargs)
    with tf.GradientTape() as tape:
        outputs = deq(x, training=True)
        loss = tf.reduce_sum(outputs[-1] ** 2)
    g = tape.gradient(loss, cell.trainable_variables)
    with tf.GradientTape() as tape:
        reference = plain(x, training=True)
        loss = tf.reduce_sum(reference**2)
    r = tape.gradient(loss, cell.trainable_variables)
    np.testing.assert_allclose(outputs[-1].numpy(), reference.numpy(), atol=1e-10)
    for a, b in zip(g, r):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-9)
    z = tf.zeros((3, 4), tf.float64)
    for _ in range(30):
        z = cell(z, x)
    np.testing.assert_allclose(deq(x, training=False)[0].numpy(), z.numpy(), atol=1e-12)


# ------------------------------------------------------------------ kernel normalization


def _plain_twin(cell, x):
    """A DenseCell without kernel_norm holding `cell`'s normalized kernels."""
    twin = _cell(cell.units)
    twin(tf.zeros((1, cell.units), tf.float64), x[:1])
    kernel1, kernel2 = cell.normalized_kernels()
    twin.hidden.kernel.assign(kernel1)
    twin.hidden.bias.assign(cell.hidden.bias)
    twin.recurrent.kernel.assign(kernel2)
    twin.injection.kernel.assign(cell.injection.kernel)
    twin.injection.bias.assign(cell.injection.bias)
    return twin


def test_weight_norm_value_and_initialization():
    x, z = _x(), tf.constant(np.random.default_rng(1).normal(size=(3, 4)))
    cell = _cell(kernel_norm="weight")
    first = cell(z, x).numpy()
    # g starts at the column norms: the same map as the raw kernels
    np.testing.assert_allclose(cell.normalized_kernels()[0].numpy(), cell.hidden.kernel.numpy())
    for weight in cell._norm_weights:
        weight.assign(np.random.default_rng(2).uniform(0.5, 2.0, size=weight.shape))
    v = cell.hidden.kernel.numpy()
    expected = cell._norm_weights[0].numpy() * v / np.linalg.norm(v, axis=0)
    np.testing.assert_allclose(cell.normalized_kernels()[0].numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(cell(z, x).numpy(), _plain_twin(cell, x)(z, x).numpy(), rtol=1e-12)
    assert np.abs(cell(z, x).numpy() - first).max() > 1e-3


def test_spectral_norm_matches_numpy_svd_and_runs_once_per_solve():
    x = _x()
    cell = _cell(kernel_norm="spectral")
    deq = ki.layers.DEQ(cell, **_fpi(15), on_failure="ignore", dtype=F64)
    deq(x)
    calls = []
    original = cell.normalized_kernels

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    cell.normalized_kernels = counted
    u0 = cell._norm_weights[1].numpy()
    deq._stats["forward_iterations"].reset_state()
    with tf.GradientTape() as tape:
        out = deq(x, training=True)
    tape.gradient(tf.reduce_sum(out**2), cell.trainable_variables)
    # one normalization (and one power step) per forward solve of more than 10 iterations,
    # reused by the implicit backward
    assert len(calls) == 1 and deq._stats["forward_iterations"].result() > 10
    w = cell.recurrent.kernel.numpy()
    u1 = w.T @ (w @ u0) / np.linalg.norm(w.T @ (w @ u0))
    np.testing.assert_allclose(cell._norm_weights[1].numpy(), u1, rtol=1e-10)
    for _ in range(60):  # power iterations, as 60 training steps would run them
        original(training=True)
    for layer, kernel in zip((cell.hidden, cell.recurrent), original()):
        sigma = np.linalg.svd(layer.kernel.numpy(), compute_uv=False)[0]
        np.testing.assert_allclose(
            kernel.numpy(), layer.kernel.numpy() / sigma, rtol=1e-6, atol=1e-9
        )
        np.testing.assert_allclose(np.linalg.svd(kernel.numpy(), compute_uv=False)[0], 1.0, 1e-6)
    z = tf.constant(np.random.default_rng(3).normal(size=(3, 4)))
    np.testing.assert_allclose(cell(z, x).numpy(), _plain_twin(cell, x)(z, x).numpy(), rtol=1e-9)


# ------------------------------------------------------------------ variational dropout


def _dropout_case(kind):
    """(cell, x, state shape, mask values in training, hidden scale at inference)."""
    if kind == "dense":
        cell = _cell(units=6, dropout=0.5, seed=3)
        return cell, _x(batch=4), (4, 6), {0.0, 2.0}
    # ConvCell drops without rescaling, so its map stays a contraction
    cell = ki.layers.ConvCell(3, hidden_filters=4, dropout=0.5, seed=3, dtype=F64)
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 5, 5, 2)), tf.float64)
    return cell, x, (4, 5, 5, 3), {0.0, 1.0}


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_dropout_one_mask_per_solve_matches_unrolled_reference(kind):
    cell, x, z_shape, mask_values = _dropout_case(kind)
    readout = getattr(cell, "readout", lambda z: z)
    deq = ki.layers.DEQ(cell, **_fpi(80, 1e-12), backward_tol=1e-12, on_failure="ignore", dtype=F64)
    deq(x)
    state = cell.seed_generator.state.numpy()
    with tf.GradientTape() as tape:
        out = deq(x, training=True)
        loss = tf.reduce_sum(out**2)
    grads = tape.gradient(loss, cell.trainable_variables)

    cell.seed_generator.state.assign(state)  # the same mask again
    with tf.GradientTape() as tape:
        context = cell.inject(x, training=True)
        z = tf.zeros(z_shape, tf.float64)
        for _ in range(80):
            z = cell.step(z, context)
        ref_loss = tf.reduce_sum(readout(z) ** 2)
    ref_grads = tape.gradient(ref_loss, cell.trainable_variables)
    mask = context[-1].numpy()
    assert mask.shape[0] == 4 and mask.shape[-1] == (6 if kind == "dense" else 4)
    assert set(np.unique(mask)) == mask_values
    np.testing.assert_allclose(out.numpy(), readout(z).numpy(), atol=1e-10)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-6, atol=1e-9)
    # no mask at inference (ConvCell: the expected one, a 0.5 scale)
    z = tf.zeros(z_shape, tf.float64)
    for _ in range(80):
        z = cell(z, x, training=False)
    np.testing.assert_allclose(deq(x, training=False).numpy(), readout(z).numpy(), atol=1e-10)
    assert np.abs(out.numpy() - readout(z).numpy()).max() > 1e-3


# ------------------------------------------------------------------ warm start


def _iterations(deq, x, **kwargs):
    metric = deq._stats["forward_iterations"]
    metric.reset_state()
    out = deq(x, **kwargs)
    return out, float(metric.result())


@pytest.mark.parametrize("cell_name", ["dense", "monotone"])
def test_warm_start_from_a_near_state(cell_name):
    cell = (
        ki.layers.DenseCell(8, dtype=F64)
        if cell_name == "dense"
        else ki.layers.MonotoneDenseCell(8, dtype=F64)
    )
    deq = ki.layers.DEQ(cell, tol=1e-8, max_iter=100, return_state=True, dtype=F64)
    x = _x(batch=4, features=6)
    x_next = x + 1e-3 * _x(batch=4, features=6, seed=1)
    (_, state), _ = _iterations(deq, x)
    (cold, _), cold_iters = _iterations(deq, x_next)
    (warm, warm_state), warm_iters = _iterations(deq, x_next, initial_state=state)
    assert warm_iters < 0.7 * cold_iters, (warm_iters, cold_iters)
    np.testing.assert_allclose(warm.numpy(), cold.numpy(), atol=1e-6)
    # the state is the solver's (MonotoneDenseCell's auxiliary v), the output its readout
    readout = getattr(cell, "readout", lambda z: z)
    np.testing.assert_allclose(readout(warm_state).numpy(), warm.numpy(), atol=1e-12)


def test_warm_start_in_a_functional_model_round_trips(tmp_path):
    x_in, s_in = keras.Input((5,)), keras.Input((4,))
    deq = ki.layers.DEQ(ki.layers.DenseCell(4), return_state=True)
    out, state = deq(x_in, initial_state=s_in)
    model = keras.Model([x_in, s_in], [out, state])
    x = _x(batch=2).numpy().astype("float32")
    out0, s0 = model([x, np.zeros((2, 4), "float32")])
    path = str(tmp_path / "warm.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    out1, _ = loaded([x, s0.numpy()])
    np.testing.assert_allclose(out1.numpy(), out0.numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="initial_state shape"):
        deq(x, initial_state=np.zeros((2, 3), "float32"))


# ------------------------------------------------------------------ Keras integration


def _fit_features(tmp_path, jit_compile):
    """Correction states with a shared head and loss weights, spectral norm and dropout,
    trained by model.fit; the saved model predicts the same."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    inputs = keras.Input((5,))
    cell = ki.layers.DenseCell(6, kernel_norm="spectral", dropout=0.2, seed=0)
    deq = ki.layers.DEQ(cell, correction_states=2, max_iter=8, backward_max_iter=8)
    states = deq(inputs)
    head = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, [head(s) for s in states])
    losses = ["binary_crossentropy"] * 2
    model.compile("adam", losses, loss_weights=[0.5, 1.0], jit_compile=jit_compile)
    u0 = cell._norm_weights[0].numpy()
    history = model.fit(x, [y, y], epochs=1, batch_size=16, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert not np.allclose(cell._norm_weights[0].numpy(), u0)  # power vectors advanced
    path = str(tmp_path / "features.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(model.predict(x, verbose=0), loaded.predict(x, verbose=0)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_features_fit_and_round_trip(tmp_path):
    _fit_features(tmp_path, jit_compile=False)


@pytest.mark.slow
def test_features_fit_under_xla(tmp_path):
    _fit_features(tmp_path, jit_compile=True)


@pytest.mark.parametrize(
    "policy, kernel_norm",
    [("mixed_float16", "weight"), ("mixed_bfloat16", "weight"), ("mixed_float16", "spectral")],
)
def test_features_under_mixed_precision(policy, kernel_norm):
    """Half-precision outputs and float32 weights (power vectors included); with weight
    norm (a contraction at initialization) the values match the float32 layer's. Spectral
    norm scales each kernel to norm 1, so the map need not contract and its fixed point
    can be too ill-conditioned for a half-precision comparison."""
    x = _x(batch=2, features=5).numpy().astype("float32")
    half = policy.split("_")[1]

    def make(dtype):
        cell = ki.layers.DenseCell(4, kernel_norm=kernel_norm, dropout=0.3, seed=0, dtype=dtype)
        return ki.layers.DEQ(
            cell, correction_states=2, return_state=True, max_iter=60, tol=1e-2, dtype=dtype
        )

    reference = make("float32")
    reference(x)
    mixed = make(policy)
    mixed(x)
    mixed.set_weights(reference.get_weights())
    assert all(w.dtype == "float32" for w in mixed.weights)
    for a, b in zip(mixed(x), reference(x)):
        assert a.dtype == half
        if kernel_norm == "weight":
            np.testing.assert_allclose(a.numpy().astype("float32"), b.numpy(), atol=5e-2)
    outputs = mixed(x, training=True)
    assert all(o.dtype == half for o in outputs)
    assert all(np.isfinite(o.numpy().astype("float32")).all() for o in outputs)
