"""Implicit differentiation vs backprop through the unrolled solver, and vs jaxopt.

Problem: z = tanh(z W + x), batch 256, width 256, ||W||_2 = 0.9, float32, at most N
forward iterations, N in {25, 50, 100, 200}. jaxopt runs exactly N (tol=0); ours asks
for tol=0, which `ki.fixed_point` raises to the float32 floor (2 machine epsilons,
2.4e-7), reached after about 14 iterations, so N caps our forward: compare backward
times for the backward solvers.
For each method: forward+backward time (XLA, median of repeats, all methods of one N
timed round-robin so that they share the machine's load), backward time
(forward+backward minus forward alone) and peak memory of forward+backward (BFC
allocator statistics). Peer: jaxopt's FixedPointIteration with implicit
differentiation (its default normal-CG backward), jit-compiled, when JAX is installed.
"implicit/bicgstab" is the default backward, "implicit/bicgstab (gmres
fallback)" BiCGStab with GMRES(10) for the rows it leaves unconverged.

    python benchmarks/bench_core.py [--quick]

Writes benchmarks/results/core.json and core.md. Targets: implicit peak memory flat in
N (200 vs 25 within 10%) while unrolled grows; implicit backward >= 2x faster than
unrolled at N = 100; the default backward <= 1.0x jaxopt's default at every N, with peak
memory no higher than the leanest general backward solver's (Neumann, which needs the
spectral radius of J below 1, is reported apart).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"  # CPU memory statistics need BFC
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

import keras_implicit as ki

RESULTS = pathlib.Path(__file__).with_name("results")
LINEAR_SOLVERS = {
    "gmres": "gmres",
    "bicgstab": "bicgstab",
    "bicgstab (gmres fallback)": ki.linalg.BiCGStab(fallback_restart=10),
    "broyden": "broyden",
    "neumann": "neumann",
}
DEFAULT = "bicgstab"  # ki.fixed_point's default linear_solver
# solvers for any nonsingular adjoint system (the candidates for the default)
GENERAL_SOLVERS = ("gmres", "bicgstab", "bicgstab (gmres fallback)", "broyden")


def make_problem(batch, width, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(width, width)).astype(np.float32)
    w = 0.9 * w / np.linalg.norm(w, 2)
    x = rng.normal(size=(batch, width)).astype(np.float32)
    return w, x


def _seconds(fn):
    start = time.perf_counter()
    tf.nest.map_structure(np.asarray, fn())
    return time.perf_counter() - start


def timed_together(functions, repeats):
    """Median ms of each function, timed round-robin so that all see the same load."""
    for fn in functions.values():
        fn()  # compile
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            samples[name].append(_seconds(fn))
    return {name: statistics.median(times) * 1e3 for name, times in samples.items()}


def peak_memory(fn):
    fn()
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    tf.nest.map_structure(np.asarray, fn())
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def tf_methods(w, x, iterations):
    w_var = tf.Variable(w)
    x_t = tf.constant(x)

    def cell(z, x):
        return tf.tanh(z @ w_var + x)

    def implicit_forward():
        return ki.fixed_point(
            cell,
            tf.zeros_like(x_t),
            x_t,
            batch_dims=1,
            solver="fixed_point_iteration",
            tol=0.0,
            max_iter=iterations,
            on_failure="ignore",
        )

    def implicit(linear_solver):
        def step():
            with tf.GradientTape() as tape:
                z = ki.fixed_point(
                    cell,
                    tf.zeros_like(x_t),
                    x_t,
                    batch_dims=1,
                    solver="fixed_point_iteration",
                    tol=0.0,
                    max_iter=iterations,
                    linear_solver=linear_solver,
                    backward_tol=1e-5,
                    backward_max_iter=100,
                    on_failure="ignore",
                )
                loss = tf.reduce_sum(z**2)
            return tape.gradient(loss, w_var)

        return step

    def unrolled_forward():
        z = tf.zeros_like(x_t)
        for _ in range(iterations):
            z = cell(z, x_t)
        return z

    def unrolled():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(unrolled_forward() ** 2)
        return tape.gradient(loss, w_var)

    compile_ = lambda f: tf.function(f, jit_compile=True)  # noqa: E731
    methods = {
        f"implicit/{name}": (compile_(implicit(ls)), compile_(implicit_forward))
        for name, ls in LINEAR_SOLVERS.items()
    }
    methods["unrolled backprop"] = (compile_(unrolled), compile_(unrolled_forward))
    return methods


def jaxopt_methods(w, x, iterations):
    try:
        import jax
        import jax.numpy as jnp
        from jaxopt import FixedPointIteration
    except ImportError:
        return {}
    jax.config.update("jax_platforms", "cpu")
    w_j, x_j = jnp.asarray(w), jnp.asarray(x)

    def cell(z, w, x):
        return jnp.tanh(z @ w + x)

    def solve(w, implicit_diff):
        solver = FixedPointIteration(cell, maxiter=iterations, tol=0.0, implicit_diff=implicit_diff)
        return solver.run(jnp.zeros_like(x_j), w, x_j).params

    def loss(w, implicit_diff):
        return jnp.sum(solve(w, implicit_diff) ** 2)

    grad_implicit = jax.jit(jax.grad(lambda w: loss(w, True)))
    grad_unrolled = jax.jit(jax.grad(lambda w: loss(w, False)))
    forward = jax.jit(lambda w: solve(w, True))

    def block(f):
        return lambda: np.asarray(f(w_j))

    return {
        "jaxopt implicit": (block(grad_implicit), block(forward)),
        "jaxopt unrolled": (block(grad_unrolled), block(forward)),
    }


def _versions():
    from importlib import metadata

    found = {}
    for package in ("tensorflow", "keras", "jax", "jaxopt"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args(argv)
    batch, width = (32, 32) if args.quick else (256, 256)
    counts = (25, 50) if args.quick else (25, 50, 100, 200)
    repeats = 3 if args.quick else 7
    w, x = make_problem(batch, width)
    rows = []
    for n in counts:
        methods = {**tf_methods(w, x, n), **jaxopt_methods(w, x, n)}
        times = timed_together(
            {
                (name, part): fn
                for name, pair in methods.items()
                for part, fn in zip(("full", "forward"), pair)
            },
            repeats,
        )
        for name, (full, _) in methods.items():
            total, fwd = times[(name, "full")], times[(name, "forward")]
            peak = None if name.startswith("jaxopt") else peak_memory(full)
            rows.append(
                {
                    "method": name,
                    "iterations": n,
                    "forward_backward_ms": total,
                    "backward_ms": max(total - fwd, 0.0),
                    "peak_bytes": peak,
                }
            )
            memory = "" if peak is None else f"  peak {peak / 2**20:7.2f} MiB"
            print(
                f"N={n:4d} {name:34s} fwd+bwd {total:8.2f} ms  bwd {total - fwd:8.2f} ms{memory}",
                flush=True,
            )

    def get(method, n, key):
        for row in rows:
            if row["method"] == method and row["iterations"] == n:
                return row[key]
        return None

    lo, hi = counts[0], counts[-1]
    mid = 100 if 100 in counts else counts[-1]
    ratios = {
        f"implicit_memory_growth (gmres, N={hi} vs {lo})": get("implicit/gmres", hi, "peak_bytes")
        / get("implicit/gmres", lo, "peak_bytes"),
        f"unrolled_memory_growth (N={hi} vs {lo})": get("unrolled backprop", hi, "peak_bytes")
        / get("unrolled backprop", lo, "peak_bytes"),
        f"unrolled_backward / implicit_backward (gmres, N={mid})": get(
            "unrolled backprop", mid, "backward_ms"
        )
        / get("implicit/gmres", mid, "backward_ms"),
    }
    if get("jaxopt implicit", mid, "forward_backward_ms"):
        ours = f"implicit/{DEFAULT}"
        for n in counts:
            for key, label in (("forward_backward_ms", "fwd+bwd"), ("backward_ms", "backward")):
                peer = get("jaxopt implicit", n, key)
                if peer:
                    ratios[f"ours_default ({DEFAULT}) / jaxopt_implicit {label} (N={n})"] = (
                        get(ours, n, key) / peer
                    )
        best = min(get(f"implicit/{ls}", mid, "forward_backward_ms") for ls in LINEAR_SOLVERS)
        ratios[f"ours_best / jaxopt_implicit fwd+bwd (N={mid})"] = best / get(
            "jaxopt implicit", mid, "forward_backward_ms"
        )
    for n in counts:
        default_peak = get(f"implicit/{DEFAULT}", n, "peak_bytes")
        # Neumann is listed apart: it needs the spectral radius of J below 1 and is no
        # candidate for a default
        leanest = min(get(f"implicit/{ls}", n, "peak_bytes") for ls in GENERAL_SOLVERS)
        ratios[f"default peak memory / leanest general solver's (N={n})"] = default_peak / leanest
        ratios[f"default peak memory / neumann's (N={n})"] = default_peak / get(
            "implicit/neumann", n, "peak_bytes"
        )
    print("\nratios:")
    for key, value in ratios.items():
        print(f"  {key}: {value:.2f}")

    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    meta = {
        "batch": batch,
        "width": width,
        "dtype": "float32",
        "xla": True,
        "tensorflow": tf.__version__,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "versions": _versions(),
    }
    (RESULTS / f"core{suffix}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2)
    )
    lines = [
        f"# Core benchmark (batch {batch}, width {width}, float32, XLA, CPU)",
        "",
        f"Load average {', '.join(f'{v:.1f}' for v in meta['load_average'])}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v),
        "",
        "| method | N | fwd+bwd (ms) | backward (ms) | peak memory (MiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        peak = "" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.2f}"
        lines.append(
            f"| {row['method']} | {row['iterations']} | "
            f"{row['forward_backward_ms']:.2f} | {row['backward_ms']:.2f} | {peak} |"
        )
    lines += ["", "| ratio | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    (RESULTS / f"core{suffix}.md").write_text("\n".join(lines) + "\n")
    return ratios


if __name__ == "__main__":
    main()
