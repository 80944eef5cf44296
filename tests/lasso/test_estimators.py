"""Estimators vs scikit-learn at tight tolerance; sparse input; validation."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import tensorflow as tf
from lasso_reference import ar1_design, breast_cancer, diabetes, sklearn_solution

import keras_implicit.lasso as L
from keras_implicit.errors import ConvergenceWarning

TIGHT = 1e-12


def _assert_close_to_sklearn(model, X, y, atol=1e-6):
    coef, intercept = sklearn_solution(model, X, y)
    scale = max(1.0, np.max(np.abs(coef)))
    np.testing.assert_allclose(model.coef_, coef, atol=atol * scale, rtol=0)
    np.testing.assert_allclose(model.intercept_, intercept, atol=atol * max(1.0, abs(intercept)))
    np.testing.assert_array_equal(model.coef_ != 0, np.abs(coef) > 0)


@pytest.mark.parametrize("alpha", [0.01, 0.3, 3.0])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_lasso_matches_sklearn_on_diabetes(alpha, fit_intercept):
    X, y = diabetes()
    model = L.Lasso(alpha=alpha, fit_intercept=fit_intercept, tol=TIGHT).fit(X, y)
    _assert_close_to_sklearn(model, X, y)
    assert model.dual_gap_ <= TIGHT * np.var(y if fit_intercept else y * 0 + y) * 2 + 1e-12
    assert model.converged_


def test_lasso_matches_sklearn_on_correlated_design():
    X, y, _ = ar1_design(80, 300, rho=0.8)
    alpha = 0.05 * L.alpha_max(X, y)
    model = L.Lasso(alpha=alpha, tol=TIGHT).fit(X, y)
    _assert_close_to_sklearn(model, X, y)


@pytest.mark.parametrize("alpha_l1,alpha_l2", [(0.05, 0.5), (1.0, 0.01)])
def test_elastic_net_matches_sklearn(alpha_l1, alpha_l2):
    X, y = diabetes()
    model = L.ElasticNet(alpha_l1=alpha_l1, alpha_l2=alpha_l2, tol=TIGHT).fit(X, y)
    _assert_close_to_sklearn(model, X, y)


def test_elastic_net_sklearn_parametrization():
    model = L.ElasticNet.from_sklearn_params(alpha=2.0, l1_ratio=0.25)
    assert model.alpha_l1 == pytest.approx(0.5)
    assert model.alpha_l2 == pytest.approx(1.5)
    assert model.sklearn_params == pytest.approx({"alpha": 2.0, "l1_ratio": 0.25})


def test_weighted_lasso_matches_rescaled_sklearn():
    X, y, _ = ar1_design(60, 40, rho=0.5)
    alphas = np.random.default_rng(1).uniform(0.02, 0.3, 40)
    model = L.WeightedLasso(alphas=alphas, tol=TIGHT).fit(X, y)
    _assert_close_to_sklearn(model, X, y)


def test_weighted_lasso_with_equal_weights_is_lasso():
    X, y = diabetes()
    weighted = L.WeightedLasso(alphas=np.full(10, 0.2), tol=TIGHT).fit(X, y)
    plain = L.Lasso(alpha=0.2, tol=TIGHT).fit(X, y)
    np.testing.assert_allclose(weighted.coef_, plain.coef_, atol=1e-8)


@pytest.mark.parametrize("fit_intercept", [False, True])
def test_sparse_logistic_matches_sklearn(fit_intercept):
    X, y = breast_cancer()
    model = L.SparseLogisticRegression(alpha=0.01, fit_intercept=fit_intercept, tol=TIGHT)
    model.fit(X, y)
    _assert_close_to_sklearn(model, X, y)
    proba = model.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert set(np.unique(model.predict(X))) <= {0, 1}
    assert model.score(X, y) > 0.9


def test_logistic_labels_pm1_and_01_agree():
    X, y = breast_cancer(200)
    a = L.SparseLogisticRegression(alpha=0.02, tol=TIGHT).fit(X, y)
    b = L.SparseLogisticRegression(alpha=0.02, tol=TIGHT).fit(X, 2 * y - 1)
    np.testing.assert_allclose(a.coef_, b.coef_, atol=1e-10)
    np.testing.assert_array_equal(b.predict(X), 2 * a.predict(X) - 1)


@pytest.mark.parametrize("kind", ["csr", "csc", "tf"])
def test_sparse_input_equals_dense(kind):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((70, 50)) * (rng.random((70, 50)) < 0.3)
    y = X[:, :5] @ np.arange(1.0, 6.0) + 0.1 * rng.standard_normal(70)
    if kind == "tf":
        idx = np.argwhere(X != 0)
        Xs = tf.SparseTensor(idx, X[X != 0], X.shape)
    else:
        Xs = getattr(sp, f"{kind}_matrix")(X)
    for model in (L.Lasso(alpha=0.05, tol=TIGHT), L.ElasticNet(alpha_l1=0.05, alpha_l2=0.1)):
        dense = L.clone(model).fit(X, y)
        sparse = L.clone(model).fit(Xs, y)
        np.testing.assert_allclose(sparse.coef_, dense.coef_, atol=1e-9)
        np.testing.assert_allclose(sparse.intercept_, dense.intercept_, atol=1e-9)
        np.testing.assert_allclose(sparse.predict(Xs), dense.predict(X), atol=1e-8)
    labels = (y > np.median(y)).astype(float)
    dense = L.SparseLogisticRegression(alpha=0.01, tol=TIGHT).fit(X, labels)
    sparse = L.SparseLogisticRegression(alpha=0.01, tol=TIGHT).fit(Xs, labels)
    np.testing.assert_allclose(sparse.coef_, dense.coef_, atol=1e-8)


def test_predict_and_score_match_sklearn_conventions():
    X, y = diabetes()
    model = L.Lasso(alpha=0.1, tol=TIGHT).fit(X, y)
    np.testing.assert_allclose(model.predict(X), X @ model.coef_ + model.intercept_)
    residual = np.sum((y - model.predict(X)) ** 2)
    r2 = 1 - residual / np.sum((y - y.mean()) ** 2)
    assert model.score(X, y) == pytest.approx(r2)


def test_warm_start_reuses_solution():
    X, y = diabetes()
    model = L.Lasso(alpha=0.1, tol=TIGHT, warm_start=True).fit(X, y)
    coef = model.coef_.copy()
    model.fit(X, y)
    assert model.n_iter_ == 0  # already optimal: only the gap check
    np.testing.assert_allclose(model.coef_, coef)


def test_not_converged_warns_and_reports_gap():
    X, y, _ = ar1_design(60, 200, rho=0.9)
    model = L.Lasso(alpha=0.01 * L.alpha_max(X, y), tol=1e-14, max_iter=1)
    with pytest.warns(ConvergenceWarning, match="did not converge: duality gap"):
        model.fit(X, y)
    assert not model.converged_
    assert model.dual_gap_ > 0


def test_get_set_params_and_clone():
    model = L.WeightedLasso(alphas=np.ones(3), tol=1e-6)
    params = model.get_params()
    assert set(params) == {"alphas", "fit_intercept", "tol", "max_iter", "warm_start", "positive"}
    copy = L.clone(model).set_params(tol=1e-3)
    assert copy.tol == 1e-3 and model.tol == 1e-6
    assert "WeightedLasso(" in repr(model)
    with pytest.raises(ValueError, match="Invalid parameter 'nope'"):
        model.set_params(nope=1)


@pytest.mark.parametrize(
    "model,match",
    [
        (L.Lasso(alpha=-1.0), r"Received: alpha=-1.0"),
        (L.Lasso(alpha=0.0), r"Received: alpha=0.0"),
        (L.ElasticNet(alpha_l1=1.0, alpha_l2=-0.5), r"Received: alpha_l2=-0.5"),
        (L.WeightedLasso(alphas=[1.0, -2.0, 1.0]), r"Received: alphas\[1\]=-2.0"),
        (L.SparseLogisticRegression(alpha=np.nan), r"Received: alpha=nan"),
        (L.Lasso(max_iter=0), r"Received: max_iter=0"),
        (L.Lasso(tol=-1), r"Received: tol=-1"),
    ],
)
def test_invalid_parameters_raise(model, match):
    X, y = diabetes()
    if isinstance(model, L.WeightedLasso):
        X = X[:, :3]
    with pytest.raises(ValueError, match=match):
        model.fit(X, y if not isinstance(model, L.SparseLogisticRegression) else y > 100)


def test_bad_data_raises():
    X, y = diabetes()
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="`X` contains NaN or infinity"):
        L.Lasso().fit(bad, y)
    with pytest.raises(ValueError, match="`y` contains NaN or infinity"):
        L.Lasso().fit(X, np.where(np.arange(y.size) == 0, np.inf, y))
    with pytest.raises(ValueError, match="mismatched numbers of samples"):
        L.Lasso().fit(X, y[:-1])
    with pytest.raises(ValueError, match="must be 2-D"):
        L.Lasso().fit(X[:, 0], y)
    with pytest.raises(ValueError, match="exactly two classes"):
        L.SparseLogisticRegression().fit(X, np.arange(y.size) % 3)
    model = L.Lasso(alpha=1.0).fit(X, y)
    with pytest.raises(ValueError, match="has 9 features but the model expects 10"):
        model.predict(X[:, :9])
    with pytest.raises(ValueError, match="not fitted"):
        L.Lasso().predict(X)


def test_constant_target_gives_zero_solution():
    X, _ = diabetes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = L.Lasso(alpha=0.1).fit(X, np.full(X.shape[0], 3.0))
    np.testing.assert_array_equal(model.coef_, 0.0)
    assert model.intercept_ == pytest.approx(3.0)


def test_working_set_stays_in_the_bucket_of_the_support():
    from keras_implicit.lasso import _solver

    p = 20_000
    scores = np.linspace(0.0, 1.0, p)
    support = np.zeros(p, bool)
    support[:600] = True  # doubling would ask for 1200 columns: a 4096-wide bucket
    index = _solver._working_set(scores, support, previous=0)
    assert index.size == 1024 and np.all(support[index[:600]])
    assert np.all(np.isin(np.arange(p - 424, p), index))  # the most violating features
    support[:900] = True  # no 25% headroom in 1024 columns: grow
    assert _solver._working_set(scores, support, previous=0).size == 1800
    support[:100] = True
    support[100:] = False  # small supports keep the doubling rule
    assert _solver._working_set(scores, support, previous=0).size == 200


def test_capped_working_sets_match_sklearn(monkeypatch):
    from keras_implicit.lasso import _solver

    monkeypatch.setattr(_solver, "MAX_UNCAPPED_WS", _solver.MIN_WS_SIZE)
    X, y, _ = ar1_design(150, 400, rho=0.5, k=40, noise=0.5, seed=2)
    alpha = 0.02 * L.alpha_max(X, y)
    model = L.Lasso(alpha=alpha, tol=1e-12).fit(X, y)
    coef, intercept = sklearn_solution(model, X, y)
    assert np.count_nonzero(coef) > _solver.MIN_WS_SIZE  # the cap is exercised
    np.testing.assert_allclose(model.coef_, coef, atol=1e-6)
    assert model.intercept_ == pytest.approx(intercept, abs=1e-6)


def test_gram_cache_reassembles_changing_working_sets():
    # Working sets along a search keep some columns, drop others and add new ones;
    # the cached block must always equal Xc_W^T Xc_W / n (dense and sparse designs).
    import scipy.sparse as sp

    from keras_implicit.lasso import _solver
    from keras_implicit.lasso._data import Design

    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 40)) * (rng.random((30, 40)) < 0.5)
    for raw in (X, sp.csc_matrix(X)):
        design, mean = Design.centered(raw)
        Xc = X - mean
        for index in ([3, 5, 9], [1, 3, 9, 20], [1, 3, 9, 20], [0, 2, 20, 39], list(range(40))):
            index = np.array(index)
            block = _solver.gram_block(design, index)
            np.testing.assert_allclose(block, Xc[:, index].T @ Xc[:, index] / 30, atol=1e-12)
        np.testing.assert_allclose(design.columns([4, 7]).numpy(), Xc[:, [4, 7]], atol=1e-12)
        rows = design.columns_as_rows([7, 4, 7]).numpy()
        np.testing.assert_allclose(rows, Xc[:, [7, 4, 7]].T, atol=1e-12)
