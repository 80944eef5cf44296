"""A short tour of keras_implicit: `python -m keras_implicit [--quick]`."""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


import numpy as np
import tensorflow as tf

import keras_implicit as ki

WIDTH = 72


def _section(title: str) -> None:
    print()
    print(f"── {title} " + "─" * max(0, WIDTH - len(title) - 4))


def _row(*cells, widths):
    print("  " + "".join(str(c).ljust(w) for c, w in zip(cells, widths)))


def tour_fixed_point(summary, batch, width):
    _section("1. Fixed points: z = tanh(W z + x), a deep-equilibrium cell")
    rng = np.random.default_rng(0)
    w = rng.normal(size=(width, width))
    w_var = tf.Variable(0.9 * w / np.linalg.norm(w, 2))
    x = tf.constant(rng.normal(size=(batch, width)))

    def cell(z, x):
        return tf.tanh(z @ w_var + x)

    print(f"  batch {batch}, width {width}, ||W||_2 = 0.9, float64, tol 1e-10\n")
    _row("forward solver", "iterations (mean)", "backward (bicgstab) its", widths=(26, 22, 22))
    for solver in ("fixed_point_iteration", "anderson", "broyden"):
        record = []
        with tf.GradientTape() as tape:
            z, stats = ki.fixed_point(
                cell,
                tf.zeros_like(x),
                x,
                solver=solver,
                batch_dims=1,
                tol=1e-10,
                max_iter=500,
                backward_tol=1e-10,
                return_stats=True,
                backward_callback=record.append,
            )
            loss = tf.reduce_sum(z**2)
        tape.gradient(loss, w_var)
        _row(
            solver,
            f"{stats.iterations.numpy().mean():.1f}",
            f"{record[0].iterations.numpy().mean():.1f}",
            widths=(26, 22, 22),
        )
        summary.append(
            (
                f"fixed_point ({solver})",
                "converged" if stats.converged.numpy().all() else "NOT converged",
            )
        )

    check = ki.diagnostics.check_gradients(
        cell,
        tf.zeros_like(x[:2]),
        x[:2],
        variables=[w_var],
        batch_dims=1,
        tol=1e-12,
        max_iter=500,
        backward_tol=1e-12,
    )
    print(
        f"\n  implicit gradient vs central finite differences (x and W): "
        f"relative error {check.relative_error:.1e}"
    )
    summary.append(
        ("gradient check vs finite differences", f"rel. error {check.relative_error:.1e}")
    )


def tour_linear_solvers(summary, batch, width):
    _section("2. Backward linear solvers: (I - J^T) u = g, matrix-free")
    rng = np.random.default_rng(1)
    w = tf.constant(0.9 * (m := rng.normal(size=(width, width))) / np.linalg.norm(m, 2))
    x = tf.constant(rng.normal(size=(batch, width)))

    def cell(z, x):
        return tf.tanh(z @ w + x)

    grads = {}
    _row("linear solver", "iterations (mean)", "max |grad - dense|", widths=(26, 22, 22))
    for name in ("dense", "gmres", "bicgstab", "broyden", "neumann"):
        record = []
        with tf.GradientTape() as tape:
            tape.watch(x)
            z = ki.fixed_point(
                cell,
                tf.zeros_like(x),
                x,
                batch_dims=1,
                tol=1e-12,
                max_iter=500,
                linear_solver=name,
                backward_tol=1e-10,
                backward_max_iter=400,
                backward_callback=record.append,
            )
            loss = tf.reduce_sum(z**2)
        grads[name] = tape.gradient(loss, x).numpy()
        error = np.abs(grads[name] - grads["dense"]).max()
        _row(
            name, f"{record[0].iterations.numpy().mean():.1f}", f"{error:.1e}", widths=(26, 22, 22)
        )
    worst = max(np.abs(g - grads["dense"]).max() for g in grads.values())
    summary.append(("5 linear solvers agree with dense solve", f"max diff {worst:.1e}"))


