"""Stochastic hypergradient descent on the Lasso penalty, with vanishing step sizes.

The Lasso solution b*(alpha) is a nonsmooth (piecewise smooth) function of alpha; its
hypergradient by the nonsmooth implicit function theorem (Bolte, Le, Pauwels,
Silveti-Falls 2021), restricted to the support and signs of the solution
(`ki.lasso.hypergradient`), is an element of a conservative Jacobian, and the paper's
convergence result for SGD with conservative gradients and vanishing steps covers
the bilevel problem

    min_theta  C(theta) = mean over validation samples of (y_i - x_i^T b*(e^theta))^2.

Here each step uses a *mini-batch* of validation samples (an unbiased estimate of C
and of its hypergradient), theta = log(alpha), and steps lr_k = a / (1 + k/k0)^gamma
with gamma in (1/2, 1]:

    theta_{k+1} = theta_k - lr_k * d C_batch / d theta (theta_k).

It is compared with the full-batch `ki.lasso.search` (gradient descent with line
search) and with a scikit-learn grid (`sklearn.linear_model.Lasso` on a log grid),
all judged by the criterion on the *full* validation set.

    python examples/paper/stochastic_lasso.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.linear_model import Lasso as SklearnLasso

import keras_implicit.lasso as L


def ar1_problem(n, n_val, p, rho=0.6, k=15, seed=0):
    """y = X b + noise with AR(1)-correlated features; y standardized by its train stats."""
    rng = np.random.default_rng(seed)
    total = n + n_val
    X = np.empty((total, p))
    X[:, 0] = rng.standard_normal(total)
    for j in range(1, p):
        X[:, j] = rho * X[:, j - 1] + np.sqrt(1 - rho**2) * rng.standard_normal(total)
    beta = np.zeros(p)
    support = rng.choice(p, k, replace=False)
    beta[support] = rng.choice([-1.0, 1.0], k) * rng.uniform(0.5, 2.0, k)
    signal = X @ beta
    y = signal + rng.standard_normal(total) * signal.std()
    y = (y - y[:n].mean()) / y[:n].std()
    return X[:n], y[:n], X[n:], y[n:]


def validation_mse(model, X_val, y_val):
    return float(np.mean((y_val - model.predict(X_val)) ** 2))


def sklearn_grid(X, y, X_val, y_val, alphas):
    """Full-validation MSE of scikit-learn's Lasso along a grid (warm-started path)."""
    model = SklearnLasso(alpha=alphas[0], warm_start=True, tol=1e-7, max_iter=100_000)
    values = []
    for alpha in alphas:
        model.set_params(alpha=alpha).fit(X, y)
        values.append(validation_mse(model, X_val, y_val))
    return np.array(values)


def stochastic_search(X, y, X_val, y_val, theta0, *, steps, batch_size, a, k0, gamma, seed=0):
    """SGD on theta = log(alpha) with mini-batch hypergradients of the held-out MSE."""
    rng = np.random.default_rng(seed)
    theta = float(theta0)
    state = {}  # warm starts and converted training data, shared across steps
    model = L.Lasso(alpha=np.exp(theta), tol=1e-8, max_iter=1000)
    path, rates, full, batch_values = [theta], [], [], []
    for k in range(steps):
        rows = rng.choice(len(y_val), batch_size, replace=False)
        criterion = L.HeldOutMSE(X_val[rows], y_val[rows])
        model.set_params(alpha=np.exp(theta))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", L.EmptySupportWarning)
            value, grad = L.hypergradient(model, criterion, X, y, state=state)
        full.append(validation_mse(model, X_val, y_val))  # model is fitted at theta_k
        batch_values.append(value)
        rate = a / (1.0 + k / k0) ** gamma
        rates.append(rate)
        theta = theta - rate * float(grad[0])
        path.append(theta)
    model.set_params(alpha=np.exp(theta)).fit(X, y)
    full.append(validation_mse(model, X_val, y_val))
    return {
        "theta": np.array(path),
        "step_sizes": np.array(rates),
        "full_criterion": np.array(full),
        "batch_criterion": np.array(batch_values),
    }


