"""ConeProgram: solutions vs cvxpy, gradients vs finite differences, spec errors, Keras."""

import math
import os

import cvxpy as cp
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_implicit.layers as kl
from keras_implicit.layers.cone_program import (
    _tril_indices,
    cone_dim,
    project_cone,
    solve_cone_program,
    validate_cone,
)

FULL = {"z": 2, "l": 3, "q": [3], "s": [2], "ep": 1}
SETTINGS = {
    "tol": 1e-9,
    "max_iter": 20000,
    "rho": 1.0,
    "sigma": 1e-6,
    "alpha": 1.6,
    "check_interval": 25,
    "backward_tol": 1e-11,
    "backward_max_iter": 400,
}


def _interior(cone, rng):
    v = [np.zeros(cone["z"]), rng.uniform(0.5, 1.0, cone["l"])]
    for d in cone["q"]:
        v.append(np.r_[2.0, rng.uniform(-0.5, 0.5, d - 1) / max(1, d - 1)])
    for k in cone["s"]:
        r, c = _tril_indices(k)
        M = np.eye(k) + 0.1 * np.ones((k, k))
        v.append(np.where(r == c, 1.0, math.sqrt(2.0)) * M[r, c])
    v += [np.array([0.0, 1.0, 2.0])] * cone["ep"]
    return np.concatenate(v)


def random_cone_program(cone, batch, n, rng):
    """Strictly primal and dual feasible, so a solution exists."""
    cone = validate_cone(cone)
    m = cone_dim(cone)
    A = rng.standard_normal((batch, m, n))
    x0 = rng.standard_normal((batch, n))
    b = np.stack([A[i] @ x0[i] + _interior(cone, rng) for i in range(batch)])
    ys = []
    for _ in range(batch):
        y = _interior(cone, rng)
        y[: cone["z"]] = rng.standard_normal(cone["z"])
        if cone["ep"]:
            y[-3 * cone["ep"] :] = np.tile([-1.0, 0.0, 1.0], cone["ep"])  # dual exp interior
        ys.append(y)
    c = np.stack([-A[i].T @ ys[i] for i in range(batch)])
    return cone, c, A, b


def cvxpy_solution(cone, c, A, b):
    n = c.shape[0]
    x = cp.Variable(n)
    s = b - A @ x
    cons, i = [], 0
    if cone["z"]:
        cons.append(s[i : i + cone["z"]] == 0)
        i += cone["z"]
    if cone["l"]:
        cons.append(s[i : i + cone["l"]] >= 0)
        i += cone["l"]
    for d in cone["q"]:
        cons.append(cp.SOC(s[i], s[i + 1 : i + d]))
        i += d
    for k in cone["s"]:
        S = cp.Variable((k, k), symmetric=True)
        cons.append(S >> 0)
        for t, (r, cc) in enumerate(zip(*_tril_indices(k))):
            scale = 1.0 if r == cc else math.sqrt(2.0)
            cons.append(s[i + t] == scale * S[r, cc])
        i += k * (k + 1) // 2
    for _ in range(cone["ep"]):
        cons.append(cp.ExpCone(s[i], s[i + 1], s[i + 2]))
        i += 3
    prob = cp.Problem(cp.Minimize(c @ x), cons)
    prob.solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    assert prob.status == "optimal"
    return x.value


def _compiled(cone):
    return tf.function(lambda c, A, b: solve_cone_program(c, A, b, cone, SETTINGS))


def test_solution_matches_cvxpy_on_all_cone_types():
    rng = np.random.default_rng(0)
    cone, c, A, b = random_cone_program(FULL, 2, 5, rng)
    x, y, status = _compiled(cone)(*(tf.constant(v) for v in (c, A, b)))
    assert status.numpy().tolist() == [0, 0]
    for i in range(2):
        ref = cvxpy_solution(cone, c[i], A[i], b[i])
        np.testing.assert_allclose(x.numpy()[i], ref, atol=1e-5 * max(1.0, np.abs(ref).max()))
        # dual feasibility c + A^T y = 0 and y in K* (self-dual blocks)
        np.testing.assert_allclose(c[i] + A[i].T @ y.numpy()[i], 0.0, atol=1e-6)
        assert np.all(y.numpy()[i, 2:5] >= -1e-8)


def test_gradients_match_finite_differences():
    # LP + SOC blocks; a small step keeps the active structure (which blocks sit on
    # their boundary) unchanged, checked below through the duals' zero pattern
    rng = np.random.default_rng(1)
    cone, c, A, b = random_cone_program({"z": 1, "l": 4, "q": [3, 4]}, 2, 4, rng)
    fn = _compiled(cone)
    params = [tf.constant(v) for v in (c, A, b)]
    W = tf.constant(rng.standard_normal(c.shape))
    with tf.GradientTape() as tape:
        tape.watch(params)
        x, y, status = fn(*params)
        loss = tf.reduce_sum(W * x)
    grads = tape.gradient(loss, params)
    assert status.numpy().tolist() == [0, 0]
    pattern = np.abs(y.numpy()) > 1e-6
    eps = 1e-5
    for k in range(3):
        v = rng.standard_normal(params[k].shape)
        plus = [p + eps * v if j == k else p for j, p in enumerate(params)]
        minus = [p - eps * v if j == k else p for j, p in enumerate(params)]
        xp, yp, _ = fn(*plus)
        xm, ym, _ = fn(*minus)
        assert np.array_equal(np.abs(yp.numpy()) > 1e-6, pattern)
        assert np.array_equal(np.abs(ym.numpy()) > 1e-6, pattern)
        fd = float(tf.reduce_sum(W * (xp - xm))) / (2 * eps)
        np.testing.assert_allclose(float(tf.reduce_sum(grads[k] * v)), fd, rtol=1e-3, atol=1e-5)


