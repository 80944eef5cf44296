"""Training a deep equilibrium network by SGD with vanishing steps and implicit gradients.

The nonsmooth implicit function theorem (Bolte, Le, Pauwels, Silveti-Falls 2021) makes
the implicit gradient of an equilibrium z* = relu(W z* + U x + b) an element of a
conservative Jacobian whenever the implicit system is invertible, and the paper's
convergence result for nonsmooth SGD with conservative gradients then applies: with
step sizes lr_k such that sum lr_k = inf and sum lr_k^2 < inf, e.g.

    lr_k = a / (1 + k / k0)^gamma,      1/2 < gamma <= 1,

the iterates converge (almost surely, for almost every initialization) to critical
points of the training loss.

Here the equilibrium layer is `ki.layers.DEQ(ki.layers.MonotoneDenseCell(32))`, a
monotone operator equilibrium network whose implicit system I - W is strongly monotone
for *every* value of the weights: the theorem's invertibility hypothesis holds by
construction along the whole training trajectory, relu kinks included. The task is a
two-class "concentric circles" problem, on which a linear model cannot beat chance.
Two runs from the same initialization:

  * SGD with the vanishing step sizes above (gamma = 0.6), the setting of the theorem;
  * Adam with a constant step (what practitioners use; not covered by the theorem).

The script reports the training loss, the test accuracy next to a logistic-regression
baseline, the forward solver's statistics (Keras metrics of the DEQ layer) and an
independent check that the returned z* is the monDEQ equilibrium:
||z - relu(W z + U x + b)||, recomputed from the weights.

    python examples/paper/deq_sgd.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import matplotlib

matplotlib.use("Agg")
import keras
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf
from sklearn.datasets import make_circles
from sklearn.linear_model import LogisticRegression

import keras_implicit as ki

UNITS = 32


class VanishingStepSize(keras.optimizers.schedules.LearningRateSchedule):
    """lr_k = a / (1 + k / k0)^gamma: sum lr_k = inf and sum lr_k^2 < inf for gamma in (1/2, 1]."""

    def __init__(self, initial_learning_rate, decay_steps, gamma):
        if not 0.5 < gamma <= 1.0:
            raise ValueError(f"`gamma` must be in (1/2, 1]. Received: gamma={gamma!r}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = float(decay_steps)
        self.gamma = float(gamma)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        return self.initial_learning_rate / (1.0 + step / self.decay_steps) ** self.gamma

    def value(self, step):
        return self.initial_learning_rate / (1.0 + step / self.decay_steps) ** self.gamma

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "gamma": self.gamma,
        }


def load(n_train, n_test, seed=0):
    x, y = make_circles(n_train + n_test, noise=0.1, factor=0.5, random_state=seed)
    x, y = x.astype("float32"), y.astype("int32")
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def build(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((2,))
    # GMRES restarts: give the backward solve room to reach its 1e-4 tolerance in float32
    deq = ki.layers.DEQ(
        ki.layers.MonotoneDenseCell(UNITS),
        max_iter=100,
        tol=1e-3,
        backward_max_iter=100,
        name="deq",
    )
    z = deq(inputs)
    logits = keras.layers.Dense(2, name="readout")(z)
    return keras.Model(inputs, logits), keras.Model(inputs, z), deq


class StepSizeLog(keras.callbacks.Callback):
    """Learning rate used at the end of each epoch."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.rates = []

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        rate = self.schedule.value(step) if callable(self.schedule) else self.schedule
        self.rates.append(float(rate))


def equilibrium_residual(encoder, deq, x):
    """max over samples of ||z - relu(W z + U x + b)|| / (1 + ||z||), from the weights."""
    z = encoder(x, training=False)
    residual = deq.cell.equilibrium_residual(z, tf.convert_to_tensor(x))
    return float(tf.reduce_max(residual / (1.0 + tf.norm(z, axis=-1))))


def train(name, optimizer, schedule, data, epochs, batch_size, seed):
    x_train, y_train, x_test, y_test = data
    model, encoder, deq = build(seed)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer, loss_fn, metrics=["accuracy"])
    initial_loss = float(model.evaluate(x_train, y_train, verbose=0, batch_size=256)[0])
    steps = StepSizeLog(schedule)
    tic = time.perf_counter()
    history = model.fit(
        x_train, y_train, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=[steps]
    ).history
    seconds = time.perf_counter() - tic
    train_loss = float(model.evaluate(x_train, y_train, verbose=0, batch_size=256)[0])
    results = model.evaluate(x_test, y_test, verbose=0, batch_size=256, return_dict=True)
    # G = I - W: its symmetric part is >= m I for every weight value (the invertibility)
    g = np.eye(UNITS) - deq.cell.w_matrix().numpy()
    return {
        "name": name,
        "history": history,
        "step_sizes": np.array(steps.rates),
        "initial_loss": initial_loss,
        "train_loss": train_loss,
        "test_loss": float(results["loss"]),
        "test_accuracy": float(results["accuracy"]),
        "forward_converged": np.array(history["deq_forward_converged"]),
        "forward_iterations": np.array(history["deq_forward_iterations"]),
        "backward_iterations": np.array(history["deq_backward_iterations"]),
        "equilibrium_residual": equilibrium_residual(encoder, deq, x_test),
        "monotonicity": float(np.linalg.eigvalsh(0.5 * (g + g.T)).min()),
        "backward_residual": np.array(history["deq_backward_residual"]),
        "seconds": seconds,
        "model": model,
    }


