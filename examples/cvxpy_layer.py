"""A constrained-output regressor written once in cvxpy and trained with model.fit.

Each sample's target is an allocation y of a unit budget over k items with a cap per
item: y >= 0, sum(y) = 1, y <= cap. A network maps features to scores s(x), and the
output layer is the Euclidean projection of the scores onto that capped simplex,

    y_hat(s) = argmin_y ||y - s||^2   s.t.   y >= 0,  1^T y = 1,  y <= cap,

so every prediction is feasible by construction and the loss is taken on feasible
allocations. The projection is written in cvxpy (four lines) and becomes a Keras layer
with `ki.layers.CvxpyLayer`; the same problem written by hand as a
`ki.layers.QuadraticProgram` (Q = 2I, q = -2s, A = 1^T, b = 1, G = [-I; I],
h = [0; cap]) trains the same network from the same initial weights for comparison.
The two must agree (same problem, same solution), and the script prints their test
error and seconds per epoch: the difference is what the cvxpy front end costs.

Run:  python examples/cvxpy_layer.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cvxpy as cp
import keras
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import keras_implicit as ki


def make_data(n, features, items, cap, seed):
    """Targets: the capped-simplex projection of a fixed nonlinear function of x."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    W = rng.normal(size=(features, items)) / np.sqrt(features)
    scores = np.tanh(x @ W) * 2.0 + 0.3 * np.sin(3 * x[:, :items])
    y = np.array([_project_reference(s, cap) for s in scores], dtype="float32")
    return x, y


def _project_reference(s, cap):
    """Capped-simplex projection by bisection on the shift (the test-free reference)."""
    low, high = s.min() - 1.0, s.max()
    for _ in range(100):
        tau = 0.5 * (low + high)
        total = np.clip(s - tau, 0.0, cap).sum()
        low, high = (tau, high) if total > 1.0 else (low, tau)
    return np.clip(s - 0.5 * (low + high), 0.0, cap)


def cvxpy_projection(items, cap):
    scores, y = cp.Parameter(items), cp.Variable(items)
    problem = cp.Problem(
        cp.Minimize(cp.sum_squares(y - scores)), [y >= 0, cp.sum(y) == 1, y <= cap]
    )
    return ki.layers.CvxpyLayer(problem, parameters=[scores], variables=[y])


def native_projection(items, cap):
    eye = np.eye(items)
    return ki.layers.QuadraticProgram(
        Q=2 * eye,
        A=np.ones((1, items)),
        b=np.ones(1),
        G=np.concatenate([-eye, eye]),
        h=np.concatenate([np.zeros(items), np.full(items, cap)]),
    )


def build(features, items, output_layer, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features,))
    hidden = keras.layers.Dense(32, activation="relu")(inputs)
    scores = keras.layers.Dense(items)(hidden)
    if isinstance(output_layer, ki.layers.QuadraticProgram):
        scores = keras.layers.Lambda(lambda s: -2.0 * s)(scores)  # q = -2 s
    model = keras.Model(inputs, output_layer(scores))
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, small data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("output")))
    args = parser.parse_args()
    features, items, cap = 6, 5, 0.4
    n, epochs = (128, 2) if args.quick else (2000, 30)
    x, y = make_data(n + 500, features, items, cap, args.seed)
    x_train, y_train, x_test, y_test = x[:n], y[:n], x[n:], y[n:]

    results = {}
    for name, layer in (
        ("CvxpyLayer (cvxpy)", cvxpy_projection(items, cap)),
        ("QuadraticProgram (by hand)", native_projection(items, cap)),
    ):
        model = build(features, items, layer, args.seed)
        start = time.perf_counter()
        history = model.fit(
            x_train,
            y_train,
            batch_size=64,
            epochs=epochs,
            verbose=0,
            validation_data=(x_test, y_test),
        )
        seconds = (time.perf_counter() - start) / epochs
        prediction = model.predict(x_test, verbose=0)
        results[name] = (history.history, seconds, prediction)
        feasible = (prediction.min() >= -1e-3) and np.allclose(prediction.sum(axis=1), 1, atol=1e-3)
        print(
            f"{name:28s} test MSE {history.history['val_loss'][-1]:.5f}  "
            f"{seconds:.2f} s/epoch  feasible outputs: {feasible}"
        )
    (_, _, p_cvx), (_, _, p_qp) = results.values()
    print(
        f"largest difference between the two models' predictions: {np.abs(p_cvx - p_qp).max():.1e}"
    )

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_alloc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (history, _, _) in results.items():
        ax_loss.plot(history["val_loss"], label=name)
    ax_loss.set(
        xlabel="epoch", ylabel="held-out MSE", yscale="log", title="training through the projection"
    )
    ax_loss.legend()
    sample = np.arange(items)
    ax_alloc.bar(sample - 0.2, y_test[0], width=0.4, label="target")
    ax_alloc.bar(sample + 0.2, p_cvx[0], width=0.4, label="CvxpyLayer prediction")
    ax_alloc.axhline(cap, color="grey", linestyle="--", label="cap")
    ax_alloc.set(xlabel="item", ylabel="allocation", title="one held-out sample")
    ax_alloc.legend()
    fig.tight_layout()
    path = out / "cvxpy_layer.png"
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
