"""Trials and wall time for keras-tuner oracles to tune Lasso-type penalties.

Problems (held-out MSE, half of the samples for training, half for validation):

- ``p60_informative8``, ``p200_lowrank_informative20``: one Lasso penalty. The
  common case; a 1-D search over 4 decades, easy for every tuner (random search
  needs a handful of trials), so no large speedup is possible there.
- ``p200_lowrank_elasticnet``: ElasticNet, two penalties (l1, l2). A narrow valley
  in l1 and a slope in l2 that flattens towards its lower bound: blind search in 2-D
  has to land in a thin band.
- ``multisource_4groups``: four data sources of 50 features each (own shared factor,
  10, 5, 2 and 0 informative features), one Lasso penalty per source
  (``WeightedLasso`` with ``penalty_groups``, as IPF-Lasso tunes penalty factors per
  data modality). Four hyperparameters: a blind search's chance to land near the
  optimum falls with the dimension, while a hypergradient costs the same per trial.
- ``multisource_6groups``: the same with six sources (10, 5, 2, 0, 8 and 3
  informative features). Added when it exposed a plateau: a first step that
  switches off every feature of a source leaves its penalty with a zero gradient
  (see the plateau probe of ``HypergradientOracle``).

For each problem, the target is the best held-out MSE of scikit-learn (tight
tolerance) over a dense log grid of the penalties: 120 penalties in
[1e-4, 1] * alpha_max for the Lasso; for the ElasticNet (l1, l2) a 30 x 30 grid
over [1e-4, 1] * alpha_max times [1e-4, 1] * (mean feature variance), which are
also the bounds every tuner searches. A dense grid in 4-6 dimensions is out of reach,
so for the grouped sources the target is the best of a 120-point grid of one shared
penalty, refined by Nelder-Mead over the per-source log penalties (scikit-learn fits,
derivative free: independent of the hypergradient); the tuners search
[1e-4, 1] * alpha_max per source. Every tuner searches the same space with the same trial
budget through the same Tuner (``ki.tuner.LassoTuner``, so a trial costs the same for
all); we record how many trials and how many seconds each needs to get within 1% of
the target (a run stops there). Random search and Bayesian optimization are run with
several seeds (median reported, a run that misses counting as budget + 1).

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
import scipy.optimize
from sklearn.datasets import make_regression
from sklearn.linear_model import ElasticNet as SkElasticNet
from sklearn.linear_model import Lasso as SkLasso

import keras_implicit as ki
import keras_implicit.tuner

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
LOW = 1e-4  # penalty range relative to alpha_max, shared by the grid and all tuners
TOLERANCE = 0.01


def problems(quick):
    """(name, estimator, x, y, x_val, y_val, groups): held-out regression problems
    (``groups``: the source of each feature, for the grouped penalties, else None)."""
    del quick  # the quick run uses the same problems with a smaller budget
    specs = [("p60_informative8", "lasso", 300, 60, 8, 20.0, None)]
    specs.append(("p200_lowrank_informative20", "lasso", 400, 200, 20, 5.0, 30))
    specs.append(("p200_lowrank_elasticnet", "elasticnet", 400, 200, 20, 5.0, 30))
    out = []
    for name, estimator, n, p, informative, noise, rank in specs:
        x, y = make_regression(
            n_samples=n,
            n_features=p,
            n_informative=informative,
            noise=noise,
            effective_rank=rank,
            random_state=0,
        )
        half = n // 2
        out.append((name, estimator, x[:half], y[:half], x[half:], y[half:], None))
    out.append(("multisource_4groups", "grouped", *multisource()))
    out.append(("multisource_6groups", "grouped", *multisource(informative=(10, 5, 2, 0, 8, 3))))
    return out


def multisource(n=400, size=50, informative=(10, 5, 2, 0), noise=5.0, seed=0):
    """Four data sources: features correlated within a source (a shared factor), with
    10, 5, 2 and 0 informative features. (x, y, x_val, y_val, source of each feature)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(informative)), size)
    x = rng.standard_normal((n, groups.size))
    coef = np.zeros(groups.size)
    for source, count in enumerate(informative):
        columns = np.flatnonzero(groups == source)
        x[:, columns] += 0.5 * rng.standard_normal((n, 1))
        coef[columns[:count]] = rng.normal(scale=2.0, size=count)
    y = x @ coef + noise * rng.standard_normal(n)
    half = n // 2
    return x[:half], y[:half], x[half:], y[half:], groups


def bounds(estimator, x, y, groups=None):
    """{name: (low, high)} of the penalties: what LassoTuner declares by default."""
    scale = ki.lasso.alpha_max(x, y)
    if estimator == "lasso":
        return {"alpha": (LOW * scale, scale)}
    if estimator == "grouped":
        return {f"alpha_{label}": (LOW * scale, scale) for label in np.unique(groups)}
    variance = float(np.mean(np.var(x, axis=0)))
    return {"alpha_l1": (LOW * scale, scale), "alpha_l2": (LOW * variance, variance)}


