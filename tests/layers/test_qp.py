"""QuadraticProgram: solutions vs cvxpy, gradients vs a dense KKT solve, modes, Keras."""

import dataclasses
import os

import cvxpy as cp
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_in_mode

import keras_implicit as ki
from keras_implicit.programs import _admm as codes
from keras_implicit.programs.qp import Settings, solve_qp

NAMES = ("Q", "q", "A", "b", "G", "h")


def random_qp(rng, batch, n=8, m=6, p=3, shared=()):
    """Random feasible QPs (a known feasible point), about half the inequalities active.

    `shared`: names among Q, A, G that are the same matrix for every row.
    """

    def draw(name, shape):
        rows = 1 if name in shared else batch
        return np.broadcast_to(rng.standard_normal((rows, *shape)), (batch, *shape)).copy()

    L = draw("Q", (n, n))
    Q = L @ L.transpose(0, 2, 1) / n + 0.1 * np.eye(n)
    q = rng.standard_normal((batch, n))
    A = draw("A", (p, n))
    G = draw("G", (m, n))
    x0 = rng.standard_normal((batch, n))
    b = np.einsum("bpn,bn->bp", A, x0)
    h = np.einsum("bmn,bn->bm", G, x0) + rng.uniform(0.1, 1.0, (batch, m))
    return {"Q": Q, "q": q, "A": A, "b": b, "G": G, "h": h}


def cvxpy_solve(d, i):
    n = d["q"].shape[-1]
    z = cp.Variable(n)
    eq = d["A"][i] @ z == d["b"][i]
    ineq = d["G"][i] @ z <= d["h"][i]
    obj = 0.5 * cp.quad_form(z, cp.psd_wrap(d["Q"][i])) + d["q"][i] @ z
    prob = cp.Problem(cp.Minimize(obj), [eq, ineq])
    prob.solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    assert prob.status == "optimal"
    return z.value, eq.dual_value, ineq.dual_value


def dense_kkt_grads(d, i, x, nu, lam, gx):
    """Reference gradients of <gx, x*> from the active-set KKT system, in numpy float64."""
    Q, A, G = d["Q"][i], d["A"][i], d["G"][i]
    n, p, m = Q.shape[0], A.shape[0], G.shape[0]
    act = lam > 1e-7
    Ga = G[act]
    K = np.block(
        [
            [Q, A.T, Ga.T],
            [A, np.zeros((p, p)), np.zeros((p, Ga.shape[0]))],
            [Ga, np.zeros((Ga.shape[0], p + Ga.shape[0]))],
        ]
    )
    rhs = np.concatenate([gx, np.zeros(p + Ga.shape[0])])
    w = np.linalg.solve(K.T, rhs)
    wx, wnu, wlam = w[:n], w[n : n + p], w[n + p :]
    lam_full_w = np.zeros(m)
    lam_full_w[act] = wlam
    gQ = -0.5 * (np.outer(wx, x) + np.outer(x, wx))
    gq = -wx
    gA = -(np.outer(nu, wx) + np.outer(wnu, x))
    gb = wnu
    gG = -(np.outer(lam, wx) + np.outer(lam_full_w, x))
    gh = lam_full_w
    return {"Q": gQ, "q": gq, "A": gA, "b": gb, "G": gG, "h": gh}


SETTINGS = Settings(tol=1e-9)


def _solve(d, settings=SETTINGS):
    params = {k: tf.constant(v) for k, v in d.items()}
    return solve_qp(params, dict.fromkeys(NAMES, True), settings)


def assert_matches_cvxpy(d, x, nu, lam):
    """Primal and dual solutions of every row equal cvxpy's to 1e-5 (relative to scale)."""
    for i in range(x.shape[0]):
        xr, nur, lamr = cvxpy_solve(d, i)
        scale = max(1.0, np.abs(xr).max())
        np.testing.assert_allclose(x.numpy()[i], xr, atol=1e-5 * scale, rtol=0)
        np.testing.assert_allclose(nu.numpy()[i], nur, atol=1e-5 * max(1, np.abs(nur).max()))
        np.testing.assert_allclose(lam.numpy()[i], lamr, atol=1e-5 * max(1, np.abs(lamr).max()))


