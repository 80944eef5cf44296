"""Hypergradient search of Lasso penalties vs grid search (scikit-learn, celer).

For AR(1)-correlated designs with a sparse truth (n=500, p=5000, rho=0.5, 50 nonzeros;
a smaller n=200, p=1000 one; a wide n=500, p=20000 one, where only the warm-started
path is timed as a baseline) this measures
  - wall time of scikit-learn's 100-alpha held-out path and of ``LassoCV`` (100 alphas,
    the same 5 contiguous folds), and of celer's path when celer is installed; the
    path is timed twice: in this process after TensorFlow has run (up to 3x slower in
    some runs on 2 cores: TensorFlow's thread pool and OpenBLAS's can contend) and in
    a fresh subprocess that never imports TensorFlow (what a scikit-learn user sees);
  - in that subprocess, the same 100 alphas as a held-out grid search of independent
    fits (``GridSearchCV`` with the validation half as its one split), the way a
    generic grid search (scikit-learn's or keras-tuner's) runs: no warm start;
  - wall time of ``ki.lasso.search`` (line search from alpha_max / 10) until its
    criterion is within 1% of the best grid value, cold (first call in the process,
    XLA compilation included) and warm (kernels compiled);
  - the hypergradient time against one inner solve (from zero) at the selected alpha,
    and the restricted solve by conjugate gradient (``linear_solver="cg"``, what
    supports above ``cholesky_max`` use) against Cholesky: time and relative gap;
  - on a design with unequal feature relevance, the held-out and test error of the
    weighted Lasso (one penalty per feature) against the best single alpha.
Ratios are printed and written to benchmarks/results/lasso.json and lasso.md
(lasso_quick.* with --quick).

    python benchmarks/bench_lasso.py [--quick] [--only large small wide]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

L = None  # keras_implicit.lasso, imported in main() (not by the --grid-only subprocess)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
N_ALPHAS = 100
WITHIN = 1.01


def ar1_design(n, p, rho, k, seed=0, snr=3.0):
    rng = np.random.default_rng(seed)
    X = np.empty((n, p))
    X[:, 0] = rng.standard_normal(n)
    scale = np.sqrt(1 - rho**2)
    for j in range(1, p):
        X[:, j] = rho * X[:, j - 1] + scale * rng.standard_normal(n)
    beta = np.zeros(p)
    support = rng.choice(p, k, replace=False)
    beta[support] = rng.choice([-1.0, 1.0], k) * rng.uniform(0.5, 2.0, k)
    signal = X @ beta
    y = signal + rng.standard_normal(n) * signal.std() / snr
    return X, y, beta


def split(X, y):
    half = X.shape[0] // 2
    return X[:half], y[:half], X[half:], y[half:]


def held_out_mse(coef, intercept, X_val, y_val):
    return float(np.mean((y_val - X_val @ coef - intercept) ** 2))


def sklearn_grid(X, y, X_val, y_val, alphas):
    """Held-out criterion along scikit-learn's warm-started path (centered like Lasso)."""
    from sklearn.linear_model import lasso_path

    tic = time.perf_counter()
    x_mean, y_mean = X.mean(0), y.mean()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, coefs, _ = lasso_path(X - x_mean, y - y_mean, alphas=alphas, tol=1e-4)
    values = [
        held_out_mse(coefs[:, i], y_mean - x_mean @ coefs[:, i], X_val, y_val)
        for i in range(alphas.size)
    ]
    return np.array(values), time.perf_counter() - tic