def held_out_mse(model, x_val, y_val):
    return float(np.mean((model.predict(x_val) - y_val) ** 2))


def grouped_mse(log_alphas, x, y, x_val, y_val, groups):
    """Held-out MSE of the Lasso with penalty exp(log_alphas[g]) on the features of
    group g: scikit-learn's Lasso on rescaled columns (b_j = c_j / w_j turns
    sum_j alpha w_j |b_j| into alpha |c|_1 for the columns x_j / w_j)."""
    alphas = np.exp(np.asarray(log_alphas))[groups]
    reference = float(alphas.min())
    weights = alphas / reference
    model = SkLasso(alpha=reference, tol=1e-10, max_iter=100_000).fit(x / weights, y)
    return held_out_mse(model, x_val / weights, y_val)


def grid_best(estimator, x, y, x_val, y_val, groups=None, n_alphas=120, n_per_axis=30):
    """Best held-out MSE of scikit-learn over a dense log grid of the penalties (for
    the grouped penalties: a shared-penalty grid refined by Nelder-Mead)."""
    space = bounds(estimator, x, y, groups)
    if estimator == "grouped":
        low, high = np.log(next(iter(space.values())))
        k = len(space)
        shared = np.linspace(low, high, n_alphas)
        errors = [grouped_mse(np.full(k, t), x, y, x_val, y_val, groups) for t in shared]
        start = np.full(k, shared[int(np.argmin(errors))])
        # A simplex of half a decade per penalty around the best shared penalty.
        simplex = np.vstack([start, start + 0.5 * np.log(10.0) * np.eye(k)])
        result = scipy.optimize.minimize(
            lambda t: grouped_mse(np.clip(t, low, high), x, y, x_val, y_val, groups),
            start,
            method="Nelder-Mead",
            options={"maxfev": 400, "xatol": 1e-3, "fatol": 1e-6, "initial_simplex": simplex},
        )
        return min(min(errors), float(result.fun))
    best = np.inf
    if estimator == "lasso":
        for alpha in np.geomspace(*space["alpha"], n_alphas):
            model = SkLasso(alpha=alpha, tol=1e-10, max_iter=100_000).fit(x, y)
            best = min(best, held_out_mse(model, x_val, y_val))
        return best
    for l1 in np.geomspace(*space["alpha_l1"], n_per_axis):
        for l2 in np.geomspace(*space["alpha_l2"], n_per_axis):
            # scikit-learn: alpha * l1_ratio * |b|_1 + alpha * (1 - l1_ratio) / 2 * |b|^2
            model = SkElasticNet(
                alpha=l1 + l2, l1_ratio=l1 / (l1 + l2), tol=1e-10, max_iter=100_000
            ).fit(x, y)
            best = min(best, held_out_mse(model, x_val, y_val))
    return best


class TimedLassoTuner(ki.tuner.LassoTuner):
    """Records the wall time at the end of every trial; stops once ``target`` is met
    (trials and seconds to the target are what is measured, for every oracle)."""

    target = None

    def on_search_begin(self):
        self.started = time.perf_counter()
        self.ends = []

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        self.ends.append(time.perf_counter() - self.started)
        score = self.oracle.trials[trial.trial_id].score
        if self.target is not None and score is not None and score <= self.target:
            self.oracle.max_trials = len(self.oracle.trials)  # no further trial


def make_oracle(kind, budget, space, seed):
    objective = keras_tuner.Objective("val_criterion", "min")
    hp = keras_tuner.HyperParameters()
    if kind == "hypergradient":
        return ki.tuner.HypergradientOracle(max_trials=budget)
    if kind == "hypergradient_line_search":
        return ki.tuner.HypergradientOracle(max_trials=budget, policy="line_search")
    if kind == "grid":
        # A product grid of log-spaced points per penalty covering the whole range
        # (at least the two bounds per axis: with many penalties the budget then
        # covers only part of the grid, in keras-tuner's order).
        per_axis = max(2, int(budget ** (1.0 / len(space)) + 1e-9))
        for name, (low, high) in space.items():
            ratio = (high / low) ** (1.0 / (per_axis - 1))
            hp.Float(name, low, high * 1.0001, sampling="log", step=ratio, default=low)
        return keras_tuner.oracles.GridSearchOracle(
            objective=objective, max_trials=budget, hyperparameters=hp
        )
    for name, (low, high) in space.items():
        hp.Float(name, low, high, sampling="log")
    if kind == "random":
        return keras_tuner.oracles.RandomSearchOracle(
            objective=objective, max_trials=budget, hyperparameters=hp, seed=seed
        )
    return keras_tuner.oracles.BayesianOptimizationOracle(
        objective=objective, max_trials=budget, hyperparameters=hp, seed=seed
    )


