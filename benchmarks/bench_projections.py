"""Throughput of keras_implicit's projections versus numpy and jaxopt.

Each op projects a batch of vectors (default 1024 x 1000, float32) along the last
axis. Ours run XLA-compiled (`tf.function(jit_compile=True)`), warmed up; jaxopt's
run as `jax.jit(jax.vmap(...))`, warmed up; numpy is the textbook sort-based simplex
projection (and np.clip / norms for the box / l2 ball). Reported: median wall time
per call over `--repeats` calls, throughput in vectors per second, and ratios
ours/peer (< 1 means ours is faster). An "identity" row measures each framework's
fixed per-call cost on the same data (allocation of the output and dispatch), which
bounds what memory-bound ops such as the box can reach.

A second table (`--set polytopes`, written to projections_polytopes.*) times the
projections solved by a search or an iterative method, against jaxopt's functions of
the same name: box section, sparse simplex, transport and Birkhoff polytopes
(Euclidean and KL), each batched (vmap for jaxopt), with the largest difference
between the two outputs.

Usage:
  python benchmarks/bench_projections.py            # full run, writes results/
  python benchmarks/bench_projections.py --quick    # tiny shapes, a few seconds
                                                    # (writes projections_quick.*)
  python benchmarks/bench_projections.py --set polytopes   # the second table

jax/jaxopt are optional (pip install jax jaxopt); without them only numpy is compared.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import keras_implicit.ops as ops

RADIUS = 1.0
LOWER, UPPER = -0.5, 0.5


# ---------------------------------------------------------------------------- numpy


def np_simplex(x, value=1.0):
    """Sort-based projection onto the simplex (Held, Wolfe & Crowder 1974)."""
    u = -np.sort(-x, axis=-1)
    css = np.cumsum(u, axis=-1)
    k = np.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    tau = np.max((css - value) / k, axis=-1, keepdims=True)
    return np.maximum(x - tau, 0)


def np_l1_ball(x, radius=RADIUS):
    inside = np.abs(x).sum(-1, keepdims=True) <= radius
    return np.where(inside, x, np.sign(x) * np_simplex(np.abs(x), radius))


def np_l2_ball(x, radius=RADIUS):
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x * np.minimum(1.0, radius / np.maximum(norm, 1e-30)).astype(x.dtype)


NUMPY = {
    "simplex": np_simplex,
    "sparsemax": np_simplex,
    "l1_ball": np_l1_ball,
    "l2_ball": np_l2_ball,
    "box": lambda x: np.clip(x, LOWER, UPPER),
    "identity": lambda x: x.copy(),
}

OURS = {
    "simplex": lambda x: ops.projection_simplex(x, 1.0),
    "sparsemax": ops.sparsemax,
    "l1_ball": lambda x: ops.projection_l1_ball(x, RADIUS),
    "l2_ball": lambda x: ops.projection_l2_ball(x, RADIUS),
    "box": lambda x: ops.projection_box(x, LOWER, UPPER),
    "identity": lambda x: x + 0.0,  # XLA cannot alias its input: one output buffer
}


def jax_peers():
    """jaxopt's projections (jit + vmap), or {} when jax/jaxopt are not installed."""
    try:
        import jax
        import jax.numpy as jnp
        from jaxopt import projection as jp
    except ImportError:
        return {}, None

    def batched(fn):
        return jax.jit(jax.vmap(fn))

    peers = {
        "simplex": batched(lambda v: jp.projection_simplex(v, 1.0)),
        # jaxopt has no separate sparsemax; it is the unit-simplex projection.
        "sparsemax": batched(lambda v: jp.projection_simplex(v, 1.0)),
        "l1_ball": batched(lambda v: jp.projection_l1_ball(v, RADIUS)),
        "l2_ball": batched(lambda v: jp.projection_l2_ball(v, RADIUS)),
        "box": batched(lambda v: jp.projection_box(v, (LOWER, UPPER))),
        "identity": jax.jit(lambda v: v + 0.0),
    }
    versions = {"jax": jax.__version__, "jaxopt": importlib.metadata.version("jaxopt")}

    def run(fn):
        def call(x):
            return fn(x).block_until_ready()

        return call

    return {k: run(v) for k, v in peers.items()}, (versions, jnp)


# ------------------------------------------------------------- amortized (in-graph)
#
# A projection inside a model is one op of a larger compiled function, so the
# framework's per-call dispatch is paid once per step, not once per op. To measure
# the op itself, each side applies it K times in ONE compiled function (a fixed-count
# loop, x <- op(x) * 1.5: the scaling keeps every application doing real work, and a
# loop cannot be folded away by the compiler), and time / K is reported.


