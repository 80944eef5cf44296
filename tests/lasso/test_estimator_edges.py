"""Estimators at their edges, as scikit-learn's coordinate-descent tests use them.

The cases follow sklearn/linear_model/tests/test_coordinate_descent.py (rewritten for
this API) and compare with scikit-learn at tight tolerance; ``positive=True``,
``sample_weight``, multi-target y, ``precompute`` and ``check_input`` are not part of
this API and are not ported.
"""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from lasso_reference import breast_cancer, diabetes, sklearn_solution
from sklearn import linear_model as lm

import keras_implicit.lasso as L
from keras_implicit.errors import ConvergenceWarning

TIGHT = 1e-12
SK = {"tol": 1e-13, "max_iter": 1_000_000}


def _build_dataset(n_samples=50, n_features=200, n_informative=10, seed=0):
    """An ill-posed regression with many noisy features (scikit-learn's test data)."""
    rng = np.random.RandomState(seed)
    w = rng.randn(n_features)
    w[n_informative:] = 0.0
    X = rng.randn(n_samples, n_features)
    return X, X @ w


def _overflow_data():
    rng = np.random.RandomState(0)
    X = np.finfo(np.float64).max * rng.uniform(size=(10, 2))
    y = rng.randint(0, 2, size=10).astype(float)
    return X, y


def _all_models(**kwargs):
    return [
        L.Lasso(alpha=0.1, **kwargs),
        L.ElasticNet(alpha_l1=0.05, alpha_l2=0.05, **kwargs),
        L.WeightedLasso(alphas=0.1, **kwargs),
        L.SparseLogisticRegression(alpha=0.1, **kwargs),
    ]


def _close_to_sklearn(model, X, y, atol=1e-6):
    coef, intercept = sklearn_solution(model, X, y)
    scale = max(1.0, np.max(np.abs(coef)))
    np.testing.assert_allclose(model.coef_, coef, atol=atol * scale, rtol=0)
    assert model.intercept_ == pytest.approx(intercept, abs=atol * max(1.0, abs(intercept)))


# -- overflow: an error, never a converged all-zero model ---------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("index", range(4))
def test_overflow_raises_instead_of_reporting_convergence(index, fit_intercept):
    X, y = _overflow_data()
    model = _all_models(fit_intercept=fit_intercept)[index]
    with pytest.raises(ValueError, match="overflowed .* rescale X and y"):
        model.fit(X, y)
    assert not hasattr(model, "converged_")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_overflow_reference_raises_in_sklearn_too():
    X, y = _overflow_data()
    with pytest.raises(ValueError, match="non-finite parameter values"):
        lm.ElasticNet(alpha=0.1).fit(X, y)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    "x_scale,y_scale,fit_intercept",
    [(1e200, 1.0, False), (1e200, 1.0, True), (1.0, 1e200, True), (1.0, 1e200, False)],
)
def test_overflow_in_products_raises(x_scale, y_scale, fit_intercept):
    # Finite means, but ||X_j||^2 or ||y||^2 overflow.
    X, y = _build_dataset(20, 5)
    model = L.Lasso(alpha=1e-3 * x_scale * y_scale, fit_intercept=fit_intercept)
    with pytest.raises(ValueError, match="overflowed"):
        model.fit(X * x_scale, y * y_scale)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_hypergradient_overflow_raises():
    X, y = diabetes()
    X_train, y_train, X_val, y_val = X[:300], y[:300], X[300:], y[300:]
    big = _overflow_data()[0]
    with pytest.raises(ValueError, match="overflowed"):
        L.hypergradient(L.Lasso(0.1), L.HeldOutMSE(X_val[:10, :2], y_val[:10]), big, y[:10])
    with pytest.raises(ValueError, match="not finite .* overflowed"):
        L.hypergradient(L.Lasso(0.1), L.HeldOutMSE(1e300 * X_val, y_val), X_train, y_train)
    with pytest.raises(ValueError, match="overflowed"):
        L.search(L.Lasso(0.1), L.HeldOutMSE(X_val[:10, :2], y_val[:10]), big, y[:10], verbose=0)