KINDS = ("hypergradient", "hypergradient_line_search", "grid", "random", "bayesian")
ESTIMATORS = {
    "lasso": ki.lasso.Lasso,
    "elasticnet": ki.lasso.ElasticNet,
    "grouped": ki.lasso.WeightedLasso,
}


def run_one(kind, estimator, data, target, budget, seed, directory):
    x, y, x_val, y_val, groups = data
    tuner = TimedLassoTuner(
        ESTIMATORS[estimator](tol=1e-6),
        oracle=make_oracle(kind, budget, bounds(estimator, x, y, groups), seed),
        penalty_range=(LOW, 1.0),
        penalty_groups=groups,
        directory=directory,
        project_name=f"{kind}_{seed}",
        overwrite=True,
    )
    tuner.target = (1 + TOLERANCE) * target
    tuner.search(x, y, validation_data=(x_val, y_val), verbose=0)
    scores = [tuner.oracle.trials[t].score for t in tuner.oracle.end_order]
    best = np.minimum.accumulate(scores)
    hits = np.flatnonzero(best <= (1 + TOLERANCE) * target)
    reached = int(hits[0]) + 1 if hits.size else None
    return {
        "seed": seed,
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
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="PROBLEM",
        help="run only these problems and merge them into the existing results file",
    )
    args = parser.parse_args()
    budget = 15 if args.quick else 40
    # Random search is cheap: more seeds steady its median. Bayesian optimization
    # costs seconds per trial (its Gaussian process): three seeds.
    seeds = {"random": [1, 2] if args.quick else [1, 2, 3, 4, 5]}
    seeds["bayesian"] = [1, 2] if args.quick else [1, 2, 3]
    report = {
        "budget": budget,
        "tolerance": TOLERANCE,
        "seeds": seeds,
        "machine": platform.platform(),
        "problems": {},
    }
    selected = problems(args.quick)
    if args.only:
        unknown = set(args.only) - {spec[0] for spec in selected}
        if unknown:
            parser.error(f"unknown problems {sorted(unknown)}")
        selected = [spec for spec in selected if spec[0] in args.only]
        previous = RESULTS / ("tuner_quick.json" if args.quick else "tuner.json")
        if previous.exists():
            kept = json.loads(previous.read_text())["problems"]
            names = [spec[0] for spec in problems(args.quick)]  # keep the problems' order
            report["problems"] = {k: kept[k] for k in names if k in kept and k not in args.only}
    with tempfile.TemporaryDirectory() as directory:
        for name, estimator, x, y, x_val, y_val, groups in selected:
            target = grid_best(estimator, x, y, x_val, y_val, groups)
            data = (x, y, x_val, y_val, groups)
            # Untimed warm-up: the first fits in a process pay for tracing/compiling
            # the inner solver, which would otherwise be charged to the first tuner.
            run_one("random", estimator, data, target, 3, 0, directory)
            rows = {}
            for kind in KINDS:
                kind_seeds = seeds.get(kind, [0])
                runs = [
                    run_one(kind, estimator, data, target, budget, s, directory) for s in kind_seeds
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
                "estimator": estimator,
                "penalties": list(bounds(estimator, x, y, groups)),
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
        "# Penalty tuning: trials to reach the best-grid criterion within 1%",
        "",
        f"Budget {budget} trials per run; median over seeds {report['seeds']} for random "
        f"and Bayesian (a miss counts as {budget} + 1); '>{budget}' = not reached. Same "
        "Tuner, search space and trial cost for all oracles; target = best held-out MSE "
        "of scikit-learn over a dense log grid (Lasso: 120 penalties; ElasticNet: 30 x 30 "
        "penalties; several sources: 120 shared penalties refined by Nelder-Mead over "
        "the per-source penalties, see the module docstring). HypergradientOracle with "
        "its defaults "
        "(policy='quasi_newton'). "
        "Machine: " + report["machine"],
        "",
        "| problem | tuner | trials to target | per run | seconds to target | reached "
        "| best/target |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, problem in report["problems"].items():
        for kind, row in problem["tuners"].items():
            trials = row["median_trials_to_target"]
            seconds = row["median_seconds_to_target"]
            ratio = statistics.median(r["best_ratio"] for r in row["runs"])
            per_run = ", ".join(
                "-" if r["trials_to_target"] is None else str(r["trials_to_target"])
                for r in row["runs"]
            )
            lines.append(
                f"| {name} | {kind} | {trials if trials is not None else f'>{budget}'} | "
                f"{per_run} | {'-' if seconds is None else f'{seconds:.2f}'} | "
                f"{row['reached']} | {ratio:.4f} |"
            )
        sp = problem["speedup_vs_best_builtin"]
        lines.append(
            f"| {name} | **speedup vs best built-in** | "
            f"{'-' if sp is None else f'{sp:.1f}x'} | | | | |"
        )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
