"""Two DEQ features that change a number, on scikit-learn's 8x8 digits (bundled).

1. Fixed-point correction (`DEQ(correction_states=3)`, Bai et al. 2022): a shared head
   and a loss on three states sampled along the forward solve (`loss_weights` 0.64,
   0.8, 1, torchdeq's exponential weights). The number: test accuracy when inference
   stops after a few solver iterations, with and without the correction, over seeds.
2. Warm start (`deq(x, initial_state=z_prev)` with `return_state=True`): a sequence of
   slowly changing inputs (each test digit morphing into another over 20 frames),
   solved frame by frame from zeros or from the previous frame's fixed point. The
   number: forward iterations per frame, for the same predictions.

    python examples/deq_features.py            # full run (3 seeds, 30 epochs each)
    python examples/deq_features.py --quick    # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import os
import pathlib
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from keras_implicit import layers

UNITS = 64
MAX_ITER = 12
CORRECTION_WEIGHTS = [0.64, 0.8, 1.0]
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def load(quick):
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    if quick:
        x_train, y_train, x_test, y_test = x_train[:256], y_train[:256], x_test[:64], y_test[:64]
    return x_train, x_test, y_train, y_test


def train(data, correction, epochs, seed, units):
    """A DenseCell DEQ and a Dense head; with `correction` the head reads 3 states."""
    x_train, _, y_train, _ = data
    keras.utils.set_random_seed(seed)
    cell = layers.DenseCell(units)
    states = 3 if correction else 1
    # the small budget is deliberate (what the correction is for): no failure report
    deq = layers.DEQ(
        cell,
        solver="fixed_point",
        max_iter=MAX_ITER,
        tol=1e-3,
        correction_states=states,
        on_failure="ignore",
    )
    head = keras.layers.Dense(10)
    inputs = keras.Input((64,))
    outputs = deq(inputs)
    outputs = [head(z) for z in outputs] if correction else head(outputs)
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.Adam(3e-3),
        [LOSS] * states if correction else LOSS,
        loss_weights=CORRECTION_WEIGHTS if correction else None,
    )
    targets = [y_train] * states if correction else y_train
    model.fit(x_train, targets, epochs=epochs, batch_size=64, verbose=0)
    return cell, head


def accuracy_after(cell, head, data, iterations):
    """Test accuracy of the head on the state reached after `iterations` solver steps."""
    _, x_test, _, y_test = data
    probe = layers.DEQ(
        cell, solver="fixed_point", max_iter=iterations, tol=1e-3, on_failure="ignore"
    )
    logits = head(probe(x_test)).numpy()
    return float(np.mean(np.argmax(logits, -1) == y_test))


def morph_frames(x_test, frames, pairs):
    """(frames, pairs, 64): test digit i morphing into digit i + 1."""
    a, b = x_test[:pairs], x_test[1 : pairs + 1]
    t = np.linspace(0.0, 1.0, frames, dtype="float32")[:, None, None]
    return (1.0 - t) * a + t * b


def warm_start(cell, head, data, frames, pairs):
    """Forward iterations per frame from zeros and from the previous fixed point, the
    fraction of converged solves in each mode, and how far the two fixed points are."""
    deq = layers.DEQ(cell, solver="fixed_point", max_iter=100, tol=1e-4, return_state=True)
    stats = {m.name.split("_forward_")[-1]: m for m in deq.stat_metrics}
    counts = {"cold": [], "warm": []}
    converged = {"cold": [], "warm": []}
    outputs = {"cold": [], "warm": []}
    state = None
    for x in morph_frames(data[1], frames, pairs):
        for mode in ("cold", "warm"):
            for metric in stats.values():
                metric.reset_state()
            out, new_state = deq(x, initial_state=state if mode == "warm" else None)
            counts[mode].append(float(stats["iterations"].result()))
            converged[mode].append(float(stats["converged"].result()))
            outputs[mode].append(head(out).numpy())
        state = new_state
    cold, warm = (np.array(outputs[m]) for m in ("cold", "warm"))
    return {
        # the first frame starts from zeros in both modes
        "iterations": {m: float(np.mean(c[1:])) for m, c in counts.items()},
        "converged": {m: float(np.mean(c)) for m, c in converged.items()},
        "max_logit_gap": float(np.max(np.abs(cold - warm))),
        "same_class": float(np.mean(cold.argmax(-1) == warm.argmax(-1))),
        "counts": counts,
    }


def plot(budgets, accuracies, counts, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in accuracies.items():
        rows = np.array(rows)
        axes[0].errorbar(budgets, rows.mean(0), rows.std(0), marker="o", capsize=3, label=name)
    axes[0].set(
        xlabel="inference iterations", ylabel="test accuracy", title="fixed-point correction"
    )
    for mode, values in counts.items():
        axes[1].plot(np.arange(len(values)), values, marker=".", label=f"{mode} start")
    axes[1].set(xlabel="frame", ylabel="forward iterations", title="warm start")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "deq_features.png"
    fig.savefig(path, dpi=120)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: tiny run")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/output"))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*did not converge.*")

    data = load(args.quick)
    epochs = args.epochs or (1 if args.quick else 30)
    seeds = range(args.seeds or (1 if args.quick else 3))
    units = 16 if args.quick else UNITS
    budgets = [2, 4, MAX_ITER] if args.quick else [2, 3, 4, 6, MAX_ITER]
    accuracies = {"plain": [], "correction": []}
    trained = None
    for seed in seeds:
        for name in accuracies:
            cell, head = train(data, name == "correction", epochs, seed, units)
            accuracies[name].append([accuracy_after(cell, head, data, n) for n in budgets])
            if trained is None:
                trained = (cell, head)

    print(f"digits: {len(data[0])} train / {len(data[1])} test, {epochs} epochs, "
          f"{len(seeds)} seeds, fixed-point iteration, max_iter={MAX_ITER}")  # fmt: skip
    print("test accuracy after n inference iterations (mean +- std over seeds):")
    for name, rows in accuracies.items():
        rows = np.array(rows)
        stats = zip(budgets, rows.mean(0), rows.std(0))
        cells = "  ".join(f"n={n}: {m:.3f}+-{s:.3f}" for n, m, s in stats)
        print(f"  {name:10s} {cells}")

    frames, pairs = (5, 8) if args.quick else (20, 100)
    warm = warm_start(*trained, data, frames, pairs)
    its, conv = warm["iterations"], warm["converged"]
    print(
        f"warm start on {pairs} digits morphing over {frames} frames (tol 1e-4): forward "
        f"iterations per frame {its['cold']:.1f} from zeros, {its['warm']:.1f} from the "
        f"previous fixed point; converged {100 * conv['cold']:.1f}% / {100 * conv['warm']:.1f}%;"
        f" largest logit gap {warm['max_logit_gap']:.2g}, same class on "
        f"{100 * warm['same_class']:.1f}% of frames"
    )
    print(f"figure: {plot(budgets, accuracies, warm['counts'], args.out)}")


if __name__ == "__main__":
    main()
