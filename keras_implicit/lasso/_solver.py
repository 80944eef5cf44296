"""Working-set drivers around the XLA coordinate-descent kernel of ``_kernels.py``.

Each outer iteration makes one pass over the full data (``X^T r``), computes the
global duality gap, keeps the current support plus the features that violate the
optimality conditions the most (score ``|X_j^T r / n - l2 b_j| / alpha_j``, as in
celer / skglm) and solves the problem restricted to that working set: XLA runs the
coordinate-descent epochs, the host does the bookkeeping between calls (duality gap,
Anderson extrapolation, feature-sign steps that solve the support's linear system once
the signs settle; for the logistic loss the proximal-Newton Hessian and line search).
Working sets are padded to widths 64 * 4^k, at least 1024 once p > 256, so that XLA
compiles one shape per search in most cases (each costs ~0.3 s). The Gram block of the
last working set is cached on the design (``Design.gram_cache``): warm starts along a
hyperparameter search share most of it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.linalg
import tensorflow as tf

from keras_implicit.lasso import _kernels
from keras_implicit.lasso._data import DTYPE, Design, overflow_error

MIN_WS_SIZE = 64
MAX_UNCAPPED_WS = 1024  # see _working_set
# Narrowest compiled width once p > 256. The epoch kernel skips the padded tail, so a
# 64-column working set in a 1024 width costs ~0.3 ms more per block, while every
# extra width costs 0.3-0.5 s of XLA compilation: a search on p >= 1024 features
# compiles a single width unless a working set outgrows 1024 columns.
FIRST_WIDTH = 1024
# Relative tolerances below this are raised to it: duality gaps computed in float64
# carry rounding of ~1e-16..1e-14 of the objective, so smaller tolerances are never
# met and a solve runs to max_iter (e.g. 100 outer iterations at tol=1e-15 on a
# correlated 80 x 300 design).
TOL_FLOOR = 10.0 * float(np.finfo(np.float64).eps)
SUBPROBLEM_GAP_FRACTION = 0.3  # solve working sets to this fraction of the global gap
MAX_EPOCHS = 20_000
EXACT_PRODUCT_EVERY = 20  # see solve_gram_problem
MAX_NEWTON = 100
MAX_SIGN_STEPS = 8  # feature-sign steps per CD block, see _sign_pattern_descent
# Feature-sign steps cost |S|^3 / 3 flops (Cholesky) each, CD epochs size * width
# coordinate updates; an update costs about 5 flops of a Cholesky factorization (an
# epoch of 800 coordinates at width 1024 takes 0.3 ms, a 420-column Cholesky 1.1-2.6
# ms). The steps may spend as much as the epochs did: near |S| ~ n (the smallest
# penalties) an unrationed step costs more than the tens of epochs it saves.
CD_UPDATE_COST = 5.0
SIGN_STEP_SHARE = 1.0

_compiled = {}

_MATRIX = tf.TensorSpec([None, None], DTYPE)
_VECTOR = tf.TensorSpec([None], DTYPE)
_SCALAR = tf.TensorSpec([], DTYPE)
_INT = tf.TensorSpec([], tf.int32)


def cd_epochs_xla():
    """The ``jit_compile=True`` version of ``_kernels.cd_epochs`` (built once).

    ``autograph=False`` everywhere: the kernels use explicit ``tf.while_loop`` and
    AutoGraph's source conversion was measured to cost seconds of cold-start time."""
    if "cd_epochs" not in _compiled:
        _compiled["cd_epochs"] = tf.function(_kernels.cd_epochs, jit_compile=True, autograph=False)
    return _compiled["cd_epochs"]


def cd_epoch_xla():
    """The ``jit_compile=True`` version of ``_kernels.cd_epoch``, as a concrete function.

    Traced once for unknown sizes; XLA still compiles it once per padded width. The
    driver calls it once per epoch, so it returns the concrete function: calling it
    skips the polymorphic function's argument binding and signature matching, 0.28 of
    the 0.61 ms a call takes at width 1024."""
    if "cd_epoch" not in _compiled:
        _compiled["cd_epoch"] = tf.function(
            _kernels.cd_epoch,
            input_signature=[_MATRIX, _VECTOR, _VECTOR, _VECTOR, _VECTOR, _INT, _SCALAR],
            jit_compile=True,
            autograph=False,
        ).get_concrete_function()
    return _compiled["cd_epoch"]