# -- ElasticNet: l1_ratio = 1 (the Lasso) and l1_ratio = 0 (a ridge) ------------------
@pytest.mark.parametrize("alpha", [0.01, 0.5])
def test_elastic_net_with_l1_ratio_one_matches_sklearn(alpha):
    X, y = diabetes()
    model = L.ElasticNet.from_sklearn_params(alpha, l1_ratio=1.0, tol=TIGHT).fit(X, y)
    sk = lm.ElasticNet(alpha=alpha, l1_ratio=1.0, **SK).fit(X, y)
    scale = np.max(np.abs(sk.coef_))
    np.testing.assert_allclose(model.coef_, sk.coef_, atol=1e-6 * scale, rtol=0)
    assert model.intercept_ == pytest.approx(sk.intercept_, abs=1e-6 * abs(sk.intercept_))
    assert model.converged_ and model.alpha_l2 == 0.0
    assert model.sklearn_params == pytest.approx({"alpha": alpha, "l1_ratio": 1.0})
    lasso = L.Lasso(alpha=alpha, tol=TIGHT).fit(X, y)
    np.testing.assert_allclose(model.coef_, lasso.coef_, atol=1e-9 * scale)


def test_elastic_net_without_ridge_is_refused_by_tuning():
    X, y = diabetes()
    model = L.ElasticNet(alpha_l1=0.1, alpha_l2=0.0)
    criterion = L.HeldOutMSE(X[300:], y[300:])
    with pytest.raises(ValueError, match=r"alpha_l2=0.*Use ki.lasso.Lasso.*alpha_l2=0.0"):
        L.hypergradient(model, criterion, X[:300], y[:300])
    with pytest.raises(ValueError, match=r"cannot be tuned on a log scale"):
        L.search(model, criterion, X[:300], y[:300], verbose=0)


def test_elastic_net_l1_ratio_zero_and_bad_alpha_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"pure ridge penalty.*Received: l1_ratio=0"):
        L.ElasticNet.from_sklearn_params(1.0, l1_ratio=0)
    with pytest.raises(ValueError, match=r"Received: l1_ratio=1.5"):
        L.ElasticNet.from_sklearn_params(1.0, l1_ratio=1.5)
    with pytest.raises(ValueError, match=r"Received: alpha=0"):
        L.ElasticNet.from_sklearn_params(0, l1_ratio=0.5)
    with pytest.raises(ValueError, match=r"alpha_l2.*non-negative.*Received: alpha_l2=-1.0"):
        L.ElasticNet(alpha_l1=1.0, alpha_l2=-1.0).fit(*diabetes())
    with pytest.raises(ValueError, match=r"Received: alpha_l1=0.0"):
        L.ElasticNet(alpha_l1=0.0, alpha_l2=1.0).fit(*diabetes())


# -- warm starts from a hand-set coef_ ------------------------------------------------
@pytest.mark.parametrize("index", range(4))
def test_warm_start_from_hand_set_coef(index):
    X, y = breast_cancer(200) if index == 3 else diabetes()
    model = _all_models(tol=TIGHT, warm_start=True)[index]
    model.coef_ = [0.5] * X.shape[1]  # a list, no intercept_: as scikit-learn accepts
    model.fit(X, y)
    assert model.converged_
    if index == 3:  # saga at tight tolerance takes seconds: test_estimators compares it
        cold = L.clone(model).set_params(warm_start=False).fit(X, y)
        np.testing.assert_allclose(model.coef_, cold.coef_, atol=1e-6)
        assert model.intercept_ == pytest.approx(cold.intercept_, abs=1e-6)
    else:
        _close_to_sklearn(model, X, y)


