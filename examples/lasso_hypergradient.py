"""Tuning Lasso penalties by hypergradient descent instead of a grid.

Two problems: a synthetic high-dimensional AR(1)-correlated design and scikit-learn's
bundled diabetes data. For each one the script
  1. computes the held-out MSE along a grid of alphas (the classical approach),
  2. runs `ki.lasso.search` on the single penalty (gradient descent + line search),
  3. runs it on a WeightedLasso (one penalty per feature, Adam) started from there,
and plots the held-out error of the search iterates next to the grid curve.

    python examples/lasso_hypergradient.py [--quick] [--out examples/output/]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import keras_implicit.lasso as L


def ar1_problem(n, p, rho=0.5, k=20, seed=0):
    """Train/validation split of y = X b + noise with AR(1)-correlated features."""
    rng = np.random.default_rng(seed)
    X = np.empty((2 * n, p))
    X[:, 0] = rng.standard_normal(2 * n)
    for j in range(1, p):
        X[:, j] = rho * X[:, j - 1] + np.sqrt(1 - rho**2) * rng.standard_normal(2 * n)
    beta = np.zeros(p)
    support = rng.choice(p, k, replace=False)
    beta[support] = rng.choice([-1.0, 1.0], k) * rng.uniform(0.5, 2.0, k)
    signal = X @ beta
    y = signal + rng.standard_normal(2 * n) * signal.std() / 2.0
    return X[:n], y[:n], X[n:], y[n:]


def diabetes_problem():
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(0).permutation(y.size)
    X, y = X[order], y[order]
    return X[:300], y[:300], X[300:], y[300:]


def grid_curve(X, y, X_val, y_val, n_alphas):
    """Held-out MSE along a decreasing grid, warm-started (a regularization path)."""
    alphas = L.alpha_max(X, y) * np.logspace(0, -3, n_alphas)
    model = L.Lasso(alpha=alphas[0], warm_start=True)
    values = []
    for alpha in alphas:
        model.set_params(alpha=alpha).fit(X, y)
        values.append(np.mean((y_val - model.predict(X_val)) ** 2))
    return alphas, np.array(values)


def run(name, problem, n_alphas, max_iter, ax):
    X, y, X_val, y_val = problem
    criterion = L.HeldOutMSE(X_val, y_val)
    tic = time.perf_counter()
    alphas, values = grid_curve(X, y, X_val, y_val, n_alphas)
    grid_time = time.perf_counter() - tic
    start = L.alpha_max(X, y) / 10  # the usual starting point of hypergradient search
    tic = time.perf_counter()
    single = L.search(L.Lasso(alpha=start), criterion, X, y, max_iter=max_iter, verbose=0)
    single_time = time.perf_counter() - tic
    weighted = L.search(
        L.WeightedLasso(alphas=np.full(X.shape[1], single.best_penalties[0])),
        criterion,
        X,
        y,
        optimizer="adam",
        max_iter=max_iter,
        verbose=0,
    )
    print(
        f"{name}: grid best {values.min():.4g} ({n_alphas} alphas, {grid_time:.2f} s); "
        f"search best {single.best_value:.4g} at alpha={single.best_penalties[0]:.4g} "
        f"({len(single.trace)} evaluations, {single_time:.2f} s); "
        f"weighted Lasso {weighted.best_value:.4g}"
    )
    ax.semilogx(alphas, values, color="0.6", label=f"grid ({n_alphas} alphas)")
    path = single.history("penalties")[:, 0]
    ax.plot(path, single.history("criterion"), "o-", color="C0", ms=4, label="search iterates")
    ax.plot(path[:1], single.history("criterion")[:1], "s", color="C3", label="start")
    ax.axhline(weighted.best_value, color="C2", ls="--", label="weighted Lasso (search)")
    ax.set_xlabel("alpha")
    ax.set_ylabel("held-out MSE")
    ax.set_title(name)
    ax.legend(fontsize=8)
    return single, weighted


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny problems (CI)")
    parser.add_argument("--out", default=os.path.join("examples", "output"))
    args = parser.parse_args(argv)
    n, p = (60, 150) if args.quick else (200, 2000)
    n_alphas = 15 if args.quick else 100
    max_iter = 8 if args.quick else 40
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    run(f"synthetic AR(1), n={n}, p={p}", ar1_problem(n, p), n_alphas, max_iter, axes[0])
    run("diabetes", diabetes_problem(), n_alphas, max_iter, axes[1])
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "lasso_hypergradient.png")
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