def plot(runs, data, baseline, out):
    _, _, x_test, y_test = data
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for run in runs.values():
        epochs = np.arange(1, len(run["history"]["loss"]) + 1)
        axes[0].semilogy(
            np.r_[0, epochs], np.r_[run["initial_loss"], run["history"]["loss"]], label=run["name"]
        )
        axes[1].semilogy(epochs, run["step_sizes"], label=run["name"])
        axes[2].plot(epochs, run["forward_iterations"], label=f"{run['name']} forward")
        axes[2].plot(epochs, run["backward_iterations"], "--", label=f"{run['name']} backward")
    axes[0].axhline(baseline["logistic_loss"], color="0.5", ls=":", label="logistic regression")
    axes[0].set(xlabel="epoch", ylabel="training cross-entropy", title="training loss")
    axes[1].set(xlabel="epoch", ylabel="step size", title="step sizes (SGD: a/(1+k/k0)^0.6)")
    axes[2].set(xlabel="epoch", ylabel="mean iterations", title="DEQ solver iterations")
    for ax in axes[:3]:
        ax.legend(fontsize=8)
    grid = np.linspace(-1.5, 1.5, 121, dtype="float32")
    gx, gy = np.meshgrid(grid, grid)
    points = np.c_[gx.ravel(), gy.ravel()]
    model = runs["SGD"]["model"]
    prob = tf.nn.softmax(model.predict(points, verbose=0, batch_size=2048))[:, 1].numpy()
    axes[3].contourf(gx, gy, prob.reshape(gx.shape), levels=20, cmap="RdBu", alpha=0.6)
    axes[3].scatter(x_test[:, 0], x_test[:, 1], c=y_test, s=6, cmap="RdBu", edgecolors="k")
    axes[3].set(title="SGD-trained monDEQ: P(inner class)", aspect="equal")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "deq_sgd.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (CI)")
    parser.add_argument("--out", default="examples/output", help="where the figure goes")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    n_train, n_test, epochs = (512, 400, 8) if args.quick else (1600, 800, 40)
    batch_size = 32
    data = load(n_train, n_test)
    x_train, y_train, x_test, y_test = data

    logistic = LogisticRegression().fit(x_train, y_train)
    proba = np.clip(logistic.predict_proba(x_train)[np.arange(n_train), y_train], 1e-12, 1)
    baseline = {
        "chance": float(max(np.mean(y_test == 0), np.mean(y_test == 1))),
        "logistic_accuracy": float(logistic.score(x_test, y_test)),
        "logistic_loss": float(-np.mean(np.log(proba))),
    }
    schedule = VanishingStepSize(0.1, decay_steps=50, gamma=0.6)
    runs = {
        "SGD": train(
            "SGD", keras.optimizers.SGD(schedule), schedule, data, epochs, batch_size, seed=0
        ),
        "Adam": train("Adam", keras.optimizers.Adam(0.01), 0.01, data, epochs, batch_size, seed=0),
    }

    print(
        f"concentric circles: {n_train} train / {n_test} test, {epochs} epochs, batch "
        f"{batch_size}; DEQ(MonotoneDenseCell({UNITS}))"
    )
    print(
        f"baselines: chance {baseline['chance']:.3f}, logistic regression test accuracy "
        f"{baseline['logistic_accuracy']:.3f} (train loss {baseline['logistic_loss']:.3f}, "
        f"log 2 = {math.log(2):.3f})"
    )
    header = (
        f"{'optimizer':10s}{'loss 0':>8s}{'loss T':>8s}{'test acc':>9s}{'fwd iters':>10s}"
        f"{'converged':>10s}{'bwd resid':>10s}{'eq. resid':>10s}{'min eig':>9s}"
        f"{'last lr':>9s}{'time':>7s}"
    )
    print(header)
    for run in runs.values():
        print(
            f"{run['name']:10s}{run['initial_loss']:8.3f}{run['train_loss']:8.3f}"
            f"{run['test_accuracy']:9.3f}{run['forward_iterations'].mean():10.1f}"
            f"{run['forward_converged'].min():10.3f}{run['backward_residual'].max():10.1e}"
            f"{run['equilibrium_residual']:10.1e}"
            f"{run['monotonicity']:9.3f}{run['step_sizes'][-1]:9.4f}{run['seconds']:6.1f}s"
        )
    print(
        "converged: worst epoch's fraction of samples whose forward solve met tol; bwd resid: "
        "worst epoch mean of the backward GMRES residual;\neq. resid: max ||z - relu(Wz+Ux+b)||"
        " / (1 + ||z||) on the test set; min eig: of the symmetric part of I - W (>= m = 0.1)"
    )
    print(f"figure: {plot(runs, data, baseline, out)}")
    summary = {
        name: {k: v for k, v in run.items() if k not in ("model", "history")}
        for name, run in runs.items()
    }
    for name, run in runs.items():
        summary[name]["epoch_losses"] = np.array(run["history"]["loss"])
    return {"baseline": baseline, "runs": summary, "schedule": schedule.get_config()}


if __name__ == "__main__":
    main()
