"""When the invertibility condition fails: a small, fully explained pathology.

The nonsmooth implicit function theorem (Bolte, Le, Pauwels, Silveti-Falls 2021)
gives a valid gradient of a fixed point z*(theta) only if *every* element of the
conservative Jacobian of the residual at the solution is invertible. Backpropagation
returns one element; here it returns a singular one.

The map. r(z) = relu(z) - relu(-z) is exactly the identity, but backpropagation
differentiates relu at 0 as 0 (TensorFlow's choice), so it reports r'(0) = 0, a
legitimate element of a conservative Jacobian of r, though not of its Clarke
Jacobian {1}. The fixed-point map

    T(z, theta) = z - r(z) + theta          (mathematically: T = theta, constant in z)

has the unique fixed point z* = theta and true Jacobian dT/dz = 0. Backpropagation
says dT/dz = 1 - r'(z) = 1 at z = 0, so the implicit system (1 - J) u = g reads 0 = g.
Zero initialization, theta = 0, lands exactly there.

Training theta on L = (z*(theta) - 1)^2 / 2 (true gradient theta - 1):
  * implicit gradient with GMRES: the system has no solution, the solver makes no
    progress and returns u = 0, so gradient descent stalls at theta = 0, which is not a
    critical point. keras_implicit warns (on_failure="warn"); with "ignore" the stall is
    silent, which is why that policy is not the default.
  * Neumann backward: u = sum_k J^k g = K g diverges with the number of terms K, so the
    first step explodes.
  * ki.diagnostics.check_invertibility flags the problem at the initial point, before
    any training step.
  * Remedy 1, a different Jacobian selection: relu'(0) := 1/2 makes r'(0) = 1, the
    Clarke value; training converges. Trade-off: it needs the op rewritten with a custom
    gradient, knowing where its kinks are.
  * Remedy 2, random initialization: the bad set {theta = 0} has measure zero, and the
    paper's convergence result for (S)GD with conservative Jacobians holds for almost
    every initialization. Trade-off: "almost surely" only; a deterministic zero init, or a
    parametrization that maps a region onto the kink, is not covered.

    python examples/paper/pathological.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

import keras_implicit as ki


def identity_by_relus(z):
    """relu(z) - relu(-z): the identity, with backprop derivative 0 at z = 0."""
    return tf.nn.relu(z) - tf.nn.relu(-z)


@tf.custom_gradient
def relu_half_at_kink(z):
    """relu with derivative 1/2 at 0 (the midpoint of its Clarke subdifferential)."""

    def grad(upstream):
        slope = tf.where(z > 0, 1.0, tf.where(z < 0, 0.0, 0.5))
        return upstream * tf.cast(slope, z.dtype)

    return tf.nn.relu(z), grad


def identity_by_relus_clarke(z):
    return relu_half_at_kink(z) - relu_half_at_kink(-z)


def make_map(identity):
    def fixed_point_map(z, theta):
        return z - identity(z) + theta

    return fixed_point_map


def train(fixed_point_map, theta0, *, steps, learning_rate, linear_solver):
    """Gradient descent on L = (z* - 1)^2 / 2 with implicit gradients. Returns the path."""
    theta = tf.Variable([theta0], dtype=tf.float64)
    path = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            z = ki.fixed_point(
                fixed_point_map,
                tf.zeros([1], tf.float64),
                theta,
                tol=1e-12,
                max_iter=50,
                linear_solver=linear_solver,
                backward_max_iter=50,
                on_failure="ignore",
            )
            loss = 0.5 * tf.reduce_sum((z - 1.0) ** 2)
        grad = tape.gradient(loss, theta)
        path.append((float(theta[0]), float(loss), float(grad[0])))
        theta.assign_sub(learning_rate * grad)
    return np.array(path)  # columns: theta, loss, implicit gradient


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (CI)")
    parser.add_argument("--out", default="examples/output", help="where the figure goes")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = 12 if args.quick else 40
    rate = 0.5
    naive = make_map(identity_by_relus)

    # Diagnostics first: at the zero initialization the implicit system is singular.
    theta0 = tf.constant([0.0], tf.float64)
    z0 = ki.fixed_point(naive, tf.zeros([1], tf.float64), theta0, tol=1e-12)
    report = ki.diagnostics.check_invertibility(naive, z0, theta0)
    healthy = ki.diagnostics.check_invertibility(
        naive, tf.constant([0.3], tf.float64), tf.constant([0.3], tf.float64)
    )
    print(
        f"at theta = 0:   invertible={report.invertible}, "
        f"sigma_min={report.smallest_singular_value:.3g}, "
        f"spectral radius of J={report.spectral_radius:.3g}"
    )
    print(
        f"at theta = 0.3: invertible={healthy.invertible}, "
        f"sigma_min={healthy.smallest_singular_value:.3g}"
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ki.ConvergenceWarning)
        rng = np.random.default_rng(0)
        runs = {
            "implicit, GMRES (stalls)": train(
                naive, 0.0, steps=steps, learning_rate=rate, linear_solver="gmres"
            ),
            "implicit, Neumann (explodes)": train(
                naive, 0.0, steps=steps, learning_rate=rate, linear_solver="neumann"
            ),
            "remedy: relu'(0) = 1/2": train(
                make_map(identity_by_relus_clarke),
                0.0,
                steps=steps,
                learning_rate=rate,
                linear_solver="gmres",
            ),
            "remedy: random init": train(
                naive,
                float(rng.normal(scale=0.1)),
                steps=steps,
                learning_rate=rate,
                linear_solver="gmres",
            ),
        }
    # a stall must be told apart from convergence: the true gradient there is theta - 1
    print(f"\n{'run':32s}{'final theta':>12s}{'final loss':>12s}{'true grad':>12s}")
    summary = {}
    for name, path in runs.items():
        theta, loss = path[-1, 0], path[-1, 1]
        summary[name] = {
            "theta": theta,
            "loss": loss,
            "true_gradient": theta - 1.0,
            "max_abs_step": float(np.abs(np.diff(path[:, 0])).max()),
        }
        print(f"{name:32s}{theta:12.4f}{loss:12.4g}{theta - 1.0:12.4f}")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, path in runs.items():
        ax1.plot(path[:, 0], marker=".", label=name)
        ax2.semilogy(np.maximum(path[:, 1], 1e-16), marker=".", label=name)
    ax1.axhline(1.0, color="0.6", linestyle="--", linewidth=1)
    ax1.set(
        title="theta along gradient descent (optimum: theta = 1)",
        xlabel="step",
        ylabel="theta",
        ylim=(-2, 30),
    )
    ax2.set(title="loss (z* - 1)^2 / 2", xlabel="step")
    ax1.legend(fontsize=8)
    fig.suptitle(
        "Singular implicit system at the zero initialization: "
        f"check_invertibility -> invertible={report.invertible}"
    )
    fig.tight_layout()
    figure = out / "pathological.png"
    fig.savefig(figure, dpi=110)
    print(f"figure: {figure}")
    return {"report": report, "healthy": healthy, "runs": summary}


if __name__ == "__main__":
    main()