def test_projection_onto_product_cone_is_idempotent_and_matches_blocks():
    rng = np.random.default_rng(2)
    cone = validate_cone(FULL)
    v = tf.constant(rng.standard_normal((4, cone_dim(cone))))
    p = project_cone(v, cone)
    np.testing.assert_allclose(project_cone(p, cone).numpy(), p.numpy(), atol=1e-9)
    np.testing.assert_array_equal(p.numpy()[:, :2], 0.0)
    np.testing.assert_allclose(p.numpy()[:, 2:5], np.maximum(v.numpy()[:, 2:5], 0.0))
    # PSD block: the matrix rebuilt from the SCS vectorization is PSD
    r, cc = _tril_indices(2)
    for row in p.numpy():
        M = np.zeros((2, 2))
        for t, (i, j) in enumerate(zip(r, cc)):
            M[i, j] = M[j, i] = row[8 + t] / (1.0 if i == j else math.sqrt(2.0))
        assert np.linalg.eigvalsh(M).min() >= -1e-9


def test_unsolved_row_is_flagged_and_gets_zero_gradient():
    rng = np.random.default_rng(3)
    cone, c, A, b = random_cone_program({"l": 4}, 3, 3, rng)
    # row 1: A x <= b with A = [I; -I] rows and b making x_0 <= -1 and x_0 >= 1
    A[1, :2] = 0.0
    A[1, 0, 0], A[1, 1, 0] = 1.0, -1.0
    b[1, :2] = -1.0
    settings = dict(SETTINGS, max_iter=500)
    params = [tf.constant(v) for v in (c, A, b)]
    with tf.GradientTape() as tape:
        tape.watch(params)
        x, _, status = solve_cone_program(*params, validate_cone(cone), settings)
        loss = tf.reduce_sum(x**2)
    grads = tape.gradient(loss, params)
    assert status.numpy()[1] != 0 and status.numpy()[0] == 0 and status.numpy()[2] == 0
    for g in grads:
        assert np.all(g.numpy()[1] == 0.0)
        assert np.all(np.isfinite(g.numpy()))
        assert np.any(g.numpy()[0] != 0.0)


def test_bad_cone_specs_are_rejected():
    with pytest.raises(ValueError, match="Unsupported cone keys"):
        validate_cone({"l": 2, "psd": [2]})
    with pytest.raises(ValueError, match=r"cone\['q'\] must be a list of integers"):
        validate_cone({"q": [0]})
    with pytest.raises(ValueError, match=r"cone\['l'\] must be a non-negative integer"):
        validate_cone({"l": -1})
    with pytest.raises(ValueError, match="empty"):
        validate_cone({})
    with pytest.raises(ValueError, match=r"A must have 3 rows.*Received: A.shape=\(2, 2\)"):
        kl.ConeProgram({"l": 3}, A=np.ones((2, 2)))


@pytest.mark.slow
def test_layer_fit_save_load(tmp_path):
    rng = np.random.default_rng(4)
    _cone, c, A, b = random_cone_program({"l": 4, "q": [3]}, 1, 3, rng)
    layer = kl.ConeProgram(
        {"l": 4, "q": [3]},
        A=A[0],
        b=b[0],
        trainable_params=("b",),
        return_status=True,
        dtype="float64",
        tol=1e-7,
    )
    c_in = keras.Input((3,), dtype="float64")
    x, _status = layer({"c": c_in})
    model = keras.Model(c_in, x)
    cs = c[0] + 0.1 * rng.standard_normal((16, 3))
    target = np.zeros((16, 3))
    model.compile(optimizer="sgd", loss="mse", jit_compile=False)
    model.fit(cs, target, epochs=1, batch_size=8, verbose=0)
    path = os.path.join(tmp_path, "cone.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(cs[:5]).numpy(), model(cs[:5]).numpy(), atol=1e-6)
    clone = kl.ConeProgram.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


@pytest.mark.slow
def test_xla_and_dynamic_batch():
    rng = np.random.default_rng(5)
    cone, c, A, b = random_cone_program({"z": 1, "l": 3, "q": [3], "s": [2]}, 4, 3, rng)
    fn = tf.function(
        lambda c, A, b: solve_cone_program(c, A, b, cone, SETTINGS),
        jit_compile=True,
        reduce_retracing=True,
    )
    ref = _compiled(cone)
    for rows in (4, 2):
        args = [tf.constant(v[:rows]) for v in (c, A, b)]
        x, _, status = fn(*args)
        x_ref, _, _ = ref(*args)
        assert np.all(status.numpy() == 0)
        np.testing.assert_allclose(x.numpy(), x_ref.numpy(), atol=1e-7)
