"""Forward solvers: fixed points, roots and minima, batched with per-row convergence.

All solvers act on a packed [B, D] tensor whose rows are independent problems (see
`_structure.Packer`). A row's answer stops changing once it has converged (or produced
a non-finite value), so one hard sample costs iterations but never alters the others.
Loops are `tf.while_loop`s with fixed-shape state, so every solver runs eagerly, in
`tf.function` and under XLA.

Every solver returns, per row, the best iterate it evaluated (the lowest residual) and
that iterate's residual: past the precision of the dtype, iterates wander (Broyden's
rank-one updates of roundoff can throw a row from 1e-8 to 1e-1), so the last iterate
is not the answer. Tracking costs two `tf.where`s per checked iteration and no
evaluation (`FixedPointIteration(check_every=k)` checks every k-th evaluation).

Residual convention (reported in `SolverStats.residual` and compared with `tol`):
for a fixed point z = T(z) it is ||T(z) - z|| / (1 + ||z||) per row, for a root F(y) = 0
it is ||F(y)|| / (1 + ||y||): relative for large iterates, absolute near zero.
"""

from __future__ import annotations

import tensorflow as tf

from keras_implicit import _dense, _validation
from keras_implicit._registry import Registry, Settings, serialize
from keras_implicit._structure import (
    SolverStats,
    broyden_root,
    finite_rows,
    freeze,
    history_combine,
    history_dot,
    history_write,
    keep_best,
    no_residual,
    relative_residual,
    row_norm,
    while_active,
    while_loop,
)


class Solver(Settings):
    """Base class of forward solvers. Subclasses implement `solve_fixed_point`.

    Args:
        tol: residual tolerance per batch element (see module docstring).
        max_iter: maximum number of iterations (evaluations of the map).
    """

    name = "solver"
    _fields = ("tol", "max_iter")

    def __init__(self, tol: float = 1e-5, max_iter: int = 100):
        self.tol = _validation.non_negative_float("tol", tol)
        self.max_iter = _validation.positive_int("max_iter", max_iter)

    def solve_fixed_point(self, fixed_point_map, z0: tf.Tensor):
        """Returns (z, SolverStats) with z ~= fixed_point_map(z), rows independent."""
        raise NotImplementedError

    def solve_root(self, residual_map, y0: tf.Tensor):
        """Returns (y, SolverStats) with residual_map(y) ~= 0.

        Fixed-point solvers iterate y <- y - F(y); this converges when I - dF/dy is a
        contraction (F close to the identity, e.g. F(y) = y - T(y)). Broyden overrides
        this with a quasi-Newton method.
        """
        return self.solve_fixed_point(lambda y: y - residual_map(y), y0)


_REGISTRY = Registry(Solver, "solver")