def tour_argmin(summary):
    _section("3. argmin: ridge regression, d(solution)/d(lambda) through the Hessian")
    rng = np.random.default_rng(2)
    design = rng.normal(size=(50, 5))
    target = design @ rng.normal(size=5) + 0.1 * rng.normal(size=50)
    a, y = tf.constant(design), tf.constant(target)

    def objective(beta, lam):
        return 0.5 * tf.reduce_sum(
            (tf.linalg.matvec(a, beta) - y) ** 2
        ) + 0.5 * lam * tf.reduce_sum(beta**2)

    lam = tf.constant(2.0, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(lam)
        beta = ki.argmin(objective, tf.zeros([5], tf.float64), lam, tol=1e-12, backward_tol=1e-12)
        norm = tf.reduce_sum(beta**2)
    grad = float(tape.gradient(norm, lam))
    hessian = design.T @ design + 2.0 * np.eye(5)
    exact = np.linalg.solve(hessian, design.T @ target)
    exact_grad = float(-2 * exact @ np.linalg.solve(hessian, exact))
    print(f"  L-BFGS solution vs closed form: max diff {np.abs(beta.numpy() - exact).max():.1e}")
    print(f"  d||beta||^2/d lambda  implicit (CG): {grad:+.8f}   closed form: {exact_grad:+.8f}")
    summary.append(("argmin gradient vs closed form", f"diff {abs(grad - exact_grad):.1e}"))


def tour_memory(summary, width, iterations=(10, 100), batch=128):
    _section("4. Memory and speed: implicit vs backprop through the unrolled solver")
    rng = np.random.default_rng(3)
    w_var = tf.Variable(
        (0.9 * (m := rng.normal(size=(width, width))) / np.linalg.norm(m, 2)).astype(np.float32)
    )
    x = tf.constant(rng.normal(size=(batch, width)).astype(np.float32))

    def cell(z, x):
        return tf.tanh(z @ w_var + x)

    # both paths compiled with XLA, the path model.fit takes where an accelerator is visible
    def implicit(n):
        @tf.function(jit_compile=True)
        def step():
            with tf.GradientTape() as tape:
                z = ki.fixed_point(
                    cell,
                    tf.zeros_like(x),
                    x,
                    solver="fixed_point_iteration",
                    tol=0.0,
                    max_iter=n,
                    batch_dims=1,
                    on_failure="ignore",
                )
                loss = tf.reduce_sum(z**2)
            return tape.gradient(loss, w_var)

        return step

    def unrolled(n):
        @tf.function(jit_compile=True)
        def step():
            with tf.GradientTape() as tape:
                z = tf.while_loop(
                    lambda z: True, lambda z: cell(z, x), [tf.zeros_like(x)], maximum_iterations=n
                )[0]
                loss = tf.reduce_sum(z**2)
            return tape.gradient(loss, w_var)

        return step

    print(
        f"  forward + backward of z = tanh(W z + x), batch {batch}, width {width}, ||W|| = 0.9,"
        "\n  compiled with XLA on this machine's CPU; median of 5 runs after compilation"
    )
    _row(
        "forward iterations",
        "implicit (ms)",
        "unrolled backprop (ms)",
        "speed-up",
        widths=(22, 16, 24, 10),
    )

    def timed(step, repeats=5):
        step()  # trace and compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step().numpy()
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1e3

    for n in iterations:
        t_imp, t_unr = timed(implicit(n)), timed(unrolled(n))
        _row(n, f"{t_imp:.1f}", f"{t_unr:.1f}", f"{t_unr / t_imp:.1f}x", widths=(22, 16, 24, 10))
    print(
        "  The implicit backward is one linear solve whatever the forward iterations; the\n"
        "  unrolled backward replays every iteration and stores its activations (memory grows\n"
        "  with iterations: benchmarks/RESULTS.md)."
    )
    summary.append(("implicit vs unrolled (XLA)", f"{t_unr / t_imp:.1f}x faster at {n} its"))


def tour_diagnostics(summary):
    _section("5. Diagnostics: is the implicit system invertible? (the paper's condition)")
    rng = np.random.default_rng(4)
    w = tf.constant(0.5 * (m := rng.normal(size=(4, 4))) / np.linalg.norm(m, 2))
    x = tf.constant(rng.normal(size=4))

    def healthy(z, x):
        return tf.tanh(tf.linalg.matvec(w, z) + x)

    def cube(y, x):  # y^3 = x: at x = 0 the root 0 has dF/dy = 3 y^2 = 0
        return y**3 - x

    z = ki.fixed_point(healthy, tf.zeros([4], tf.float64), x, tol=1e-12)
    good = ki.diagnostics.check_invertibility(healthy, z, x)
    bad = ki.diagnostics.check_invertibility(
        cube, tf.zeros([1], tf.float64), tf.zeros([1], tf.float64), kind="root"
    )
    _row("", "healthy: tanh(Wz+x)", "pathological: y^3 = x at 0", widths=(22, 25, 25))
    _row(
        "sigma_min(dF/dy)",
        f"{good.smallest_singular_value:.3g}",
        f"{bad.smallest_singular_value:.3g}",
        widths=(22, 25, 25),
    )
    _row("invertible", good.invertible, bad.invertible, widths=(22, 25, 25))
    print(f"\n  healthy:      {good.message}")
    print(f"  pathological: {bad.message}")
    summary.append(("diagnostics flag the singular case", "yes" if not bad.invertible else "NO"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keras_implicit", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller problems")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(
        f"keras_implicit {ki.__version__} · TensorFlow {tf.__version__} · "
        "implicit differentiation for Keras"
    )
    summary = []
    batch, width = (8, 16) if args.quick else (32, 64)
    tour_fixed_point(summary, batch, width)
    tour_linear_solvers(summary, batch, width)
    tour_argmin(summary)
    tour_memory(
        summary, 64 if args.quick else 256, iterations=(10, 50) if args.quick else (25, 100, 200)
    )
    tour_diagnostics(summary)
    _section("Summary")
    for what, outcome in summary:
        _row(what, outcome, widths=(44, 30))
    print(f"\n  done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
