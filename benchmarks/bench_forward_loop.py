"""Forward-loop overhead: each forward solver's loop vs a plain `tf.while_loop` of the cell.

Problem: z <- tanh(z W + x), batch 256, width 256, ||W||_2 = 0.9, float32, XLA
(`jit_compile=True`), tol=0 so that every loop runs exactly N evaluations of the map,
N in {25, 50, 100, 200}. The baseline is `tf.while_loop` applying the cell N times with
no bookkeeping. Each solver runs through its `solve_fixed_point` on the packed rows:
"rows" is the [256, 256] batch of independent rows (`batch_dims=1`), "one row" the
same state packed as a single [1, 65536] row (`batch_dims=0`).

Timing: the baseline(s) and the solver alternate call by call in one process, and
each ratio is the median of the per-round ratios, so all see the same machine load.

    python benchmarks/bench_forward_loop.py [--quick]

Anderson and Broyden are also timed against a plain loop doing their own math (the same
history, least squares, rank-one updates and steps, with the same kernels; Broyden's
includes its evaluation of the start) and no bookkeeping (residuals, best iterate,
per-row masks, counts, fallbacks); `check_references` first verifies that these loops
evaluate the map at the same points as the solvers.

Writes benchmarks/results/forward_loop.json and forward_loop.md. Target (issue 19):
every solver within 1.15x of the plain loop of its own math ("own work") at N = 25..200.
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
from keras_implicit._dense import spd_solve
from keras_implicit._structure import history_combine, history_dot, history_write, row_sum

RESULTS = pathlib.Path(__file__).with_name("results")


def make_problem(batch, width, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(width, width)).astype(np.float32)
    w = 0.9 * w / np.linalg.norm(w, 2)
    x = rng.normal(size=(batch, width)).astype(np.float32)
    return tf.constant(w), tf.constant(x)


def solvers(n):
    found = {
        f"fixed_point_iteration (check_every={k})": ki.solvers.FixedPointIteration(
            tol=0.0, max_iter=n, check_every=k
        )
        for k in (1, 4, 8)
    }
    found["anderson (memory=5)"] = ki.solvers.Anderson(tol=0.0, max_iter=n)
    found["broyden (memory=20)"] = ki.solvers.Broyden(tol=0.0, max_iter=n)
    return found


def anderson_loop(cell, z0, n, memory=5, ridge=1e-8):
    """Anderson's iterates (as `ki.solvers.Anderson`, beta = 1) with no bookkeeping:
    no residuals, best iterate, per-row masks, counts or fallbacks; the same history
    layout, Gram update, small solve and mixing kernels."""
    m, dtype = memory, z0.dtype
    eye, index = tf.eye(m, dtype=dtype), tf.range(m)
    history = tf.zeros([m, *z0.shape], dtype)
    tiny = 1e-30 if dtype == tf.float64 else 1e-20

    def body(i, z, fs, gs, gram):
        tz = cell(z)
        g = tz - z
        slot = i % m
        fs, gs = history_write(fs, slot, tz), history_write(gs, slot, g)
        products = tf.transpose(history_dot(gs, g))
        gram = tf.where((index == slot)[None, :, None], products[:, None, :], gram)
        gram = tf.where((index == slot)[None, None, :], products[:, :, None], gram)
        valid = tf.cast(index <= i, dtype)
        reg = ridge * tf.reduce_max(tf.linalg.diag_part(gram), -1) + tiny
        system = gram + (reg[:, None, None] + 1 - valid[:, None] * valid[None, :]) * eye
        weights = spd_solve(system, tf.broadcast_to(valid, [z0.shape[0], m]))
        alpha = tf.transpose(weights / tf.reduce_sum(weights, -1, keepdims=True))
        return i + 1, history_combine(alpha, fs), fs, gs, gram

    gram = tf.zeros([z0.shape[0], m, m], dtype)
    state = (tf.constant(0), z0, history, history, gram)
    return tf.while_loop(lambda i, *_: i < n, body, state)[1]


def broyden_loop(cell, z0, n, memory=20):
    """Broyden's iterates on z - T(z) = 0 (as `ki.solvers.Broyden`) with no bookkeeping;
    the same buffers, carried H F(z), rank-one update and eviction."""
    history = tf.zeros([memory, *z0.shape], z0.dtype)

    def body(i, z, h_f, us, vs):
        step = -h_f
        z = z + step
        f = z - cell(z)
        h_f = f + history_combine(history_dot(vs, f), us)
        h_d = h_f + step
        denom = row_sum(step * h_d, keepdims=True)
        nonzero = tf.not_equal(denom, 0)
        u = tf.where(nonzero, (step - h_d) / tf.where(nonzero, denom, tf.ones_like(denom)), 0.0)
        v = step + history_combine(history_dot(us, step), vs)
        slot = i % memory
        old_u, old_v = us[slot], vs[slot]
        u, v = tf.where(nonzero, u, old_u), tf.where(nonzero, v, old_v)
        us, vs = history_write(us, slot, u), history_write(vs, slot, v)
        h_f += u * row_sum(v * f, keepdims=True) - old_u * row_sum(old_v * f, keepdims=True)
        return i + 1, z, h_f, us, vs

    f0 = z0 - cell(z0)
    return tf.while_loop(lambda i, *_: i < n, body, (tf.constant(0), z0, f0, history, history))[1]


def cell_loop(cell, z0, n):
    return tf.while_loop(lambda i, z: i < n, lambda i, z: (i + 1, cell(z)), (0, z0))[1]


def same_math(name):
    """The plain loop doing a solver's own math; fixed-point iteration's is the cell loop."""
    if name.startswith("anderson"):
        return anderson_loop
    if name.startswith("broyden"):
        return broyden_loop
    return cell_loop


def check_references(n=12):
    """The plain loops evaluate the map at the same points as the solvers (float64,
    3 rows of width 4, tol=0, histories that wrap around), eagerly."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 4))
    w = tf.constant(0.9 * w / np.linalg.norm(w, 2))
    x = tf.constant(rng.normal(size=(3, 4)))
    z0 = tf.zeros([3, 4], tf.float64)
    cases = [
        (anderson_loop, ki.solvers.Anderson(tol=0.0, max_iter=n, memory=3), {"memory": 3}),
        (broyden_loop, ki.solvers.Broyden(tol=0.0, max_iter=n, memory=3), {"memory": 3}),
    ]
    for loop, solver, options in cases:
        seen = {"solver": [], "plain": []}

        def recorder(key, seen=seen):
            def cell(z):
                seen[key].append(z.numpy())
                return tf.tanh(z @ w + x)

            return cell

        solver.solve_fixed_point(recorder("solver"), z0)
        loop(recorder("plain"), z0, n, **options)
        count = n + 1 if loop is broyden_loop else n
        assert len(seen["solver"]) == len(seen["plain"]) == count, seen
        np.testing.assert_allclose(seen["plain"], seen["solver"], rtol=1e-9, atol=1e-12)


