"""ConeProgram: solutions vs cvxpy, gradients vs finite differences, spec errors, Keras."""

import math
import os

import cvxpy as cp
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_implicit.layers as kl
from keras_implicit.programs.cone import (
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


def cvxpy_cone_constraints(s, cone):
    """cvxpy constraints s in K for an SCS-style cone dict (PSD blocks scaled svec)."""
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
    return cons


def cvxpy_solution(cone, c, A, b):
    n = c.shape[0]
    x = cp.Variable(n)
    s = b - A @ x
    cons = cvxpy_cone_constraints(s, cone)
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


# ------------------------------------------------------------------ dense reference
#
# Problems with a planted primal-dual solution: per cone block a complementary pair
# (s, y), s in K, y in K*, <s, y> = 0, both on their boundaries where the block allows
# it (strict complementarity); then b = A x* + s and c = -A^T y make x* optimal.
#
# Reference derivative (independent of the layer's ADMM map): with w = s - y, Moreau's
# decomposition gives s = P_K(w) and y = P_K(w) - w, so the solution solves
#     F(x, w) = [c + A^T (P_K(w) - w);  A x + P_K(w) - b] = 0.
# Its Jacobian [[0, A^T (D - I)], [A, D]], D = dP_K(w) (built below in numpy from
# textbook formulas), is inverted densely with numpy.linalg.


def _vec_to_mat(v, k):
    r, c = _tril_indices(k)
    M = np.zeros((k, k))
    vals = v / np.where(r == c, 1.0, math.sqrt(2.0))
    M[r, c] = vals
    M[c, r] = vals
    return M


def _mat_to_vec(M, k):
    r, c = _tril_indices(k)
    return np.where(r == c, 1.0, math.sqrt(2.0)) * M[r, c]


def _planted_blocks(cone, rng):
    """Complementary (s, y) per block, and w = s - y."""
    s, y = [], []
    if cone["z"]:
        s.append(np.zeros(cone["z"]))
        y.append(rng.standard_normal(cone["z"]))
    if cone["l"]:
        active = np.arange(cone["l"]) % 2 == 0
        s.append(np.where(active, 0.0, rng.uniform(0.5, 1.5, cone["l"])))
        y.append(np.where(active, rng.uniform(0.5, 1.5, cone["l"]), 0.0))
    for d in cone["q"]:
        u = rng.standard_normal(d - 1)
        u /= np.linalg.norm(u)
        a, bb = rng.uniform(0.5, 1.5, 2)
        s.append(a * np.r_[1.0, u])
        y.append(bb * np.r_[1.0, -u])
    for k in cone["s"]:
        V, _ = np.linalg.qr(rng.standard_normal((k, k)))
        r = max(1, k // 2)
        lam = np.r_[rng.uniform(0.5, 1.5, r), np.zeros(k - r)]
        mu = np.r_[np.zeros(r), rng.uniform(0.5, 1.5, k - r)]
        s.append(_mat_to_vec(V @ np.diag(lam) @ V.T, k))
        y.append(_mat_to_vec(V @ np.diag(mu) @ V.T, k))
    for _ in range(cone["ep"]):
        rho = rng.uniform(-1.0, 1.0)
        sp, mu = rng.uniform(0.5, 1.5, 2)
        e = math.exp(rho)
        s.append(sp * np.array([rho, 1.0, e]))  # on K's boundary
        y.append(mu * np.array([-e, (rho - 1.0) * e, 1.0]))  # on K*'s boundary, <s, y> = 0
    s, y = np.concatenate(s), np.concatenate(y)
    return s, y


def planted_cone_program(cone, batch, n, rng):
    cone = validate_cone(cone)
    m = cone_dim(cone)
    A = rng.standard_normal((batch, m, n))
    x = rng.standard_normal((batch, n))
    pairs = [_planted_blocks(cone, rng) for _ in range(batch)]
    s = np.stack([p[0] for p in pairs])
    y = np.stack([p[1] for p in pairs])
    b = np.einsum("bmn,bn->bm", A, x) + s
    c = -np.einsum("bmn,bm->bn", A, y)
    return cone, c, A, b, x, s, y


def _dproj_soc(w):
    t, v = w[0], w[1:]
    nv = np.linalg.norm(v)
    if nv <= t:
        return np.eye(len(w))
    if nv <= -t:
        return np.zeros((len(w), len(w)))
    u = v / nv
    J = np.zeros((len(w), len(w)))
    J[0, 0] = 0.5
    J[0, 1:] = J[1:, 0] = 0.5 * u
    J[1:, 1:] = 0.5 * (1 + t / nv) * np.eye(len(v)) - 0.5 * (t / nv) * np.outer(u, u)
    return J


def _dproj_psd_vec(w, k):
    """Daleckii-Krein in SCS vector coordinates, one basis direction at a time."""
    lam, V = np.linalg.eigh(_vec_to_mat(w, k))
    pos = np.maximum(lam, 0.0)
    li, lj = lam[:, None], lam[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        gamma = np.where(
            np.abs(li - lj) > 1e-12,
            (pos[:, None] - pos[None, :]) / (li - lj),
            (lam[:, None] > 0).astype(float),
        )
    T = len(w)
    J = np.zeros((T, T))
    for j in range(T):
        E = _vec_to_mat(np.eye(T)[j], k)
        J[:, j] = _mat_to_vec(V @ (gamma * (V.T @ E @ V)) @ V.T, k)
    return J


def _dproj_exp(s, y):
    """dP_K at w = s - y for s on K's smooth boundary and y != 0 on K*'s.

    w - s = mu grad g(s) with g(p) = p2 exp(p1/p2) - p3 and mu = y_3; differentiating
    the optimality conditions: (I + mu H) ds + grad g dmu = dw, grad g^T ds = 0.
    """
    r, q, _ = s
    e = math.exp(r / q)
    grad = np.array([e, e * (1 - r / q), -1.0])
    hess = e * np.array([[1 / q, -r / q**2, 0], [-r / q**2, r**2 / q**3, 0], [0, 0, 0]])
    mu = y[2]
    kkt = np.zeros((4, 4))
    kkt[:3, :3] = np.eye(3) + mu * hess
    kkt[:3, 3] = grad
    kkt[3, :3] = grad
    return np.linalg.solve(kkt, np.vstack([np.eye(3), np.zeros((1, 3))]))[:3]


def dense_dproj(cone, s, y):
    w = s - y
    blocks, i = [], 0
    if cone["z"]:
        blocks.append(np.zeros((cone["z"], cone["z"])))
        i += cone["z"]
    if cone["l"]:
        blocks.append(np.diag((w[i : i + cone["l"]] > 0).astype(float)))
        i += cone["l"]
    for d in cone["q"]:
        blocks.append(_dproj_soc(w[i : i + d]))
        i += d
    for k in cone["s"]:
        t = k * (k + 1) // 2
        blocks.append(_dproj_psd_vec(w[i : i + t], k))
        i += t
    for _ in range(cone["ep"]):
        blocks.append(_dproj_exp(s[i : i + 3], y[i : i + 3]))
        i += 3
    m = sum(len(B) for B in blocks)
    D = np.zeros((m, m))
    j = 0
    for B in blocks:
        D[j : j + len(B), j : j + len(B)] = B
        j += len(B)
    return D


def dense_reference_grads(cone, A, x, s, y, gx):
    """Gradients of <gx, x*> w.r.t. (c, A, b) from the dense residual-map Jacobian."""
    m, n = A.shape
    D = dense_dproj(cone, s, y)
    J = np.block([[np.zeros((n, n)), A.T @ (D - np.eye(m))], [A, D]])
    lam = np.linalg.solve(J.T, np.r_[gx, np.zeros(m)])
    l1, l2 = lam[:n], lam[n:]
    return -l1, -(np.outer(y, l1) + np.outer(l2, x)), l2


def cvxpy_problem(cone, n, m):
    """Parametrized cvxpy problem (c, A, b as cp.Parameter) for repeated solves."""
    c, A, b = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    x = cp.Variable(n)
    s = b - A @ x
    cons = cvxpy_cone_constraints(s, cone)
    prob = cp.Problem(cp.Minimize(c @ x), cons)

    def solve(cv, Av, bv):
        c.value, A.value, b.value = cv, Av, bv
        prob.solve(solver="CLARABEL", tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
        # Clarabel may call a 1e-11 solution "inaccurate"; it is checked against x* below
        status = "optimal" if prob.status == "optimal_inaccurate" else prob.status
        return status, x.value

    return solve


def _n_active(cone):
    """Number of variables making the planted problem regular (x* and y* unique).

    Strict complementarity: the dual face dimension of each block equals the
    codimension of the primal one; both add up to n exactly when the (generic)
    linearized KKT system is square and nonsingular.
    """
    cone = validate_cone(cone)
    psd = sum((k - max(1, k // 2)) * (k - max(1, k // 2) + 1) // 2 for k in cone["s"])
    return cone["z"] + (cone["l"] + 1) // 2 + len(cone["q"]) + psd + cone["ep"]


def _check_gradients_against_references(cone_spec, seed, n_dirs=1):
    rng = np.random.default_rng(seed)
    n = _n_active(cone_spec)
    cone, c, A, b, x_star, s_star, y_star = planted_cone_program(cone_spec, 2, n, rng)
    # XLA: the exp-cone root finder inside thousands of ADMM steps is ~1000x faster
    # compiled than as graph ops (15 s compile instead of a 35 s graph run)
    fn = tf.function(lambda c, A, b: solve_cone_program(c, A, b, cone, SETTINGS), jit_compile=True)
    params = [tf.constant(v) for v in (c, A, b)]
    W = rng.standard_normal(c.shape)
    with tf.GradientTape() as tape:
        tape.watch(params)
        x, y, status = fn(*params)
        loss = tf.reduce_sum(tf.constant(W) * x)
    grads = [g.numpy() for g in tape.gradient(loss, params)]
    assert status.numpy().tolist() == [0, 0]
    np.testing.assert_allclose(x.numpy(), x_star, atol=1e-6)
    np.testing.assert_allclose(y.numpy(), y_star, atol=1e-6)
    solve = cvxpy_problem(cone, n, A.shape[1])
    for i in range(2):
        # 1. dense solve of the residual map's Jacobian at the planted solution
        ref = dense_reference_grads(cone, A[i], x_star[i], s_star[i], y_star[i], W[i])
        for k in range(3):
            scale = max(1.0, np.abs(ref[k]).max())
            np.testing.assert_allclose(grads[k][i], ref[k], atol=1e-6 * scale)
        # 2. central finite differences of cvxpy (Clarabel) solutions
        status_i, x_cvx = solve(c[i], A[i], b[i])
        assert status_i == "optimal"
        np.testing.assert_allclose(x_cvx, x_star[i], atol=1e-6)
        eps = 1e-4
        for k in range(3):
            for _ in range(n_dirs):
                v = rng.standard_normal(params[k].shape[1:])
                args_p = [c[i], A[i], b[i]]
                args_m = [c[i], A[i], b[i]]
                args_p[k] = args_p[k] + eps * v
                args_m[k] = args_m[k] - eps * v
                _, xp = solve(*args_p)
                _, xm = solve(*args_m)
                fd = W[i] @ (xp - xm) / (2 * eps)
                np.testing.assert_allclose(np.sum(grads[k][i] * v), fd, rtol=5e-4, atol=1e-5)


def test_gradients_match_dense_reference_and_cvxpy_fd_soc_psd_exp():
    """SOC, PSD and exp blocks all active at the solution; gradients w.r.t. c, A, b."""
    _check_gradients_against_references({"z": 1, "l": 2, "q": [3], "s": [2], "ep": 1}, 11)


@pytest.mark.slow  # the default test above already has an active exp cone
def test_gradients_with_active_exp_cones():
    _check_gradients_against_references({"l": 2, "ep": 2}, 12, n_dirs=2)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [21, 22])
def test_gradients_match_references_larger_cones(seed):
    _check_gradients_against_references(
        {"z": 2, "l": 3, "q": [4, 3], "s": [3], "ep": 2}, seed, n_dirs=2
    )


# ------------------------------------------------------------------ infeasibility

CVXPY_STATUS = {"optimal": 0, "infeasible": 2, "unbounded": 3}


def _mixed_batch(cone_spec, n, rng):
    """Rows: feasible, primal infeasible (two ways), unbounded (two ways), feasible."""
    cone, c, A, b = random_cone_program(cone_spec, 6, n, rng)
    m = cone_dim(cone)
    l0 = cone["z"]  # first nonnegative-orthant row
    # row 1: x_0 <= -1 and x_0 >= 1 (two orthant rows)
    A[1, l0 : l0 + 2] = 0.0
    A[1, l0, 0], A[1, l0 + 1, 0] = 1.0, -1.0
    b[1, l0 : l0 + 2] = -1.0
    # row 2: x_0 unbounded below along a direction keeping A x + s = b feasible:
    # A e_0 = -(a point of K) and c_0 > 0 (decreasing ... ) -> use -A d in K, c^T d < 0
    k_point = _interior(cone, rng)
    A[2, :, 0] = -k_point
    c[2] = 0.0
    c[2, 0] = -1.0
    b[2] = A[2] @ rng.standard_normal(n) + _interior(cone, rng)
    # row 3: the first SOC block's t forced to -1 (t = b_t - A_t x with A_t = 0)
    q0 = l0 + cone["l"]
    A[3, q0] = 0.0
    b[3, q0] = -1.0
    # row 4: unbounded along -e_1 with A e_1 = (a point of K)
    A[4, :, 1] = _interior(cone, rng)
    c[4] = 0.0
    c[4, 1] = 1.0
    b[4] = A[4] @ rng.standard_normal(n) + _interior(cone, rng)
    assert A.shape[1] == m
    return cone, c, A, b


def _check_mixed_statuses(cone_spec, n, seed, fn_wrap):
    rng = np.random.default_rng(seed)
    cone, c, A, b = _mixed_batch(cone_spec, n, rng)
    expected = []
    solve = cvxpy_problem(cone, n, A.shape[1])
    for i in range(len(c)):
        status_i, _ = solve(c[i], A[i], b[i])
        expected.append(CVXPY_STATUS[status_i])
    assert expected == [0, 2, 3, 2, 3, 0]
    settings = dict(SETTINGS, tol=1e-8, max_iter=20000)
    fn = fn_wrap(lambda c, A, b: solve_cone_program(c, A, b, cone, settings))
    params = [tf.constant(v) for v in (c, A, b)]
    W = tf.constant(rng.standard_normal(c.shape))
    with tf.GradientTape() as tape:
        tape.watch(params)
        x, _, status = fn(*params)
        loss = tf.reduce_sum(W * x)
    grads = [g.numpy() for g in tape.gradient(loss, params)]
    assert status.numpy().tolist() == expected
    bad = np.array(expected) != 0
    for g in grads:
        assert np.all(np.isfinite(g))
        assert np.all(g[bad] == 0.0)
    # the solved rows are exactly what they are when solved alone
    good = np.where(~bad)[0]
    sub = [tf.constant(v[good]) for v in (c, A, b)]
    with tf.GradientTape() as tape:
        tape.watch(sub)
        x_sub, _, status_sub = fn(*sub)
        loss = tf.reduce_sum(tf.gather(W, good) * x_sub)
    grads_sub = tape.gradient(loss, sub)
    assert np.all(status_sub.numpy() == 0)
    np.testing.assert_allclose(x.numpy()[good], x_sub.numpy(), atol=1e-7)
    for g, gs in zip(grads, grads_sub):
        np.testing.assert_allclose(g[good], gs.numpy(), atol=1e-6)
    for i in good:
        _, x_cvx = solve(c[i], A[i], b[i])
        np.testing.assert_allclose(x.numpy()[i], x_cvx, atol=1e-5)


def test_infeasible_and_unbounded_rows_are_certified_like_cvxpy():
    _check_mixed_statuses({"z": 1, "l": 3, "q": [3]}, 3, 31, tf.function)


@pytest.mark.slow
def test_infeasible_and_unbounded_rows_all_cone_types_xla():
    _check_mixed_statuses(
        {"z": 1, "l": 3, "q": [3], "s": [2], "ep": 1},
        3,
        32,
        lambda f: tf.function(f, jit_compile=True),
    )


def test_quadratic_objective_matches_cvxpy_with_gradients_in_P_and_c():
    """min 1/2 x'Px + c'x over a simplex cut by a ball (zero, non-negative and SOC cones),
    P passed as an input: rows against cvxpy, d/dP and d/dc against central differences."""
    rng = np.random.default_rng(11)
    n, batch = 3, 2
    factors = rng.normal(size=(batch, n, n))
    P = factors @ np.swapaxes(factors, 1, 2) + 0.2 * np.eye(n)
    c = rng.normal(size=(batch, n))
    A = np.concatenate([np.ones((1, n)), -np.eye(n), np.zeros((1, n)), -np.eye(n)])
    b = np.concatenate([[1.0], np.zeros(n), [0.75], np.zeros(n)])
    layer = kl.ConeProgram(
        {"z": 1, "l": n, "q": [n + 1]}, A=A, b=b, tol=1e-11, max_iter=20000, dtype="float64"
    )
    weights = tf.constant(rng.normal(size=(batch, n)))
    solve = tf.function(lambda c_, P_: layer({"c": c_, "P": P_}))

    def loss(c_, P_):
        return float(tf.reduce_sum(weights * solve(tf.constant(c_), tf.constant(P_))))

    c_t, P_t = tf.constant(c), tf.constant(P)
    with tf.GradientTape() as tape:
        tape.watch([c_t, P_t])
        x = solve(c_t, P_t)
        objective = tf.reduce_sum(weights * x)
    grad_c, grad_P = tape.gradient(objective, [c_t, P_t])
    for row in range(batch):
        v = cp.Variable(n)
        reference = cp.Problem(
            cp.Minimize(0.5 * cp.quad_form(v, P[row]) + c[row] @ v),
            [v >= 0, cp.sum(v) == 1, cp.norm(v) <= 0.75],
        )
        reference.solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10)
        np.testing.assert_allclose(x.numpy()[row], v.value, atol=1e-6)
    delta = 1e-6
    for index in [(0, 0), (1, 2)]:
        up, down = c.copy(), c.copy()
        up[index] += delta
        down[index] -= delta
        expected = (loss(up, P) - loss(down, P)) / (2 * delta)
        np.testing.assert_allclose(grad_c.numpy()[index], expected, rtol=1e-4, atol=1e-6)
    for index in [(0, 0, 1), (1, 2, 2)]:
        up, down = P.copy(), P.copy()
        up[index] += delta
        down[index] -= delta
        expected = (loss(c, up) - loss(c, down)) / (2 * delta)
        np.testing.assert_allclose(grad_P.numpy()[index], expected, rtol=1e-4, atol=1e-6)


def test_adaptive_rho_keeps_the_solution_and_cuts_iterations():
    """Residual balancing: same solution as cvxpy, fewer ADMM steps from a poor rho."""
    from keras_implicit.programs.cone import _solve

    rng = np.random.default_rng(11)
    cone, c, A, b = random_cone_program({"l": 4, "q": [4, 3]}, 8, 5, rng)
    c, A, b = (tf.constant(t) for t in (c, A, b))
    runs = {}
    for adaptive in (False, True):
        settings = dict(SETTINGS, rho=0.05, adaptive_rho=adaptive)
        (x, _, _), status, iters, rho = tf.function(
            lambda settings=settings: _solve(c, A, b, cone, settings, 8)
        )()
        np.testing.assert_array_equal(status.numpy(), 0)
        runs[adaptive] = x.numpy(), iters.numpy(), rho.numpy()
    for row in range(8):
        expected = cvxpy_solution(cone, c.numpy()[row], A.numpy()[row], b.numpy()[row])
        for adaptive in (False, True):
            np.testing.assert_allclose(runs[adaptive][0][row], expected, atol=2e-5)
    assert runs[True][1].max() < runs[False][1].max() / 2, (runs[True][1], runs[False][1])
    np.testing.assert_array_equal(runs[False][2], 0.05)  # fixed: rho never moves
    assert np.all(runs[True][2] != 0.05)


@pytest.mark.parametrize("n", [6, 70])  # unrolled Gauss-Jordan, and the fallback beyond 64
def test_spd_inverse_under_xla_matches_numpy_with_its_gradient(n):
    from keras_implicit._dense import spd_inverse

    rng = np.random.default_rng(n)
    B = rng.standard_normal((3, 2 * n, n))
    M = tf.constant(np.einsum("bki,bkj->bij", B, B) + 0.1 * np.eye(n))
    upstream = tf.constant(rng.standard_normal((3, n, n)))

    @tf.function(jit_compile=True)
    def value_and_grad(M):
        with tf.GradientTape() as tape:
            tape.watch(M)
            inverse = spd_inverse(M)
            loss = tf.reduce_sum(upstream * inverse)
        return inverse, tape.gradient(loss, M)

    inverse, grad = value_and_grad(M)
    expected = np.linalg.inv(M.numpy())
    np.testing.assert_allclose(inverse.numpy(), expected, rtol=1e-9, atol=1e-12)
    # d<G, M^-1> / dM = -M^-T G M^-T
    expected_grad = -np.swapaxes(expected, 1, 2) @ upstream.numpy() @ np.swapaxes(expected, 1, 2)
    np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-8, atol=1e-10)


def test_a_failed_gradient_solve_is_reported_under_the_layer_policy(capfd):
    """A gradient solve stopped before `backward_tol` (one GMRES iteration) is reported as
    the layer's `on_failure` says (here in a graph: a printed warning, a failed assertion,
    or nothing) while the forward is solved."""
    rng = np.random.default_rng(6)
    cone, c, A, b = random_cone_program({"l": 4, "q": [3]}, 1, 3, rng)
    cs = tf.constant(c[0] + 0.01 * rng.standard_normal((2, 3)))

    def gradient(on_failure):
        layer = kl.ConeProgram(
            cone, A=A[0], b=b[0], dtype="float64", backward_max_iter=1, on_failure=on_failure
        )

        @tf.function
        def run(cs):
            with tf.GradientTape() as tape:
                tape.watch(cs)
                loss = tf.reduce_sum(layer(cs) ** 2)
            return tape.gradient(loss, cs)

        return run(cs).numpy()

    capfd.readouterr()
    assert np.isfinite(gradient("ignore")).all()
    assert "backward linear solve" not in capfd.readouterr().err
    assert np.isfinite(gradient("warn")).all()
    assert "custom_fixed_point: backward linear solve (gmres)" in capfd.readouterr().err
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"backward linear solve \(gmres\)"):
        gradient("raise")