def test_warm_start_from_a_converged_coef_needs_no_iteration():
    X, y = _build_dataset()
    sk = lm.ElasticNet(alpha=1e-3, tol=1e-3, **{"max_iter": 10_000}).fit(X, y)
    model = L.ElasticNet.from_sklearn_params(1e-3, 0.5, tol=1e-3)
    model.fit(X, y)
    n_iter = model.n_iter_
    assert n_iter > 0
    model.fit(X, y)
    assert model.n_iter_ == n_iter  # cold starts are deterministic
    model.set_params(warm_start=True).fit(X, y)
    assert model.n_iter_ == 0  # the gap is checked before any iteration
    # Warm start from scikit-learn's own (less accurate) solution, set by hand.
    fresh = L.ElasticNet.from_sklearn_params(1e-3, 0.5, tol=1e-3, warm_start=True)
    fresh.coef_ = sk.coef_.copy()
    fresh.fit(X, y)
    assert fresh.converged_


@pytest.mark.slow  # ~12 s: CD moves mass between collinear columns by alpha per epoch
def test_warm_start_from_bad_coef_warns_like_sklearn():
    # scikit-learn's test_enet_coordinate_descent_raises_convergence: a very bad start,
    # one iteration and a tiny tolerance end with a ConvergenceWarning.
    X = np.array([[-1, -1, 1, 1], [1, 1, -1, -1]])
    y = np.array([-1, 1])
    model = L.Lasso(alpha=1e-10, fit_intercept=False, warm_start=True, max_iter=1, tol=1e-10)
    model.coef_ = np.array([1, 1, 1, 1000])
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        model.fit(X, y)
    assert not model.converged_ and model.dual_gap_ > 0


def test_warm_start_with_unusable_coef_raises():
    X, y = diabetes()
    model = L.Lasso(alpha=0.1, warm_start=True)
    model.coef_ = np.zeros(5)
    with pytest.raises(ValueError, match=r"coef_`, which has 5 entries, but X has 10"):
        model.fit(X, y)
    model.coef_ = np.full(10, np.nan)
    with pytest.raises(ValueError, match="coef_`, which contains NaN"):
        model.fit(X, y)
    model.coef_ = ["a"] * 10
    with pytest.raises(ValueError, match="`coef_` must be a numeric array"):
        model.fit(X, y)


# -- sparse_coef_ and predict after coef_ is assigned ---------------------------------
def test_sparse_coef_after_assigning_a_list():
    X, y = diabetes()
    model = L.Lasso(alpha=0.5).fit(X, y)
    sk = lm.Lasso(alpha=0.5).fit(X, y)
    values = [0.0, 1.5, 0.0, -2.0] + [0.0] * 6
    model.coef_, sk.coef_ = list(values), np.array(values)
    ours, theirs = model.sparse_coef_, sk.sparse_coef_
    assert sp.issparse(ours) and ours.format == "csr" and ours.shape == theirs.shape == (1, 10)
    np.testing.assert_array_equal(ours.toarray(), theirs.toarray())
    np.testing.assert_allclose(model.predict(X[:5]), X[:5] @ np.array(values) + model.intercept_)


# -- scikit-learn's toy problems --------------------------------------------------------
def test_lasso_zero_data():
    X, y = np.zeros((3, 1)), np.zeros(3)
    model = L.Lasso(alpha=0.1).fit(X, y)
    np.testing.assert_array_equal(model.coef_, [0.0])
    np.testing.assert_array_equal(model.predict([[1.0], [2.0], [3.0]]), [0.0, 0.0, 0.0])
    assert model.dual_gap_ == 0.0 and model.converged_


