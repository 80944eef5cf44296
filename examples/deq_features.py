"""Warm-starting a DEQ on a sequence of slowly changing inputs (scikit-learn's digits).

A dense DEQ classifier is trained with `model.fit`; then each test digit morphs into
the next over 20 frames and the frames are solved one after the other, either from
zeros or from the previous frame's fixed point (`deq(x, initial_state=z_prev)` with
`return_state=True`). The number: forward iterations per frame, for the same
predictions (the largest logit gap between the two is printed).

Full run (seed 0, 98.2% test accuracy): 15.4 forward iterations per frame from zeros,
11.9 from the previous fixed point (-23%); the same class on 99.7% of the frames that
converged from both starts. The other 0.3% are morphs between two digits where the
trained map has more than one fixed point (both starts converge, to different ones):
the penalty keeps the map contractive on the data, not between digits.

    python examples/deq_features.py            # full run (30 epochs, a few minutes)
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
MAX_ITER = 30
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


def train(data, epochs, seed, units):
    """A DenseCell DEQ and a Dense head; the Jacobian penalty keeps the map contractive
    on the training data (as in deq_digits.py). The few training samples that miss the
    tolerance are not reported (the warm start is the subject here)."""
    x_train, _, y_train, _ = data
    keras.utils.set_random_seed(seed)
    cell = layers.DenseCell(units)
    deq = layers.DEQ(
        cell,
        solver="fixed_point",
        max_iter=MAX_ITER,
        tol=1e-3,
        jacobian_weight=0.1,
        on_failure="ignore",
    )
    head = keras.layers.Dense(10)
    inputs = keras.Input((64,))
    model = keras.Model(inputs, head(deq(inputs)))
    model.compile(keras.optimizers.Adam(3e-3), LOSS, metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
    accuracy = model.evaluate(data[1], data[3], verbose=0)[1]
    return cell, head, accuracy


def morph_frames(x_test, frames, pairs):
    """(frames, pairs, 64): test digit i morphing into digit i + 1."""
    a, b = x_test[:pairs], x_test[1 : pairs + 1]
    t = np.linspace(0.0, 1.0, frames, dtype="float32")[:, None, None]
    return (1.0 - t) * a + t * b


def _converged(cell, x, z, tol):
    """Per sample: the solver's residual ||cell(z, x) - z|| / (1 + ||z||) is within tol."""
    residual = np.linalg.norm(cell(z, x) - z, axis=-1) / (1.0 + np.linalg.norm(z, axis=-1))
    return residual <= tol


def warm_start(cell, head, data, frames, pairs, tol=1e-4):
    """Forward iterations per frame from zeros and from the previous fixed point, the
    fraction of converged solves, and the largest logit gap between the two starts
    over the samples that converged from both."""
    deq = layers.DEQ(
        cell, solver="fixed_point", max_iter=100, tol=tol, return_state=True, on_failure="ignore"
    )
    iterations = next(m for m in deq.stat_metrics if m.name.endswith("forward_iterations"))
    counts, converged, logits = ({"cold": [], "warm": []} for _ in range(3))
    state = None
    for x in morph_frames(data[1], frames, pairs):
        for mode in ("cold", "warm"):
            iterations.reset_state()
            out, new_state = deq(x, initial_state=state if mode == "warm" else None)
            counts[mode].append(float(iterations.result()))
            converged[mode].append(_converged(cell, x, new_state, 1.01 * tol))
            logits[mode].append(head(out).numpy())
        state = new_state
    both = np.array(converged["cold"]) & np.array(converged["warm"])
    cold, warm = np.array(logits["cold"]), np.array(logits["warm"])
    return {
        # the first frame starts from zeros in both modes
        "iterations": {m: float(np.mean(c[1:])) for m, c in counts.items()},
        "converged": {m: float(np.mean(c)) for m, c in converged.items()},
        "max_logit_gap": float(np.max(np.abs(cold - warm)[both])),
        "same_class": float(np.mean((cold.argmax(-1) == warm.argmax(-1))[both])),
        "counts": counts,
    }


def plot(counts, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for mode, values in counts.items():
        ax.plot(np.arange(len(values)), values, marker=".", label=f"{mode} start")
    ax.set(xlabel="frame", ylabel="mean forward iterations", title="DEQ warm start")
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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*did not converge.*")

    data = load(args.quick)
    epochs = args.epochs or (1 if args.quick else 30)
    cell, head, accuracy = train(data, epochs, args.seed, 16 if args.quick else UNITS)
    print(
        f"digits: {len(data[0])} train / {len(data[1])} test, {epochs} epochs: "
        f"dense DEQ test accuracy {accuracy:.4f}"
    )
    frames, pairs = (5, 8) if args.quick else (20, 100)
    warm = warm_start(cell, head, data, frames, pairs)
    its, conv = warm["iterations"], warm["converged"]
    print(
        f"warm start on {pairs} digits morphing over {frames} frames (tol 1e-4): forward "
        f"iterations per frame {its['cold']:.1f} from zeros, {its['warm']:.1f} from the "
        f"previous fixed point; converged {100 * conv['cold']:.1f}% / {100 * conv['warm']:.1f}%;"
        f" where both converged, largest logit gap {warm['max_logit_gap']:.2g} and the same "
        f"class on {100 * warm['same_class']:.1f}% of frames"
    )
    print(f"figure: {plot(warm['counts'], args.out)}")


if __name__ == "__main__":
    main()
