"""QuadraticProgram forward+backward vs cvxpylayers (JAX) and jaxopt's OSQP.

Problem: a batch of 128 random feasible QPs, n = 20 variables, 5 equalities, 10
inequalities (about half active), every parameter Q, q, A, b, G, h batched. Loss
sum(W * z*) with a fixed random W; we time one forward+backward (gradients w.r.t. all
parameters), median of repeats after compilation, float64 for every method.

Accuracy: solutions against CLARABEL at tight tolerances (cvxpy), gradients against a
dense float64 KKT solve at the CLARABEL solution (the implicit-function-theorem
reference). cvxpylayers needs DPP, so its Q enters as Q = L L^T with L a parameter;
its Q gradient is therefore not compared, its q, A, b, G, h ones are. cvxpylayers is
run twice: with its defaults (diffcp's LSQR backward, gradients a few % off) and with
SCS at eps 1e-10 and diffcp's dense backward (equal accuracy).

    python benchmarks/bench_qp.py [--quick]

Writes benchmarks/results/qp.json and qp.md. Target (issue #4): >= 10x faster than
cvxpylayers at equal accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import tensorflow as tf

import keras_implicit as ki  # noqa: F401  (registers the package)
from keras_implicit.programs.qp import Settings, solve_qp

RESULTS = pathlib.Path(__file__).with_name("results")
NAMES = ("Q", "q", "A", "b", "G", "h")


def make_problem(batch, n, m, p, seed=0):
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((batch, n, n)) / np.sqrt(n)
    Q = L @ L.transpose(0, 2, 1) + 0.1 * np.eye(n)
    L = np.linalg.cholesky(Q)  # exact factor for the cvxpylayers parameterization
    q = rng.standard_normal((batch, n))
    A = rng.standard_normal((batch, p, n))
    G = rng.standard_normal((batch, m, n))
    x0 = rng.standard_normal((batch, n))
    b = np.einsum("bpn,bn->bp", A, x0)
    slack = rng.uniform(0.0, 1.0, (batch, m)) * (rng.uniform(size=(batch, m)) < 0.5)
    h = np.einsum("bmn,bn->bm", G, x0) + slack
    W = rng.standard_normal((batch, n))
    return {"Q": Q, "q": q, "A": A, "b": b, "G": G, "h": h}, L, W


def timed(fn, repeats):
    fn()  # compile / warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# ------------------------------------------------------------------ references


def reference(d, W):
    """CLARABEL solutions and dense-KKT gradients of sum(W * z*) per problem."""
    import cvxpy as cp

    batch, n = d["q"].shape
    out = {k: np.zeros_like(v) for k, v in d.items()}
    xs = np.zeros((batch, n))
    for i in range(batch):
        z = cp.Variable(n)
        eq = d["A"][i] @ z == d["b"][i]
        ineq = d["G"][i] @ z <= d["h"][i]
        obj = 0.5 * cp.quad_form(z, cp.psd_wrap(d["Q"][i])) + d["q"][i] @ z
        cp.Problem(cp.Minimize(obj), [eq, ineq]).solve(
            solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10
        )
        x, nu, lam = z.value, eq.dual_value, ineq.dual_value
        xs[i] = x
        act = lam > 1e-7
        Q, A, G = d["Q"][i], d["A"][i], d["G"][i]
        Ga, p, k = G[act], A.shape[0], int(act.sum())
        K = np.block(
            [
                [Q, A.T, Ga.T],
                [A, np.zeros((p, p + k))],
                [Ga, np.zeros((k, p + k))],
            ]
        )
        w = np.linalg.solve(K.T, np.concatenate([W[i], np.zeros(p + k)]))
        wx, wnu = w[:n], w[n : n + p]
        wlam = np.zeros(len(lam))
        wlam[act] = w[n + p :]
        out["Q"][i] = -0.5 * (np.outer(wx, x) + np.outer(x, wx))
        out["q"][i] = -wx
        out["A"][i] = -(np.outer(nu, wx) + np.outer(wnu, x))
        out["b"][i] = wnu
        out["G"][i] = -(np.outer(lam, wx) + np.outer(wlam, x))
        out["h"][i] = wlam
    return xs, out


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def grad_errors(grads, ref, names):
    return {k: rel_err(np.asarray(grads[k]), ref[k]) for k in names}


# ------------------------------------------------------------------ methods


def run_ki(d, W, repeats, tol, jit_compile):
    params = {k: tf.constant(v) for k, v in d.items()}
    batched = dict.fromkeys(NAMES, True)
    W_t = tf.constant(W)
    settings = Settings(tol=tol)

    @tf.function(jit_compile=jit_compile)
    def fwd_bwd(ps):
        with tf.GradientTape() as tape:
            tape.watch(ps)
            x, _, _, status, _ = solve_qp(ps, batched, settings)
            loss = tf.reduce_sum(W_t * x)
        return x, status, tape.gradient(loss, ps)

    start = time.perf_counter()
    x, status, grads = fwd_bwd(params)
    compile_s = time.perf_counter() - start
    return (
        x.numpy(),
        {k: g.numpy() for k, g in grads.items()},
        lambda: [v.numpy() for v in tf.nest.flatten(fwd_bwd(params))],
        compile_s,
        int((status.numpy() == 0).sum()),
    )


def timed_together(fns, repeats):
    """Median seconds of each callable, their calls interleaved (a load change hits all)."""
    samples = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, times in zip(fns, samples):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in samples]


def run_cvxpylayers(d, L, W, repeats, solver_args):
    import cvxpy as cp
    import jax
    import jax.numpy as jnp
    from cvxpylayers.jax import CvxpyLayer

    jax.config.update("jax_enable_x64", True)
    n = d["q"].shape[1]
    p, m = d["b"].shape[1], d["h"].shape[1]
    z = cp.Variable(n)
    Lp, qp_ = cp.Parameter((n, n)), cp.Parameter(n)
    Ap, bp = cp.Parameter((p, n)), cp.Parameter(p)
    Gp, hp = cp.Parameter((m, n)), cp.Parameter(m)
    obj = 0.5 * cp.sum_squares(Lp.T @ z) + qp_ @ z
    prob = cp.Problem(cp.Minimize(obj), [Ap @ z == bp, Gp @ z <= hp])
    layer = CvxpyLayer(prob, parameters=[Lp, qp_, Ap, bp, Gp, hp], variables=[z])
    args = [jnp.asarray(v) for v in (L, d["q"], d["A"], d["b"], d["G"], d["h"])]
    Wj = jnp.asarray(W)

    def loss(*a):
        (x,) = layer(*a, solver_args=solver_args)
        return jnp.sum(Wj * x), x

    grad_fn = jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)

    def once():
        (_, x), g = grad_fn(*args)
        return np.asarray(x), [np.asarray(v) for v in g]

    t = timed(once, repeats)
    x, g = once()
    grads = dict(zip(("L", "q", "A", "b", "G", "h"), g))
    return x, grads, t


def run_jaxopt(d, W, repeats, tol):
    import jax
    import jax.numpy as jnp
    from jaxopt import OSQP

    jax.config.update("jax_enable_x64", True)
    solver = OSQP(tol=tol, maxiter=4000)
    Wj = jnp.asarray(W)

    def one(Q, q, A, b, G, h):
        return solver.run(params_obj=(Q, q), params_eq=(A, b), params_ineq=(G, h)).params.primal

    def loss(Q, q, A, b, G, h):
        x = jax.vmap(one)(Q, q, A, b, G, h)
        return jnp.sum(Wj * x), x

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))
    args = [jnp.asarray(d[k]) for k in NAMES]

    def once():
        (_, x), g = grad_fn(*args)
        return np.asarray(x), [np.asarray(v) for v in g]

    start = time.perf_counter()
    once()
    compile_s = time.perf_counter() - start
    t = timed(once, repeats)
    x, g = once()
    return x, dict(zip(NAMES, g)), t, compile_s


# ------------------------------------------------------------------ report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, few repeats")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    batch, n, m, p = (16 if args.quick else 128), 20, 10, 5
    repeats = 3 if args.quick else 10
    d, L, W = make_problem(batch, n, m, p)
    x_ref, g_ref = reference(d, W)
    rows, results = [], {"batch": batch, "n": n, "m_ineq": m, "p_eq": p, "methods": {}}

    def record(name, x, grads, seconds, names, extra=None):
        entry = {
            "fwd_bwd_seconds": seconds,
            "solution_rel_err": rel_err(x, x_ref),
            "gradient_rel_err": grad_errors(grads, g_ref, names),
        }
        entry.update(extra or {})
        results["methods"][name] = entry
        worst = max(entry["gradient_rel_err"].values())
        rows.append((name, seconds, entry["solution_rel_err"], worst, ",".join(names)))
        print(
            f"{name:28s} {seconds * 1e3:9.1f} ms  sol err {entry['solution_rel_err']:.1e}  "
            f"grad err {worst:.1e}"
        )

    # both execution modes, timed interleaved; target (issue #19): XLA within 1.1x of
    # tf.function
    modes = (("XLA", True), ("tf.function", False))
    runs = [run_ki(d, W, repeats, tol=1e-6, jit_compile=jit) for _, jit in modes]
    seconds = timed_together([run[2] for run in runs], 2 * repeats)
    for (label, _), (x, g, _, c, n_solved), t in zip(modes, runs, seconds):
        record(
            f"keras_implicit ({label}, f64)",
            x,
            g,
            t,
            NAMES,
            {"compile_seconds": c, "solved": n_solved},
        )
    try:
        # diffcp's default backward (LSQR) stops early: gradients off by ~5%; its
        # dense mode with tight SCS tolerances is the equal-accuracy configuration
        for label, solver_args in (
            ("default", {}),
            ("eps 1e-10, dense backward", {"eps_abs": 1e-10, "eps_rel": 1e-10, "mode": "dense"}),
        ):
            x, g, t = run_cvxpylayers(d, L, W, max(2, repeats // 3), solver_args)
            record(f"cvxpylayers (JAX, {label})", x, g, t, ("q", "A", "b", "G", "h"))
    except ImportError as error:
        results["methods"]["cvxpylayers"] = {"skipped": str(error)}
        print("cvxpylayers skipped:", error)
    try:
        x, g, t, c = run_jaxopt(d, W, max(2, repeats // 3), tol=1e-6)
        record("jaxopt OSQP (vmap, jit)", x, g, t, NAMES, {"compile_seconds": c})
    except ImportError as error:
        results["methods"]["jaxopt"] = {"skipped": str(error)}
        print("jaxopt skipped:", error)

    ours = min(
        entry["fwd_bwd_seconds"]
        for name, entry in results["methods"].items()
        if name.startswith("keras_implicit")
    )
    results["keras_implicit_best_seconds"] = ours
    xla = results["methods"]["keras_implicit (XLA, f64)"]["fwd_bwd_seconds"]
    graph = results["methods"]["keras_implicit (tf.function, f64)"]["fwd_bwd_seconds"]
    results["xla_over_tf_function"] = xla / graph
    for entry in results["methods"].values():
        if "fwd_bwd_seconds" in entry:
            entry["speedup_of_keras_implicit"] = entry["fwd_bwd_seconds"] / ours

    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"qp{suffix}.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"# QuadraticProgram: batch {batch}, n={n}, {p} equalities, {m} inequalities (float64)",
        "",
        "Forward+backward (gradients w.r.t. all parameters), median wall time on this "
        "machine; errors relative to CLARABEL (solution) and a dense KKT solve at the "
        "CLARABEL solution (gradients, worst over the parameters compared). "
        f"Load average at start: {load:.1f} on {os.cpu_count()} cores. "
        f"keras_implicit XLA / tf.function: {xla / graph:.2f}.",
        "",
        "| method | fwd+bwd (ms) | time / best keras_implicit | solution rel. err | "
        "gradient rel. err | gradients compared |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, seconds, sol, grad, names in rows:
        lines.append(
            f"| {name} | {seconds * 1e3:.1f} | {seconds / ours:.1f}x | {sol:.1e} | {grad:.1e} "
            f"| {names} |"
        )
    (RESULTS / f"qp{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