_SIGNATURES = {
    # A, y, mask, n, alphas, beta, tol, max_newton
    "logistic_prox_newton": [_MATRIX, _VECTOR, _VECTOR, _SCALAR, _VECTOR, _VECTOR, _SCALAR, _INT],
}


def _graph_solver(name):
    """``_kernels.<name>`` as one shape-polymorphic graph whose CD epochs are XLA.

    The bookkeeping graph is traced once per process (input signature with unknown
    sizes); only the small epoch kernel is compiled again for each bucket width.
    """
    if name not in _compiled:
        kernel = getattr(_kernels, name)

        def solver(*args):
            return kernel(*args, epochs_fn=cd_epochs_xla())

        _compiled[name] = tf.function(solver, input_signature=_SIGNATURES[name], autograph=False)
    return _compiled[name]


def bucket(size: int, minimum: int = MIN_WS_SIZE) -> int:
    """Smallest ``minimum * 4^k >= size``: few distinct XLA shapes.

    Every new width costs an XLA compilation (0.3-1 s on a small CPU) while padded
    coordinates cost ~0.2 us per epoch, so widths grow by 4x rather than 2x.
    """
    width = minimum
    while width < size:
        width *= 4
    return width


@dataclasses.dataclass
class Solution:
    """What a working-set solve returns."""

    coef: np.ndarray
    intercept: float
    gap: float
    tol: float
    converged: bool
    n_iter: int
    n_epochs: int
    primal: float