def ours_amortized(name, k):
    fn = OURS[name]

    @tf.function(jit_compile=True)
    def many(x):
        def body(i, x):
            return i + 1, fn(x) * 1.5

        return tf.while_loop(lambda i, _: i < k, body, (tf.constant(0), x))[1]

    return many


def jax_amortized(name, k):
    import jax
    from jaxopt import projection as jp

    single = {
        "simplex": lambda v: jp.projection_simplex(v, 1.0),
        "sparsemax": lambda v: jp.projection_simplex(v, 1.0),
        "l1_ball": lambda v: jp.projection_l1_ball(v, RADIUS),
        "l2_ball": lambda v: jp.projection_l2_ball(v, RADIUS),
        "box": lambda v: jp.projection_box(v, (LOWER, UPPER)),
        "identity": lambda v: v + 0.0,
    }[name]
    batched = jax.vmap(single)

    @jax.jit
    def many(x):
        return jax.lax.fori_loop(0, k, lambda i, x: batched(x) * 1.5, x)

    return lambda x: many(x).block_until_ready()


# ------------------------------------------------------------------ polytopes


def polytope_cases(batch, rng):
    """name -> (our function, jaxopt's single-instance function, numpy input)."""
    from jaxopt import projection as jp

    n = 200
    lo, hi = -np.ones(n, "float32"), np.ones(n, "float32")
    w = rng.uniform(0.5, 1.5, size=n).astype("float32")
    m_rows, n_cols = 20, 30
    a = np.full(m_rows, 1.0 / m_rows, "float32")
    b = np.full(n_cols, 1.0 / n_cols, "float32")
    square = 20
    return {
        "box_section": (
            lambda x: ops.projection_box_section(x, lo, hi, w, 3.0),
            lambda v: jp.projection_box_section(v, (lo, hi, w, 3.0)),
            rng.normal(size=(batch, n)),
        ),
        "sparse_simplex (k=10)": (
            lambda x: ops.projection_sparse_simplex(x, 10),
            lambda v: jp.projection_sparse_simplex(v, 10),
            rng.normal(size=(batch, 1000)),
        ),
        "transport": (
            lambda x: ops.projection_transport(x, a, b),
            lambda v: jp.projection_transport(v, (a, b)),
            rng.normal(size=(batch // 64, m_rows, n_cols)),
        ),
        "transport (KL)": (
            lambda x: ops.projection_transport(x, a, b, divergence="kl"),
            lambda v: jp.kl_projection_transport(v, (a, b)),
            rng.normal(size=(batch // 64, m_rows, n_cols)),
        ),
        "birkhoff": (
            ops.projection_birkhoff,
            jp.projection_birkhoff,
            rng.normal(size=(batch // 64, square, square)),
        ),
        "birkhoff (KL)": (
            lambda x: ops.projection_birkhoff(x, divergence="kl"),
            jp.kl_projection_birkhoff,
            rng.normal(size=(batch // 64, square, square)),
        ),
    }


def run_polytopes(batch, repeats):
    import jax

    rng = np.random.default_rng(0)
    rows = []
    for name, (ours, theirs, x) in polytope_cases(batch, rng).items():
        x = x.astype("float32")
        ours_fn = tf.function(ours, jit_compile=True)
        jax_fn = jax.jit(jax.vmap(theirs))
        x_tf, x_jax = tf.constant(x), jax.numpy.asarray(x)
        ours_median, ours_min = time_calls(ours_fn, x_tf, repeats)
        jax_median, jax_min = time_calls(
            lambda v, f=jax_fn: f(v).block_until_ready(), x_jax, repeats
        )
        diff = np.abs(np.asarray(ours_fn(x_tf)) - np.asarray(jax_fn(x_jax)))
        row = {
            "op": name,
            "shape": list(x.shape),
            "ours_s": ours_median,
            "ours_min_s": ours_min,
            "jaxopt_s": jax_median,
            "jaxopt_min_s": jax_min,
            "ratio_vs_jaxopt": ours_median / jax_median,
            "ratio_vs_jaxopt_min": ours_min / jax_min,
            "max_abs_diff_jaxopt": float(np.nanmax(diff)),
        }
        rows.append(row)
        print(
            f"{name:>22} {x.shape}: ours {ours_median * 1e3:8.2f} ms, jaxopt "
            f"{jax_median * 1e3:8.2f} ms (ours/jaxopt {row['ratio_vs_jaxopt']:.2f}), "
            f"max |ours - jaxopt| {row['max_abs_diff_jaxopt']:.1e}",
            flush=True,
        )
    return {"meta": _meta(batch, None, "float32", repeats, 0), "results": rows}


def polytopes_markdown(report):
    meta = report["meta"]
    lines = [
        "# Projections onto polytopes: ours vs jaxopt",
        "",
        f"float32, median of {meta['repeats']} warm calls; {meta['machine']}, "
        f"{meta['cpu_count']} CPUs, load average {meta['load_average']}; TensorFlow "
        f"{meta['tensorflow']}, jax {meta.get('jax')}, jaxopt {meta.get('jaxopt')}; "
        f"{meta['date']}.",
        "",
        "Ours: `tf.function(jit_compile=True)` on the batch. jaxopt: "
        "`jax.jit(jax.vmap(f))` with f its function of the same name (default solvers: "
        "bisection for the box section, L-BFGS on the semi-dual for the transport and "
        "Birkhoff polytopes). Ratio = ours / jaxopt from medians and, in brackets, from "
        "the fastest calls. The last column is the largest entry of |ours - jaxopt|.",
        "",
        "| op | input | ours (ms) | jaxopt (ms) | ours/jaxopt | max abs diff |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['op']} | {' x '.join(map(str, r['shape']))} | {r['ours_s'] * 1e3:.2f} | "
            f"{r['jaxopt_s'] * 1e3:.2f} | {r['ratio_vs_jaxopt']:.2f} "
            f"[{r['ratio_vs_jaxopt_min']:.2f}] | {r['max_abs_diff_jaxopt']:.1e} |"
        )
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- timing


def time_calls(call, x, repeats, warmup=3, budget_s=15.0):
    """Median and fastest of `repeats` warm calls, fewer (at least 3) past `budget_s`.

    The budget keeps the slow peers (jaxopt's simplex takes ~0.4 s per call, 8 s per
    amortized call) from stretching the run to tens of minutes.
    """
    for _ in range(warmup):
        call(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - start)
        if len(times) >= 3 and sum(times) > budget_s:
            break
    return statistics.median(times), min(times)


def run(batch, dim, repeats, dtype, amortize=20):
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(batch, dim)).astype(dtype)
    x_tf = tf.constant(x_np)
    peers, jax_info = jax_peers()
    x_jax = jax_info[1].asarray(x_np) if jax_info else None

    rows = []
    for name in ("simplex", "sparsemax", "l1_ball", "l2_ball", "box", "identity"):
        ours_fn = tf.function(OURS[name], jit_compile=True)
        ours_median, ours_min = time_calls(ours_fn, x_tf, repeats)
        ours_out = np.asarray(ours_fn(x_tf))
        row = {
            "op": name,
            "ours_s": ours_median,
            "ours_min_s": ours_min,
            "ours_vectors_per_s": batch / ours_median,
        }
        np_median, np_min = time_calls(NUMPY[name], x_np, repeats)
        row["numpy_s"] = np_median
        row["numpy_min_s"] = np_min
        row["ratio_vs_numpy"] = ours_median / np_median
        row["ratio_vs_numpy_min"] = ours_min / np_min
        row["max_abs_diff_numpy"] = float(np.max(np.abs(ours_out - NUMPY[name](x_np))))
        if peers:
            jax_median, jax_min = time_calls(peers[name], x_jax, repeats)
            row["jaxopt_s"] = jax_median
            row["jaxopt_min_s"] = jax_min
            row["ratio_vs_jaxopt"] = ours_median / jax_median
            row["ratio_vs_jaxopt_min"] = ours_min / jax_min
            row["max_abs_diff_jaxopt"] = float(
                np.max(np.abs(ours_out - np.asarray(peers[name](x_jax))))
            )
        if amortize:
            am = ours_amortized(name, amortize)
            row["ours_amortized_s"] = time_calls(am, x_tf, repeats)[0] / amortize
            if peers:
                am_j = jax_amortized(name, amortize)
                row["jaxopt_amortized_s"] = time_calls(am_j, x_jax, repeats)[0] / amortize
                row["ratio_vs_jaxopt_amortized"] = (
                    row["ours_amortized_s"] / row["jaxopt_amortized_s"]
                )
        rows.append(row)
        print(_format_row(row), flush=True)
    return {"meta": _meta(batch, dim, dtype, repeats, amortize), "results": rows}


def _meta(batch, dim, dtype, repeats, amortize):
    try:
        import jax

        versions = {"jax": jax.__version__, "jaxopt": importlib.metadata.version("jaxopt")}
    except ImportError:
        versions = {"jax": None}
    return {
        "batch": batch,
        "dim": dim,
        "dtype": dtype,
        "repeats": repeats,
        "amortize": amortize,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        **versions,
    }


def _format_row(row):
    parts = [f"{row['op']:>10}: ours {row['ours_s'] * 1e3:8.2f} ms"]
    parts.append(f"numpy {row['numpy_s'] * 1e3:8.2f} ms (ours/numpy {row['ratio_vs_numpy']:.2f})")
    parts.append(f"best-call ours {row['ours_min_s'] * 1e3:.2f} ms")
    if "jaxopt_s" in row:
        parts.append(
            f"jaxopt {row['jaxopt_s'] * 1e3:8.2f} ms (ours/jaxopt {row['ratio_vs_jaxopt']:.2f})"
        )
    if "ratio_vs_jaxopt_amortized" in row:
        parts.append(
            f"in-graph: ours {row['ours_amortized_s'] * 1e3:.2f} ms, "
            f"jaxopt {row['jaxopt_amortized_s'] * 1e3:.2f} ms "
            f"(ours/jaxopt {row['ratio_vs_jaxopt_amortized']:.2f})"
        )
    return " | ".join(parts)


def to_markdown(report):
    meta = report["meta"]
    lines = [
        "# Projection throughput",
        "",
        f"Batch {meta['batch']} x dim {meta['dim']}, {meta['dtype']}, median of "
        f"{meta['repeats']} warm calls; {meta['machine']}, {meta['cpu_count']} CPUs, "
        f"load average {meta.get('load_average')}; "
        f"TensorFlow {meta['tensorflow']}, numpy {meta['numpy']}, jax {meta.get('jax')}, "
        f"jaxopt {meta.get('jaxopt')}; {meta['date']}.",
        "",
        "Ours: `tf.function(jit_compile=True)`. jaxopt: `jax.jit(jax.vmap(...))`. numpy: "
        "sort-based simplex (Held et al.), `np.clip`, norms. Ratio = ours / peer "
        "(below 1: ours faster), from medians and, in brackets, from the fastest call "
        "of each (robust when the machine is shared). `identity` is each framework's "
        "fixed cost for one call producing a fresh output of this size.",
        "",
        "| op | ours (ms) | vectors/s | numpy (ms) | ours/numpy | jaxopt (ms) | ours/jaxopt |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        jax_ms = f"{r['jaxopt_s'] * 1e3:.2f}" if "jaxopt_s" in r else "n/a"
        jax_ratio = (
            f"{r['ratio_vs_jaxopt']:.2f} [{r['ratio_vs_jaxopt_min']:.2f}]"
            if "ratio_vs_jaxopt" in r
            else "n/a"
        )
        lines.append(
            f"| {r['op']} | {r['ours_s'] * 1e3:.2f} | {r['ours_vectors_per_s']:.3g} | "
            f"{r['numpy_s'] * 1e3:.2f} | {r['ratio_vs_numpy']:.2f} "
            f"[{r['ratio_vs_numpy_min']:.2f}] | {jax_ms} | {jax_ratio} |"
        )
    amortized = [r for r in report["results"] if "ratio_vs_jaxopt_amortized" in r]
    if amortized:
        lines += [
            "",
            f"Per application when each side applies the op {meta.get('amortize')} times "
            "inside ONE compiled function (x <- op(x) * 1.5 in a tf.while_loop / "
            "lax.fori_loop), i.e. with the per-call dispatch amortized, as when the op "
            "is one layer of a compiled model. The per-call table above stays the "
            "honest number for a standalone call.",
            "",
            "| op | ours per op (ms) | jaxopt per op (ms) | ours/jaxopt in-graph "
            "| ours/jaxopt per call |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in amortized:
            lines.append(
                f"| {r['op']} | {r['ours_amortized_s'] * 1e3:.3f} | "
                f"{r['jaxopt_amortized_s'] * 1e3:.3f} | {r['ratio_vs_jaxopt_amortized']:.2f} | "
                f"{r['ratio_vs_jaxopt']:.2f} |"
            )
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument(
        "--set",
        choices=["simple", "polytopes"],
        default="simple",
        help="simple: closed-form projections vs numpy/jaxopt; polytopes: the searched "
        "and iterative projections vs jaxopt",
    )
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument(
        "--amortize",
        type=int,
        default=20,
        help="also time K applications inside one compiled function (0: skip)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="directory for projections.json / projections.md",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.dim, args.repeats = 64 if args.set == "polytopes" else 32, 50, 5
    if args.set == "polytopes":
        report = run_polytopes(args.batch, args.repeats)
        stem, markdown = "projections_polytopes", polytopes_markdown(report)
    else:
        report = run(args.batch, args.dim, args.repeats, args.dtype, args.amortize)
        stem, markdown = "projections", to_markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    # A quick run must not overwrite the real results (and *_quick.* is git-ignored).
    if args.quick:
        stem += "_quick"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown)
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.md')}")
    return report


if __name__ == "__main__":
    main()