@pytest.mark.parametrize(
    "alpha,coef,pred",
    [
        (1e-8, 1.0, [2.0, 3.0, 4.0]),
        (0.1, 0.85, [1.7, 2.55, 3.4]),
        (0.5, 0.25, [0.5, 0.75, 1.0]),
        (1.0, 0.0, [0.0, 0.0, 0.0]),
    ],
)
def test_lasso_toy(alpha, coef, pred):
    X, y, T = [[-1], [0], [1]], [-1, 0, 1], [[2], [3], [4]]
    model = L.Lasso(alpha=alpha, tol=TIGHT).fit(X, y)
    sk = lm.Lasso(alpha=alpha, **SK).fit(X, y)
    np.testing.assert_allclose(model.coef_, [coef], atol=1e-7)
    np.testing.assert_allclose(model.coef_, sk.coef_, atol=1e-6)
    np.testing.assert_allclose(model.predict(T), pred, atol=1e-7)
    assert model.dual_gap_ == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "alpha,l1_ratio,coef",
    [(1e-8, 1.0, 1.0), (0.5, 0.3, 0.50819), (0.5, 0.5, 0.45454)],
)
def test_elastic_net_toy(alpha, l1_ratio, coef):
    X, y = np.array([[-1.0], [0.0], [1.0]]), [-1, 0, 1]
    model = L.ElasticNet.from_sklearn_params(alpha, l1_ratio, tol=TIGHT).fit(X, y)
    sk = lm.ElasticNet(alpha=alpha, l1_ratio=l1_ratio, **SK).fit(X, y)
    np.testing.assert_allclose(model.coef_, [coef], atol=1e-5)
    np.testing.assert_allclose(model.coef_, sk.coef_, atol=1e-6)
    assert model.intercept_ == pytest.approx(sk.intercept_, abs=1e-6)
    assert model.dual_gap_ == pytest.approx(0.0, abs=1e-12)


def test_dual_gap_is_a_certified_gap_of_the_normalized_objective():
    # scikit-learn checks dual_gap_ = primal - dual for the datafit 1/(2n)||y - Xw||^2
    # and the dual point r / max(1, ||X^T r||_inf / (n alpha)). Ours scales the same
    # residual optimally, so it lies between that gap and the true suboptimality.
    X, y = _build_dataset(n_samples=10, n_features=30)
    n = len(y)
    alpha = 0.01 * np.max(np.abs(X.T @ y)) / n
    model = L.Lasso(alpha=alpha, fit_intercept=False, tol=1e-3, max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, y)
    w = model.coef_
    r = y - X @ w
    primal = 0.5 * np.mean(r**2) + alpha * np.sum(np.abs(w))
    theta = r / max(1.0, np.max(np.abs(X.T @ r)) / (n * alpha))
    sklearn_gap = primal - 0.5 * (np.mean(y**2) - np.mean((y - theta) ** 2))
    sk = lm.Lasso(alpha=alpha, fit_intercept=False, **SK).fit(X, y)
    optimum = 0.5 * np.mean((y - X @ sk.coef_) ** 2) + alpha * np.sum(np.abs(sk.coef_))
    assert primal - optimum - 1e-12 <= model.dual_gap_ <= sklearn_gap + 1e-12
    assert model.dual_gap_ > 0
    converged = L.Lasso(alpha=alpha, fit_intercept=False, tol=TIGHT).fit(X, y)
    np.testing.assert_allclose(converged.coef_, sk.coef_, atol=1e-6 * np.abs(sk.coef_).max())


# -- data handling --------------------------------------------------------------------
def test_readonly_and_memmapped_data(tmp_path):
    X, y = np.array([[-1.0], [0.0], [1.0]]), np.array([-1.0, 0.0, 1.0])
    X.setflags(write=False)
    y.setflags(write=False)
    model = L.Lasso(alpha=0.5).fit(X, y)
    np.testing.assert_allclose(model.coef_, [0.25], atol=1e-9)
    path = tmp_path / "X.dat"
    X_map = np.memmap(path, dtype=np.float64, mode="w+", shape=(3, 1))
    X_map[:] = X
    X_map.flush()
    X_map = np.memmap(path, dtype=np.float64, mode="r", shape=(3, 1))
    np.testing.assert_allclose(L.Lasso(alpha=0.5).fit(X_map, y).coef_, [0.25], atol=1e-9)