def _working_set(scores: np.ndarray, support: np.ndarray, previous: int) -> np.ndarray:
    """Support plus the most violating features, sorted.

    ``scores > 1`` marks the features that violate the optimality conditions. The size
    is at least twice the support (celer's rule), and makes room for every violator up
    to four times the support (and the cap below): after a warm start at a much
    smaller penalty the support grows by hundreds of features, which doubling alone
    finds over 4 outer iterations and this rule over 2-3 (see benchmarks/RESULTS.md).
    From an empty support every feature above the penalty violates; the working set
    then starts at 64 columns and doubles, so that the first solves of a search do not
    build a 1024-column Gram block several times wider than the support they find.
    """
    p = scores.shape[0]
    n_support = int(support.sum())
    violators = int(np.count_nonzero((scores > 1.0) & ~support))
    size = max(MIN_WS_SIZE, 2 * n_support, previous, min(n_support + violators, 4 * n_support))
    # Doubling a support just above a bucket width would jump to a 4x wider bucket
    # (e.g. |S| = 516 -> 4096 columns: a new XLA shape and a 16x larger Gram block).
    # Above MAX_UNCAPPED_WS, stay in the bucket that holds the support with 25%
    # headroom (below it the doubling rule needs fewer working-set iterations).
    size = min(size, max(MAX_UNCAPPED_WS, bucket(n_support + n_support // 4 + 1)))
    size = min(p, max(size, n_support))
    if size >= p:
        return np.arange(p)
    ranked = np.where(support, np.inf, scores)
    chosen = np.argpartition(-ranked, size - 1)[:size]
    return np.sort(chosen)


class _GramCache:
    """Gram block ``Xc_W^T Xc_W / n`` of the last working set of a design."""

    def __init__(self):
        self.index = np.zeros(0, dtype=np.int64)
        self.gram = np.zeros((0, 0))

    def block(self, design: Design, index: np.ndarray) -> np.ndarray:
        positions = np.searchsorted(self.index, index)
        positions = np.minimum(positions, max(self.index.size - 1, 0))
        known_mask = (
            self.index[positions] == index if self.index.size else np.zeros(index.size, bool)
        )
        if known_mask.all() and index.size == self.index.size:
            return self.gram  # same working set as last time
        known, new = index[known_mask], index[~known_mask]
        pos = positions[known_mask]
        # Assemble in [known | new] order with contiguous slices, then permute to the
        # sorted order with two takes: masked 2-D assignments (np.ix_) cost ~5x more.
        m = known.size
        combined = np.empty((index.size, index.size))
        combined[:m, :m] = self.gram.take(pos, axis=0).take(pos, axis=1)
        if new.size:
            assembled = np.concatenate([known, new])
            # One product gives the new columns against [known | new].
            products = design.cross_gram(assembled, new) / design.n
            combined[:, m:] = products
            combined[m:, :m] = products[:m].T
            order = np.argsort(assembled, kind="stable")
            out = combined.take(order, axis=0).take(order, axis=1)
        else:
            out = combined
        self.index, self.gram = index, out
        return out


def cached_gram(design: Design, index: np.ndarray):
    """``Xc_S^T Xc_S / n`` from the design's cached block if it covers ``index``."""
    cache = design.gram_cache
    if cache is None or cache.index.size == 0:
        return None
    positions = np.minimum(np.searchsorted(cache.index, index), cache.index.size - 1)
    if not np.all(cache.index[positions] == index):
        return None
    return cache.gram[np.ix_(positions, positions)]


def gram_block(design: Design, index: np.ndarray) -> np.ndarray:
    """``Xc_W^T Xc_W / n`` for sorted ``index``, reusing the design's cached block."""
    if design.gram_cache is None:
        design.gram_cache = _GramCache()
    cache = design.gram_cache
    return cache.block(design, np.asarray(index, dtype=np.int64))


def _sub_tolerance(gap: float, tol_abs: float) -> float:
    return max(SUBPROBLEM_GAP_FRACTION * min(gap, 10.0 * tol_abs), 0.3 * tol_abs)


def _padded(vector, width, fill=0.0):
    out = np.full(width, fill)
    out[: vector.shape[0]] = vector
    return out


# ---------------------------------------------------------------------------------
# Squared loss (Lasso, elastic net, weighted Lasso)
# ---------------------------------------------------------------------------------
def solve_gram_problem(H, c, beta, alphas, yy, l2, tol, max_epochs, width=None, positive=False):
    """CD + Anderson on ``1/2 b^T H b - c^T b + sum alphas |b|`` (numpy in and out).

    XLA runs the epochs (``_kernels.cd_epoch``) on the problem zero-padded to
    ``width`` (default ``bucket(size)``); after each block of ``ANDERSON_MEMORY``
    epochs the extrapolation, its safeguard and the gap are computed on the host from
    the iterates and gradients the kernel returns, with no full product by H: on this
    shared 2-core CPU a multi-threaded (W, W) matrix-vector product costs 1-3 ms under
    load, more than a CD block. A traced graph for this loop (the ``cd_quadratic``
    route) costs ~0.5 s of tracing per process, more than a whole warm search.

    When the signs held over a block's last epoch, a feature-sign step
    (``_sign_pattern_descent``) moves to the minimizer for that sign pattern: one
    Cholesky solve on the support replaces the tens of epochs CD needs to converge
    there, and the solves end exact to rounding (gaps ~1e-13, far below the tolerance).

    The gradients carried from block to block accumulate rounding, so ``H beta`` is
    recomputed exactly every ``EXACT_PRODUCT_EVERY`` blocks and before the gap is
    trusted for stopping.

    ``positive`` constrains the coefficients to ``b >= 0`` (the epochs clip at zero
    and extrapolated points with a negative entry are rejected).

    Returns numpy ``(beta, gap, epochs)``.
    """
    size = int(H.shape[0])
    width = bucket(size) if width is None else int(width)
    padded = np.zeros((width, width))
    padded[:size, :size] = H
    H_tf = tf.constant(padded)  # ~3x faster than tf.pad of the (size, size) block
    diag = np.diagonal(H)
    inv_diag = np.zeros(width)
    inv_diag[:size] = np.where(diag > 0, 1.0 / np.where(diag > 0, diag, 1.0), 0.0)
    inv_diag_tf = tf.constant(inv_diag)
    alphas_tf = tf.constant(_padded(alphas, width, 1.0))
    size_tf = tf.constant(size, tf.int32)
    lower_tf = tf.constant(0.0 if positive else -np.inf, DTYPE)
    kernel = cd_epoch_xla()

    def gap_of(hb, beta):
        return float(_kernels.gram_gap_from_product(hb, c, beta, alphas, yy, l2, positive=positive))

    def exact_product(beta):
        return tf.linalg.matvec(H_tf, tf.constant(_padded(beta, width))).numpy()[:size]

    def objective(beta, hb):
        return 0.5 * np.sum(beta * hb) - np.sum(beta * c) + np.sum(np.abs(beta) * alphas)

    beta = np.array(beta, dtype=np.float64)
    hb = exact_product(beta)
    gap = gap_of(hb, beta)
    epochs = blocks = 0
    sign_budget = 0.0  # flops the feature-sign steps may still spend (see CD_UPDATE_COST)
    exact = True
    while epochs < max_epochs and not np.isnan(gap):  # NaN: the caller reports it
        if gap <= tol:
            if exact:
                break
            hb, exact = exact_product(beta), True
            gap = gap_of(hb, beta)
            continue
        rows, grads = [beta], [hb - c]
        beta_tf = tf.constant(_padded(beta, width))
        grad_tf = tf.constant(_padded(hb - c, width))
        for _ in range(_kernels.ANDERSON_MEMORY):
            beta_tf, grad_tf = kernel(
                H_tf, grad_tf, beta_tf, alphas_tf, inv_diag_tf, size_tf, lower_tf
            )
            rows.append(beta_tf.numpy()[:size])
            grads.append(grad_tf.numpy()[:size])
        rows, grads = np.array(rows), np.array(grads)
        epochs += _kernels.ANDERSON_MEMORY
        blocks += 1
        sign_budget += SIGN_STEP_SHARE * CD_UPDATE_COST * _kernels.ANDERSON_MEMORY * size * width
        beta, hb = rows[-1], grads[-1] + c
        try:
            # At extreme scales the extrapolation system may overflow; the objective
            # test below then rejects the (non-finite) extrapolated point.
            with np.errstate(over="ignore", invalid="ignore"):
                weights, ok = _kernels.anderson_weights(rows)
        except np.linalg.LinAlgError:
            ok = False
        if ok:
            # The extrapolation is affine (weights sum to 1): so is its gradient.
            extrapolated = np.sum(weights[:, None] * rows[1:], axis=0)
            extrapolated_hb = np.sum(weights[:, None] * grads[1:], axis=0) + c
            # Keep the extrapolated point only if it is feasible and lowers the
            # objective (a NaN does not).
            feasible = not positive or np.all(extrapolated >= 0)
            if feasible and objective(extrapolated, extrapolated_hb) < objective(beta, hb):
                beta, hb = extrapolated, extrapolated_hb
        exact = False
        n_support = np.count_nonzero(beta)
        step_cost = n_support**3 / 3.0 + 2.0 * size * n_support
        affordable = min(MAX_SIGN_STEPS, int(sign_budget // max(step_cost, 1.0)))
        if affordable and np.array_equal(np.sign(beta), np.sign(rows[-2])):
            # The signs held over the last epoch: jump to the point they determine.
            *candidate, steps = _sign_pattern_descent(H, c, alphas, beta, hb, affordable)
            sign_budget -= steps * step_cost
            if objective(*candidate) < objective(beta, hb):
                beta, hb = candidate
        if blocks % EXACT_PRODUCT_EVERY == 0:
            hb, exact = exact_product(beta), True
        gap = gap_of(hb, beta)
    return beta, gap, epochs


def _sign_pattern_descent(H, c, alphas, beta, hb, max_steps=MAX_SIGN_STEPS):
    """Feature-sign descent from ``beta``: the support's linear system, safeguarded.

    With the signs ``s`` of the solution known, the optimality conditions on the
    support S are the linear system ``H_SS b_S = c_S - alphas_S s_S``. Coordinate
    descent identifies the signs long before its iterates converge, so a Cholesky
    solve (|S|^3 / 3 flops, ~2 ms at |S| = 400) replaces tens of epochs. Where the
    solution of that system flips some signs, the step goes along the segment to it
    and stops at the zero crossing (or the end) of lowest objective, dropping the
    crossed coordinates, and repeats: every step lowers the objective (the objective
    is the signed quadratic up to the first crossing, decreasing towards the end).
    Coordinates outside the support are left to the next epochs.

    Returns ``(beta, hb, steps)`` with the number of factorizations made; ``beta`` is
    unchanged when the support is empty or ``H_SS`` is not numerically positive
    definite.
    """
    beta = beta.copy()
    steps_made = 0
    for _ in range(max_steps):
        support = np.flatnonzero(beta)
        if support.size == 0:
            break
        current = beta[support]
        signs = np.sign(current)
        columns = H.take(support, axis=1)  # for the update of hb below
        block = columns[support]
        steps_made += 1
        try:
            factor = scipy.linalg.cho_factor(block, check_finite=False)
        except np.linalg.LinAlgError:
            break
        target = scipy.linalg.cho_solve(factor, c[support] - alphas[support] * signs)
        if not np.all(np.isfinite(target)):
            break
        direction = target - current
        crossed = target * signs <= 0
        with np.errstate(divide="ignore", invalid="ignore"):
            crossings = np.where(crossed, -current / direction, np.inf)
        steps = np.unique(np.append(crossings[crossed], 1.0))
        steps = steps[(steps > 0) & (steps <= 1)]
        # Objective along the segment: quadratic part in closed form, l1 part pointwise.
        slope = direction @ (hb[support] - c[support])
        curvature = direction @ (block @ direction)
        points = current[None, :] + steps[:, None] * direction[None, :]
        values = steps * slope + 0.5 * steps**2 * curvature + np.abs(points) @ alphas[support]
        best = int(np.argmin(values))
        if values[best] >= np.abs(current) @ alphas[support]:
            break  # no descent left in this sign pattern (rounding)
        step = steps[best]
        new = points[best]
        new[crossings <= step] = 0.0  # exact zeros where the segment crossed
        beta[support] = new
        hb = hb + columns @ (new - current)
        if not crossed.any() or step == 1.0:
            break
    return beta, hb, steps_made


def _residual(design: Design, y_tf, beta: np.ndarray):
    support = np.flatnonzero(beta)
    if support.size == 0:
        return y_tf
    if support.size < design.p // 4:
        rows = design.columns_as_rows(support)
        return y_tf - tf.linalg.matvec(rows, tf.constant(beta[support]), transpose_a=True)
    return y_tf - design.matvec(tf.constant(beta))


def solve_quadratic(
    design: Design,
    y: np.ndarray,
    alphas: np.ndarray,
    l2: float,
    coef0: np.ndarray | None,
    tol: float,
    max_iter: int,
    max_epochs: int = MAX_EPOCHS,
    positive: bool = False,
) -> Solution:
    """Minimizes ``1/(2n)||y - Xc b||^2 + sum alphas_j |b_j| + l2/2 ||b||^2``.

    ``y`` must already be centered when ``design`` is (intercept handled by the caller).
    ``tol`` is relative: stop when the gap <= ``tol * ||y||^2 / n`` (scikit-learn's rule;
    ``tol`` is floored at ``TOL_FLOOR``). ``positive`` adds the constraint ``b >= 0``.
    """
    n, p = design.n, design.p
    y_tf = tf.constant(y, dtype=DTYPE)
    with np.errstate(over="ignore"):
        yy = float(y @ y) / n
    if not np.isfinite(yy):
        raise overflow_error("||y - mean(y)||^2", design, y)
    tol_abs = max(tol, TOL_FLOOR) * yy
    beta = np.zeros(p) if coef0 is None else np.array(coef0, dtype=np.float64)
    if positive:
        beta = np.maximum(beta, 0.0)
    xty = None
    ws_size, epochs, gap, primal = 0, 0, np.inf, np.inf
    converged = False
    it = 0
    for it in range(max_iter + 1):
        r = _residual(design, y_tf, beta)
        xtr = design.rmatvec(r).numpy() / n
        rr = float(tf.tensordot(r, r, 1)) / n
        yr = float(tf.tensordot(y_tf, r, 1)) / n
        gap, primal = (
            float(v)
            for v in _kernels.quadratic_gap(xtr, yr, rr, beta, alphas, l2, positive=positive)
        )
        # An overflow would otherwise pass as convergence: an infinite X^T r only
        # shrinks the dual scaling (gap = primal), a NaN gap never meets the tolerance.
        if not (np.isfinite(gap) and np.isfinite(primal) and np.all(np.isfinite(xtr))):
            raise overflow_error("X^T r / n or the duality gap", design, y)
        if gap <= tol_abs:
            converged = True
            break
        if it == max_iter:
            break
        corr = xtr - l2 * beta
        scores = (np.maximum(corr, 0.0) if positive else np.abs(corr)) / alphas
        index = _working_set(scores, beta != 0, ws_size)
        ws_size = index.size
        if xty is None:
            xty = design.rmatvec(y_tf).numpy() / n
        H = gram_block(design, index)
        # The diagonal bounds the block (|H_ij| <= sqrt(H_ii H_jj)): an O(|W|) check.
        if not np.all(np.isfinite(np.diagonal(H))):
            raise overflow_error("a Gram block X_W^T X_W / n", design, y)
        if l2:
            H = H + l2 * np.eye(index.size)
        sub_beta, _, sub_epochs = solve_gram_problem(
            H,
            xty[index],
            beta[index],
            alphas[index],
            yy,
            l2,
            _sub_tolerance(gap, tol_abs),
            max_epochs,
            width=bucket(index.size, minimum=min(FIRST_WIDTH, bucket(p))),
            positive=positive,
        )
        if not np.all(np.isfinite(sub_beta)):
            raise overflow_error("a coordinate-descent iterate", design, y)
        epochs += sub_epochs
        beta[index] = sub_beta
    return Solution(beta, 0.0, gap, tol_abs, converged, it, epochs, primal)


# ---------------------------------------------------------------------------------
# Logistic loss
# ---------------------------------------------------------------------------------
def solve_logistic_block(A, y, alphas, beta, tol, max_newton, weights=None):
    """Proximal Newton on a dense block ``A`` (padded columns zero); ``weights``
    (default ones) weight the samples' losses."""
    n = A.shape[0]
    beta, gap, steps = _graph_solver("logistic_prox_newton")(
        tf.constant(A),
        tf.constant(y),
        tf.ones([n], DTYPE) if weights is None else tf.constant(weights, DTYPE),
        tf.constant(float(n), DTYPE),
        tf.constant(alphas),
        tf.constant(beta),
        tf.constant(tol, DTYPE),
        tf.constant(max_newton, tf.int32),
    )
    return beta.numpy(), float(gap), int(steps)


def solve_logistic(
    design: Design,
    y_pm: np.ndarray,
    alphas: np.ndarray,
    fit_intercept: bool,
    coef0: np.ndarray | None,
    intercept0: float,
    tol: float,
    max_iter: int,
    max_newton: int = MAX_NEWTON,
    sample_weight: np.ndarray | None = None,
) -> Solution:
    """Minimizes ``1/n sum w_i log(1 + exp(-y_i (x_i^T b + b0))) + sum alphas_j |b_j|``.

    ``sample_weight`` gives ``w`` (default ones). ``tol`` is relative to the objective
    at zero for unit weights (``log 2``): stop when gap <= tol log 2.
    """
    n, p = design.n, design.p
    y_tf = tf.constant(y_pm, dtype=DTYPE)
    tol_abs = max(tol, TOL_FLOOR) * np.log(2.0)
    beta = np.zeros(p) if coef0 is None else np.array(coef0, dtype=np.float64)
    b0 = float(intercept0) if fit_intercept else 0.0
    w = np.ones(n) if sample_weight is None else sample_weight
    w_tf = tf.constant(w, DTYPE)
    ws_size, steps, gap, primal = 0, 0, np.inf, np.inf
    converged = False
    it = 0
    for it in range(max_iter + 1):
        z = design.matvec(tf.constant(beta)) + b0
        prob = tf.math.sigmoid(-y_tf * z)
        xtr = design.rmatvec(w_tf * y_tf * prob).numpy() / n
        z_np, prob_np = z.numpy(), prob.numpy()
        gap, primal = (float(v) for v in _kernels.logistic_gap(xtr, z_np, y_pm, w, n, alphas, beta))
        if fit_intercept:
            g0 = float((w * y_pm) @ prob_np) / n
            h0 = float(np.sum(w * prob_np * (1.0 - prob_np))) / n
            gap += g0 * g0 / (2.0 * max(h0, 1e-300))
        if not (np.isfinite(gap) and np.all(np.isfinite(xtr)) and np.all(np.isfinite(z_np))):
            raise overflow_error("X^T (y sigmoid(-y z)) / n or the duality gap", design)
        if gap <= tol_abs:
            converged = True
            break
        if it == max_iter:
            break
        index = _working_set(np.abs(xtr) / alphas, beta != 0, ws_size)
        ws_size = index.size
        extra = 1 if fit_intercept else 0
        width = bucket(index.size + extra)
        A = np.zeros((n, width))
        A[:, : index.size] = design.columns_as_rows(index).numpy().T
        a = _padded(alphas[index], width, 1.0)
        start = _padded(beta[index], width)
        if fit_intercept:
            A[:, index.size] = 1.0
            a[index.size] = 0.0
            start[index.size] = b0
        sub_beta, _, sub_steps = solve_logistic_block(
            A, y_pm, a, start, _sub_tolerance(gap, tol_abs), max_newton, sample_weight
        )
        if not np.all(np.isfinite(sub_beta)):
            raise overflow_error("a proximal-Newton iterate", design)
        steps += sub_steps
        beta[index] = sub_beta[: index.size]
        if fit_intercept:
            b0 = float(sub_beta[index.size])
    return Solution(beta, b0, gap, tol_abs, converged, it, steps, primal)
