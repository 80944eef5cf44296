"""Implicit differentiation on two problems everybody knows.

1. PageRank is the fixed point r = d P r + (1 - d) / n. Which link, if strengthened,
   raises page 0's rank most? `ki.fixed_point` gives d r_0 / d W for every edge weight
   at the cost of one extra linear solve; we check it against finite differences.
2. Ridge regression's solution is an argmin. Its validation error is a smooth
   function of the penalty lambda, and `ki.argmin` differentiates through the solver,
   so lambda can be tuned by gradient descent (a tiny bilevel problem). We compare
   the result with a dense grid.

    python examples/fixed_point_and_argmin.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_diabetes

import keras_implicit as ki


def pagerank_sensitivity(n_pages: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    links = (rng.random((n_pages, n_pages)) < 0.15).astype(np.float64)
    np.fill_diagonal(links, 0.0)
    links[:, links.sum(0) == 0] = 1.0  # dangling pages link everywhere
    weights = tf.Variable(links)
    mask = tf.constant(links)
    damping = tf.constant(0.85, tf.float64)

    def step(rank, damping):
        w = weights * mask  # only existing links carry weight
        transition = w / tf.reduce_sum(w, axis=0, keepdims=True)
        return damping * tf.linalg.matvec(transition, rank) + (1 - damping) / n_pages

    rank0 = tf.fill([n_pages], tf.constant(1.0 / n_pages, tf.float64))
    with tf.GradientTape() as tape:
        tape.watch(damping)
        rank, stats = ki.fixed_point(
            step, rank0, damping, tol=1e-12, max_iter=500, return_stats=True
        )
        target = rank[0]
    d_weights, d_damping = tape.gradient(target, [weights, damping])
    d_weights = (d_weights * mask).numpy()

    # finite-difference check on the most influential edge
    i, j = np.unravel_index(np.argmax(d_weights), d_weights.shape)
    eps, original = 1e-6, weights.numpy()
    values = []
    for sign in (1, -1):
        bumped = original.copy()
        bumped[i, j] += sign * eps
        weights.assign(bumped)
        values.append(float(ki.fixed_point(step, rank0, damping, tol=1e-13, max_iter=500)[0]))
    weights.assign(original)
    fd = (values[0] - values[1]) / (2 * eps)
    return {
        "rank": rank.numpy(),
        "iterations": int(stats.iterations),
        "best_edge": (int(j), int(i)),
        "implicit": float(d_weights[i, j]),
        "finite_difference": fd,
        "d_damping": float(d_damping),
        "sensitivity": d_weights,
    }


def tune_ridge(steps: int):
    data = load_diabetes()
    x, y = data.data, data.target
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, val = order[:150], order[150:]  # few training points: the penalty matters
    mean, scale = x[train].mean(0), x[train].std(0)
    x = (x - mean) / scale
    y = y - y[train].mean()
    x_tr, y_tr, x_val, y_val = (tf.constant(a) for a in (x[train], y[train], x[val], y[val]))
    n = len(train)

    def objective(beta, lam):
        residual = tf.linalg.matvec(x_tr, beta) - y_tr
        return 0.5 * tf.reduce_sum(residual**2) / n + 0.5 * lam * tf.reduce_sum(beta**2)

    def validation(log_lam):
        beta = ki.argmin(
            objective,
            tf.zeros([x.shape[1]], tf.float64),
            tf.exp(log_lam),
            tol=1e-10,
            backward_tol=1e-10,
        )
        return tf.reduce_mean((tf.linalg.matvec(x_val, beta) - y_val) ** 2)

    log_lam = tf.Variable(np.log(10.0))  # start far from the optimum
    optimizer = tf.keras.optimizers.Adam(learning_rate=0.3)
    path = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = validation(log_lam)
        path.append((float(tf.exp(log_lam)), float(loss)))
        optimizer.apply_gradients([(tape.gradient(loss, log_lam), log_lam)])

    # dense grid by closed form: independent reference
    xt, yt, xv, yv = x[train], y[train], x[val], y[val]
    grid = np.logspace(-4, 2, 200)
    curve = [
        np.mean(
            (xv @ np.linalg.solve(xt.T @ xt / n + g * np.eye(x.shape[1]), xt.T @ yt / n) - yv) ** 2
        )
        for g in grid
    ]
    return path, grid, np.array(curve)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and fast (CI)")
    parser.add_argument("--out", default="examples/output", help="where the figure goes")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pr = pagerank_sensitivity(20 if args.quick else 60)
    src, dst = pr["best_edge"]
    print(
        f"PageRank: converged in {pr['iterations']} iterations; rank of page 0 = "
        f"{pr['rank'][0]:.4f}"
    )
    print(
        f"  strongest lever: the link {src} -> {dst}; d rank_0 / d w = {pr['implicit']:.6e} "
        f"(finite differences {pr['finite_difference']:.6e})"
    )
    print(f"  d rank_0 / d damping = {pr['d_damping']:+.4f}")

    path, grid, curve = tune_ridge(15 if args.quick else 60)
    best_grid = grid[np.argmin(curve)]
    lam_final, mse_final = path[-1]
    print(
        f"Ridge on diabetes: lambda {path[0][0]:.3g} -> {lam_final:.3g} by hypergradient "
        f"descent (grid optimum {best_grid:.3g}); validation MSE {path[0][1]:.1f} -> "
        f"{mse_final:.1f} (grid best {curve.min():.1f})"
    )

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    image = ax1.imshow(
        pr["sensitivity"],
        cmap="RdBu_r",
        vmax=np.abs(pr["sensitivity"]).max(),
        vmin=-np.abs(pr["sensitivity"]).max(),
    )
    ax1.set(title="d rank(page 0) / d link weight", xlabel="from page", ylabel="to page")
    fig.colorbar(image, ax=ax1)
    ax2.semilogx(grid, curve, color="0.6", label="grid (closed form)")
    lams, losses = zip(*path)
    ax2.semilogx(lams, losses, "o-", color="C3", markersize=3, label="hypergradient descent")
    ax2.set(title="Ridge: validation MSE vs lambda", xlabel="lambda", ylabel="validation MSE")
    ax2.legend()
    fig.tight_layout()
    figure = out / "fixed_point_and_argmin.png"
    fig.savefig(figure, dpi=110)
    print(f"figure: {figure}")
    return {"pagerank": pr, "ridge_final": (lam_final, mse_final), "grid_best": curve.min()}


if __name__ == "__main__":
    main()