def plot(grid, stochastic, searched, out):
    alphas, values = grid
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].semilogx(alphas, values, color="0.5", label="scikit-learn grid")
    alpha_path = np.exp(stochastic["theta"])
    axes[0].plot(
        alpha_path,
        stochastic["full_criterion"],
        ".-",
        ms=3,
        lw=0.6,
        color="C0",
        label="stochastic iterates",
    )
    axes[0].plot(
        alpha_path[-1:],
        stochastic["full_criterion"][-1:],
        "*",
        ms=12,
        color="C3",
        label="stochastic, last",
    )
    axes[0].plot(
        searched.history("penalties")[:, 0],
        searched.history("criterion"),
        "s",
        ms=4,
        color="C2",
        label="ki.lasso.search (full batch)",
    )
    axes[0].set(xlabel="alpha", ylabel="full validation MSE", title="criterion")
    axes[0].legend(fontsize=8)
    steps = np.arange(len(stochastic["theta"]))
    axes[1].plot(steps, np.exp(stochastic["theta"]), color="C0", label="stochastic")
    axes[1].axhline(searched.best_penalties[0], color="C2", ls="--", label="search best")
    axes[1].axhline(alphas[np.argmin(values)], color="0.5", ls=":", label="grid best")
    axes[1].set(xlabel="step", ylabel="alpha", yscale="log", title="iterates")
    axes[1].legend(fontsize=8)
    axes[2].loglog(steps[1:], stochastic["step_sizes"], color="C0")
    axes[2].set(xlabel="step", ylabel="step size", title="a / (1 + k/k0)^gamma")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "stochastic_lasso.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small problem (CI)")
    parser.add_argument("--out", default="examples/output", help="where the figure goes")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.quick:
        n, n_val, p, steps, n_alphas, batch_size = 100, 400, 200, 60, 40, 32
    else:
        n, n_val, p, steps, n_alphas, batch_size = 200, 1000, 1000, 300, 100, 32
    schedule = {"a": 0.5, "k0": 10.0, "gamma": 0.75}
    X, y, X_val, y_val = ar1_problem(n, n_val, p)
    alpha_max = L.alpha_max(X, y)
    theta0 = np.log(alpha_max / 10)

    tic = time.perf_counter()
    alphas = alpha_max * np.logspace(0, -3, n_alphas)
    values = sklearn_grid(X, y, X_val, y_val, alphas)
    grid_time = time.perf_counter() - tic

    tic = time.perf_counter()
    searched = L.search(
        L.Lasso(alpha=np.exp(theta0), tol=1e-8, max_iter=1000),
        L.HeldOutMSE(X_val, y_val),
        X,
        y,
        max_iter=30,
        verbose=0,
    )
    search_time = time.perf_counter() - tic

    tic = time.perf_counter()
    stochastic = stochastic_search(
        X, y, X_val, y_val, theta0, steps=steps, batch_size=batch_size, **schedule
    )
    stochastic_time = time.perf_counter() - tic

    best = int(np.argmin(values))
    tail = stochastic["theta"][-max(5, steps // 10) :]
    result = {
        "grid": {"alpha": float(alphas[best]), "value": float(values[best])},
        "search": {
            "alpha": float(searched.best_penalties[0]),
            "value": float(searched.best_value),
            "evaluations": len(searched.trace),
        },
        "stochastic": {
            "alpha": float(np.exp(stochastic["theta"][-1])),
            "value": float(stochastic["full_criterion"][-1]),
            "initial_value": float(stochastic["full_criterion"][0]),
            "tail_theta_spread": float(tail.max() - tail.min()),
            "last_step": float(abs(stochastic["theta"][-1] - stochastic["theta"][-2])),
            **stochastic,
        },
        "schedule": schedule,
        "alpha_max": alpha_max,
        "problem": {"n": n, "n_val": n_val, "p": p, "batch_size": batch_size, "steps": steps},
        "data": (X, y, X_val, y_val),
    }
    print(
        f"AR(1) Lasso: n={n} train, {n_val} validation, p={p}; stochastic: {steps} steps of "
        f"{batch_size} validation samples, lr_k = {schedule['a']}/(1+k/{schedule['k0']:g})"
        f"^{schedule['gamma']}"
    )
    print(f"{'method':34s}{'alpha':>10s}{'full val MSE':>14s}{'vs grid':>9s}{'time':>8s}")
    rows = (
        (f"scikit-learn grid ({n_alphas} alphas)", result["grid"], grid_time),
        (f"ki.lasso.search ({len(searched.trace)} evals)", result["search"], search_time),
        ("stochastic hypergradient (last)", result["stochastic"], stochastic_time),
    )
    for name, entry, seconds in rows:
        ratio = entry["value"] / result["grid"]["value"] - 1.0
        print(f"{name:34s}{entry['alpha']:10.4g}{entry['value']:14.5f}{ratio:+9.2%}{seconds:7.1f}s")
    print(
        f"stochastic: start {result['stochastic']['initial_value']:.4f} (alpha_max/10); "
        f"spread of log(alpha) over the last {len(tail)} iterates "
        f"{result['stochastic']['tail_theta_spread']:.3g}, last step "
        f"{result['stochastic']['last_step']:.2g}, last step size "
        f"{stochastic['step_sizes'][-1]:.3g}"
    )
    print(f"figure: {plot((alphas, values), stochastic, searched, out)}")
    return result


if __name__ == "__main__":
    main()
