"""DEQ layer and cells: training, gradients, compilation, serialization, bad input."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_implicit as ki
from keras_implicit import layers

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(kind, n=32, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "conv":
        x = rng.normal(size=(n, 4, 4, 2)).astype("float32")
        y = (x[:, :2, :, 0].mean(axis=(1, 2)) > 0).astype("int32")
    else:
        x = rng.normal(size=(n, 6)).astype("float32")
        y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    return x, y


def _cell(kind):
    if kind == "dense":
        return layers.DenseCell(8)
    if kind == "monotone":
        return layers.MonotoneDenseCell(8)
    return layers.ConvCell(4, groups=2)


def _model(kind, jit_compile=False, name="deq", **deq_kwargs):
    keras.utils.set_random_seed(0)
    x, _ = _data(kind)
    inputs = keras.Input(x.shape[1:])
    z = layers.DEQ(_cell(kind), name=name, **deq_kwargs)(inputs)
    if len(z.shape) > 2:
        z = keras.layers.GlobalAveragePooling2D()(z)
    model = keras.Model(inputs, keras.layers.Dense(2)(z))
    model.compile(keras.optimizers.Adam(1e-2), LOSS, jit_compile=jit_compile)
    return model


def _weights(model):
    return [w.numpy().copy() for w in model.trainable_weights]


# ------------------------------------------------------------------ training


_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "kind, backward",
    [
        ("monotone", "implicit"),
        ("dense", "phantom"),
        pytest.param("dense", "implicit", marks=_SLOW),
        pytest.param("monotone", "phantom", marks=_SLOW),
        pytest.param("conv", "implicit", marks=_SLOW),
        pytest.param("conv", "phantom", marks=_SLOW),
    ],
)
def test_fit_each_cell_and_backward(kind, backward):
    x, y = _data(kind)
    model = _model(kind, backward=backward, max_iter=30, on_failure="ignore")
    before = _weights(model)
    loss0 = model.evaluate(x, y, verbose=0)[0]
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0).history
    cell_weights = model.get_layer("deq").cell.trainable_weights
    assert cell_weights, "the cell has weights"
    assert history["loss"][-1] < loss0, history["loss"]
    # every weight moved, including the cell's (implicit / phantom gradients reach it)
    for old, new in zip(before, _weights(model)):
        assert np.isfinite(new).all() and not np.allclose(old, new)
    assert min(history["deq_forward_converged"]) > 0.9, history
    assert ("deq_backward_iterations" in history) == (backward == "implicit")


@pytest.mark.parametrize("jit_compile", [False, True])
def test_statistics_in_history(jit_compile):
    x, y = _data("dense")
    model = _model("dense", jit_compile=jit_compile)
    # validation (a second compiled function) only in the cheaper graph mode
    validation = None if jit_compile else (x, y)
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, validation_data=validation)
    logs = history.history
    for key in ("forward_iterations", "forward_residual", "forward_converged"):
        assert len(logs[f"deq_{key}"]) == 2
        assert (f"val_deq_{key}" in logs) == (not jit_compile)
    assert all(1 <= v <= 40 for v in logs["deq_forward_iterations"])
    assert all(0 < v <= 1e-3 for v in logs["deq_forward_residual"])
    # the backward statistics are assigned while the gradient is computed, even in XLA
    assert all(1 <= v <= 40 for v in logs["deq_backward_iterations"])
    assert all(0 <= v <= 1e-4 for v in logs["deq_backward_residual"])


@_SLOW
def test_xla_and_graph_training_agree():
    x, y = _data("dense")
    results = []
    for jit in (False, True):
        model = _model("dense", jit_compile=jit, tol=1e-6, backward_tol=1e-7, max_iter=80)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        results.append(model.predict(x, verbose=0))
    np.testing.assert_allclose(results[0], results[1], atol=2e-3)


@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=_SLOW)])
def test_dynamic_batch_rows_are_independent(jit_compile):
    x, _ = _data("dense", n=11)
    model = _model("dense", jit_compile=jit_compile, tol=1e-6, max_iter=80)
    full = model.predict(x, batch_size=11, verbose=0)
    for size in (1, 4, 7):
        part = model.predict(x[:size], batch_size=size, verbose=0)
        np.testing.assert_allclose(part, full[:size], atol=1e-4)


# ------------------------------------------------------------------ gradients


def _float64_problem(kind):
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(3, 4)), tf.float64)
    if kind == "dense":
        cell = layers.DenseCell(5, dtype="float64")
    else:
        cell = layers.MonotoneDenseCell(5, dtype="float64")
    deq = layers.DEQ(
        cell,
        tol=1e-12,
        max_iter=300,
        backward_tol=1e-12,
        backward_max_iter=300,
        dtype="float64",
        on_failure="raise",
    )
    deq.build(x.shape)
    return deq, cell, x


def _unrolled(deq, cell, x, steps=300):
    # a tf.while_loop keeps the graph small (ordinary backprop still stores every step)
    z = tf.zeros([x.shape[0], *deq.compute_output_shape(x.shape)[1:]], x.dtype)
    _, z = tf.while_loop(lambda i, z: i < steps, lambda i, z: (i + 1, cell(z, x)), (0, z))
    readout = getattr(cell, "readout", None)
    return readout(z) if readout else z


@pytest.mark.parametrize("kind", ["dense", "monotone"])
def test_gradients_match_unrolled_autodiff_float64(kind):
    deq, cell, x = _float64_problem(kind)
    probe = tf.constant(np.random.default_rng(2).normal(size=(3, 5)), tf.float64)

    def grads(forward):
        @tf.function  # graph mode: eager while-loops would run 300 Python iterations
        def run():
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = forward()
                loss = tf.reduce_sum(probe * tf.sin(out))
            return out, tape.gradient(loss, [x, *cell.trainable_variables])

        return run()

    z_imp, implicit = grads(lambda: deq(x, training=True))
    z_unr, unrolled = grads(lambda: _unrolled(deq, cell, x))
    np.testing.assert_allclose(z_imp.numpy(), z_unr.numpy(), atol=1e-9)
    assert len(implicit) == len(cell.trainable_variables) + 1
    for g_imp, g_unr in zip(implicit, unrolled):
        np.testing.assert_allclose(g_imp.numpy(), g_unr.numpy(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["dense", "monotone"])
def test_input_gradient_matches_finite_differences(kind):
    deq, _cell, x = _float64_problem(kind)
    loss = tf.function(lambda x: tf.reduce_sum(tf.sin(deq(x))))

    @tf.function
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = tf.reduce_sum(tf.sin(deq(x, training=True)))
        return tape.gradient(value, x)

    grad = gradient(x).numpy()
    rng = np.random.default_rng(4)
    for _ in range(3):  # directional derivatives along random directions
        direction = rng.normal(size=grad.shape)
        eps = 1e-6
        numeric = (float(loss(x + eps * direction)) - float(loss(x - eps * direction))) / (2 * eps)
        np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-6, atol=1e-8)


def test_monotone_cell_solves_the_mondeq_equilibrium():
    deq, cell, x = _float64_problem("monotone")
    z = deq(x)
    # z* = relu(W z* + U x + b), independently of the splitting used to find it
    assert float(tf.reduce_max(cell.equilibrium_residual(z, x))) < 1e-9
    w = cell.w_matrix().numpy()
    g = np.eye(5) - w
    assert np.linalg.eigvalsh(0.5 * (g + g.T)).min() >= 0.1 - 1e-12  # m-strongly monotone


def test_phantom_gradient_approximates_implicit():
    keras.utils.set_random_seed(3)
    x = tf.constant(np.random.default_rng(3).normal(size=(8, 6)), tf.float32)
    cell = layers.DenseCell(8)
    grads = {}
    for backward in ("implicit", "phantom"):
        deq = layers.DEQ(cell, backward=backward, phantom_steps=20, phantom_damping=0.8, tol=1e-6)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.sin(deq(x, training=True)))
        grads[backward] = np.concatenate(
            [g.numpy().ravel() for g in tape.gradient(loss, cell.trainable_variables)]
        )
    a, b = grads["implicit"], grads["phantom"]
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cosine > 0.95, cosine


def test_jacobian_regularization_is_a_hutchinson_estimate():
    class Linear(keras.layers.Layer):
        def build(self, z_shape, x_shape):
            self.a = self.add_weight(shape=(6, 6), initializer=keras.initializers.Orthogonal(0.5))

        def call(self, z, x):
            return tf.matmul(z, self.a) + x

    x = tf.random.normal([64, 6])
    cell = Linear()
    deq = layers.DEQ(cell, jacobian_weight=2.0, jacobian_samples=50, jacobian_power_steps=0)
    deq(x, training=False)
    assert not deq.losses, "the regularizer is a training loss only"
    deq(x, training=True)
    (penalty,) = deq.losses
    expected = 2.0 * np.sum(cell.a.numpy() ** 2) / 6
    np.testing.assert_allclose(float(penalty), expected, rtol=0.1)
    # and it trains: the penalty's gradient reaches the cell's weights
    with tf.GradientTape() as tape:
        deq(x, training=True)
        total = tf.add_n(deq.losses)
    assert np.abs(tape.gradient(total, cell.a).numpy()).sum() > 0


def test_inference_budget_and_initial_state():
    x, _ = _data("dense")
    deq = layers.DEQ(layers.DenseCell(8), inference_max_iter=2, on_failure="ignore", tol=1e-6)
    deq(x, training=True)
    train_iters = float(deq.stat_metrics[0].result())
    deq.stat_metrics[0].reset_state()
    deq(x, training=False)
    assert float(deq.stat_metrics[0].result()) == 2.0 < train_iters

    solved = layers.DEQ(deq.cell, tol=1e-6, max_iter=100)
    warm = layers.DEQ(layers.DenseCell(8), initial_state=lambda x: solved(x), tol=1e-5)
    warm.build(x.shape)
    warm.cell.set_weights(deq.cell.get_weights())
    warm(x)
    assert float(warm.stat_metrics[0].result()) <= 2.0  # starts at the solution


# ------------------------------------------------------------------ user cells, save/load


@keras.saving.register_keras_serializable(package="keras_implicit_tests")
class TanhCell(keras.layers.Layer):
    """A user cell without the inject/step protocol: z -> tanh(z A + x B)."""

    def build(self, z_shape, x_shape):
        self.a = self.add_weight(shape=(z_shape[-1], z_shape[-1]), initializer="orthogonal")
        self.b = self.add_weight(shape=(x_shape[-1], z_shape[-1]))

    def call(self, z, x):
        return tf.tanh(0.5 * tf.matmul(z, self.a) + tf.matmul(x, self.b))


def test_user_cell_trains_and_round_trips(tmp_path):
    x, y = _data("dense")
    inputs = keras.Input((6,))
    z = layers.DEQ(TanhCell(), state_shape=(5,), name="deq")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(z))
    model.compile("adam", LOSS)
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / "user.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(model.predict(x, verbose=0), restored.predict(x, verbose=0))


@pytest.mark.parametrize("kind", ["dense", "monotone", pytest.param("conv", marks=_SLOW)])
def test_save_and_load_round_trip(kind, tmp_path):
    x, y = _data(kind)
    model = _model(
        kind,
        solver=ki.solvers.Anderson(memory=4),
        linear_solver=ki.linalg.BiCGStab(),
        backward="phantom" if kind == "conv" else "implicit",
        inference_max_iter=25,
        on_failure="ignore",
    )
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / f"{kind}.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    deq = restored.get_layer("deq")
    assert isinstance(deq.cell, type(model.get_layer("deq").cell))
    assert deq.solver.memory == 4 and deq.linear_solver.name == "bicgstab"
    as_json = lambda layer: json.loads(json.dumps(layer.get_config()))  # noqa: E731
    assert as_json(deq) == as_json(model.get_layer("deq"))
    np.testing.assert_array_equal(model.predict(x, verbose=0), restored.predict(x, verbose=0))


# ------------------------------------------------------------------ bad input


def test_cell_shape_mismatch_is_a_build_error():
    class Wrong(keras.layers.Layer):
        def call(self, z, x):
            return tf.concat([z, z], axis=-1)

    with pytest.raises(ValueError, match=r"shaped like the state z.*Received: cell output"):
        layers.DEQ(Wrong())(keras.Input((4,)))
    with pytest.raises(ValueError, match=r"states of shape \(batch, \*\(8,\)\)"):
        layers.DEQ(layers.DenseCell(8), state_shape=(3,))(keras.Input((4,)))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: layers.DEQ(layers.DenseCell(4), max_iter=-1), "Received: max_iter=-1"),
        (lambda: layers.DEQ(layers.DenseCell(4), backward="unrolled"), "backward='unrolled'"),
        (lambda: layers.DEQ(layers.DenseCell(4), solver="newton"), "solver='newton'"),
        (lambda: layers.DEQ(lambda z, x: z), "`cell` must be a Keras layer"),
        (lambda: layers.DEQ(layers.DenseCell(4), initial_state="ones"), "initial_state='ones'"),
        (lambda: layers.DEQ(layers.DenseCell(4), state_shape=(0,)), "state_shape=(0,)"),
        (lambda: layers.DEQ(layers.DenseCell(4), jacobian_weight=-1.0), "jacobian_weight=-1.0"),
        (lambda: layers.DenseCell(0), "Received: units=0"),
        (lambda: layers.DenseCell(4, normalization="batch"), "normalization='batch'"),
        (lambda: layers.ConvCell(6, groups=4), "groups=4, filters=6"),
        (lambda: layers.ConvCell(4, kernel_size=2), "kernel_size=2"),
        (lambda: layers.MonotoneDenseCell(4, monotonicity=1.5), "monotonicity=1.5"),
    ],
)
def test_invalid_settings_quote_received_values(make, message):
    with pytest.raises(ValueError, match=None) as info:
        make()
    assert message in str(info.value)


@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=_SLOW)])
def test_nan_sample_is_reported_and_never_reaches_the_weights(jit_compile):
    x, y = _data("dense")
    x[3, 2] = np.nan
    deq_layer = layers.DEQ(layers.DenseCell(8), on_failure="raise")
    with pytest.raises(ki.ConvergenceError, match="1 of 32 batch elements"):
        deq_layer(x)
    for jit in (jit_compile,):
        model = _model("dense", jit_compile=jit, on_failure="ignore")
        history = model.fit(x, y, batch_size=32, epochs=2, verbose=0).history
        assert all(np.isfinite(w).all() for w in _weights(model))
        assert np.isfinite(history["loss"]).all()
        # the broken sample shows in the statistics: 31 of 32 converged
        np.testing.assert_allclose(history["deq_forward_converged"], 31 / 32)
        out = model.predict(x, verbose=0)
        assert np.isfinite(out).all() and np.isfinite(np.delete(out, 3, 0)).all()


def test_non_contractive_cell_is_reported():
    class Expanding(keras.layers.Layer):
        def call(self, z, x):
            return 2.0 * z + x

    x = tf.ones([4, 3])
    deq = layers.DEQ(Expanding(), solver="fixed_point_iteration", max_iter=20)
    with pytest.warns(ki.ConvergenceWarning, match="forward solve did not converge for 4 of 4"):
        deq(x)
    assert float(deq.stat_metrics[2].result()) == 0.0  # forward_converged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layers.DEQ(Expanding(), solver="fixed_point_iteration", on_failure="ignore")(x)


# ------------------------------------------------------------------ distribution

_MIRRORED = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from keras_implicit import layers

    def train(strategy):
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 6)).astype("float32")
        y = (x[:, 0] > 0).astype("int32")
        with strategy.scope():
            inputs = keras.Input((6,))
            z = layers.DEQ(layers.DenseCell(8), tol=1e-6, backward_tol=1e-7, max_iter=60,
                           name="deq")(inputs)
            model = keras.Model(inputs, keras.layers.Dense(2)(z))
            model.compile(keras.optimizers.SGD(0.1),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        logs = model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False).history
        return model.get_weights(), logs

    one, logs1 = train(tf.distribute.OneDeviceStrategy("/cpu:0"))
    two, logs2 = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(one, two))
    print(json.dumps({"diff": diff, "loss1": logs1["loss"], "loss2": logs2["loss"],
                      "iters2": logs2["deq_backward_iterations"]}))
    """
)


@_SLOW
def test_mirrored_strategy_matches_one_device():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["diff"] < 1e-4, report
    np.testing.assert_allclose(report["loss1"], report["loss2"], rtol=1e-4)
    assert min(report["iters2"]) >= 1, report