def test_solution_matches_cvxpy():
    rng = np.random.default_rng(0)
    d = random_qp(rng, 6)
    x, nu, lam, status, _ = _solve(d)
    assert np.all(status.numpy() == 0)
    assert_matches_cvxpy(d, x, nu, lam)
    # half the inequalities at random are active: the test exercises the active set
    assert 0 < np.mean(lam.numpy() > 1e-7) < 1


def test_gradients_match_dense_kkt_at_cvxpy_solution():
    rng = np.random.default_rng(1)
    d = random_qp(rng, 4)
    params = {k: tf.constant(v) for k, v in d.items()}
    gx = rng.standard_normal((4, d["q"].shape[-1]))
    with tf.GradientTape() as tape:
        tape.watch(params)
        x, *_ = solve_qp(params, dict.fromkeys(NAMES, True), SETTINGS)
        loss = tf.reduce_sum(x * gx)
    grads = tape.gradient(loss, params)
    for i in range(4):
        xr, nur, lamr = cvxpy_solve(d, i)
        ref = dense_kkt_grads(d, i, xr, nur, lamr, gx[i])
        for k in NAMES:
            np.testing.assert_allclose(
                grads[k].numpy()[i], ref[k], atol=1e-5 * max(1, np.abs(ref[k]).max()), err_msg=k
            )


@pytest.mark.slow
def test_gradients_match_finite_differences_with_fixed_active_set():
    rng = np.random.default_rng(2)
    d = random_qp(rng, 3)
    params = {k: tf.constant(v) for k, v in d.items()}
    batched = dict.fromkeys(NAMES, True)
    gx = tf.constant(rng.standard_normal((3, d["q"].shape[-1])))
    with tf.GradientTape() as tape:
        tape.watch(params)
        x, _, lam, _, _ = solve_qp(params, batched, SETTINGS)
        loss = tf.reduce_sum(x * gx)
    grads = tape.gradient(loss, params)
    active = lam.numpy() > 0
    eps = 1e-6
    solve = tf.function(lambda ps: solve_qp(ps, batched, SETTINGS))
    for k in NAMES:
        v = rng.standard_normal(d[k].shape)
        plus = solve({**params, k: params[k] + eps * v})
        minus = solve({**params, k: params[k] - eps * v})
        # finite differences are only a reference while the active set is unchanged
        assert np.array_equal(plus[2].numpy() > 0, active)
        assert np.array_equal(minus[2].numpy() > 0, active)
        fd = (tf.reduce_sum(plus[0] * gx) - tf.reduce_sum(minus[0] * gx)) / (2 * eps)
        np.testing.assert_allclose(
            float(tf.reduce_sum(grads[k] * v)), float(fd), rtol=1e-5, atol=1e-6
        )


def _layer_inputs(d, dtype="float64"):
    return {k: tf.constant(d[k], dtype) for k in ("q", "h")}


def _fixed_layer(d, **kwargs):
    return ki.layers.QuadraticProgram(
        Q=d["Q"][0], A=d["A"][0], b=d["b"][0], G=d["G"][0], dtype="float64", **kwargs
    )


def test_layer_in_all_modes(mode):
    rng = np.random.default_rng(3)
    d = random_qp(rng, 5, shared=("Q", "A", "G"))
    d["b"] = np.broadcast_to(d["b"][:1], d["b"].shape).copy()
    d["h"] = d["h"] + np.abs(d["h"][:1] - d["h"]).max()  # keeps row 0's point feasible
    layer = _fixed_layer(d, return_duals=True, return_status=True, tol=1e-9)
    inputs = _layer_inputs(d)

    def fn(q, h):
        with tf.GradientTape() as tape:
            tape.watch(q)
            x, _nu, _lam, status = layer({"q": q, "h": h})
            loss = tf.reduce_sum(x**2)
        return x, status, tape.gradient(loss, q)

    x, status, gq = run_in_mode(fn, mode)(inputs["q"], inputs["h"])
    ref_x, _, _, ref_status, _ = _solve(d)
    assert np.all(status.numpy() == ref_status.numpy())
    np.testing.assert_allclose(x.numpy(), ref_x.numpy(), atol=1e-7)
    assert np.all(np.isfinite(gq.numpy()))


