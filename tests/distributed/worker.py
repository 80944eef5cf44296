"""One worker of a two-worker `tf.distribute.MultiWorkerMirroredStrategy` run.

Started twice by test_multiworker.py, each with its own TF_CONFIG (cluster of two
workers on 127.0.0.1, task index 0 or 1). Usage:

    python worker.py <out_dir> <case>

case "implicit": trains a DEQ model and a QuadraticProgram model with `model.fit` on
    this worker's half of the data, one full-shard batch per step. Writes
    <out_dir>/worker<i>.json (histories, this worker's own solver statistics at the
    initial weights) and <out_dir>/<model>_worker<i>.npz (final weights). Worker 0 also
    trains both models in one process on all the data (the single-replica reference)
    and writes <out_dir>/<model>_reference.npz.
case "keras_recipe": the plain recipe of the Keras guides (a Dense model built inside
    the strategy scope, the default `train_step`); writes <out_dir>/recipe<i>.json with
    the loss history, or with the error it raised.

Two Keras 3 workarounds make the "implicit" case run under `model.fit` (see the test
module for the errors they avoid): the layers are created inside the strategy scope
(the DEQ statistics are metric variables made in the layer's constructor, and only
variables made in the scope are aggregated over the replicas), the `Model` object
outside it, and the model is built and compiled inside it; `train_step` returns its
logs with a length-1 axis.
"""

import json
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf

from keras_implicit import layers

FEATURES = 6
ROWS_PER_WORKER = 32
STEPS = 6  # one full-shard batch per step (epochs of one step each)


class MultiWorkerSequential(keras.Sequential):
    """A Sequential model whose step logs carry a length-1 axis.

    Under MultiWorkerMirroredStrategy, Keras 3 reduces every step output with
    `strategy.reduce("MEAN", v, axis=0)`, which rejects scalars; with the extra axis the
    reduce is the mean over the replicas and returns a scalar again.
    """

    def train_step(self, data):
        logs = super().train_step(data)
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}


def _data(task):
    """(x, y) of all workers and this worker's half (every other row)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2 * ROWS_PER_WORKER, FEATURES)).astype("float32")
    w = rng.normal(size=(FEATURES, 4)).astype("float32")
    y = np.clip(x @ w, -0.5, 0.5).astype("float32")
    return (x, y), (x[task::2], y[task::2])


def _deq_layers():
    return [
        layers.DEQ(layers.DenseCell(8), tol=1e-6, backward_tol=1e-6, max_iter=60, name="deq"),
        keras.layers.Dense(4),
    ]


def _qp_layers():
    # q = Dense(x); z = argmin 1/2 |z|^2 + q^T z s.t. G z <= h, G and h trainable
    g = np.concatenate([np.eye(4), -np.eye(4)]).astype("float32")
    return [
        keras.layers.Dense(4),
        layers.QuadraticProgram(
            Q=np.eye(4, dtype="float32"),
            G=g,
            h=np.full(8, 2.0, "float32"),
            trainable=("G", "h"),
            input_names=("q",),
            name="qp",
        ),
    ]


MODELS = {"deq": (_deq_layers, 0.05), "qp": (_qp_layers, 0.3)}


def _model(name, strategy=None, weights=None):
    """The model: layers made, built and compiled in `strategy`'s scope, the Model outside."""
    make, rate = MODELS[name]
    keras.utils.set_random_seed(1)
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        stack = make()
    model = MultiWorkerSequential(stack)
    with strategy.scope():
        model.build((None, FEATURES))
        if weights is not None:
            model.set_weights(weights)
        model.compile(keras.optimizers.SGD(rate), "mse", jit_compile=False)
    return model


def _local_stats(model, x, y):
    """The DEQ statistics of one forward + backward pass on (x, y), in this process only."""
    deq = model.get_layer("deq")
    for metric in deq.stat_metrics:
        metric.reset_state()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x, training=True) - y) ** 2)
    tape.gradient(loss, model.trainable_weights)
    return {metric.name: float(metric.result()) for metric in deq.stat_metrics}


def _distributed(strategy, x, y):
    """This worker's shard as a distributed dataset: one full-shard batch per step."""

    def dataset(context):
        assert context.num_input_pipelines == 2
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x)).repeat()

    return strategy.distribute_datasets_from_function(dataset)


def _train(strategy, name, task, out_dir, local):
    model = _model(name, strategy)
    initial = model.get_weights()
    report = {}
    if name == "deq":
        # this worker's own statistics at the initial weights (what the first step sees)
        report["local_stats"] = _local_stats(_model(name, weights=initial), *local)
    with strategy.scope():
        history = model.fit(
            _distributed(strategy, *local), epochs=STEPS, steps_per_epoch=1, verbose=0
        )
    report["history"] = history.history
    np.savez(os.path.join(out_dir, f"{name}_worker{task}.npz"), *model.get_weights())
    return initial, report


def _reference(name, initial, x, y, out_dir):
    """The same training in one process on all the data (global batch)."""
    model = _model(name, weights=initial)
    model.fit(x, y, batch_size=len(x), epochs=STEPS, shuffle=False, verbose=0)
    np.savez(os.path.join(out_dir, f"{name}_reference.npz"), *model.get_weights())


def implicit(strategy, task, out_dir):
    everything, local = _data(task)
    report = {}
    for name in MODELS:
        initial, report[name] = _train(strategy, name, task, out_dir, local)
        if task == 0:
            _reference(name, initial, *everything, out_dir)
    with open(os.path.join(out_dir, f"worker{task}.json"), "w") as f:
        json.dump(report, f)


def keras_recipe(strategy, task, out_dir):
    _, (x, y) = _data(task)
    report = {"keras": keras.__version__, "tensorflow": tf.__version__}
    try:
        with strategy.scope():
            model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(4)])
            model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=False)
        history = model.fit(_distributed(strategy, x, y), epochs=3, steps_per_epoch=1, verbose=0)
        report["loss"] = history.history["loss"]
    except Exception as error:  # the test reads the error
        report["error"] = f"{type(error).__name__}: {error}"[:2000]
        report["traceback"] = traceback.format_exc()[-4000:]
    with open(os.path.join(out_dir, f"recipe{task}.json"), "w") as f:
        json.dump(report, f)


def main():
    out_dir, case = sys.argv[1], sys.argv[2]
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    {"implicit": implicit, "keras_recipe": keras_recipe}[case](strategy, task, out_dir)


if __name__ == "__main__":
    main()
