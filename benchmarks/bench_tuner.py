"""Trials and wall time for keras-tuner oracles to tune the Lasso penalty.

For each problem, the target is the best held-out MSE of scikit-learn's Lasso over a
dense log grid of 120 penalties in [1e-4, 1] * alpha_max (tight tolerance). Every
tuner searches the same penalty range with the same trial budget through the same
Tuner (``ki.tuner.LassoTuner``, so a trial costs the same for all); we record how
many trials and how many seconds each needs to get within 1% of the target.
Random search and Bayesian optimization are run with several seeds (median reported).

    python benchmarks/bench_tuner.py [--quick]

Writes benchmarks/results/tuner.json and tuner.md (tuner_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras_tuner
import numpy as np
from sklearn.datasets import make_regression
from sklearn.linear_model import Lasso as SkLasso

import keras_implicit as ki
import keras_implicit.tuner

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
LOW = 1e-4  # penalty range relative to alpha_max, shared by the grid and all tuners
TOLERANCE = 0.01


def problems(quick):
    """(name, x, y, x_val, y_val): held-out regression problems of growing difficulty."""
    specs = [("p60_informative8", 300, 60, 8, 20.0, None)]
    specs.append(("p200_lowrank_informative20", 400, 200, 20, 5.0, 30))
    out = []
    for name, n, p, informative, noise, rank in specs:
        x, y = make_regression(
            n_samples=n,
            n_features=p,
            n_informative=informative,
            noise=noise,
            effective_rank=rank,
            random_state=0,
        )
        half = n // 2
        out.append((name, x[:half], y[:half], x[half:], y[half:]))
    return out


def grid_best(x, y, x_val, y_val, n_alphas=120):
    scale = ki.lasso.alpha_max(x, y)
    best = np.inf
    for alpha in scale * np.geomspace(LOW, 1.0, n_alphas):
        model = SkLasso(alpha=alpha, tol=1e-10, max_iter=100_000).fit(x, y)
        best = min(best, float(np.mean((model.predict(x_val) - y_val) ** 2)))
    return best, scale


class TimedLassoTuner(ki.tuner.LassoTuner):
    """Records the wall time at the end of every trial."""

    def on_search_begin(self):
        self.started = time.perf_counter()
        self.ends = []

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        self.ends.append(time.perf_counter() - self.started)


def make_oracle(kind, budget, scale, seed):
    objective = keras_tuner.Objective("val_criterion", "min")
    hp = keras_tuner.HyperParameters()
    low, high = LOW * scale, scale
    if kind == "hypergradient":
        return ki.tuner.HypergradientOracle(max_trials=budget)
    if kind == "grid":
        # `budget` log-spaced points covering the whole range.
        ratio = (high / low) ** (1.0 / (budget - 1))
        hp.Float("alpha", low, high * 1.0001, sampling="log", step=ratio, default=low)
        return keras_tuner.oracles.GridSearchOracle(
            objective=objective, max_trials=budget, hyperparameters=hp
        )
    hp.Float("alpha", low, high, sampling="log")
    if kind == "random":
        return keras_tuner.oracles.RandomSearchOracle(
            objective=objective, max_trials=budget, hyperparameters=hp, seed=seed
        )
    return keras_tuner.oracles.BayesianOptimizationOracle(
        objective=objective, max_trials=budget, hyperparameters=hp, seed=seed
    )


def run_one(kind, data, scale, target, budget, seed, directory):
    x, y, x_val, y_val = data
    tuner = TimedLassoTuner(
        ki.lasso.Lasso(tol=1e-6),
        oracle=make_oracle(kind, budget, scale, seed),
        penalty_range=(LOW, 1.0),
        directory=directory,
        project_name=f"{kind}_{seed}",
        overwrite=True,
    )
    tuner.search(x, y, validation_data=(x_val, y_val), verbose=0)
    scores = [tuner.oracle.trials[t].score for t in tuner.oracle.end_order]
    best = np.minimum.accumulate(scores)
    hits = np.flatnonzero(best <= (1 + TOLERANCE) * target)
    reached = int(hits[0]) + 1 if hits.size else None
    return {
        "trials_to_target": reached,
        "seconds_to_target": tuner.ends[reached - 1] if reached else None,
        "trials_run": len(scores),
        "best_ratio": float(best[-1] / target),
        "curve": [float(v) for v in best],
    }


def median_or_none(values, budget):
    """Median with misses counted as budget + 1 (reported as '>budget' if median misses)."""
    filled = [budget + 1 if v is None else v for v in values]
    med = statistics.median(filled)
    return None if med > budget else med


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    budget = 15 if args.quick else 40
    seeds = [1, 2] if args.quick else [1, 2, 3]
    report = {
        "budget": budget,
        "tolerance": TOLERANCE,
        "seeds": seeds,
        "machine": platform.platform(),
        "problems": {},
    }
    with tempfile.TemporaryDirectory() as directory:
        for name, x, y, x_val, y_val in problems(args.quick):
            target, scale = grid_best(x, y, x_val, y_val)
            # Untimed warm-up: the first fits in a process pay for tracing/compiling
            # the inner solver, which would otherwise be charged to the first tuner.
            run_one("random", (x, y, x_val, y_val), scale, target, 3, 0, directory)
            rows = {}
            for kind in ("hypergradient", "grid", "random", "bayesian"):
                kind_seeds = seeds if kind in ("random", "bayesian") else [0]
                runs = [
                    run_one(kind, (x, y, x_val, y_val), scale, target, budget, s, directory)
                    for s in kind_seeds
                ]
                trials = [r["trials_to_target"] for r in runs]
                seconds = [r["seconds_to_target"] for r in runs]
                rows[kind] = {
                    "median_trials_to_target": median_or_none(trials, budget),
                    "median_seconds_to_target": (
                        statistics.median([s for s in seconds if s is not None])
                        if any(s is not None for s in seconds)
                        else None
                    ),
                    "reached": f"{sum(t is not None for t in trials)}/{len(runs)}",
                    "runs": runs,
                }
                print(name, kind, rows[kind]["median_trials_to_target"], rows[kind]["reached"])
            report["problems"][name] = {
                "n_train": int(x.shape[0]),
                "n_features": int(x.shape[1]),
                "grid_best_mse": target,
                "tuners": rows,
                "speedup_vs_best_builtin": speedup(rows, budget),
            }
            write(report, args.quick)  # after every problem: partial runs keep results


def speedup(rows, budget):
    """Trials of the best built-in tuner / trials of the hypergradient tuner.

    A built-in tuner that misses the target within the budget counts as budget + 1
    trials, so the ratio is then a lower bound."""
    ours = rows["hypergradient"]["median_trials_to_target"]
    if ours is None:
        return None
    builtin = [rows[k]["median_trials_to_target"] for k in ("grid", "random", "bayesian")]
    best = min(budget + 1 if t is None else t for t in builtin)
    return best / ours


def write(report, quick):
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "tuner_quick" if quick else "tuner"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    budget = report["budget"]
    lines = [
        "# Lasso penalty tuning: trials to reach the best-grid criterion within 1%",
        "",
        f"Budget {budget} trials per run; random and Bayesian: median over seeds "
        f"{report['seeds']}; '>{budget}' = not reached. Same Tuner and trial cost for all "
        "oracles; target = best held-out MSE of scikit-learn Lasso over 120 log-spaced "
        "penalties. Machine: " + report["machine"],
        "",
        "| problem | tuner | trials to target | seconds to target | reached | best/target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, problem in report["problems"].items():
        for kind, row in problem["tuners"].items():
            trials = row["median_trials_to_target"]
            seconds = row["median_seconds_to_target"]
            ratio = statistics.median(r["best_ratio"] for r in row["runs"])
            lines.append(
                f"| {name} | {kind} | {trials if trials is not None else f'>{budget}'} | "
                f"{'-' if seconds is None else f'{seconds:.2f}'} | {row['reached']} | {ratio:.4f} |"
            )
        sp = problem["speedup_vs_best_builtin"]
        lines.append(
            f"| {name} | **speedup vs best built-in** | "
            f"{'-' if sp is None else f'{sp:.1f}x'} | | | |"
        )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