def test_infeasible_row_is_flagged_and_gets_zero_gradient():
    rng = np.random.default_rng(4)
    d = random_qp(rng, 4)
    # row 2: G contains x_0 <= -1 and -x_0 <= -1 (x_0 >= 1): primal infeasible
    d["G"][2, 0] = np.eye(d["q"].shape[-1])[0]
    d["G"][2, 1] = -np.eye(d["q"].shape[-1])[0]
    d["h"][2, :2] = -1.0
    params = {k: tf.constant(v) for k, v in d.items()}
    batched = dict.fromkeys(NAMES, True)
    with tf.GradientTape() as tape:
        tape.watch(params)
        x, _, _, status, _ = solve_qp(params, batched, SETTINGS)
        loss = tf.reduce_sum(x**2)
    grads = tape.gradient(loss, params)
    assert status.numpy().tolist() == [0, 0, codes.PRIMAL_INFEASIBLE, 0]
    for k in NAMES:
        assert np.all(grads[k].numpy()[2] == 0.0), k
        assert np.all(np.isfinite(grads[k].numpy())), k
    # the other rows are exactly those of the batch without the infeasible problem
    keep = [0, 1, 3]
    sub = {k: v[keep] for k, v in d.items()}
    sub_params = {k: tf.constant(v) for k, v in sub.items()}
    with tf.GradientTape() as tape:
        tape.watch(sub_params)
        xs, *_ = solve_qp(sub_params, batched, SETTINGS)
        loss = tf.reduce_sum(xs**2)
    sub_grads = tape.gradient(loss, sub_params)
    np.testing.assert_allclose(x.numpy()[keep], xs.numpy(), atol=1e-12)
    for k in NAMES:
        np.testing.assert_allclose(grads[k].numpy()[keep], sub_grads[k].numpy(), atol=1e-9)


def test_unbounded_and_nan_rows_are_flagged():
    rng = np.random.default_rng(5)
    n = 4
    Q = np.zeros((3, n, n))
    Q[0] = np.eye(n)
    Q[2] = np.eye(n)
    q = rng.standard_normal((3, n))
    q[1] = np.ones(n)  # row 1: LP min 1^T x with x free below: unbounded
    G = np.broadcast_to(np.eye(n), (3, n, n)).copy()
    h = np.ones((3, n))
    q[2, 0] = np.nan
    layer = ki.layers.QuadraticProgram(G=G[0], return_status=True, dtype="float64")
    with pytest.warns(ki.ConvergenceWarning, match="not solved"):
        x, status = layer({"Q": tf.constant(Q), "q": tf.constant(q), "h": tf.constant(h)})
    assert status.numpy().tolist() == [codes.SOLVED, codes.DUAL_INFEASIBLE, codes.NUMERICAL_ERROR]
    np.testing.assert_allclose(x.numpy()[0], np.minimum(-q[0], 1.0), atol=1e-6)
    assert np.all(np.isnan(x.numpy()[2]))