@pytest.mark.parametrize("kind", ["dense_F", "csr", "csc"])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_memory_layouts_and_sparse_input_match_sklearn(kind, fit_intercept):
    X, y = _build_dataset(40, 60)
    X = X * (np.random.RandomState(1).rand(*X.shape) < 0.4)
    Xk = np.asfortranarray(X) if kind == "dense_F" else getattr(sp, f"{kind}_matrix")(X)
    for model in (
        L.Lasso(alpha=0.05, fit_intercept=fit_intercept, tol=TIGHT),
        L.ElasticNet(alpha_l1=0.05, alpha_l2=0.1, fit_intercept=fit_intercept, tol=TIGHT),
    ):
        model.fit(Xk, y)
        coef, intercept = sklearn_solution(model, Xk, y)  # scikit-learn on the same input
        np.testing.assert_allclose(model.coef_, coef, atol=1e-6 * np.abs(coef).max())
        assert model.intercept_ == pytest.approx(intercept, abs=1e-6)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_fit_does_not_modify_its_inputs(fit_intercept):
    X, y = _build_dataset(30, 20)
    for data in (np.asfortranarray(X), X.copy(), sp.csr_matrix(X)):
        before = data.copy()
        y_before = y.copy()
        L.ElasticNet(alpha_l1=0.1, alpha_l2=0.1, fit_intercept=fit_intercept).fit(data, y)
        after = data.toarray() if sp.issparse(data) else data
        np.testing.assert_array_equal(after, before.toarray() if sp.issparse(data) else before)
        np.testing.assert_array_equal(y, y_before)


def test_no_intercept_when_fit_intercept_is_false():
    X, y = diabetes()
    for model in (L.Lasso(0.1, fit_intercept=False), L.ElasticNet(0.1, 0.1, fit_intercept=False)):
        model.set_params(tol=TIGHT).fit(X, y + 100.0)
        assert model.intercept_ == 0.0
        _close_to_sklearn(model, X, y + 100.0)


def test_integer_inputs_and_column_y():
    X, y = [[0, 0], [1, 1], [-1, -1]], [0, 1, 2]
    for cls in (L.Lasso, L.ElasticNet):
        ints = cls(fit_intercept=False).fit(X, y)
        floats = cls(fit_intercept=False).fit(np.array(X, float), np.array(y, float))
        column = cls(fit_intercept=False).fit(X, np.array(y)[:, None])
        np.testing.assert_array_equal(ints.coef_, floats.coef_)
        np.testing.assert_array_equal(column.coef_, floats.coef_)
        sk_cls = lm.Lasso if cls is L.Lasso else lm.ElasticNet
        sk = sk_cls(alpha=1.0, **({"l1_ratio": 0.5} if cls is L.ElasticNet else {}))
        reference = L.ElasticNet.from_sklearn_params(1.0, 0.5) if cls is L.ElasticNet else None
        if reference is not None:
            floats = reference.set_params(fit_intercept=False, tol=TIGHT).fit(X, y)
        sk.set_params(fit_intercept=False, **SK).fit(X, y)
        np.testing.assert_allclose(floats.coef_, sk.coef_, atol=1e-6)


def test_float32_input_is_solved_in_float64():
    # scikit-learn keeps float32 coefficients for float32 X; this API documents float64
    # solves, so coef_ is float64 and equals the solution of the float32 data.
    X, y = _build_dataset(20, 10)
    X32, y32 = X.astype(np.float32), y.astype(np.float32)
    for fit_intercept in (True, False):
        model = L.ElasticNet.from_sklearn_params(0.5, 0.5, fit_intercept=fit_intercept, tol=TIGHT)
        model.fit(X32, y32)
        assert model.coef_.dtype == np.float64
        sk = lm.ElasticNet(alpha=0.5, fit_intercept=fit_intercept, **SK)
        sk.fit(X32.astype(np.float64), y32.astype(np.float64))
        np.testing.assert_allclose(model.coef_, sk.coef_, atol=1e-6)
        sk32 = lm.ElasticNet(alpha=0.5, fit_intercept=fit_intercept).fit(X32, y32)
        np.testing.assert_allclose(model.coef_, sk32.coef_, atol=1e-4)  # float32 accuracy


