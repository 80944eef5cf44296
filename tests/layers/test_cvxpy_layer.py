"""CvxpyLayer against cvxpy itself: solutions, gradients, batching, failures, saving.

The problems are the kinds cvxpylayers' own suite checks (least squares, QP, logistic
regression, LP, SDP, geometric programs, broadcasting, infeasible and non-DPP cases),
written afresh. Solutions are compared with cvxpy solved tightly by Clarabel; gradients
with central differences of those solutions, at points where the active set holds.
"""

import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_implicit as ki

cp = pytest.importorskip("cvxpy")

TIGHT = {"tol": 1e-10, "max_iter": 50000, "dtype": "float64"}


def _solve_reference(problem, tol=1e-10):
    problem.solve(solver="CLARABEL", tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol)
    assert problem.status == "optimal", problem.status


def _central_differences(problem, parameters, values, output, delta=1e-6, tol=1e-10):
    """d sum(output(params)) / d params, by central differences of cvxpy solves."""
    grads = []
    for index, value in enumerate(values):
        grad = np.zeros_like(value)
        for entry in np.ndindex(value.shape):
            sides = []
            for sign in (1.0, -1.0):
                shifted = [v.copy() for v in values]
                shifted[index][entry] += sign * delta
                for param, v in zip(parameters, shifted):
                    param.value = v
                _solve_reference(problem, tol)
                sides.append(output())
            grad[entry] = (sides[0] - sides[1]) / (2 * delta)
        grads.append(grad)
    for param, v in zip(parameters, values):
        param.value = v
    return grads


def _layer_gradients(layer, values, reduce=tf.reduce_sum):
    tensors = [tf.constant(v) for v in values]

    @tf.function
    def run(*args):
        with tf.GradientTape() as tape:
            tape.watch(args)
            out = layer(list(args))
            loss = reduce(out)
        return out, tape.gradient(loss, args)

    out, grads = run(*tensors)
    return out.numpy(), [g.numpy() for g in grads]


def test_qp_solution_and_gradients_match_cvxpy():
    rng = np.random.default_rng(0)
    nx, ncon = 3, 4
    G, h, x = cp.Parameter((ncon, nx)), cp.Parameter(ncon), cp.Variable(nx)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - 1)), [G @ x <= h])
    layer = ki.layers.CvxpyLayer(problem, [G, h], [x], **TIGHT)
    # the quadratic objective is kept as P, not turned into a second-order cone
    assert layer.canonical["cone"]["q"] == [] and layer.canonical["P_map"] is not None
    G_value = rng.normal(size=(ncon, nx))
    h_value = G_value @ rng.normal(size=nx) + 0.2 * rng.uniform(size=ncon)
    out, grads = _layer_gradients(layer, [G_value, h_value])
    G.value, h.value = G_value, h_value
    _solve_reference(problem)
    np.testing.assert_allclose(out, x.value, rtol=1e-6, atol=1e-7)
    reference = _central_differences(problem, [G, h], [G_value, h_value], lambda: x.value.sum())
    for ours, theirs in zip(grads, reference):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_duals_match_cvxpy_for_inequality_equality_and_psd_constraints():
    rng = np.random.default_rng(4)
    n = 3
    G, h, x = cp.Parameter((4, n)), cp.Parameter(4), cp.Variable(n)
    X = cp.Variable((2, 2), symmetric=True)
    constraints = [G @ x <= h, cp.sum(x) == 1, X >> 0, cp.trace(X) == 1]
    problem = cp.Problem(
        cp.Minimize(cp.sum_squares(x - 2) + cp.sum(cp.multiply(np.array([[1, 0.5], [0.5, 2]]), X))),
        constraints,
    )
    layer = ki.layers.CvxpyLayer(problem, [G, h], [x, X], duals=constraints, **TIGHT)
    assert x.value is None and constraints[0].dual_value is None  # the probes left no trace
    G.value = rng.normal(size=(4, n))
    h.value = G.value @ np.array([0.5, 0.3, 0.2]) + np.array([0.0, 0.5, 0.5, 0.5])
    outputs = [t.numpy() for t in tf.function(layer)([tf.constant(G.value), tf.constant(h.value)])]
    _solve_reference(problem)
    # Clarabel ends ~1e-6 from the optimum on this PSD problem
    for ours, theirs in zip(outputs, [x.value, X.value, *(c.dual_value for c in constraints)]):
        np.testing.assert_allclose(ours, theirs, atol=2e-5)
    x_opt, _, lam, nu, _, _ = outputs
    assert lam.max() > 1e-3  # an inequality is active
    # KKT stationarity of the x block with our duals, to our own tolerance
    np.testing.assert_allclose(2 * (x_opt - 2) + G.value.T @ lam + nu, 0.0, atol=1e-7)


