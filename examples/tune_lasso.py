"""Tuning the Lasso penalty with keras-tuner: hypergradients versus blind search.

1. One penalty (Lasso): ``ki.tuner.LassoTuner`` with its ``HypergradientOracle``
   against keras-tuner's GridSearch, RandomSearch and BayesianOptimization oracles,
   same Tuner, same penalty range, same trial budget. The hypergradient oracle uses
   d(validation MSE)/d(log alpha) from ``ki.lasso.hypergradient``; the others only
   see the criterion. A dense scikit-learn grid gives the reference best value.
2. One penalty per feature (WeightedLasso): hundreds of hyperparameters, which only
   a gradient-based oracle can search, starting from the best Lasso penalty.

The figure (best validation MSE so far versus trials) goes to ``--out``, and the
hypergradient searches log per-trial TensorBoard scalars (criterion, gradient norm,
penalties) under ``--out``/tensorboard: ``tensorboard --logdir <out>/tensorboard``.

    python examples/tune_lasso.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import matplotlib

matplotlib.use("Agg")
import keras_tuner
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import make_regression
from sklearn.linear_model import Lasso as SkLasso

import keras_implicit as ki
import keras_implicit.tuner

LOW = 1e-4  # penalties searched in [LOW, 1] * alpha_max by every tuner


def make_problem(quick):
    n, p = (200, 40) if quick else (400, 200)
    x, y = make_regression(n_samples=n, n_features=p, n_informative=10, noise=10.0, random_state=0)
    half = n // 2
    return x[:half], y[:half], x[half:], y[half:]


def grid_reference(x, y, x_val, y_val, n_alphas):
    """Best held-out MSE of scikit-learn's Lasso over a dense log grid."""
    scale = ki.lasso.alpha_max(x, y)
    alphas = scale * np.geomspace(LOW, 1.0, n_alphas)
    errors = [
        np.mean(
            (SkLasso(alpha=a, tol=1e-10, max_iter=100_000).fit(x, y).predict(x_val) - y_val) ** 2
        )
        for a in alphas
    ]
    return float(np.min(errors)), float(alphas[int(np.argmin(errors))]), scale


def builtin_oracle(kind, budget, scale):
    objective = keras_tuner.Objective("val_criterion", "min")
    hp = keras_tuner.HyperParameters()
    low, high = LOW * scale, scale
    if kind == "GridSearch":
        ratio = (high / low) ** (1.0 / (budget - 1))  # `budget` points over the range
        hp.Float("alpha", low, high * 1.0001, sampling="log", step=ratio, default=low)
        return keras_tuner.oracles.GridSearchOracle(objective, budget, hyperparameters=hp)
    hp.Float("alpha", low, high, sampling="log")
    if kind == "RandomSearch":
        return keras_tuner.oracles.RandomSearchOracle(objective, budget, hyperparameters=hp, seed=1)
    return keras_tuner.oracles.BayesianOptimizationOracle(
        objective, budget, hyperparameters=hp, seed=1
    )


def best_so_far(tuner):
    scores = [tuner.oracle.trials[t].score for t in tuner.oracle.end_order]
    return np.minimum.accumulate(scores)


def run(kind, data, budget, scale, directory, estimator=None, oracle=None, logdir=None):
    x, y, x_val, y_val = data
    if oracle is None and kind != "Hypergradient":
        oracle = builtin_oracle(kind, budget, scale)
    tuner = ki.tuner.LassoTuner(
        estimator or ki.lasso.Lasso(tol=1e-6),
        oracle=oracle,
        max_trials=budget,
        penalty_range=(LOW, 1.0),
        tensorboard=None if logdir is None else os.path.join(logdir, kind),
        directory=directory,
        project_name=kind,
        overwrite=True,
    )
    tuner.search(x, y, validation_data=(x_val, y_val), verbose=0)
    return tuner


def weighted_search(data, alpha, budget, directory, logdir=None):
    """WeightedLasso: one penalty per feature, started at the best Lasso penalty."""
    p = data[0].shape[1]
    names = ki.tuner.penalty_names(ki.lasso.WeightedLasso(), p)
    oracle = ki.tuner.HypergradientOracle(
        max_trials=budget, initial_points=[dict.fromkeys(names, alpha)], patience=8
    )
    return run(
        "WeightedLasso",
        data,
        budget,
        None,
        directory,
        ki.lasso.WeightedLasso(tol=1e-6),
        oracle,
        logdir=logdir,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small problem, few trials")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "output"))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = 6 if args.quick else 25
    data = make_problem(args.quick)
    target, grid_alpha, scale = grid_reference(*data, n_alphas=20 if args.quick else 150)
    print(f"dense grid: best validation MSE {target:.4f} at alpha = {grid_alpha:.4g}")

    curves = {}
    with tempfile.TemporaryDirectory() as directory:
        for kind in ("Hypergradient", "GridSearch", "RandomSearch", "BayesianOptimization"):
            logdir = str(out / "tensorboard") if kind == "Hypergradient" else None
            tuner = run(kind, data, budget, scale, directory, logdir=logdir)
            curves[kind] = best_so_far(tuner)
            hits = np.flatnonzero(curves[kind] <= 1.01 * target)
            reached = f"trial {hits[0] + 1}" if hits.size else "not reached"
            print(
                f"{kind:>21}: best {curves[kind][-1]:.4f} in {curves[kind].size} trials; "
                f"within 1% of the grid: {reached}"
            )
            if kind == "Hypergradient":
                best_alpha = tuner.get_best_hyperparameters()[0].get("alpha")
                tuner.results_summary(num_trials=2)
        weighted = weighted_search(data, best_alpha, budget, directory, str(out / "tensorboard"))
        weighted_curve = best_so_far(weighted)
        print(
            f"\nWeightedLasso ({data[0].shape[1]} penalties): best {weighted_curve[-1]:.4f} "
            f"(Lasso grid best {target:.4f})"
        )
        weighted.results_summary(num_trials=1)

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, curve in curves.items():
        left.plot(np.arange(1, curve.size + 1), curve, marker="o", ms=3, label=kind)
    left.axhline(target, color="k", ls="--", lw=1, label="dense grid best")
    left.axhline(1.01 * target, color="gray", ls=":", lw=1, label="grid best + 1%")
    left.set(
        xlabel="trial",
        ylabel="best validation MSE so far",
        title="Lasso: one penalty",
        yscale="log",
    )
    left.legend(fontsize=8)
    right.plot(
        np.arange(1, weighted_curve.size + 1),
        weighted_curve,
        marker="o",
        ms=3,
        color="C4",
        label="WeightedLasso (hypergradient)",
    )
    right.axhline(target, color="k", ls="--", lw=1, label="Lasso dense grid best")
    right.set(
        xlabel="trial",
        ylabel="best validation MSE so far",
        title=f"one penalty per feature ({data[0].shape[1]})",
    )
    right.legend(fontsize=8)
    figure.tight_layout()
    path = out / "tune_lasso.png"
    figure.savefig(path, dpi=110)
    print(f"figure: {path}")
    print(f"TensorBoard logs: tensorboard --logdir {out / 'tensorboard'}")


if __name__ == "__main__":
    main()
