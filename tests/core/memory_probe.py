"""Peak memory of forward+backward, run as a subprocess by test_core_memory.py.

CPU allocator statistics exist only with the BFC allocator, which must be chosen
before TensorFlow starts; hence a separate process. Prints one JSON object.
"""

import json
import os
import sys

os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

import keras_implicit as ki

# one op at a time: concurrent op scheduling makes peaks vary from run to run
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)

# large enough that the allocator's ~1 MiB of bookkeeping jitter is noise
BATCH, WIDTH = 256, 256


def make_problem():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(WIDTH, WIDTH)).astype(np.float32)
    w_var = tf.Variable(0.9 * w / np.linalg.norm(w, 2))
    x = tf.constant(rng.normal(size=(BATCH, WIDTH)).astype(np.float32))
    return w_var, x


def implicit_step(w_var, x, iterations):
    def cell(z, x):
        return tf.tanh(z @ w_var + x)

    with tf.GradientTape() as tape:
        # tol=0: every one of the `iterations` forward steps runs
        z = ki.fixed_point(
            cell,
            tf.zeros_like(x),
            x,
            batch_dims=1,
            solver="fixed_point_iteration",
            tol=0.0,
            max_iter=iterations,
            linear_solver="gmres",
            backward_max_iter=30,
            on_failure="ignore",
        )
        loss = tf.reduce_sum(z**2)
    return tape.gradient(loss, w_var)


def unrolled_step(w_var, x, iterations):
    with tf.GradientTape() as tape:
        z = tf.zeros_like(x)
        for _ in range(iterations):
            z = tf.tanh(z @ w_var + x)
        loss = tf.reduce_sum(z**2)
    return tape.gradient(loss, w_var)


def peak_bytes(step, w_var, x, iterations):
    step(w_var, x, iterations)  # trace / warm up
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    step(w_var, x, iterations).numpy()
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def main(iteration_counts):
    w_var, x = make_problem()
    result = {}
    for name, step in [
        ("implicit_function", tf.function(implicit_step)),
        ("implicit_eager", implicit_step),
        ("unrolled_function", tf.function(unrolled_step)),
    ]:
        result[name] = {n: peak_bytes(step, w_var, x, n) for n in iteration_counts}
    print(json.dumps(result))


if __name__ == "__main__":
    main([int(n) for n in sys.argv[1:]] or [10, 100])