@_REGISTRY.register("fixed_point", "picard")
class FixedPointIteration(Solver):
    """Damped (Krasnosel'skii-Mann) iteration z <- (1 - damping) z + damping T(z).

    Args:
        damping: in (0, 1]; 1 is plain Picard iteration. Damping below 1 converges for
            nonexpansive (not only contractive) maps.
        check_every: evaluate the residual, keep the best iterate and test convergence
            at every `check_every`-th evaluation (and at the last); the evaluations in
            between are plain steps. 1 checks every iterate. Larger values make the
            loop cost little more than the map itself, at the price of up to
            `check_every - 1` evaluations past convergence and of a best iterate chosen
            among the checked ones.
    """

    name = "fixed_point_iteration"
    _fields = (*Solver._fields, "damping", "check_every")

    def __init__(
        self,
        tol: float = 1e-5,
        max_iter: int = 100,
        damping: float = 1.0,
        check_every: int = 1,
    ):
        super().__init__(tol=tol, max_iter=max_iter)
        self.damping = _validation.float_in_range("damping", damping, 0.0, 1.0, low_open=True)
        self.check_every = _validation.positive_int("check_every", check_every)

    def solve_fixed_point(self, fixed_point_map, z0):
        with tf.name_scope("fixed_point_iteration"):
            dtype = z0.dtype
            batch = tf.shape(z0)[0]
            tol = tf.constant(self.tol, dtype)
            max_iter, every = self.max_iter, self.check_every

            def advance(z, tz):
                return tz if self.damping == 1.0 else z + self.damping * (tz - z)

            def plain_steps(z, count):
                return while_loop(
                    lambda i, z: i < count,
                    lambda i, z: (i + 1, advance(z, fixed_point_map(z))),
                    (tf.constant(0), z),
                    maximum_iterations=every - 1,
                )[1]

            def checked(iteration, active, z, best, residual, iterations):
                # a row leaves when converged or broken (non-finite); rows that left keep
                # iterating in z, but their best iterate is final
                tz = fixed_point_map(z)
                res = relative_residual(tz - z, z)
                residual, best = keep_best(active, res, z, residual, best)
                iterations = tf.where(active, iteration + 1, iterations)
                active = active & (res > tol) & tf.math.is_finite(res)
                return iteration + 1, active, advance(z, tz), best, residual, iterations

            def running(iteration, active, *rest):
                del rest
                return tf.reduce_any(active) & (iteration < max_iter)

            def body(*state):
                state = checked(*state)
                if every == 1:
                    # two evaluations per trip: z is read after T(z) exists (to keep the
                    # best iterate), so with one per trip XLA copies z every evaluation;
                    # with two, the second T(z) is written over the first z's buffer
                    return tf.cond(running(*state), lambda: checked(*state), lambda: state)
                # plain steps up to the next check (the last evaluation is one)
                iteration, active, z = state[:3]
                count = tf.minimum(every - 1, max_iter - 1 - iteration)
                count = tf.where(tf.reduce_any(active), tf.maximum(count, 0), 0)
                z = plain_steps(z, count)
                return (iteration + count, active, z, *state[3:])

            state = (
                tf.constant(0),
                tf.ones([batch], tf.bool),
                z0,
                z0,
                no_residual(batch, dtype),
                tf.zeros([batch], tf.int32),
            )
            _, _, _, z, residual, iterations = while_loop(
                running,
                body,
                state,
                maximum_iterations=max_iter,
            )
            return z, SolverStats(iterations, residual, residual <= tol)


