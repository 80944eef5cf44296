"""scikit-learn's Lasso options: ``positive=True``, ``fit(X, y, sample_weight)`` and a
2-D ``y`` (one problem per target). Solutions against scikit-learn to 1e-6;
hypergradients against central finite differences of criteria from scikit-learn
solutions."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from lasso_reference import ar1_design, diabetes, finite_difference, sklearn_solution
from sklearn import linear_model as lm
from sklearn.metrics import r2_score

import keras_implicit.lasso as L

TIGHT = 1e-12
RTOL = 1e-4


def _assert_matches(model, X, y, sample_weight=None, atol=1e-6):
    coef, intercept = sklearn_solution(model, X, y, sample_weight)
    scale = max(1.0, np.max(np.abs(coef)))
    assert np.shape(model.coef_) == np.shape(coef)
    np.testing.assert_allclose(model.coef_, coef, atol=atol * scale, rtol=0)
    np.testing.assert_allclose(model.intercept_, intercept, atol=atol * scale, rtol=1e-9)
    np.testing.assert_array_equal(model.coef_ != 0, np.abs(coef) > 0)


def _weights(n, seed=0):
    w = np.random.default_rng(seed).uniform(0.2, 3.0, n)
    w[::7] = 0.0  # zero weights drop samples, as in scikit-learn
    return w


def _gradient_close(grad, reference):
    scale = np.max(np.abs(reference))
    assert scale > 0
    np.testing.assert_allclose(grad, reference, rtol=0, atol=RTOL * scale)


# -- positive ------------------------------------------------------------------------
def _models(**options):
    rng = np.random.default_rng(3)
    return {
        "lasso": L.Lasso(alpha=0.05, tol=TIGHT, **options),
        "enet": L.ElasticNet(alpha_l1=0.03, alpha_l2=0.02, tol=TIGHT, **options),
        "weighted": L.WeightedLasso(alphas=rng.uniform(0.02, 0.1, 10), tol=TIGHT, **options),
    }


@pytest.mark.parametrize("name", ["lasso", "enet", "weighted"])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_positive_matches_sklearn(name, fit_intercept):
    X, y = diabetes()
    X = X[:300] * 10
    y = y[:300]
    unconstrained = _models(fit_intercept=fit_intercept)[name].fit(X, y)
    assert np.any(unconstrained.coef_ < 0)  # the constraint is active
    model = _models(fit_intercept=fit_intercept, positive=True)[name].fit(X, y)
    assert np.all(model.coef_ >= 0) and model.converged_
    _assert_matches(model, X, y)


def test_positive_sparse_design_and_validation():
    X, y = diabetes()
    model = L.Lasso(alpha=0.05, positive=True, tol=TIGHT).fit(sp.csr_matrix(X * 10), y)
    _assert_matches(model, X * 10, y)
    with pytest.raises(ValueError, match="Received: positive='yes'"):
        L.Lasso(positive="yes").fit(X, y)


@pytest.mark.parametrize("name", ["lasso", "enet", "weighted"])
def test_positive_hypergradient_matches_finite_differences(name):
    X, y = diabetes()
    X = X * 10
    model = _models(positive=True)[name]
    criterion = L.HeldOutMSE(X[300:], y[300:])
    _, grad, info = L.hypergradient(model, criterion, X[:300], y[:300], return_info=True)
    assert np.all(model.coef_ >= 0)
    assert info.support_sizes[0] == np.count_nonzero(model.coef_)
    _gradient_close(grad, finite_difference(model, criterion, X[:300], y[:300]))


# -- sample_weight -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lasso", "enet"])
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("sparse", [False, True])
def test_sample_weight_matches_sklearn(name, fit_intercept, sparse):
    X, y = diabetes()
    w = _weights(X.shape[0])
    model = _models(fit_intercept=fit_intercept)[name]
    model.fit(sp.csc_matrix(X) if sparse else X, y, sample_weight=w)
    _assert_matches(model, X, y, w)


def test_integer_sample_weights_equal_repeated_rows():
    X, y, _ = ar1_design(60, 30, rho=0.5, seed=2)
    counts = np.random.default_rng(1).integers(0, 4, 60)
    weighted = L.Lasso(alpha=0.1, tol=TIGHT).fit(X, y, sample_weight=counts)
    # The weights are rescaled to sum to n (scikit-learn), so the repeated data set
    # needs the penalty of the same weighted average: alpha is unchanged.
    repeated = L.Lasso(alpha=0.1, tol=TIGHT).fit(np.repeat(X, counts, 0), np.repeat(y, counts))
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, atol=1e-8)
    assert weighted.intercept_ == pytest.approx(repeated.intercept_, abs=1e-8)


def test_logistic_sample_weight_matches_sklearn():
    X, y, _ = ar1_design(200, 10, rho=0.3, k=4, seed=1)
    labels = (y > 0).astype(float)
    w = _weights(200, seed=2)
    model = L.SparseLogisticRegression(alpha=0.01, fit_intercept=False, tol=TIGHT)
    model.fit(X, labels, sample_weight=w)
    sk = lm.LogisticRegression(
        l1_ratio=1.0,
        C=1.0 / (200 * 0.01),
        solver="liblinear",
        fit_intercept=False,
        tol=1e-14,
        max_iter=1_000_000,
        random_state=0,
    ).fit(X, labels, sample_weight=w)
    np.testing.assert_allclose(model.coef_, sk.coef_[0], atol=1e-6 * np.max(np.abs(sk.coef_)))
    assert model.score(X, labels, sample_weight=w) == pytest.approx(
        sk.score(X, labels, sample_weight=w)
    )


def test_bad_sample_weights_are_refused():
    X, y = diabetes()
    for bad, match in [
        (-np.ones(X.shape[0]), "non-negative with a positive sum. Received: sample_weight entry"),
        (np.zeros(X.shape[0]), r"Received: sum\(sample_weight\)=0.0"),
        (np.ones(3), r"one entry per sample \(442\). Received shape \(3,\)"),
        (np.full(X.shape[0], np.nan), "`sample_weight` contains NaN"),
    ]:
        with pytest.raises(ValueError, match=match):
            L.Lasso(alpha=0.1).fit(X, y, sample_weight=bad)
        with pytest.raises(ValueError, match=match):
            L.hypergradient(L.Lasso(0.1), L.CrossVal(cv=3), X, y, sample_weight=bad)
    with pytest.raises(ValueError, match="SURE .* not defined with sample weights"):
        L.hypergradient(L.Lasso(0.1), L.SURE(50.0), X, y, sample_weight=np.ones(X.shape[0]))


@pytest.mark.parametrize("criterion_name", ["heldout", "cv"])
def test_weighted_hypergradient_matches_finite_differences(criterion_name):
    X, y = diabetes()
    w = _weights(X.shape[0], seed=4)
    model = L.ElasticNet(alpha_l1=0.3, alpha_l2=0.05, tol=TIGHT)
    if criterion_name == "heldout":
        criterion = L.HeldOutMSE(X[300:], y[300:], sample_weight=w[300:])
        X, y, w = X[:300], y[:300], w[:300]
    else:
        criterion = L.CrossVal("mse", cv=3)
    value, grad = L.hypergradient(model, criterion, X, y, sample_weight=w)
    unweighted, _ = L.hypergradient(model, criterion, X, y)
    assert value != pytest.approx(unweighted, rel=1e-5)  # the weights matter
    _gradient_close(grad, finite_difference(model, criterion, X, y, sample_weight=w))


def test_weighted_held_out_mse_is_sklearns_weighted_mean():
    from sklearn.metrics import mean_squared_error

    X, y = diabetes()
    w = _weights(142, seed=5)
    model = L.Lasso(alpha=0.5).fit(X[:300], y[:300])
    criterion = L.HeldOutMSE(X[300:], y[300:], sample_weight=w)
    value, _, _ = criterion.value_and_gradient(model)
    reference = mean_squared_error(y[300:], model.predict(X[300:]), sample_weight=w)
    assert value == pytest.approx(reference, rel=1e-12)


# -- several targets -----------------------------------------------------------------
def _two_targets(n=120, p=40, seed=0):
    X, y1, _ = ar1_design(n, p, rho=0.5, k=6, seed=seed)
    _, y2, _ = ar1_design(n, p, rho=0.5, k=6, seed=seed + 1)
    rng = np.random.default_rng(seed)
    X2, _, _ = ar1_design(n, p, rho=0.5, k=6, seed=seed)  # same X as y1's design
    assert np.array_equal(X, X2)
    y = np.c_[y1, y2 + rng.standard_normal(n), 0.5 * y1 - y2]
    return X, y


@pytest.mark.parametrize("name", ["lasso", "enet"])
@pytest.mark.parametrize("weighted", [False, True])
def test_multi_target_matches_sklearn(name, weighted):
    X, Y = _two_targets()
    w = _weights(X.shape[0]) if weighted else None
    model = _models()[name].fit(X, Y, sample_weight=w)
    assert model.coef_.shape == (3, X.shape[1]) and model.intercept_.shape == (3,)
    assert len(model.n_iter_) == 3 and model.dual_gap_.shape == (3,)
    _assert_matches(model, X, Y, w)
    for t in range(3):  # one independent problem per target
        single = _models()[name].fit(X, Y[:, t], sample_weight=w)
        np.testing.assert_allclose(model.coef_[t], single.coef_, atol=1e-9)
    assert model.predict(X).shape == (X.shape[0], 3)
    assert model.score(X, Y, sample_weight=w) == pytest.approx(
        r2_score(Y, model.predict(X), sample_weight=w), rel=1e-12
    )
    np.testing.assert_array_equal(model.sparse_coef_.toarray(), model.coef_)


def test_multi_target_warm_start_and_refusals():
    X, Y = _two_targets()
    model = L.Lasso(alpha=0.05, tol=TIGHT, warm_start=True).fit(X, Y)
    again = model.fit(X, Y)
    assert again.n_iter_ == [0, 0, 0]
    with pytest.raises(ValueError, match="X has 40 features and y has 2 targets"):
        model.fit(X, Y[:, :2])


@pytest.mark.parametrize("criterion_name", ["heldout", "sure", "cv"])
def test_multi_target_hypergradient_matches_finite_differences(criterion_name):
    X, Y = _two_targets(n=160)
    model = L.ElasticNet(alpha_l1=0.05, alpha_l2=0.02, tol=TIGHT)
    if criterion_name == "heldout":
        criterion = L.HeldOutMSE(X[100:], Y[100:])
        X, Y = X[:100], Y[:100]
    elif criterion_name == "sure":
        criterion = L.SURE(sigma=0.5)
    else:
        criterion = L.CrossVal("mse", cv=3)
    value, grad, info = L.hypergradient(model, criterion, X, Y, return_info=True)
    assert len(info.support_sizes) >= 3  # one restricted system per target
    _gradient_close(grad, finite_difference(model, criterion, X, Y))
    if criterion_name == "heldout":
        # The criterion is the mean over targets of the per-target criteria.
        per_target = [
            L.hypergradient(model, L.HeldOutMSE(X_val, Y_val[:, t]), X, Y[:, t])
            for t in range(3)
            for X_val, Y_val in [(criterion.X_val, criterion.y_val)]
        ]
        assert value == pytest.approx(np.mean([v for v, _ in per_target]), rel=1e-9)
        np.testing.assert_allclose(grad, np.mean([g for _, g in per_target], axis=0), rtol=1e-6)


def test_a_target_with_empty_support_does_not_change_the_others():
    X, Y = _two_targets(n=160)
    Y = np.c_[Y[:, 0], np.full(160, 2.0)]  # a constant target: all-zero solution
    model = L.Lasso(alpha=0.05, tol=TIGHT)
    criterion = L.HeldOutMSE(X[100:], Y[100:])
    with warnings.catch_warnings():
        warnings.simplefilter("error", L.EmptySupportWarning)
        value, grad, info = L.hypergradient(model, criterion, X[:100], Y[:100], return_info=True)
    assert info.support_sizes[1] == 0 and not info.empty_support
    single = L.hypergradient(model, L.HeldOutMSE(X[100:], Y[100:, 0]), X[:100], Y[:100, 0])
    assert value == pytest.approx(single[0] / 2, rel=1e-9)  # the constant is predicted exactly
    np.testing.assert_allclose(grad, single[1] / 2, rtol=1e-9)
    with pytest.warns(L.EmptySupportWarning):
        _, grad = L.hypergradient(L.Lasso(alpha=1e6), criterion, X[:100], Y[:100])
    np.testing.assert_array_equal(grad, [0.0])