def test_learnable_weights_fit_and_save_load(tmp_path):
    rng = np.random.default_rng(6)
    n, m = 5, 4
    G = rng.standard_normal((m, n))
    h = np.ones(m)
    layer = ki.layers.QuadraticProgram(
        Q=np.eye(n), G=G, h=h, trainable=("G", "h"), dtype="float64", tol=1e-8
    )
    q_in = keras.Input((n,), dtype="float64", name="q")
    out = layer({"q": q_in})
    model = keras.Model(q_in, out)
    assert len(model.trainable_weights) == 2
    qs = rng.standard_normal((64, n))
    target = np.clip(-qs, -0.5, 0.5)  # a box the learned polytope can approach
    # graph mode here (XLA is covered by test_layer_in_all_modes; compiling the train
    # step would dominate this test's time)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", jit_compile=False)
    h0 = model.evaluate(qs, target, verbose=0)
    model.fit(qs, target, epochs=3, batch_size=16, verbose=0)
    assert model.evaluate(qs, target, verbose=0) < h0
    path = os.path.join(tmp_path, "qp.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(qs[:7]).numpy(), model(qs[:7]).numpy(), atol=1e-9)
    # dynamic batch: one traced function serves several batch sizes
    serve = tf.function(loaded, reduce_retracing=True)
    for rows in (3, 5, 9):
        np.testing.assert_allclose(serve(qs[:rows]).numpy(), model(qs[:rows]).numpy(), atol=1e-9)


def test_list_inputs_and_output_shapes():
    rng = np.random.default_rng(7)
    d = random_qp(rng, 2, shared=("Q", "A", "G"))
    layer = ki.layers.QuadraticProgram(
        Q=d["Q"][0], A=d["A"][0], G=d["G"][0], input_names=("q", "b", "h"), return_duals=True
    )
    shapes = layer.compute_output_shape([(None, 8), (None, 3), (None, 6)])
    assert shapes == ((None, 8), (None, 3), (None, 6))
    x, _nu, lam = layer(
        [
            tf.constant(d["q"], "float32"),
            tf.constant(d["b"], "float32"),
            tf.constant(d["h"], "float32"),
        ]
    )
    assert x.dtype == tf.float32 and x.shape == (2, 8) and lam.shape == (2, 6)
    ref, *_ = _solve(d)
    np.testing.assert_allclose(x.numpy(), ref.numpy(), atol=2e-3)


def test_clear_errors():
    with pytest.raises(ValueError, match=r"Received: Q with shape \(3,\)"):
        ki.layers.QuadraticProgram(Q=np.ones(3))
    with pytest.raises(ValueError, match="Received: max_iter=-1"):
        ki.layers.QuadraticProgram(max_iter=-1)
    with pytest.raises(ValueError, match="Received: scaling=-1"):
        ki.layers.QuadraticProgram(scaling=-1)
    with pytest.raises(ValueError, match="Received: scaling=2.5"):
        ki.layers.QuadraticProgram(scaling=2.5)
    with pytest.raises(ValueError, match="alpha"):
        ki.layers.QuadraticProgram(alpha=2.5)
    with pytest.raises(ValueError, match="come as a pair"):
        ki.layers.QuadraticProgram(Q=np.eye(3), A=np.ones((1, 3)))({"q": tf.zeros([2, 3])})
    with pytest.raises(ValueError, match="Inconsistent QP sizes"):
        ki.layers.QuadraticProgram(Q=np.eye(3))({"q": tf.zeros([2, 4])})
    with pytest.raises(ValueError, match=r"Received: q.shape=\(2, 3, 1\)"):
        ki.layers.QuadraticProgram(Q=np.eye(3))({"q": tf.zeros([2, 3, 1])})
    with pytest.raises(ValueError, match="trainable_params"):
        ki.layers.QuadraticProgram(Q=np.eye(3), trainable=("G",))
    with pytest.raises(ValueError, match="keyed by names"):
        ki.layers.QuadraticProgram(Q=np.eye(3))({"Q": tf.zeros([2, 3, 3])})


def test_config_round_trip():
    layer = ki.layers.QuadraticProgram(Q=np.eye(2), trainable=("Q",), tol=1e-7, return_status=True)
    clone = ki.layers.QuadraticProgram.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert layer.get_config()["scaling"] == 10
    layer = ki.layers.QuadraticProgram(Q=np.eye(2), scaling=0)
    clone = ki.layers.QuadraticProgram.from_config(layer.get_config())
    assert clone.get_config()["scaling"] == 0 and clone.settings.scaling == 0


def badly_scaled_qp(rng, batch, n=8, m=6, p=3):
    """`random_qp` in other units: variables rescaled by 1e-3..1e3, rows by 1e-2..1e2."""
    d = random_qp(rng, batch, n=n, m=m, p=p)
    var = 10.0 ** rng.uniform(-3, 3, (batch, n))  # x_original = var * x_new
    row_a = 10.0 ** rng.uniform(-2, 2, (batch, p))
    row_g = 10.0 ** rng.uniform(-2, 2, (batch, m))
    return {
        "Q": var[:, :, None] * d["Q"] * var[:, None, :],
        "q": var * d["q"],
        "A": row_a[:, :, None] * d["A"] * var[:, None, :],
        "b": row_a * d["b"],
        "G": row_g[:, :, None] * d["G"] * var[:, None, :],
        "h": row_g * d["h"],
    }


def test_scaling_solves_badly_scaled_qps_in_far_fewer_iterations():
    rng = np.random.default_rng(10)
    d = badly_scaled_qp(rng, 8)
    params = {k: tf.constant(v) for k, v in d.items()}
    batched = dict.fromkeys(NAMES, True)
    # graph mode: eagerly, the unscaled run's ~24k while-loop steps take tens of seconds
    x, nu, lam, status, iters = tf.function(lambda ps: solve_qp(ps, batched, SETTINGS))(params)
    off = dataclasses.replace(SETTINGS, scaling=0)
    *_, iters_off = tf.function(lambda ps: solve_qp(ps, batched, off))(params)
    assert np.all(status.numpy() == 0)
    assert_matches_cvxpy(d, x, nu, lam)
    assert 0 < np.mean(lam.numpy() > 1e-7) < 1
    # measured: 725 iterations in total with scaling, about 24000 without (most rows
    # hit max_iter=4000 there and are rescued, or not, by polishing); other seeds: 20x+
    assert 10 * iters.numpy().sum() <= iters_off.numpy().sum()


def test_scaling_leaves_well_scaled_solution_and_gradients_unchanged():
    rng = np.random.default_rng(1)
    d = random_qp(rng, 4)
    batched = dict.fromkeys(NAMES, True)
    gx = tf.constant(rng.standard_normal((4, d["q"].shape[-1])))
    results = []
    for scaling in (10, 0):
        params = {k: tf.constant(v) for k, v in d.items()}
        settings = dataclasses.replace(SETTINGS, scaling=scaling)
        with tf.GradientTape() as tape:
            tape.watch(params)
            x, nu, lam, status, _ = solve_qp(params, batched, settings)
            loss = tf.reduce_sum(x * gx)
        assert np.all(status.numpy() == 0)
        results.append(((x, nu, lam), tape.gradient(loss, params)))
    (sol_on, grads_on), (sol_off, grads_off) = results
    for a, b in zip(sol_on, sol_off):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-9)
    for k in NAMES:
        ref = grads_off[k].numpy()
        np.testing.assert_allclose(
            grads_on[k].numpy(), ref, atol=1e-6 * max(1, np.abs(ref).max()), err_msg=k
        )