def test_quad_form_with_second_order_cone_matches_cvxpy_and_finite_differences():
    """A quadratic objective (native P) together with an SOC constraint."""
    rng = np.random.default_rng(6)
    n = 4
    M = rng.normal(size=(n, n))
    Q = M @ M.T + 0.5 * np.eye(n)
    c, radius, x = cp.Parameter(n), cp.Parameter(nonneg=True), cp.Variable(n)
    problem = cp.Problem(
        cp.Minimize(0.5 * cp.quad_form(x, Q) + c @ x), [cp.norm(x) <= radius, cp.sum(x) == 0.5]
    )
    layer = ki.layers.CvxpyLayer(problem, [c, radius], [x], **TIGHT)
    assert layer.canonical["cone"]["q"] == [n + 1]  # only the constraint's cone
    values = [3 * rng.normal(size=n), np.array(0.7)]
    out, grads = _layer_gradients(layer, values)
    c.value, radius.value = values
    _solve_reference(problem, tol=1e-9)  # Clarabel's limit on this problem
    assert abs(np.linalg.norm(x.value) - 0.7) < 1e-6  # the cone constraint is active
    np.testing.assert_allclose(out, x.value, atol=1e-6)
    reference = _central_differences(
        problem, [c, radius], values, lambda: x.value.sum(), delta=1e-4, tol=1e-9
    )
    for ours, theirs in zip(grads, reference):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_l1_least_squares_lp_batched_rows_match_cvxpy():
    """cvxpylayers' docstring example (an LP after canonicalization), a batch of A."""
    rng = np.random.default_rng(1)
    n, m, batch = 2, 3, 3
    A, b, x = cp.Parameter((m, n)), cp.Parameter(m), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.pnorm(A @ x - b, p=1)), [x >= 0])
    layer = ki.layers.CvxpyLayer(problem, [A, b], [x], **TIGHT)
    A_values, b_value = rng.normal(size=(batch, m, n)), rng.normal(size=m)
    out = tf.function(layer)([tf.constant(A_values), tf.constant(b_value)]).numpy()
    assert out.shape == (batch, n)
    for row in range(batch):
        A.value, b.value = A_values[row], b_value
        _solve_reference(problem)
        np.testing.assert_allclose(out[row], x.value, atol=1e-6)