@_REGISTRY.register()
class Anderson(Solver):
    """Anderson acceleration (type II) of the fixed-point iteration.

    Each step mixes the last `memory` iterates with weights alpha that minimize
    ||sum_i alpha_i (T(z_i) - z_i)|| subject to sum_i alpha_i = 1, a small least-squares
    problem solved with a relative Tikhonov `ridge` (Walker & Ni 2011 for the method).

    Args:
        memory: number of past iterates mixed (>= 1; 1 is damped iteration).
        beta: mixing parameter in (0, 1]: z <- beta * sum alpha T(z_i) + (1-beta) * sum alpha z_i.
        ridge: regularization of the least-squares normal equations, relative to
            their largest diagonal entry; keeps the weights bounded when residuals are
            nearly collinear.
    """

    name = "anderson"
    _fields = (*Solver._fields, "memory", "beta", "ridge")

    def __init__(
        self,
        tol: float = 1e-5,
        max_iter: int = 100,
        memory: int = 5,
        beta: float = 1.0,
        ridge: float = 1e-8,
    ):
        super().__init__(tol=tol, max_iter=max_iter)
        self.memory = _validation.positive_int("memory", memory)
        self.beta = _validation.float_in_range("beta", beta, 0.0, 1.0, low_open=True)
        self.ridge = _validation.non_negative_float("ridge", ridge)

    def solve_fixed_point(self, fixed_point_map, z0):
        with tf.name_scope("anderson"):
            dtype = z0.dtype
            batch = tf.shape(z0)[0]
            m = self.memory
            tol = tf.constant(self.tol, dtype)
            history_shape = tf.stack([m, batch, tf.shape(z0)[1]])
            eye = tf.eye(m, dtype=dtype)
            tiny = tf.constant(1e-30 if dtype == tf.float64 else 1e-20, dtype)

            def body(iteration, active, z, best, residual, iterations, fs, gs, gram):
                tz = fixed_point_map(z)
                g = tz - z
                # (T(z_i), g_i = T(z_i) - z_i) go to the circular slot of this iteration;
                # the Gram matrix of the g_i changes in that slot's row and column only
                slot = iteration % m
                fs, gs = history_write(fs, slot, tz), history_write(gs, slot, g)
                products = tf.transpose(history_dot(gs, g))  # [B, m]
                index = tf.range(m)
                gram = tf.where(
                    (index == slot)[None, :, None],
                    products[:, None, :],
                    tf.where((index == slot)[None, None, :], products[:, :, None], gram),
                )
                g_norm = tf.sqrt(tf.maximum(tf.gather(products, slot, axis=1), 0))
                res = g_norm / (1.0 + row_norm(z))
                residual, best = keep_best(active, res, z, residual, best)
                move = active & (res > tol) & tf.math.is_finite(res)

                valid = tf.cast(index <= iteration, dtype)  # filled slots
                scale = tf.reduce_max(tf.linalg.diag_part(gram), axis=-1)
                reg = (self.ridge * scale + tiny)[:, None, None]
                # empty slots get a unit diagonal and a zero right-hand side: alpha = 0
                system = gram + (reg + 1 - valid[:, None] * valid[None, :]) * eye
                weights = _dense.spd_solve(system, tf.broadcast_to(valid, [batch, m]))
                alpha = tf.transpose(weights / tf.reduce_sum(weights, -1, keepdims=True))
                mixed = history_combine(alpha, fs)
                if self.beta != 1.0:  # beta sum alpha T(z_i) + (1 - beta) sum alpha z_i
                    mixed -= (1.0 - self.beta) * history_combine(alpha, gs)
                # a singular mixing step must not poison a row: fall back to T(z) (the
                # filled slots of a moving row are finite, so finite weights suffice)
                mixed = tf.where(finite_rows(tf.transpose(alpha))[:, None], mixed, tz)
                z = freeze(move, mixed, z)
                iterations = iterations + tf.cast(active, tf.int32)
                return iteration + 1, move, z, best, residual, iterations, fs, gs, gram

            state = (
                tf.constant(0),
                tf.ones([batch], tf.bool),
                z0,
                z0,
                no_residual(batch, dtype),
                tf.zeros([batch], tf.int32),
                tf.zeros(history_shape, dtype),
                tf.zeros(history_shape, dtype),
                tf.zeros(tf.stack([batch, m, m]), dtype),
            )
            _, _, _, z, residual, iterations, *_ = while_active(body, state, self.max_iter)
            return z, SolverStats(iterations, residual, residual <= tol)


@_REGISTRY.register()
class Broyden(Solver):
    """Limited-memory Broyden quasi-Newton method (the "good" update).

    For a fixed point it solves z - T(z) = 0; for a root F(y) = 0 directly. Superlinear
    near the solution for smooth maps, and usually many fewer map evaluations than
    plain iteration; the DEQ paper (Bai et al. 2019) uses it as the forward solver.

    Args:
        memory: rank of the inverse-Jacobian correction kept (circular buffer).
    """

    name = "broyden"
    _fields = (*Solver._fields, "memory")

    def __init__(self, tol: float = 1e-5, max_iter: int = 100, memory: int = 20):
        super().__init__(tol=tol, max_iter=max_iter)
        self.memory = _validation.positive_int("memory", memory)

    def solve_fixed_point(self, fixed_point_map, z0):
        return self.solve_root(lambda z: z - fixed_point_map(z), z0)

    def solve_root(self, residual_map, y0):
        with tf.name_scope("broyden"):
            return broyden_root(
                residual_map, y0, tol=self.tol, max_iter=self.max_iter, memory=self.memory
            )