def test_non_psd_constant_q_is_rejected_quoting_min_eigenvalue():
    Q = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.0, 3.0, 1.0]])  # eigenvalues -2, 2, 4
    with pytest.raises(ValueError, match=r"minimum eigenvalue .* is -2\b"):
        ki.layers.QuadraticProgram(Q=Q)
    with pytest.raises(ValueError, match=r"is -2\b"):
        ki.layers.QuadraticProgram(Q=Q, trainable=("Q",))
    # the symmetric part is what counts: a skew part does not make Q indefinite
    ki.layers.QuadraticProgram(Q=np.eye(2) + np.array([[0.0, 5.0], [-5.0, 0.0]]))
    # PSD but singular (rank one) is accepted, roundoff-level negative eigenvalues too
    v = np.random.default_rng(0).standard_normal(4)
    ki.layers.QuadraticProgram(Q=np.outer(v, v) - 1e-12 * np.eye(4))


def test_non_psd_batched_q_rows_get_status_and_zero_gradient():
    rng = np.random.default_rng(7)
    d = random_qp(rng, 4, n=5, m=4, p=2)
    d["Q"][1] -= 3.0 * np.eye(5)  # min eigenvalue < 0 for row 1
    d["Q"][1] = 0.5 * (d["Q"][1] + d["Q"][1].T)
    assert np.linalg.eigvalsh(d["Q"][1]).min() < -1.0
    layer = ki.layers.QuadraticProgram(
        return_status=True, on_failure="ignore", tol=1e-9, dtype="float64"
    )
    params = {k: tf.constant(v) for k, v in d.items()}
    with tf.GradientTape() as tape:
        tape.watch(params)
        x, status = tf.function(layer)(params)
        loss = tf.reduce_sum(tf.where(tf.math.is_finite(x), x, 0.0) ** 2)
    grads = tape.gradient(loss, params)
    assert status.numpy().tolist() == [0, 5, 0, 0]
    assert ki.layers.QuadraticProgram.STATUS_NAMES[5] == "non_convex"
    assert np.all(np.isnan(x.numpy()[1]))
    for k in NAMES:
        g = grads[k].numpy()
        assert np.all(np.isfinite(g)) and np.all(g[1] == 0.0)
    for i in (0, 2, 3):
        ref, _, _ = cvxpy_solve(d, i)
        np.testing.assert_allclose(x.numpy()[i], ref, atol=1e-6)
    # under the failure policy the non-convex row is an error / a warning
    with pytest.raises(ki.errors.ConvergenceError, match="non_convex"):
        ki.layers.QuadraticProgram(on_failure="raise", dtype="float64", max_iter=50)(params)