def test_logistic_regression_exp_cone_matches_dense_implicit_reference():
    """Exponential cones. The references are scipy's BFGS on the smooth objective and the
    implicit function theorem solved densely: Clarabel ends about 1e-6 from the optimum
    here, too far for finite differences of its solutions."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(243)
    N, n = 8, 2
    X_value = rng.normal(size=(N, n))
    labels = (X_value @ rng.normal(size=n) + 0.5 * rng.normal(size=N) > 0).astype(float)
    X, lam, a = cp.Parameter((N, n)), cp.Parameter(nonneg=True), cp.Variable(n)
    log_likelihood = cp.sum(cp.multiply(labels, X @ a) - cp.logistic(X @ a))
    problem = cp.Problem(cp.Minimize(-log_likelihood / N + lam * cp.sum_squares(a)))
    layer = ki.layers.CvxpyLayer(problem, [X, lam], [a], **TIGHT)
    values = [X_value, np.array(0.1)]
    out, grads = _layer_gradients(layer, values)

    def reference(features, penalty):
        def objective(w):
            z = features @ w
            return -(labels * z - np.logaddexp(0, z)).sum() / N + penalty * w @ w

        def gradient(w):
            p = 1 / (1 + np.exp(-(features @ w)))
            return -features.T @ (labels - p) / N + 2 * penalty * w

        return minimize(objective, np.zeros(n), jac=gradient, options={"gtol": 1e-13}).x

    X.value, lam.value = values
    _solve_reference(problem)
    np.testing.assert_allclose(out, a.value, rtol=1e-5)
    np.testing.assert_allclose(out, reference(*values), rtol=1e-7)
    # implicit function theorem by hand: H da = -(dg/dtheta), g the objective's gradient
    w, penalty = reference(*values), values[1]
    p = 1 / (1 + np.exp(-(X_value @ w)))
    curvature = p * (1 - p)
    hessian = X_value.T @ (curvature[:, None] * X_value) / N + 2 * penalty * np.eye(n)
    adjoint = np.linalg.solve(hessian, np.ones(n))
    dg_dX = (
        -np.einsum("kj,i->ijk", np.eye(n), labels - p) / N
        + np.einsum("ik,i,j->ijk", X_value, curvature, w) / N
    )
    np.testing.assert_allclose(grads[0], -dg_dX @ adjoint, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(grads[1], -adjoint @ (2 * w), rtol=1e-6)


def test_sdp_with_symmetric_variable_matches_cvxpy():
    rng = np.random.default_rng(5)
    n = 3
    C, A = cp.Parameter((n, n)), cp.Parameter((n, n))
    X = cp.Variable((n, n), symmetric=True)
    problem = cp.Problem(
        cp.Minimize(cp.trace(C @ X) + cp.sum_squares(X)),
        [X >> 0, cp.trace(A @ X) == 1.0],
    )
    layer = ki.layers.CvxpyLayer(problem, [C, A], [X], **TIGHT)
    C_value = rng.normal(size=(n, n))
    A_value = np.eye(n) + 0.1 * rng.normal(size=(n, n))
    out, grads = _layer_gradients(layer, [C_value, A_value])
    C.value, A.value = C_value, A_value
    _solve_reference(problem)
    assert out.shape == (n, n)
    np.testing.assert_allclose(out, out.T, atol=1e-12)
    np.testing.assert_allclose(out, X.value, atol=1e-6)
    reference = _central_differences(problem, [C], [C_value], lambda: X.value.sum(), delta=1e-4)
    np.testing.assert_allclose(grads[0], grads[0].T, atol=1e-10)
    np.testing.assert_allclose(grads[0], reference[0], atol=2e-4)


def test_psd_attribute_variable_comes_back_whole_and_psd():
    C = cp.Parameter((2, 2))
    X = cp.Variable((2, 2), PSD=True)
    problem = cp.Problem(cp.Minimize(cp.trace(C @ X) + cp.sum_squares(X)), [cp.trace(X) == 1])
    layer = ki.layers.CvxpyLayer(problem, [C], [X], **TIGHT)
    values = np.array([[[1.0, 2.0], [2.0, -1.0]], [[0.5, 0.0], [0.0, 0.2]]])
    out = tf.function(layer)(tf.constant(values)).numpy()
    for row in range(2):
        C.value = values[row]
        _solve_reference(problem)
        np.testing.assert_allclose(out[row], X.value, atol=1e-6)
        assert np.linalg.eigvalsh(out[row]).min() >= -1e-8


def test_geometric_program_matches_cvxpy_and_log_space_reference():
    x, y, z = (cp.Variable(pos=True) for _ in range(3))
    a, b, c = cp.Parameter(pos=True), cp.Parameter(pos=True), cp.Parameter()
    problem = cp.Problem(
        cp.Minimize(1 / (x * y * z)), [a * (x * y + x * z + y * z) <= b, x >= y**c]
    )
    layer = ki.layers.CvxpyLayer(problem, [a, b, c], [x, y, z], gp=True, **TIGHT)
    values = [np.array(2.0), np.array(1.0), np.array(0.5)]
    tensors = [tf.constant(v) for v in values]

    @tf.function
    def run(*args):
        with tf.GradientTape() as tape:
            tape.watch(args)
            total = tf.add_n(layer(list(args)))
        return total, tape.gradient(total, args)

    total, grads = run(*tensors)

    def reference_total(a_value, b_value, c_value):
        """The log-log program (u, v, w) = log(x, y, z) by SLSQP: Clarabel's exponential
        cones end too far from the optimum for finite differences."""
        from scipy.optimize import minimize
        from scipy.special import logsumexp

        constraints = [
            {
                "type": "ineq",
                "fun": lambda t: (
                    np.log(b_value / a_value) - logsumexp([t[0] + t[1], t[0] + t[2], t[1] + t[2]])
                ),
            },
            {"type": "ineq", "fun": lambda t: t[0] - c_value * t[1]},
        ]
        logs = minimize(
            lambda t: -t.sum(),
            np.zeros(3),
            jac=lambda t: -np.ones(3),
            constraints=constraints,
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 1000},
        ).x
        return np.exp(logs).sum()

    for param, v in zip((a, b, c), values):
        param.value = v
    problem.solve(solver="CLARABEL", gp=True)
    np.testing.assert_allclose(total.numpy(), x.value + y.value + z.value, rtol=1e-5)
    np.testing.assert_allclose(total.numpy(), reference_total(*values), rtol=1e-8)
    delta = 1e-5
    for index, grad in enumerate(grads):
        up, down = list(values), list(values)
        up[index], down[index] = values[index] + delta, values[index] - delta
        expected = (reference_total(*up) - reference_total(*down)) / (2 * delta)
        np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-4)


def test_unbatched_and_batched_parameters_mix_like_separate_calls():
    """A shared (unbatched) A and a batch of b: rows equal separate solves; dA sums rows."""
    rng = np.random.default_rng(2)
    m, n, batch = 6, 3, 2
    A, b, x = cp.Parameter((m, n)), cp.Parameter(m), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + cp.sum_squares(x)))
    layer = ki.layers.CvxpyLayer(problem, [A, b], [x], **TIGHT)
    A_value, b_values = rng.normal(size=(m, n)), rng.normal(size=(batch, m))
    out, (grad_A, grad_b) = _layer_gradients(layer, [A_value, b_values])
    assert out.shape == (batch, n) and grad_A.shape == (m, n)
    separate_grad_A = np.zeros((m, n))
    for row in range(batch):
        # closed form: x = (A^T A + I)^{-1} A^T b
        H = A_value.T @ A_value + np.eye(n)
        np.testing.assert_allclose(out[row], np.linalg.solve(H, A_value.T @ b_values[row]))
        _, (g_A, g_b) = _layer_gradients(layer, [A_value, b_values[row]])
        np.testing.assert_allclose(grad_b[row], g_b, atol=1e-8)
        separate_grad_A += g_A
    np.testing.assert_allclose(grad_A, separate_grad_A, atol=1e-7)


def test_infeasible_and_unbounded_rows_get_status_and_a_warning():
    x, shift = cp.Variable(1), cp.Parameter(1)
    problem = cp.Problem(cp.Minimize(cp.sum(x)), [x >= shift, x <= 1])
    layer = ki.layers.CvxpyLayer(problem, [shift], [x], return_status=True, dtype="float64")
    shifts = tf.constant([[0.0], [2.0]], tf.float64)  # feasible, infeasible
    with pytest.warns(ki.ConvergenceWarning, match="1 of 2"):
        solution, status = layer(shifts)
    assert status.numpy().tolist() == [0, 2]
    np.testing.assert_allclose(solution.numpy()[0], [0.0], atol=1e-6)

    c = cp.Parameter(1)
    unbounded = cp.Problem(cp.Minimize(c @ x), [x <= 1])
    layer = ki.layers.CvxpyLayer(unbounded, [c], [x], return_status=True, dtype="float64")
    _, status = tf.function(layer)(tf.constant([[-1.0], [1.0]], tf.float64))
    assert status.numpy().tolist() == [0, 3]
    assert layer.program.STATUS_NAMES[3] == "dual_infeasible"


def test_bad_problems_and_calls_get_clear_errors():
    x, lam, lam2 = cp.Variable(1), cp.Parameter(nonneg=True), cp.Parameter(nonneg=True)
    not_dpp = cp.Problem(cp.Minimize(lam * lam2 * cp.norm(x, 1)))
    with pytest.raises(ValueError, match="DPP"):
        ki.layers.CvxpyLayer(not_dpp, [lam, lam2], [x])
    problem = cp.Problem(cp.Minimize(lam * cp.norm(x, 1) + lam2 * cp.sum_squares(x)))
    with pytest.raises(ValueError, match="exactly the parameters"):
        ki.layers.CvxpyLayer(problem, [lam], [x])
    with pytest.raises(ValueError, match="variables of the problem"):
        ki.layers.CvxpyLayer(problem, [lam, lam2], [cp.Variable(2)])
    layer = ki.layers.CvxpyLayer(problem, [lam, lam2], [x])
    with pytest.raises(ValueError, match="expects 2 parameter values"):
        layer(tf.ones([]))
    with pytest.raises(ValueError, match=r"has shape \(\); .* Received: shape \(4, 2\)"):
        layer([tf.ones([4, 2]), tf.ones([])])


def test_fit_xla_dynamic_batch_and_load_without_cvxpy(tmp_path):
    """Trains in model.fit (XLA), serves any batch size, and loads where cvxpy is absent."""
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    n = 4
    q, x = cp.Parameter(n), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) - q @ x), [x >= 0, cp.sum(x) == 1])
    inputs = keras.Input((3,))
    scores = keras.layers.Dense(n)(inputs)
    outputs = ki.layers.CvxpyLayer(problem, [q], [x], tol=1e-7)(scores)
    model = keras.Model(inputs, outputs)
    model.compile("adam", "mse", jit_compile=True)
    features = rng.normal(size=(32, 3)).astype("float32")
    targets = np.eye(n, dtype="float32")[rng.integers(0, n, 32)]
    history = model.fit(features, targets, epochs=3, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    predicted = model.predict(features[:5], verbose=0)
    # float32 solves stop at the tolerance floor, 100 machine epsilons (1.2e-5), so the
    # outputs are feasible and match cvxpy to a few times that, not to tol=1e-7.
    reference = []
    for row in keras.Model(inputs, scores)(features[:5]).numpy():
        q.value = row.astype("float64")
        problem.solve()
        reference.append(x.value)
    np.testing.assert_allclose(predicted, np.array(reference), atol=1e-4)
    np.testing.assert_allclose(predicted.sum(axis=1), 1.0, atol=1e-4)
    assert predicted.min() >= -1e-4
    path = tmp_path / "model.keras"
    model.save(path)
    np.save(tmp_path / "features.npy", features[:5])
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["cvxpy"] = None  # importing cvxpy now fails
        import numpy as np, keras
        import keras_implicit
        model = keras.models.load_model({str(path)!r})
        out = model.predict(np.load({str(tmp_path / "features.npy")!r}), verbose=0)
        np.save({str(tmp_path / "loaded.npy")!r}, out)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "loaded.npy"), predicted, atol=1e-5)


def test_building_without_cvxpy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cvxpy", None)
    with warnings.catch_warnings(), pytest.raises(ImportError, match=r"keras-implicit\[cvxpy\]"):
        ki.layers.CvxpyLayer(object(), [], [])