def test_coef_shape_and_attribute_types():
    model = L.Lasso(fit_intercept=False).fit(np.ones((3, 1)), np.ones(3))
    assert model.coef_.shape == (1,)
    assert isinstance(model.n_iter_, int) and isinstance(model.dual_gap_, float)
    assert model.n_features_in_ == 1


@pytest.mark.parametrize("value", [0.0, 5.0])
def test_uniform_targets_are_predicted_exactly(value):
    rng = np.random.RandomState(0)
    X_train, X_test = rng.random_sample((10, 3)), rng.random_sample((10, 3))
    y = np.full(10, value)
    for model in (L.Lasso(0.1), L.ElasticNet(0.1, 0.1), L.WeightedLasso(0.1)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_array_equal(model.fit(X_train, y).predict(X_test), y)


# -- tolerances below float64 resolution ------------------------------------------------
def test_tolerance_below_float64_resolution_is_floored_with_a_warning():
    X, y = diabetes()
    labels = (y > np.median(y)).astype(float)
    for model, target in (
        (L.ElasticNet.from_sklearn_params(0.2, 0.5, tol=0.0), y),
        (L.SparseLogisticRegression(alpha=0.01, tol=1e-20), labels),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(X, target)
        messages = [str(w.message) for w in caught]
        assert any("below what float64 duality gaps resolve" in m for m in messages), messages
        assert not any(issubclass(w.category, ConvergenceWarning) for w in caught), messages
        assert model.converged_ and model.n_iter_ < model.max_iter
    _close_to_sklearn(model.set_params(tol=TIGHT).fit(X, labels), X, labels)


# -- robustness rows: what each bad input gets ------------------------------------------
def _scaled_problem():
    X, y = diabetes()
    X = (X - X.mean(0)) / X.std(0)
    return X[:300], y[:300], X[300:], y[300:]


@pytest.mark.parametrize(
    "x_scale,y_scale", [(1e-150, 1e-100), (1e-150, 1e100), (1e150, 1e-100), (1e150, 1e100)]
)
def test_extreme_scales_give_the_rescaled_solution_and_hypergradient(x_scale, y_scale):
    # b(sX, ty, alpha s t, ridge s^2) = (t / s) b(X, y, alpha, ridge); the held-out MSE
    # and its gradient in the log penalties scale by t^2.
    X, y, X_val, y_val = _scaled_problem()
    s, t = x_scale, y_scale
    models = [(L.Lasso(1.0, tol=TIGHT), L.Lasso(1.0 * s * t, tol=TIGHT))]
    if 1e-100 <= t / s <= 1e100:  # beyond, the ridge gradient b^T v overflows (an error)
        models.append(
            (L.ElasticNet(0.5, 0.2, tol=TIGHT), L.ElasticNet(0.5 * s * t, 0.2 * s * s, tol=TIGHT))
        )
    for model, scaled in models:
        value, grad = L.hypergradient(model, L.HeldOutMSE(X_val, y_val), X, y)
        value_s, grad_s = L.hypergradient(scaled, L.HeldOutMSE(s * X_val, t * y_val), s * X, t * y)
        scale = np.max(np.abs(model.coef_))
        np.testing.assert_allclose(scaled.coef_ * s / t, model.coef_, atol=1e-9 * scale)
        assert scaled.converged_
        assert value_s / t**2 == pytest.approx(value, rel=1e-9)
        np.testing.assert_allclose(grad_s / t**2, grad, rtol=1e-7, atol=1e-9 * np.abs(grad).max())


@pytest.mark.parametrize("x_scale", [1e30, 1e150])  # small X: see the robustness notes
def test_logistic_at_extreme_scales(x_scale):
    X, y = breast_cancer(200)
    reference = L.SparseLogisticRegression(alpha=0.02, tol=TIGHT).fit(X, y)
    scaled = L.SparseLogisticRegression(alpha=0.02 * x_scale, tol=TIGHT).fit(x_scale * X, y)
    np.testing.assert_allclose(scaled.coef_ * x_scale, reference.coef_, atol=1e-8)
    assert scaled.intercept_ == pytest.approx(reference.intercept_, abs=1e-8)


def _bad_data_cases(X, y):
    nan_X, inf_y = X.copy(), y.copy()
    nan_X[1, 1], inf_y[0] = np.nan, -np.inf
    return [
        (nan_X, y, "`X` contains NaN or infinity"),
        (X, inf_y, "`y` contains NaN or infinity"),
        (sp.csr_matrix(nan_X), y, "`X` contains NaN or infinity"),
        (X[:, 0], y, "`X` must be 2-D"),
        (X[None], y, "`X` must be 2-D"),
        (X[:0], y[:0], "at least one sample"),
        (X, y[:, None, None], r"`y` must be 1-D .* Received shape \(\d+, 1, 1\)"),
        (X, y[:-1], "mismatched numbers of samples"),
        (X + 1j, y, "complex data is not supported"),
        (X.astype(str), y, r"`X` must be numeric. Received dtype <U"),
        (sp.csr_matrix(X + 1j), y, "must be real numeric"),
        (X, y.astype(str), r"`y` must be numeric"),
        (np.array([[{}] * X.shape[1]] * X.shape[0]), y, "must be a real numeric array"),
    ]


@pytest.mark.parametrize("index", range(4))
def test_every_estimator_refuses_bad_data_with_a_clear_message(index):
    X, y = diabetes()
    X, y = X[:40], y[:40]
    labels = (y > np.median(y)).astype(float)
    for bad_X, bad_y, match in _bad_data_cases(X, labels if index == 3 else y):
        model = _all_models()[index]
        with pytest.raises(ValueError, match=match):
            model.fit(bad_X, bad_y)
        assert not hasattr(model, "coef_")
    model = _all_models()[index].fit(X, labels if index == 3 else y)
    with pytest.raises(ValueError, match="has 3 features but the model expects 10"):
        model.predict(X[:, :3])
    with pytest.raises(ValueError, match="`X` contains NaN"):
        model.predict(np.where(X > 0, np.nan, X))


def test_criteria_hypergradient_and_search_refuse_bad_data():
    X, y, X_val, y_val = _scaled_problem()
    labels, labels_val = (y > 150).astype(float), (y_val > 150).astype(float)
    with pytest.raises(ValueError, match="`X_val` contains NaN"):
        L.HeldOutLogistic(np.where(X_val > 1, np.inf, X_val), labels_val)
    with pytest.raises(ValueError, match="`y_val` contains NaN"):
        L.HeldOutMSE(X_val, np.where(y_val > 100, np.nan, y_val))
    with pytest.raises(ValueError, match="`X_val` must be real"):
        L.HeldOutMSE(X_val + 1j, y_val)
    with pytest.raises(ValueError, match=r"`y_val` must be 1-D"):
        L.HeldOutMSE(X_val, y_val[:, None, None])
    with pytest.raises(ValueError, match=r"`y_val` must be 1-D"):
        L.HeldOutLogistic(X_val, np.c_[labels_val, labels_val])
    with pytest.raises(ValueError, match="`y_val` must have as many targets as `y`"):
        L.hypergradient(L.Lasso(0.5), L.HeldOutMSE(X_val, np.c_[y_val, y_val]), X, y)
    with pytest.raises(ValueError, match=r"`y` must be 1-D \(n_samples,\)"):
        L.SparseLogisticRegression(0.01).fit(X, np.c_[labels, labels])
    with pytest.raises(ValueError, match="not among the model classes"):
        L.hypergradient(
            L.SparseLogisticRegression(0.01), L.HeldOutLogistic(X_val, labels_val + 2), X, labels
        )
    with pytest.raises(ValueError, match="Received: sigma=inf"):
        L.SURE(sigma=np.inf)
    with pytest.raises(ValueError, match="Received: sigma=-1"):
        L.SURE(sigma=-1)
    with pytest.raises(ValueError, match="`cv` must be an integer >= 2"):
        L.CrossVal(cv=[1, 2])
    with pytest.raises(ValueError, match="folds need at least as many samples"):
        L.hypergradient(L.Lasso(0.5), L.CrossVal(cv=50), X[:10], y[:10])
    bad = X.copy()
    bad[0, 0] = np.nan
    for criterion in (L.HeldOutMSE(X_val, y_val), L.CrossVal(cv=3), L.SURE(50.0)):
        with pytest.raises(ValueError, match="`X` contains NaN"):
            L.hypergradient(L.Lasso(0.5), criterion, bad, y)
        with pytest.raises(ValueError, match="`X` contains NaN"):
            L.search(L.Lasso(0.5), criterion, bad, y, verbose=0)
    with pytest.raises(ValueError, match="`y` must be 1-D"):
        L.search(L.Lasso(0.5), L.HeldOutMSE(X_val, y_val), X, np.c_[y, y], verbose=0)
    with pytest.raises(ValueError, match="Received: alpha=0"):
        L.search(L.Lasso(alpha=0), L.HeldOutMSE(X_val, y_val), X, y, verbose=0)
    with pytest.raises(ValueError, match=r"Received: alphas\[2\]=0.0"):
        L.search(L.WeightedLasso(alphas=[1, 1, 0.0] + [1] * 7), L.CrossVal(), X, y, verbose=0)
    with pytest.raises(ValueError, match="Received: tol=-1"):
        L.hypergradient(L.Lasso(0.5, tol=-1), L.SURE(50.0), X, y)


@pytest.mark.parametrize("name", ["heldout", "cv", "sure", "logistic", "cv_logistic"])
def test_empty_support_gives_a_zero_hypergradient_with_a_warning(name):
    # Above alpha_max the solution is zero on a neighbourhood of the penalty: the
    # derivative is exactly 0, and the warning tells the outer loop to decrease it.
    X, y, X_val, y_val = _scaled_problem()
    logistic = "logistic" in name
    target, target_val = ((y > 150).astype(float), (y_val > 150).astype(float))
    if not logistic:
        target, target_val = y, y_val
    alpha = 2.0 * L.alpha_max(X, target, loss="logistic" if logistic else "squared")
    model = L.SparseLogisticRegression(alpha, tol=TIGHT) if logistic else L.Lasso(alpha)
    criterion = {
        "heldout": L.HeldOutMSE(X_val, y_val),
        "cv": L.CrossVal("mse", cv=3),
        "sure": L.SURE(50.0),
        "logistic": L.HeldOutLogistic(X_val, target_val),
        "cv_logistic": L.CrossVal("logistic", cv=3),
    }[name]
    with pytest.warns(L.EmptySupportWarning, match="all zeros"):
        value, grad, info = L.hypergradient(model, criterion, X, target, return_info=True)
    np.testing.assert_array_equal(grad, [0.0])
    assert info.empty_support and np.isfinite(value)
    if name == "heldout":
        assert value == pytest.approx(np.mean((y_val - y.mean()) ** 2))
    if name == "logistic":
        p = target.mean()
        expected = -np.mean(target_val * np.log(p) + (1 - target_val) * np.log(1 - p))
        assert value == pytest.approx(expected, rel=1e-6)