def _lbfgs_start(value_and_gradient, x0, memory, tolerance):
    """TFP's L-BFGS state at x0, as `lbfgs_minimize` builds it before its first step.

    Built here rather than by `lbfgs_minimize(..., max_iterations=0)`, which would trace
    a second copy of TFP's line search (seconds per trace).
    """
    try:
        from tensorflow_probability.python.optimizer.lbfgs import LBfgsOptimizerResults
    except ImportError:  # pragma: no cover - TFP layout changed
        import tensorflow_probability as tfp

        return tfp.optimizer.lbfgs_minimize(
            value_and_gradient,
            initial_position=x0,
            num_correction_pairs=memory,
            tolerance=tolerance,
            max_iterations=0,
        )
    f0, g0 = value_and_gradient(x0)
    tol = tf.constant(tolerance, x0.dtype)
    queue = tf.zeros(tf.concat([[memory], tf.shape(x0)], 0), x0.dtype)
    return LBfgsOptimizerResults(
        converged=tf.math.is_finite(f0) & (tf.reduce_max(tf.abs(g0), axis=-1) < tol),
        failed=tf.zeros_like(f0, dtype=tf.bool),
        num_iterations=tf.constant(0),
        num_objective_evaluations=tf.constant(1),
        position=x0,
        objective_value=f0,
        objective_gradient=g0,
        position_deltas=queue,
        gradient_deltas=queue,
    )


@_REGISTRY.register()
class LBFGS(Solver):
    """L-BFGS minimization through `tfp.optimizer.lbfgs_minimize` (batched over rows).

    Used by `ki.argmin`. Convergence: ||grad f(x)|| / (1 + ||x||) <= tol per row.

    Args:
        memory: number of correction pairs kept.
    """

    name = "lbfgs"
    _fields = (*Solver._fields, "memory")

    def __init__(self, tol: float = 1e-5, max_iter: int = 100, memory: int = 10):
        super().__init__(tol=tol, max_iter=max_iter)
        self.memory = _validation.positive_int("memory", memory)

    def minimize(self, value_and_gradient, x0):
        """value_and_gradient: [B, D] -> ([B], [B, D]). Returns (x, SolverStats)."""
        import tensorflow_probability as tfp

        settings = {
            "num_correction_pairs": self.memory,
            # TFP's test is on the gradient's sup-norm; ours (checked afterwards) is
            # the scaled 2-norm, so ask TFP for a little more than we need.
            "tolerance": self.tol / 10.0,
            "x_tolerance": 0.0,
            "f_relative_tolerance": 0.0,
        }

        def advance(previous, iterations):
            return tfp.optimizer.lbfgs_minimize(
                value_and_gradient,
                initial_position=None,
                previous_optimizer_results=previous,
                max_iterations=iterations,
                **settings,
            )

        with tf.name_scope("lbfgs"):
            dtype = x0.dtype
            batch = tf.shape(x0)[0]
            # TFP keeps only its last position, so its loop is resumed one iteration at
            # a time (no re-evaluation: the state carries value and gradient) and the
            # best position per row is kept here.
            start = _lbfgs_start(value_and_gradient, x0, self.memory, settings["tolerance"])
            res0 = relative_residual(start.objective_gradient, x0)
            best_res0 = tf.where(tf.math.is_finite(res0), res0, no_residual(batch, dtype))

            def cond(results, best, residual):
                del best, residual
                running = tf.logical_not(tf.reduce_all(results.converged | results.failed))
                return tf.logical_and(running, results.num_iterations < self.max_iter)

            def body(results, best, residual):
                results = advance(results, results.num_iterations + 1)
                res = relative_residual(results.objective_gradient, results.position)
                residual, best = keep_best(
                    tf.ones([batch], tf.bool), res, results.position, residual, best
                )
                return results, best, residual

            results, x, residual = while_loop(cond, body, (start, x0, best_res0))
            iterations = tf.fill([batch], tf.cast(results.num_iterations, tf.int32))
            return x, SolverStats(iterations, residual, residual <= tf.constant(self.tol, dtype))

    def solve_root(self, residual_map, y0):
        raise ValueError(
            "LBFGS minimizes a function; it cannot solve a general root or fixed-point "
            "problem. Use solver='broyden' or 'anderson' there."
        )

    solve_fixed_point = solve_root


def get(identifier, **options) -> Solver:
    """Returns a forward solver from a name, a config dict or a `Solver` instance.

    Keyword `options` (e.g. tol=, max_iter=) are passed to the constructor of a named
    solver, or replace the matching settings of a given instance (None is ignored).
    """
    return _REGISTRY.get(identifier, options)


__all__ = [
    "LBFGS",
    "Anderson",
    "Broyden",
    "FixedPointIteration",
    "Solver",
    "SolverStats",
    "broyden_root",
    "get",
    "serialize",
]
