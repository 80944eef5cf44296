"""CvxpyLayer forward+backward against cvxpylayers (JAX) and against our own ConeProgram.

Three DPP problems, each a batch of 128 with every parameter batched, float64:
  qp   min 1/2 ||x||^2 + q'x  s.t.  G x <= h, A x = b      (n = 20, 10 ineq., 5 eq.)
  soc  min c'x + ||F x - g||_2  s.t.  ||x||_2 <= 1          (n = 10, F 15 x 10)
  sdp  min tr(C X) + ||X||_F^2  s.t.  X >> 0, tr(X) = 1     (X 4 x 4, symmetric)
Loss sum(W * x*) with a fixed random W; one forward+backward (gradients with respect to
every parameter) is timed, median of repeats after compilation.

Compared:
  * CvxpyLayer, compiled with tf.function (graph) and with XLA;
  * ConeProgram on the (c, A, b, P) that the layer's maps produce, precomputed outside
    the timed step: the ratio CvxpyLayer / ConeProgram is the cost of the cvxpy front
    end (the parameter maps and the variable slicing);
  * cvxpylayers 1.x, JAX interface, its default solver (diffcp / SCS) with eps 1e-8.
Accuracy: solutions against CLARABEL through cvxpy (max abs error over the batch).

    python benchmarks/bench_cvxpy_layer.py [--quick]

Writes benchmarks/results/cvxpy_layer.json and cvxpy_layer.md. Targets (issue #17):
>= 10x faster than cvxpylayers, <= 1.3x our ConeProgram on the same problem.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cvxpy as cp
import numpy as np
import tensorflow as tf

import keras_implicit as ki

RESULTS = pathlib.Path(__file__).with_name("results")
SETTINGS = {"tol": 1e-8, "max_iter": 20000, "dtype": "float64"}


def qp_problem(rng, batch):
    n, m, p = 20, 10, 5
    q, G, h = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    A, b, x = cp.Parameter((p, n)), cp.Parameter(p), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x), [G @ x <= h, A @ x == b])
    x0 = rng.normal(size=(batch, n))
    G_v, A_v = rng.normal(size=(batch, m, n)), rng.normal(size=(batch, p, n))
    values = [
        rng.normal(size=(batch, n)),
        G_v,
        np.einsum("bmn,bn->bm", G_v, x0) + rng.uniform(0, 1, (batch, m)),
        A_v,
        np.einsum("bpn,bn->bp", A_v, x0),
    ]
    return problem, [q, G, h, A, b], [x], values


def soc_problem(rng, batch):
    n, k = 10, 15
    c, F, g, x = cp.Parameter(n), cp.Parameter((k, n)), cp.Parameter(k), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(c @ x + cp.norm(F @ x - g)), [cp.norm(x) <= 1])
    values = [
        rng.normal(size=(batch, n)),
        rng.normal(size=(batch, k, n)),
        rng.normal(size=(batch, k)),
    ]
    return problem, [c, F, g], [x], values


def sdp_problem(rng, batch):
    k = 4
    C, X = cp.Parameter((k, k)), cp.Variable((k, k), symmetric=True)
    problem = cp.Problem(
        cp.Minimize(cp.trace(C @ X) + cp.sum_squares(X)), [X >> 0, cp.trace(X) == 1]
    )
    M = rng.normal(size=(batch, k, k))
    return problem, [C], [X], [M + np.swapaxes(M, 1, 2)]


PROBLEMS = {"qp": qp_problem, "soc": soc_problem, "sdp": sdp_problem}


def timed(fn, repeats):
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference(problem, parameters, variables, values):
    solutions = []
    for row in range(values[0].shape[0]):
        for param, v in zip(parameters, values):
            param.value = v[row]
        problem.solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
        solutions.append(variables[0].value)
    return np.array(solutions)


def run_ours(problem, parameters, variables, values, W, repeats):
    layer = ki.layers.CvxpyLayer(problem, parameters, variables, **SETTINGS)
    tensors = [tf.constant(v) for v in values]
    weight = tf.constant(W)
    out = {}
    for mode, jit in (("graph", False), ("xla", True)):

        @tf.function(jit_compile=jit)
        def step(*args):
            with tf.GradientTape() as tape:
                tape.watch(args)
                x = layer(list(args))
                loss = tf.reduce_sum(weight * x)
            return x, tape.gradient(loss, args)

        seconds = timed(
            lambda step=step: [t.numpy() for t in tf.nest.flatten(step(*tensors))], repeats
        )
        out[mode] = (seconds, step(*tensors)[0].numpy())

    # the same cone program, its data computed once outside the timed step
    p, _ = layer._parameter_vector(tensors, tf.float64)
    c, A, b, P = layer._program_data(p)
    program = layer.program
    data = {"c": c, "A": A, "b": b, **({} if P is None else {"P": P})}
    n = c.shape[-1]

    @tf.function
    def native(data):
        with tf.GradientTape() as tape:
            tape.watch(data)
            x = program(data)[0]
            loss = tf.reduce_sum(x[:, :n])  # the whole primal vector, same work
        return tape.gradient(loss, data)

    out["cone_program"] = (
        timed(lambda: tf.nest.map_structure(np.asarray, native(data)), repeats),
        None,
    )
    return out


def run_cvxpylayers(problem, parameters, variables, values, W, repeats):
    import jax
    import jax.numpy as jnp
    from cvxpylayers.jax import CvxpyLayer

    jax.config.update("jax_enable_x64", True)
    layer = CvxpyLayer(problem, parameters=parameters, variables=variables)
    arrays = [jnp.asarray(v) for v in values]
    weight = jnp.asarray(W)

    def loss(*args):
        (x,) = layer(*args, solver_args={"eps": 1e-8})
        return jnp.sum(weight * x), x

    grad = jax.grad(loss, argnums=tuple(range(len(arrays))), has_aux=True)

    def once():
        grads, x = grad(*arrays)
        jax.block_until_ready(grads)
        return x

    seconds = timed(once, repeats)
    return seconds, np.asarray(once())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, 2 repeats")
    parser.add_argument("--tol", type=float, default=SETTINGS["tol"], help="our ADMM tolerance")
    args = parser.parse_args()
    SETTINGS["tol"] = args.tol
    batch, repeats = (16, 2) if args.quick else (128, 5)
    rng = np.random.default_rng(0)
    results = {"batch": batch, "tol": args.tol, "problems": {}}
    rows = []
    for name, make in PROBLEMS.items():
        problem, parameters, variables, values = make(rng, batch)
        shape = (batch, *variables[0].shape)
        W = rng.normal(size=shape)
        ref = reference(problem, parameters, variables, values)
        ours = run_ours(problem, parameters, variables, values, W, repeats)
        entry = {
            "cvxpy_layer_graph_s": ours["graph"][0],
            "cvxpy_layer_xla_s": ours["xla"][0],
            "cone_program_s": ours["cone_program"][0],
            "cvxpy_layer_error": float(np.abs(ours["graph"][1] - ref).max()),
        }
        try:
            seconds, x = run_cvxpylayers(problem, parameters, variables, values, W, repeats)
            entry["cvxpylayers_s"] = seconds
            entry["cvxpylayers_error"] = float(np.abs(x - ref).max())
        except Exception as error:  # an absent or failing peer is reported, not fatal
            entry["cvxpylayers_skipped"] = f"{type(error).__name__}: {error}"[:300]
        best = min(entry["cvxpy_layer_graph_s"], entry["cvxpy_layer_xla_s"])
        entry["front_end_ratio"] = entry["cvxpy_layer_graph_s"] / entry["cone_program_s"]
        if "cvxpylayers_s" in entry:
            entry["speedup_vs_cvxpylayers"] = entry["cvxpylayers_s"] / best
        results["problems"][name] = entry
        rows.append(
            f"| {name} | {entry['cvxpy_layer_graph_s'] * 1e3:.1f} | "
            f"{entry['cvxpy_layer_xla_s'] * 1e3:.1f} | {entry['cone_program_s'] * 1e3:.1f} | "
            f"{entry.get('cvxpylayers_s', float('nan')) * 1e3:.1f} | "
            f"{entry.get('speedup_vs_cvxpylayers', float('nan')):.1f}x | "
            f"{entry['front_end_ratio']:.2f}x | {entry['cvxpy_layer_error']:.1e} | "
            f"{entry.get('cvxpylayers_error', float('nan')):.1e} |"
        )
        print(rows[-1], flush=True)
    results["load_average"] = os.getloadavg()
    suffix = "_quick" if args.quick else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"cvxpy_layer{suffix}.json").write_text(json.dumps(results, indent=2))
    header = (
        f"Batch {batch}, float64, forward+backward, median ms; our tol {args.tol:g}; load average "
        f"{results['load_average'][0]:.1f}.\n\n"
        "| problem | CvxpyLayer graph | CvxpyLayer XLA | ConeProgram | cvxpylayers | speed-up "
        "| front end | our error | cvxpylayers error |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    (RESULTS / f"cvxpy_layer{suffix}.md").write_text(header + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