def compiled(w, x, n, layout, solver=None, loop=cell_loop):
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
            return loop(cell, z0, n)
    else:

        def run():
            return solver.solve_fixed_point(cell, z0)[0]

    return tf.function(run, jit_compile=True)


def seconds(fn):
    start = time.perf_counter()
    np.asarray(fn())
    return time.perf_counter() - start


def paired_ratios(cell, reference, solver, repeats):
    """Medians over interleaved calls of time(solver) / time(cell) and
    time(solver) / time(reference), and the cell's and reference's median ms.
    A reference of None is the cell loop itself."""
    calls = (cell, solver) if reference is None else (cell, reference, solver)
    for fn in calls:
        fn()
    times = []
    for _ in range(repeats):
        timed = [seconds(fn) for fn in calls]
        times.append(timed if reference is not None else [timed[0], *timed])
    median = statistics.median
    return {
        "ratio": median(s / c for c, _, s in times),
        "ratio_same_math": median(s / r for _, r, s in times),
        "plain_ms": median(c for c, _, _ in times) * 1e3,
        "same_math_ms": median(r for _, r, _ in times) * 1e3,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args(argv)
    batch, width = (32, 32) if args.quick else (256, 256)
    counts = (25, 50) if args.quick else (25, 50, 100, 200)
    repeats = 5 if args.quick else 21
    check_references()
    w, x = make_problem(batch, width)
    rows = []
    for layout in ("rows", "one row"):
        for n in counts:
            cell = compiled(w, x, n, layout)
            for name, solver in solvers(n).items():
                loop = same_math(name)
                reference = None if loop is cell_loop else compiled(w, x, n, layout, loop=loop)
                timing = paired_ratios(cell, reference, compiled(w, x, n, layout, solver), repeats)
                rows.append({"layout": layout, "solver": name, "iterations": n, **timing})
                print(
                    f"{layout:8s} N={n:4d} {name:40s} cell {timing['plain_ms']:8.2f} ms  "
                    f"same math {timing['same_math_ms']:8.2f} ms  "
                    f"ratio {timing['ratio']:5.2f}  own work {timing['ratio_same_math']:5.2f}",
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
        "Ratios: medians over interleaved calls (load average "
        f"{load}). *vs cell*: solver time / a plain loop of the cell; *own work*: solver "
        "time / a plain loop doing the solver's own math (Anderson's least squares, "
        "Broyden's updates) with no bookkeeping. For fixed-point iteration both are the "
        "cell loop.",
        "",
        "| layout | solver | N | cell loop (ms) | same-math loop (ms) | vs cell | own work |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['layout']} | {row['solver']} | {row['iterations']} | "
            f"{row['plain_ms']:.2f} | {row['same_math_ms']:.2f} | {row['ratio']:.2f} | "
            f"{row['ratio_same_math']:.2f} |"
        )
    (RESULTS / f"forward_loop{suffix}.md").write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
