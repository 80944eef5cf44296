"""Forward-loop overhead: each forward solver's loop vs a plain `tf.while_loop` of the cell.

Problem: z <- tanh(z W + x), batch 256, width 256, ||W||_2 = 0.9, float32, XLA
(`jit_compile=True`), tol=0 so that every loop runs exactly N evaluations of the map,
N in {25, 50, 100, 200}. The baseline is `tf.while_loop` applying the cell N times with
no bookkeeping. Each solver runs through its `solve_fixed_point` on the packed rows:
"rows" is the [256, 256] batch of independent rows (`batch_dims=1`), "one row" the
same state packed as a single [1, 65536] row (`batch_dims=0`).

Timing: the baseline and the solver alternate call by call in one process, and the
ratio is the median of the per-pair ratios, so both see the same machine load.

    python benchmarks/bench_forward_loop.py [--quick]

Writes benchmarks/results/forward_loop.json and forward_loop.md. Target (issue 19):
fixed-point iteration within 1.15x of the plain loop at N = 25..200. Anderson and
Broyden are listed for reference: their ratios include their least squares and
quasi-Newton updates, which the plain loop does not do.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

import keras_implicit as ki

RESULTS = pathlib.Path(__file__).with_name("results")


def make_problem(batch, width, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(width, width)).astype(np.float32)
    w = 0.9 * w / np.linalg.norm(w, 2)
    x = rng.normal(size=(batch, width)).astype(np.float32)
    return tf.constant(w), tf.constant(x)


def solvers(n, quick):
    found = {
        f"fixed_point_iteration (check_every={k})": ki.solvers.FixedPointIteration(
            tol=0.0, max_iter=n, check_every=k
        )
        for k in (1, 4, 8)
    }
    if not quick:
        found["anderson (memory=5)"] = ki.solvers.Anderson(tol=0.0, max_iter=n)
        found["broyden (memory=20)"] = ki.solvers.Broyden(tol=0.0, max_iter=n)
    return found


def compiled(w, x, n, layout, solver=None):
    shape = x.shape
    if layout == "one row":
        z0 = tf.zeros([1, shape.num_elements()])

        def cell(z):
            return tf.reshape(tf.tanh(tf.reshape(z, shape) @ w + x), [1, -1])
    else:
        z0 = tf.zeros(shape)

        def cell(z):
            return tf.tanh(z @ w + x)

    if solver is None:

        def run():
            return tf.while_loop(lambda i, z: i < n, lambda i, z: (i + 1, cell(z)), (0, z0))[1]
    else:

        def run():
            return solver.solve_fixed_point(cell, z0)[0]

    return tf.function(run, jit_compile=True)


def seconds(fn):
    start = time.perf_counter()
    np.asarray(fn())
    return time.perf_counter() - start


def paired_ratio(base, other, repeats):
    """Median over alternating calls of time(other) / time(base), and base's median ms."""
    base(), other()
    ratios, base_times = [], []
    for _ in range(repeats):
        b = seconds(base)
        o = seconds(other)
        ratios.append(o / b)
        base_times.append(b)
    return statistics.median(ratios), statistics.median(base_times) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args(argv)
    batch, width = (32, 32) if args.quick else (256, 256)
    counts = (25, 50) if args.quick else (25, 50, 100, 200)
    repeats = 5 if args.quick else 15
    w, x = make_problem(batch, width)
    rows = []
    for layout in ("rows", "one row"):
        for n in counts:
            plain = compiled(w, x, n, layout)
            for name, solver in solvers(n, args.quick).items():
                ratio, plain_ms = paired_ratio(plain, compiled(w, x, n, layout, solver), repeats)
                rows.append(
                    {
                        "layout": layout,
                        "solver": name,
                        "iterations": n,
                        "plain_ms": plain_ms,
                        "ratio": ratio,
                    }
                )
                print(
                    f"{layout:8s} N={n:4d} {name:40s} plain {plain_ms:8.2f} ms  ratio {ratio:5.2f}",
                    flush=True,
                )

    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    meta = {
        "batch": batch,
        "width": width,
        "dtype": "float32",
        "xla": True,
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "repeats": repeats,
    }
    (RESULTS / f"forward_loop{suffix}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2)
    )
    load = ", ".join(f"{v:.1f}" for v in meta["load_average"])
    lines = [
        f"# Forward loop vs plain tf.while_loop (batch {batch}, width {width}, float32, XLA)",
        "",
        f"Ratio: median of paired calls, solver time / plain-loop time (load average {load}).",
        "",
        "| layout | solver | N | plain loop (ms) | ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['layout']} | {row['solver']} | {row['iterations']} | "
            f"{row['plain_ms']:.2f} | {row['ratio']:.2f} |"
        )
    (RESULTS / f"forward_loop{suffix}.md").write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
