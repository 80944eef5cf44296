"""DEQ training step: implicit / phantom backward vs an unrolled weight-tied network.

Architecture (identical everywhere): z = tanh(z W + x U + b), width 256, input 64,
batch 128, a linear head to 10 classes, cross-entropy, one SGD update per step;
||W||_2 = 0.9 at initialization. The forward solve does exactly N plain fixed-point
iterations (tol = 0), N in {10, 30, 100}; the unrolled baseline applies the same cell
N times and trains by ordinary backprop through all N steps.

Methods (TensorFlow, XLA-compiled training steps, float32, CPU):
  ki DEQ implicit/bicgstab `ki.layers.DEQ(..., backward="implicit")` with its default
                           BiCGStab backward
  ki DEQ implicit/gmres    same, GMRES backward
  ki DEQ implicit/neumann  same, Neumann-series backward (fixed-point iteration on
                           the adjoint system, what torchdeq does by default)
  ki DEQ phantom(5)        `backward="phantom"`, 5 damped unrolled steps from z*
  unrolled backprop        the weight-tied network, N layers deep
Peer, when installed: torchdeq (PyTorch CPU, eager), fixed-point iteration forward
(N steps) and implicit backward by fixed-point iteration (same tolerance / budget).

Reported: median training-step time and peak memory (BFC allocator statistics),
and ratios against the unrolled network and against torchdeq.

Both frameworks get the same number of CPU threads (`--threads`, default 1): with
more threads than idle cores PyTorch's spinning workers slow it down many times
(17 ms per torchdeq step on one thread against 54 ms on two threads while another
process used a core).

    python benchmarks/bench_deq.py [--quick] [--threads N]

Writes benchmarks/results/deq.json and deq.md (deq_quick.* with --quick).
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
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf

from keras_implicit import layers

RESULTS = pathlib.Path(__file__).with_name("results")
BACKWARD_TOL = 1e-5
THREADS = {"n": 1}  # CPU threads for both frameworks, set by --threads


class TanhCell(keras.layers.Layer):
    """z -> tanh(z W + x U + b), with the DEQ inject/step protocol."""

    def __init__(self, w, u, **kwargs):
        super().__init__(**kwargs)
        self._w0, self._u0 = w, u

    def build(self, z_shape, x_shape):
        self.w = self.add_weight(shape=self._w0.shape, initializer=lambda *a, **k: self._w0)
        self.u = self.add_weight(shape=self._u0.shape, initializer=lambda *a, **k: self._u0)
        self.b = self.add_weight(shape=(self._w0.shape[0],), initializer="zeros")

    def inject(self, x):
        return tf.matmul(x, self.u) + self.b

    def step(self, z, context):
        return tf.tanh(tf.matmul(z, self.w) + context)

    def call(self, z, x):
        return self.step(z, self.inject(x))


def make_problem(batch, width, features, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(width, width)).astype(np.float32)
    w = 0.9 * w / np.linalg.norm(w, 2)
    u = (rng.normal(size=(features, width)) / np.sqrt(features)).astype(np.float32)
    head = (rng.normal(size=(width, 10)) / np.sqrt(width)).astype(np.float32)
    x = rng.normal(size=(batch, features)).astype(np.float32)
    y = rng.integers(0, 10, size=batch).astype(np.int32)
    return {"w": w, "u": u, "head": head, "x": x, "y": y}


def tf_step(problem, n, method):
    """An XLA-compiled SGD training step for one method."""
    cell = TanhCell(problem["w"], problem["u"])
    head = tf.Variable(problem["head"])
    x, y = tf.constant(problem["x"]), tf.constant(problem["y"])
    if method == "unrolled backprop":
        cell.build((None, problem["w"].shape[0]), x.shape)

        def features():
            context = cell.inject(x)
            z = tf.zeros([x.shape[0], problem["w"].shape[0]])
            for _ in range(n):
                z = cell.step(z, context)
            return z
    else:
        backward, linear = {
            "ki DEQ implicit/bicgstab": ("implicit", "bicgstab"),
            "ki DEQ implicit/gmres": ("implicit", "gmres"),
            "ki DEQ implicit/neumann": ("implicit", "neumann"),
            "ki DEQ phantom(5)": ("phantom", "gmres"),
        }[method]
        deq = layers.DEQ(
            cell,
            state_shape=(problem["w"].shape[0],),
            solver="fixed_point_iteration",
            tol=0.0,
            max_iter=n,
            backward=backward,
            linear_solver=linear,
            backward_tol=BACKWARD_TOL,
            backward_max_iter=max(n, 30),
            phantom_steps=5,
            on_failure="ignore",
            track_stats=False,
        )
        deq.build(x.shape)

        def features():
            return deq(x, training=True)

    variables = [*cell.trainable_variables, head]

    @tf.function(jit_compile=True)
    def step():
        with tf.GradientTape() as tape:
            logits = tf.matmul(features(), head)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            )
        grads = tape.gradient(loss, variables)
        for v, g in zip(variables, grads):
            v.assign_sub(0.01 * g)
        return loss

    return step


def timed(fn, repeats):
    fn()  # compile / warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(fn())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def peak_memory(fn):
    fn()
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    np.asarray(fn())
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def torchdeq_step(problem, n):
    try:
        import torch
        from torchdeq import get_deq
    except ImportError:
        return None
    torch.set_num_threads(THREADS["n"])
    w = torch.nn.Parameter(torch.from_numpy(problem["w"]))
    u = torch.nn.Parameter(torch.from_numpy(problem["u"]))
    b = torch.nn.Parameter(torch.zeros(problem["w"].shape[0]))
    head = torch.nn.Parameter(torch.from_numpy(problem["head"]))
    x = torch.from_numpy(problem["x"])
    y = torch.from_numpy(problem["y"]).long()
    params = [w, u, b, head]
    deq = get_deq(
        f_solver="fixed_point_iter",
        f_max_iter=n,
        f_tol=0.0,
        b_solver="fixed_point_iter",
        b_max_iter=max(n, 30),
        b_tol=BACKWARD_TOL,
        ift=True,
    )

    def step():
        context = x @ u + b
        z0 = torch.zeros(x.shape[0], problem["w"].shape[0])
        z_out, _ = deq(lambda z: torch.tanh(z @ w + context), z0)
        loss = torch.nn.functional.cross_entropy(z_out[-1] @ head, y)
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= 0.01 * p.grad
        return loss.detach().numpy()

    return step


METHODS = (
    "ki DEQ implicit/bicgstab",
    "ki DEQ implicit/gmres",
    "ki DEQ implicit/neumann",
    "ki DEQ phantom(5)",
    "unrolled backprop",
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per framework")
    args = parser.parse_args(argv)
    THREADS["n"] = args.threads
    # before the TF runtime starts (nothing has run yet)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    batch, width, features = (32, 32, 16) if args.quick else (128, 256, 64)
    counts = (10, 30) if args.quick else (10, 30, 100)
    repeats = 3 if args.quick else 10
    problem = make_problem(batch, width, features)
    rows = []
    for n in counts:
        for method in METHODS:
            step = tf_step(problem, n, method)
            ms = timed(step, repeats)
            peak = peak_memory(step)
            rows.append({"method": method, "iterations": n, "step_ms": ms, "peak_bytes": peak})
            print(
                f"N={n:4d} {method:26s} step {ms:8.2f} ms  peak {peak / 2**20:7.2f} MiB", flush=True
            )
        step = torchdeq_step(problem, n)
        if step is not None:
            ms = timed(step, repeats)
            rows.append({"method": "torchdeq", "iterations": n, "step_ms": ms, "peak_bytes": None})
            print(f"N={n:4d} {'torchdeq (eager)':26s} step {ms:8.2f} ms", flush=True)

    def get(method, n, key):
        for row in rows:
            if row["method"] == method and row["iterations"] == n:
                return row[key]
        return None

    ratios = {}
    for n in counts:
        base_ms = get("unrolled backprop", n, "step_ms")
        base_mem = get("unrolled backprop", n, "peak_bytes")
        for method in METHODS[:-1]:
            ratios[f"{method} / unrolled, step time (N={n})"] = get(method, n, "step_ms") / base_ms
            ratios[f"{method} / unrolled, peak memory (N={n})"] = (
                get(method, n, "peak_bytes") / base_mem
            )
        ratios[f"phantom / implicit-gmres, step time (N={n})"] = get(
            "ki DEQ phantom(5)", n, "step_ms"
        ) / get("ki DEQ implicit/gmres", n, "step_ms")
        if get("torchdeq", n, "step_ms"):
            for method in (
                "ki DEQ implicit/bicgstab",
                "ki DEQ implicit/gmres",
                "ki DEQ implicit/neumann",
            ):
                ratios[f"{method} (XLA) / torchdeq, step time (N={n})"] = get(
                    method, n, "step_ms"
                ) / get("torchdeq", n, "step_ms")
    lo, hi = counts[0], counts[-1]
    for method in (*METHODS,):
        ratios[f"{method}: peak memory N={hi} / N={lo}"] = get(method, hi, "peak_bytes") / get(
            method, lo, "peak_bytes"
        )
    print("\nratios:")
    for key, value in ratios.items():
        print(f"  {key}: {value:.2f}")

    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    meta = {
        "batch": batch,
        "width": width,
        "features": features,
        "dtype": "float32",
        "xla": True,
        "backward_tol": BACKWARD_TOL,
        "repeats": repeats,
        "tensorflow": tf.__version__,
        "torch": torch_version,
        "cpu_count": os.cpu_count(),
    }
    (RESULTS / f"deq{suffix}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2)
    )
    lines = [
        f"# DEQ training-step benchmark (batch {batch}, width {width}, float32, CPU)",
        "",
        f"TensorFlow steps are XLA-compiled; torchdeq runs eagerly (PyTorch CPU); "
        f"{THREADS['n']} CPU thread(s) each.",
        "",
        "| method | N | step (ms) | peak memory (MiB) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        peak = "" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.2f}"
        lines.append(f"| {row['method']} | {row['iterations']} | {row['step_ms']:.2f} | {peak} |")
    lines += ["", "| ratio | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    (RESULTS / f"deq{suffix}.md").write_text("\n".join(lines) + "\n")
    return ratios


if __name__ == "__main__":
    main()