def sklearn_grid_clean(n, p, rho, k, seed, a_max, grid_search=True):
    """``sklearn_grid`` timed in a fresh process without TensorFlow (best of 2), and
    the ``GridSearchCV`` of independent fits unless ``grid_search`` is False."""
    command = [sys.executable, os.path.abspath(__file__), "--grid-only"]
    command += [",".join(str(v) for v in (n, p, rho, k, seed, int(grid_search))), repr(a_max)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def sklearn_grid_search(X_all, y_all, alphas):
    """``GridSearchCV`` over ``alphas`` with one split (train half, validation half):
    every alpha fitted from zero. Returns (best held-out MSE, seconds)."""
    from sklearn.linear_model import Lasso as SkLasso
    from sklearn.model_selection import GridSearchCV, PredefinedSplit

    half = X_all.shape[0] // 2
    fold = np.where(np.arange(X_all.shape[0]) < half, -1, 0)  # -1: always in training
    tic = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search = GridSearchCV(
            SkLasso(tol=1e-4),
            {"alpha": alphas},
            cv=PredefinedSplit(fold),
            scoring="neg_mean_squared_error",
            refit=False,
        ).fit(X_all, y_all)
    return -float(search.best_score_), time.perf_counter() - tic


def _grid_only(spec, a_max):
    n, p, k, seed, grid_search = (int(v) for v in np.array(spec.split(","))[[0, 1, 3, 4, 5]])
    rho = float(spec.split(",")[2])
    X_all, y_all, _ = ar1_design(2 * n, p, rho, k, seed=seed)
    X, y, X_val, y_val = split(X_all, y_all)
    alphas = float(a_max) * np.logspace(0, -3, N_ALPHAS)
    runs = [sklearn_grid(X, y, X_val, y_val, alphas) for _ in range(2)]
    values, _ = runs[0]
    search_best, search_seconds = (
        sklearn_grid_search(X_all, y_all, alphas) if grid_search else (None, None)
    )
    summary = {
        "seconds": min(t for _, t in runs),
        "best_value": float(values.min()),
        "grid_search_seconds": search_seconds,
        "grid_search_best_value": search_best,
    }
    print(json.dumps(summary))


def celer_grid(X, y, X_val, y_val, alphas):
    try:
        from celer import Lasso as CelerLasso
    except ImportError:
        return None, None
    tic = time.perf_counter()
    model = CelerLasso(alpha=alphas[0], warm_start=True, tol=1e-4)
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for alpha in alphas:
            model.alpha = alpha
            model.fit(X, y)
            values.append(held_out_mse(model.coef_, model.intercept_, X_val, y_val))
    return np.array(values), time.perf_counter() - tic


def sklearn_lasso_cv(X, y, alphas, cv):
    from sklearn.linear_model import LassoCV
    from sklearn.model_selection import KFold

    tic = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LassoCV(alphas=alphas, cv=KFold(cv), tol=1e-4).fit(X, y)
    return float(model.mse_path_.mean(axis=1).min()), time.perf_counter() - tic


def time_to_target(result, target):
    """Elapsed seconds at the first evaluation within the target (None if never)."""
    for entry in result.trace:
        if entry["criterion"] <= target:
            return entry["elapsed"]
    return None


def run_search(X, y, criterion, start, max_iter=30):
    tic = time.perf_counter()
    result = L.search(L.Lasso(alpha=start), criterion, X, y, max_iter=max_iter, verbose=0)
    return result, time.perf_counter() - tic


def hypergradient_vs_solve(X, y, criterion, alpha, repeats=5):
    """Median times of one inner solve from zero and of one hypergradient at its
    solution, as standalone public calls (``fit``, then ``hypergradient(coef=...)``,
    which converts (X, y) to a centered float64 design again, ~0.13 s at p=20000, and
    computes the given solution's duality gap), and of the solve from zero on
    converted data (``_fit_prepared``, what ``search`` runs). The hypergradient's cost
    inside a search is read from the search's trace (``scenario``).
    """
    from keras_implicit.lasso import estimators

    model = L.Lasso(alpha=alpha)
    model.fit(X, y)  # compile for this working-set size
    data = estimators.prepare(model, X, y)
    times = {"solve": [], "hypergradient": [], "solve_prepared": [], "cg": []}
    grads = {}
    for _ in range(repeats):
        fresh = L.Lasso(alpha=alpha)
        tic = time.perf_counter()
        fresh.fit(X, y)
        times["solve"].append(time.perf_counter() - tic)
        solution = {"coef": fresh.coef_, "intercept": fresh.intercept_}
        for key, linear_solver in (("hypergradient", "auto"), ("cg", "cg")):
            tic = time.perf_counter()
            _, grads[key] = L.hypergradient(
                fresh, criterion, X, y, linear_solver=linear_solver, **solution
            )
            times[key].append(time.perf_counter() - tic)
        fresh = L.Lasso(alpha=alpha)
        tic = time.perf_counter()
        estimators.fit_prepared(fresh, data, None)
        times["solve_prepared"].append(time.perf_counter() - tic)
    out = {key: float(np.median(values)) for key, values in times.items()}
    out["support_size"] = int(np.count_nonzero(fresh.coef_))
    reference = np.abs(grads["hypergradient"]).max()
    out["cg_relative_difference"] = float(
        np.abs(grads["cg"] - grads["hypergradient"]).max() / reference
    )
    return out


def scenario(name, n, p, rho, k, cv_folds, do_cv, grid_search=True, seed=0):
    print(f"\n== {name}: n={n} (train) + {n} (validation), p={p}, rho={rho}, {k} nonzeros")
    X_all, y_all, _ = ar1_design(2 * n, p, rho, k, seed=seed)
    X, y, X_val, y_val = split(X_all, y_all)
    criterion = L.HeldOutMSE(X_val, y_val)
    a_max = L.alpha_max(X, y)
    alphas = a_max * np.logspace(0, -3, N_ALPHAS)
    out = {"n": n, "p": p, "rho": rho, "nonzeros": k}

    cold, cold_total = run_search(X, y, criterion, a_max / 10)  # first: XLA compiles here
    grid_values, grid_time = sklearn_grid(X, y, X_val, y_val, alphas)
    best = float(grid_values.min())
    target = WITHIN * best
    warm, warm_total = run_search(X, y, criterion, a_max / 10)
    out["grid"] = {
        "best_value": best,
        "best_alpha": float(alphas[np.argmin(grid_values)]),
        "seconds": grid_time,
    }
    clean = sklearn_grid_clean(n, p, rho, k, seed, a_max, grid_search)
    out["grid_without_tensorflow"] = clean
    independent = (
        "not run"
        if clean["grid_search_seconds"] is None
        else f"{clean['grid_search_seconds']:.2f} s (best {clean['grid_search_best_value']:.4f})"
    )
    print(
        f"grid in this process {grid_time:.2f} s, in a process without TensorFlow "
        f"{clean['seconds']:.2f} s (best {clean['best_value']:.4f}); GridSearchCV of "
        f"independent fits {independent}"
    )
    for label, result, total in (
        ("search_cold", cold, cold_total),
        ("search_warm", warm, warm_total),
    ):
        reached = time_to_target(result, target)
        out[label] = {
            "best_value": result.best_value,
            "best_alpha": float(result.best_penalties[0]),
            "evaluations": len(result.trace),
            "seconds_total": total,
            "seconds_to_within_1pct": reached,
            "speedup_vs_grid": None if reached is None else grid_time / reached,
            "speedup_vs_grid_without_tensorflow": None
            if reached is None
            else clean["seconds"] / reached,
            "speedup_vs_grid_search_of_independent_fits": None
            if reached is None or clean["grid_search_seconds"] is None
            else clean["grid_search_seconds"] / reached,
        }
        print(
            f"{label}: best {result.best_value:.4f} vs grid {best:.4f}; within 1% after "
            f"{reached if reached is None else round(reached, 3)} s "
            f"(grid {grid_time:.2f} s, x{out[label]['speedup_vs_grid'] or float('nan'):.1f}); "
            f"{len(result.trace)} evaluations in {total:.2f} s"
        )
    celer_values, celer_time = celer_grid(X, y, X_val, y_val, alphas)
    if celer_values is not None:
        out["celer_grid"] = {"best_value": float(celer_values.min()), "seconds": celer_time}
        print(f"celer 100-alpha path: {celer_time:.2f} s (best {celer_values.min():.4f})")

    timing = hypergradient_vs_solve(X, y, criterion, warm.best_penalties[0])
    # Inside the warm search: each evaluation's time minus its inner solve's.
    in_search = float(np.median([e["time"] - e["solve_time"] for e in warm.trace]))
    out["hypergradient"] = {
        "solve_seconds": timing["solve"],
        "hypergradient_seconds": timing["hypergradient"],
        "ratio_standalone": timing["hypergradient"] / timing["solve"],
        "solve_prepared_seconds": timing["solve_prepared"],
        "hypergradient_in_search_seconds": in_search,
        "ratio": in_search / timing["solve_prepared"],
        "support_size": timing["support_size"],
        "cg_seconds": timing["cg"],
        "cg_relative_difference": timing["cg_relative_difference"],
    }
    print(
        f"hypergradient {in_search * 1e3:.1f} ms (median over the search's evaluations, "
        f"inner solves excluded) vs inner solve from zero "
        f"{timing['solve_prepared'] * 1e3:.1f} ms on converted data "
        f"(ratio {out['hypergradient']['ratio']:.2f}); standalone calls "
        f"{timing['hypergradient'] * 1e3:.1f} ms vs {timing['solve'] * 1e3:.1f} ms "
        f"(ratio {out['hypergradient']['ratio_standalone']:.2f}); "
        f"|S|={timing['support_size']}; with CG {timing['cg'] * 1e3:.1f} ms "
        f"(relative difference {timing['cg_relative_difference']:.1e})"
    )
    if do_cv:
        cv_best, cv_time = sklearn_lasso_cv(X_all, y_all, alphas, cv_folds)
        tic = time.perf_counter()
        cv_result = L.search(
            L.Lasso(alpha=a_max / 10),
            L.CrossVal("mse", cv=cv_folds),
            X_all,
            y_all,
            max_iter=30,
            verbose=0,
        )
        cv_total = time.perf_counter() - tic
        reached = time_to_target(cv_result, WITHIN * cv_best)
        out["cross_validation"] = {
            "lassocv_best": cv_best,
            "lassocv_seconds": cv_time,
            "search_best": cv_result.best_value,
            "search_seconds_total": cv_total,
            "search_seconds_to_within_1pct": reached,
            "speedup": None if reached is None else cv_time / reached,
        }
        print(
            f"LassoCV ({cv_folds} folds): {cv_time:.2f} s best {cv_best:.4f}; search "
            f"best {cv_result.best_value:.4f}, within 1% after {reached} s"
        )
    return out


def weighted_scenario(n, p, seed=1):
    """Unequal relevance: a few strong features, several weak ones, many null ones."""
    print(f"\n== weighted Lasso: n={n} train / {n} validation / {n} test, p={p}")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((3 * n, p))
    beta = np.zeros(p)
    beta[:5] = 3.0
    beta[5:20] = 0.5
    y = X @ beta + rng.standard_normal(3 * n) * 1.5
    X_tr, y_tr = X[:n], y[:n]
    X_val, y_val = X[n : 2 * n], y[n : 2 * n]
    X_te, y_te = X[2 * n :], y[2 * n :]
    criterion = L.HeldOutMSE(X_val, y_val)
    single = L.search(
        L.Lasso(alpha=L.alpha_max(X_tr, y_tr) / 10), criterion, X_tr, y_tr, max_iter=30, verbose=0
    )
    weighted = L.search(
        L.WeightedLasso(alphas=np.full(p, single.best_penalties[0])),
        criterion,
        X_tr,
        y_tr,
        optimizer="adam",
        max_iter=60,
        verbose=0,
    )
    test_single = held_out_mse(single.best_model.coef_, single.best_model.intercept_, X_te, y_te)
    test_weighted = held_out_mse(
        weighted.best_model.coef_, weighted.best_model.intercept_, X_te, y_te
    )
    out = {
        "n": n,
        "p": p,
        "single_validation": single.best_value,
        "weighted_validation": weighted.best_value,
        "single_test": test_single,
        "weighted_test": test_weighted,
    }
    print(
        f"validation MSE: single alpha {single.best_value:.4f}, weighted "
        f"{weighted.best_value:.4f}; test MSE: single {test_single:.4f}, weighted "
        f"{test_weighted:.4f}"
    )
    return out


def write(results):
    os.makedirs(RESULTS, exist_ok=True)
    stem = "lasso_quick" if results["quick"] else "lasso"  # a quick run keeps real results
    with open(os.path.join(RESULTS, f"{stem}.json"), "w") as fh:
        json.dump(results, fh, indent=2, default=float)
    lines = [
        "# Lasso hypergradient benchmark",
        "",
        f"Machine: {results['machine']}; quick={results['quick']}; 1-minute load average "
        f"{results['load_average_1min_start']:.1f} at the start, "
        f"{results['load_average_1min_end']:.1f} at the end (other jobs shared the cores: "
        "absolute times are inflated; ratios within one run less so).",
        "",
        "| design | grid (s) | grid w/o TF (s) | search to 1% cold (s) | warm (s) | "
        "speedup cold / warm | speedup vs grid w/o TF cold / warm | "
        "GridSearchCV (s) | speedup vs GridSearchCV cold | "
        "hypergradient / solve in a search (standalone) | LassoCV (s) | "
        "CV search to 1% (s) | hypergradient Cholesky / CG (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, s in results["scenarios"].items():
        cv = s.get("cross_validation", {})
        hg = s["hypergradient"]
        cg_ms = 1e3 * hg["cg_seconds"] if "cg_seconds" in hg else None

        def fmt(value, digits=2):
            return "n/a" if value is None else f"{value:.{digits}f}"

        lines.append(
            f"| {key} (n={s['n']}, p={s['p']}) | {fmt(s['grid']['seconds'])} | "
            f"{fmt(s['grid_without_tensorflow']['seconds'])} | "
            f"{fmt(s['search_cold']['seconds_to_within_1pct'])} | "
            f"{fmt(s['search_warm']['seconds_to_within_1pct'])} | "
            f"{fmt(s['search_cold']['speedup_vs_grid'], 1)} / "
            f"{fmt(s['search_warm']['speedup_vs_grid'], 1)} | "
            f"{fmt(s['search_cold']['speedup_vs_grid_without_tensorflow'], 1)} / "
            f"{fmt(s['search_warm']['speedup_vs_grid_without_tensorflow'], 1)} | "
            f"{fmt(s['grid_without_tensorflow']['grid_search_seconds'])} | "
            f"{fmt(s['search_cold']['speedup_vs_grid_search_of_independent_fits'], 1)} | "
            f"{fmt(s['hypergradient']['ratio'])} "
            f"({fmt(s['hypergradient'].get('ratio_standalone'))}) | "
            f"{fmt(cv.get('lassocv_seconds'))} | "
            f"{fmt(cv.get('search_seconds_to_within_1pct'))} | "
            f"{fmt(1e3 * hg['hypergradient_seconds'], 0)} / {fmt(cg_ms, 0)} |"
        )
    w = results["weighted"]
    lines += [
        "",
        f"Weighted Lasso (n={w['n']}, p={w['p']}): validation MSE "
        f"{w['weighted_validation']:.4f} vs best single alpha {w['single_validation']:.4f};"
        f" test MSE {w['weighted_test']:.4f} vs {w['single_test']:.4f}.",
        "",
        "Cold = first search in the process, XLA compilation included (only the first "
        "design of a run, or each design run alone with --only, is in a fresh process); "
        "warm = the same search again. Grid = scikit-learn lasso_path (100 alphas, tol 1e-4) "
        "+ held-out MSE, timed in this process after TensorFlow ran and, w/o TF, in a "
        "fresh subprocess that never imports TensorFlow (best of 2; what a scikit-learn "
        "user sees; in some runs the in-process path was 3x slower, in others not). "
        "GridSearchCV = the same 100 alphas fitted independently (no warm start, as "
        "any generic grid search does), validation half as its one split, in the "
        "TensorFlow-free subprocess. "
        "Hypergradient / solve = the median over the warm search's evaluations of the "
        "evaluation's time minus its inner solve's (the search's trace), against one "
        "inner solve from zero at the selected alpha on converted data; in brackets "
        "standalone public calls (fit, then hypergradient(coef=...), which converts "
        "(X, y) again and computes the given solution's duality gap). "
        "Hypergradient Cholesky / CG = the standalone call with the restricted system "
        "solved by Cholesky (the default below cholesky_max=2000) and by conjugate "
        "gradient (ki.linalg.CG, the default above); the JSON has their relative "
        "difference. "
        "On this shared machine the large grid took 1.5-2.9 s near idle and 5-8 s at "
        "load 4-6: compare ratios from one run. Speedups = grid time / search time to within "
        "1% of the best grid value.",
    ]
    with open(os.path.join(RESULTS, f"{stem}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny problems")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="DESIGN",
        help="run only these designs (large, small, wide), in this fresh process (so "
        "'cold' is cold), and merge them into the existing results file",
    )
    parser.add_argument(
        "--grid-only",
        nargs=2,
        metavar=("N,P,RHO,K,SEED", "ALPHA_MAX"),
        help="internal: time the scikit-learn path in this process (no TensorFlow)",
    )
    args = parser.parse_args(argv)
    if args.grid_only:
        _grid_only(*args.grid_only)
        return
    global L
    import keras_implicit.lasso as L

    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_1min_start": os.getloadavg()[0],
        "quick": args.quick,
        "scenarios": {},
    }
    if args.quick:
        specs = [("small", 60, 300, 0.5, 10, 3, True, True)]
    else:
        # wide: the top of the range of p; 100 independent fits would take
        # minutes and 5-fold LassoCV as long, so only the warm-started path is timed.
        specs = [
            ("large", 500, 5000, 0.5, 50, 5, True, True),
            ("small", 200, 1000, 0.5, 20, 5, True, True),
            ("wide", 500, 20000, 0.5, 50, 5, False, False),
        ]
    previous = os.path.join(RESULTS, ("lasso_quick" if args.quick else "lasso") + ".json")
    if args.only:
        unknown = set(args.only) - {spec[0] for spec in specs}
        if unknown:
            parser.error(f"unknown designs {sorted(unknown)}")
        if os.path.exists(previous):
            with open(previous) as fh:
                kept = json.load(fh)
            results["scenarios"] = {
                spec[0]: kept["scenarios"][spec[0]]
                for spec in specs
                if spec[0] in kept["scenarios"] and spec[0] not in args.only
            }
            results["weighted"] = kept.get("weighted")
        specs = [spec for spec in specs if spec[0] in args.only]
    for name, n, p, rho, k, folds, do_cv, grid_search in specs:
        results["scenarios"][name] = scenario(name, n, p, rho, k, folds, do_cv, grid_search)
    if not args.only or results.get("weighted") is None:
        results["weighted"] = weighted_scenario(
            50 if args.quick else 100, 40 if args.quick else 100
        )
    results["load_average_1min_end"] = os.getloadavg()[0]
    write(results)
    stem = "lasso_quick" if args.quick else "lasso"
    print(f"\nwrote {os.path.join(RESULTS, stem)}.json and .md")


if __name__ == "__main__":
    main()
