"""Step policies of ``ki.lasso.search``: final criterion and hypergradient evaluations.

Every problem is searched with each optimizer (``quasi_newton``, ``line_search``,
``adam``) from the same start with the defaults of ``search`` (``max_iter=50``); with
``--baseline FILE`` also with the ``search`` function of another ``search.py`` (e.g.
an earlier version: ``git show REV:keras_implicit/lasso/search.py > FILE``), in the
same run. Reported per problem and optimizer: the best criterion value, its ratio to
the best value any optimizer found (and to a dense scikit-learn grid where there is
one), the number of criterion+hypergradient evaluations, the evaluations needed to
get within 1% of the best value found, the stop reason and the wall time.

Problems: the ones of tests/lasso/test_search.py (diabetes held-out from two
starts, a 4-fold cross-validation on an AR(1) design, an AR(1) held-out search, an
ElasticNet cross-validation, a WeightedLasso with one penalty per feature) and those
of bench_tuner.py (Lasso and ElasticNet held-out at p=60 and p=200, a WeightedLasso
with one penalty per feature on the four-source design) and of bench_lasso.py (AR(1)
held-out at n=200, p=1000 and n=500, p=5000; 5-fold CV at p=1000).

    python benchmarks/bench_search.py [--baseline FILE] [--only NAME ...]

Writes benchmarks/results/search.json and search.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from sklearn.datasets import load_diabetes

import keras_implicit.lasso as L

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "lasso"))

import bench_lasso  # noqa: E402
import bench_tuner  # noqa: E402
from lasso_reference import ar1_design  # noqa: E402

RESULTS = HERE / "results"
OPTIMIZERS = ("quasi_newton", "line_search", "adam")
WITHIN = 1.01


def diabetes():
    X, y = load_diabetes(return_X_y=True)
    return (X - X.mean(0)) / X.std(0), y


def problems():
    """``(name, model, criterion, X, y, grid_best)``; ``grid_best`` may be None."""
    X, y = diabetes()
    held_out = L.HeldOutMSE(X[300:], y[300:])
    a_max = L.alpha_max(X[:300], y[:300])
    out = [
        ("diabetes_heldout", L.Lasso(alpha=a_max * np.logspace(0, -3, 60)[5]), held_out),
        ("diabetes_heldout_half", L.Lasso(alpha=0.5 * a_max), held_out),
    ]
    out = [(name, model, crit, X[:300], y[:300], None) for name, model, crit in out]
    Xc, yc, _ = ar1_design(150, 400, rho=0.5, k=10, noise=1.0, seed=0)
    cv = (L.Lasso(alpha=L.alpha_max(Xc, yc) / 10), L.CrossVal("mse", cv=4), Xc, yc, None)
    out.append(("ar1_cv4_p400", *cv))
    Xa, ya, _ = ar1_design(240, 300, rho=0.5, k=10, seed=3)
    model = L.Lasso(alpha=0.3 * L.alpha_max(Xa[:120], ya[:120]))
    out.append(
        ("ar1_heldout_p300", model, L.HeldOutMSE(Xa[120:], ya[120:]), Xa[:120], ya[:120], None)
    )
    net = L.ElasticNet(alpha_l1=0.5, alpha_l2=0.5)
    out.append(("diabetes_elasticnet_cv3", net, L.CrossVal(cv=3), X, y, None))
    Xw, yw, beta = ar1_design(80, 30, rho=0.3, k=6, noise=1.0, seed=4)
    Xv, _, _ = ar1_design(200, 30, rho=0.3, k=6, noise=1.0, seed=4)
    yv = Xv @ beta + np.random.default_rng(9).standard_normal(200)
    weighted = L.WeightedLasso(alphas=np.full(30, 0.1 * L.alpha_max(Xw, yw)))
    out.append(("ar1_weighted_p30", weighted, L.HeldOutMSE(Xv, yv), Xw, yw, None))
    return out + tuner_problems() + lasso_bench_problems()


def tuner_problems():
    out = []
    for name, kind, x, y, x_val, y_val, _ in bench_tuner.problems(quick=False):
        a_max = L.alpha_max(x, y)
        if kind == "grouped":
            if name != "multisource_4groups":
                continue
            model, grid = L.WeightedLasso(alphas=np.full(x.shape[1], a_max / 10)), None
        elif kind == "lasso":
            model = L.Lasso(alpha=a_max / 10)
            grid = bench_tuner.grid_best(kind, x, y, x_val, y_val)
        else:
            variance = float(np.mean(np.var(x, axis=0)))
            model = L.ElasticNet(alpha_l1=a_max / 10, alpha_l2=variance / 10)
            grid = bench_tuner.grid_best(kind, x, y, x_val, y_val)
        out.append((f"tuner_{name}", model, L.HeldOutMSE(x_val, y_val), x, y, grid))
    return out


def lasso_bench_problems():
    out = []
    for name, n, p in (("lasso_small", 200, 1000), ("lasso_large", 500, 5000)):
        X_all, y_all, _ = bench_lasso.ar1_design(2 * n, p, 0.5, 50 if p == 5000 else 20)
        X, y, X_val, y_val = bench_lasso.split(X_all, y_all)
        start = L.Lasso(alpha=L.alpha_max(X, y) / 10)
        out.append((f"{name}_heldout_p{p}", start, L.HeldOutMSE(X_val, y_val), X, y, None))
        if p == 1000:
            start = L.Lasso(alpha=L.alpha_max(X_all, y_all) / 10)
            out.append((f"{name}_cv5_p{p}", start, L.CrossVal("mse", cv=5), X_all, y_all, None))
    return out


def load_baseline(path):
    spec = importlib.util.spec_from_file_location("baseline_search", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.search


def run(search, model, criterion, X, y, optimizer):
    kwargs = {} if optimizer is None else {"optimizer": optimizer}
    tic = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = search(model, criterion, X, y, verbose=0, refit=False, **kwargs)
    seconds = time.perf_counter() - tic
    values = result.history("criterion")
    return {
        "best": float(result.best_value),
        "evaluations": len(result.trace),
        "curve": [float(v) for v in np.minimum.accumulate(values)],
        "stop_reason": result.stop_reason,
        "seconds": seconds,
    }


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", help="a search.py whose `search` is run too")
    parser.add_argument("--only", nargs="*", help="problem names to run")
    args = parser.parse_args(argv)
    runners = [(name, L.search, name) for name in OPTIMIZERS]
    if args.baseline:
        runners.append(("baseline (default)", load_baseline(args.baseline), None))
    load = [os.getloadavg()[0]]
    rows = []
    for name, model, criterion, X, y, grid in problems():
        if args.only and name not in args.only:
            continue
        results = {label: run(fn, model, criterion, X, y, opt) for label, fn, opt in runners}
        best = min(r["best"] for r in results.values())
        for label, r in results.items():
            reached = next((i + 1 for i, v in enumerate(r["curve"]) if v <= WITHIN * best), None)
            row = {"problem": name, "optimizer": label, "grid": grid, **r}
            row.update(ratio=r["best"] / best, to_1pct=reached)
            del row["curve"]
            rows.append(row)
            print(
                f"{name:32s} {label:20s} best {r['best']:.6g} ratio {row['ratio']:.4f} "
                f"evals {r['evaluations']:3d} to 1% {reached} ({r['seconds']:.2f} s) "
                f"{r['stop_reason']}",
                flush=True,
            )
    load.append(os.getloadavg()[0])
    write(rows, load, args.baseline)


def write(rows, load, baseline):
    RESULTS.mkdir(exist_ok=True)
    report = {"machine": platform.platform(), "load_average": load, "rows": rows}
    (RESULTS / "search.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# ki.lasso.search: step policies",
        "",
        "Best criterion, its ratio to the best any optimizer found on the problem (and "
        "to a dense scikit-learn grid where there is one), criterion+hypergradient "
        "evaluations in all and to get within 1% of that best; defaults of `search` "
        "(max_iter=50), no refit. Seconds include the XLA compilation for each new "
        "design, paid by the first optimizer run on it (quasi_newton): compare "
        "evaluations. 1-minute load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end (2 shared cores)."
        + (f" Baseline: `search` of {baseline}." if baseline else ""),
        "",
        "| problem | optimizer | best | / best found | / grid | evaluations | to 1% | seconds "
        "| stop reason |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        grid = "" if r["grid"] is None else f"{r['best'] / r['grid']:.4f}"
        lines.append(
            f"| {r['problem']} | {r['optimizer']} | {r['best']:.6g} | {r['ratio']:.4f} | "
            f"{grid} | {r['evaluations']} | {r['to_1pct']} | {r['seconds']:.2f} | "
            f"{r['stop_reason']} |"
        )
    (RESULTS / "search.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
