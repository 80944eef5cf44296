"""Hypergradients vs central finite differences of criteria computed from
scikit-learn solutions (float64, tight tolerances), plus edge cases."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from lasso_reference import (
    ar1_design,
    breast_cancer,
    diabetes,
    finite_difference,
    logistic_design,
    sklearn_solution,
)

import keras_implicit.lasso as L
from keras_implicit.errors import ConvergenceWarning

RTOL = 1e-4


def _regression_split():
    X, y = diabetes()
    return X[:300], y[:300], X[300:], y[300:]


def _models():
    rng = np.random.default_rng(3)
    return {
        "lasso": L.Lasso(alpha=0.5, tol=1e-12),
        "enet": L.ElasticNet(alpha_l1=0.3, alpha_l2=0.05, tol=1e-12),
        "weighted": L.WeightedLasso(alphas=rng.uniform(0.2, 1.0, 10), tol=1e-12),
    }


def _criterion(name, X_val, y_val):
    if name == "heldout":
        return L.HeldOutMSE(X_val, y_val)
    if name == "cv":
        return L.CrossVal("mse", cv=3)
    return L.SURE(sigma=50.0)


def _assert_gradient_close(grad, reference):
    scale = np.max(np.abs(reference))
    assert scale > 0
    np.testing.assert_allclose(grad, reference, rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("model_name", ["lasso", "enet", "weighted"])
@pytest.mark.parametrize("criterion_name", ["heldout", "cv", "sure"])
def test_regression_hypergradients_match_finite_differences(model_name, criterion_name):
    X, y, X_val, y_val = _regression_split()
    if criterion_name == "cv":  # all the data for cross-validation
        X, y = diabetes()
    model = _models()[model_name]
    criterion = _criterion(criterion_name, X_val, y_val)
    value, grad = L.hypergradient(model, criterion, X, y)
    assert grad.shape == model.get_log_penalties().shape
    reference = finite_difference(model, criterion, X, y)
    _assert_gradient_close(grad, reference)
    sk_value, sk_grad = L.hypergradient(model, criterion, X, y, solver=sklearn_solution)
    assert value == pytest.approx(sk_value, rel=1e-9)
    _assert_gradient_close(sk_grad, reference)


@pytest.mark.parametrize("fit_intercept", [False, True])
@pytest.mark.parametrize("criterion_name", ["heldout", "cv"])
def test_logistic_hypergradients_match_finite_differences(fit_intercept, criterion_name):
    X, y = logistic_design()
    model = L.SparseLogisticRegression(alpha=0.01, fit_intercept=fit_intercept, tol=1e-12)
    if criterion_name == "heldout":
        criterion = L.HeldOutLogistic(X[200:], y[200:])
        X, y = X[:200], y[:200]
    else:
        criterion = L.CrossVal("logistic", cv=3)
    _, grad = L.hypergradient(model, criterion, X, y)
    reference = finite_difference(model, criterion, X, y)
    _assert_gradient_close(grad, reference)


def test_logistic_hypergradient_on_breast_cancer():
    X, y = breast_cancer()
    model = L.SparseLogisticRegression(alpha=0.01, fit_intercept=False, tol=1e-12)
    criterion = L.HeldOutLogistic(X[400:], y[400:])
    _, grad = L.hypergradient(model, criterion, X[:400], y[:400])
    _assert_gradient_close(grad, finite_difference(model, criterion, X[:400], y[:400]))


def test_correlated_high_dimensional_design():
    X, y, _ = ar1_design(100, 300, rho=0.7, k=8, seed=2)
    X_val, y_val, _ = ar1_design(100, 300, rho=0.7, k=8, seed=2)
    model = L.Lasso(alpha=0.1 * L.alpha_max(X, y), tol=1e-12)
    criterion = L.HeldOutMSE(X_val, y_val + 0.1)
    _, grad = L.hypergradient(model, criterion, X, y)
    _assert_gradient_close(grad, finite_difference(model, criterion, X, y))


def test_external_solution_gives_same_hypergradient():
    X, y, X_val, y_val = _regression_split()
    model = L.ElasticNet(alpha_l1=0.3, alpha_l2=0.05, tol=1e-12)
    criterion = L.HeldOutMSE(X_val, y_val)
    _, grad = L.hypergradient(model, criterion, X, y)
    coef, intercept = sklearn_solution(model, X, y)
    _, grad_external = L.hypergradient(model, criterion, X, y, coef=coef, intercept=intercept)
    np.testing.assert_allclose(grad_external, grad, rtol=1e-6)
    _, grad_no_intercept = L.hypergradient(model, criterion, X, y, coef=coef)
    np.testing.assert_allclose(grad_no_intercept, grad, rtol=1e-6)


def test_sparse_design_gives_same_hypergradient():
    X, y, X_val, y_val = _regression_split()
    model = L.Lasso(alpha=0.5, tol=1e-12)
    value, grad = L.hypergradient(model, L.HeldOutMSE(X_val, y_val), X, y)
    value_sp, grad_sp = L.hypergradient(
        model, L.HeldOutMSE(sp.csr_matrix(X_val), y_val), sp.csr_matrix(X), y
    )
    assert value_sp == pytest.approx(value, rel=1e-10)
    np.testing.assert_allclose(grad_sp, grad, rtol=1e-7)


def test_conjugate_gradient_matches_cholesky():
    X, y, X_val, y_val = _regression_split()
    for model in (L.ElasticNet(alpha_l1=0.3, alpha_l2=0.05, tol=1e-12),):
        crit = L.HeldOutMSE(X_val, y_val)
        _, chol = L.hypergradient(model, crit, X, y, linear_solver="cholesky")
        _, cg, info = L.hypergradient(model, crit, X, y, linear_solver="cg", return_info=True)
        assert info.linear_solvers == ["cg"]
        np.testing.assert_allclose(cg, chol, rtol=1e-7)
    Xb, yb = breast_cancer()
    model = L.SparseLogisticRegression(alpha=0.01, tol=1e-12)
    crit = L.HeldOutLogistic(Xb[400:], yb[400:])
    _, chol = L.hypergradient(model, crit, Xb[:400], yb[:400])
    _, cg = L.hypergradient(model, crit, Xb[:400], yb[:400], cholesky_max=0)
    np.testing.assert_allclose(cg, chol, rtol=1e-7)


def test_info_reports_support_and_gap():
    X, y, _X_val, _y_val = _regression_split()
    _, _, info = L.hypergradient(
        L.Lasso(alpha=0.5, tol=1e-10), L.SURE(50.0), X, y, return_info=True
    )
    assert len(info.support_sizes) == 2 and min(info.support_sizes) > 0
    assert all(info.converged) and max(info.dual_gaps) < 1e-4
    assert info.ridge == [0.0, 0.0]
    # One timing per inner solve (SURE solves the problem and a shifted one).
    assert len(info.solve_seconds) == 2 and min(info.solve_seconds) > 0
    assert info.seconds >= sum(info.solve_seconds)
    assert info.differentiation_seconds == pytest.approx(info.seconds - sum(info.solve_seconds))


def test_a_state_checks_each_input_pair_once(monkeypatch):
    import importlib

    module = importlib.import_module("keras_implicit.lasso.hypergradient")
    X, y, X_val, y_val = _regression_split()
    crit = L.HeldOutMSE(X_val, y_val)
    calls = []
    original = module.as_design_input
    monkeypatch.setattr(module, "as_design_input", lambda X: calls.append(1) or original(X))
    state = {}
    first = L.hypergradient(L.Lasso(alpha=0.5), crit, X, y, state=state)
    second = L.hypergradient(L.Lasso(alpha=0.5), crit, X, y, state=state)
    assert len(calls) == 1
    np.testing.assert_allclose(second[1], first[1], rtol=1e-10)
    # Another array is checked again, even with the same state.
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        L.hypergradient(L.Lasso(alpha=0.5), crit, bad, y, state=state)


# -- edge cases ---------------------------------------------------------------------
def test_empty_support_gives_zero_gradient_and_warning():
    X, y, X_val, y_val = _regression_split()
    model = L.Lasso(alpha=2 * L.alpha_max(X, y))
    with pytest.warns(L.EmptySupportWarning, match="all zeros .* hypergradient is 0"):
        value, grad, info = L.hypergradient(
            model, L.HeldOutMSE(X_val, y_val), X, y, return_info=True
        )
    np.testing.assert_array_equal(grad, [0.0])
    assert info.empty_support
    assert value == pytest.approx(np.mean((y_val - y.mean()) ** 2))


def test_ill_conditioned_support_uses_ridge_and_warns():
    X, y, X_val, y_val = _regression_split()
    X2 = np.hstack([X, X[:, [2]]])  # duplicated column: singular restricted system
    X2_val = np.hstack([X_val, X_val[:, [2]]])
    coef, _intercept = sklearn_solution(L.Lasso(alpha=0.5), X, y)
    split = np.append(coef, 0.0)
    split[2], split[-1] = 0.5 * coef[2], 0.5 * coef[2]  # an equally optimal solution
    model = L.Lasso(alpha=0.5)
    with pytest.warns(L.IllConditionedWarning, match="ill-conditioned"):
        _, grad, info = L.hypergradient(
            model, L.HeldOutMSE(X2_val, y_val), X2, y, coef=split, return_info=True
        )
    assert info.ridge[0] > 0
    _, grad_ref = L.hypergradient(model, L.HeldOutMSE(X_val, y_val), X, y, coef=coef)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-4)


def test_unconverged_inner_solver_is_reported():
    X, y, _ = ar1_design(60, 200, rho=0.9)
    X_val, y_val, _ = ar1_design(60, 200, rho=0.9, seed=5)
    model = L.Lasso(alpha=0.01 * L.alpha_max(X, y), tol=1e-14, max_iter=1)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        _, _, info = L.hypergradient(model, L.HeldOutMSE(X_val, y_val), X, y, return_info=True)
    assert info.converged == [False] and info.dual_gaps[0] > 0


def test_suboptimal_external_solution_warns():
    X, y, X_val, y_val = _regression_split()
    coef, _ = sklearn_solution(L.Lasso(alpha=0.5), X, y)
    with pytest.warns(ConvergenceWarning, match="supplied solution is not optimal"):
        L.hypergradient(L.Lasso(alpha=0.5), L.HeldOutMSE(X_val, y_val), X, y, coef=1.1 * coef)


def test_invalid_inputs_raise():
    X, y, X_val, y_val = _regression_split()
    crit = L.HeldOutMSE(X_val, y_val)
    with pytest.raises(ValueError, match="Received: alpha=-0.5"):
        L.hypergradient(L.Lasso(alpha=-0.5), crit, X, y)
    with pytest.raises(ValueError, match="Received: alpha_l2=0.0"):
        L.hypergradient(L.ElasticNet(alpha_l1=1.0, alpha_l2=0.0), crit, X, y)
    bad = X.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="contains NaN or infinity"):
        L.hypergradient(L.Lasso(), crit, bad, y)
    with pytest.raises(ValueError, match="`X_val` contains NaN"):
        L.HeldOutMSE(np.where(X_val > 0.05, np.nan, X_val), y_val)
    with pytest.raises(ValueError, match="mismatched numbers of samples"):
        L.hypergradient(L.Lasso(), crit, X, y[:10])
    with pytest.raises(ValueError, match="mismatched numbers of samples"):
        L.HeldOutMSE(X_val, y_val[:-1])
    with pytest.raises(ValueError, match="`X_val` has 9 features"):
        L.hypergradient(L.Lasso(), L.HeldOutMSE(X_val[:, :9], y_val), X, y)
    with pytest.raises(ValueError, match="needs a logistic model"):
        L.hypergradient(L.Lasso(), L.HeldOutLogistic(X_val, y_val > 100), X, y)
    with pytest.raises(ValueError, match="needs a squared-loss model"):
        L.hypergradient(L.SparseLogisticRegression(), L.SURE(1.0), X, y > 100)
    with pytest.raises(ValueError, match="only be given for single-fit criteria"):
        L.hypergradient(L.Lasso(), L.CrossVal(cv=3), X, y, coef=np.zeros(10))
    with pytest.raises(ValueError, match="one entry per feature"):
        L.hypergradient(L.Lasso(), crit, X, y, coef=np.zeros(3))
    with pytest.raises(ValueError, match="Received: linear_solver='lu'"):
        L.hypergradient(L.Lasso(), crit, X, y, linear_solver="lu")
    with pytest.raises(ValueError, match="Received: sigma=0"):
        L.SURE(sigma=0)
    with pytest.raises(ValueError, match="Received: criterion='mae'"):
        L.CrossVal("mae")
    with pytest.raises(ValueError, match="Received: cv=1"):
        L.CrossVal(cv=1)
    with pytest.raises(ValueError, match="must be a ki.lasso estimator"):
        L.hypergradient(object(), crit, X, y)
    with pytest.raises(ValueError, match="must be a ki.lasso criterion"):
        L.hypergradient(L.Lasso(), "mse", X, y)


def test_crossval_accepts_explicit_splits():
    X, y = diabetes()
    folds = L.criteria.kfold_indices(X.shape[0], 3)
    model = L.Lasso(alpha=0.5, tol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = L.hypergradient(model, L.CrossVal(cv=3), X, y)
        b = L.hypergradient(model, L.CrossVal(cv=folds), X, y)
    assert a[0] == pytest.approx(b[0])
    np.testing.assert_allclose(a[1], b[1])


def test_crossval_folds_warm_start_from_each_other():
    """A fold's first solve starts from the previous fold's solution (shared state);
    values and gradients equal those of independent scikit-learn solves."""
    from keras_implicit.lasso import _solver

    X, y, _ = ar1_design(120, 60, rho=0.5, k=8, seed=5)
    model = L.Lasso(alpha=0.05 * L.alpha_max(X, y), tol=1e-12)
    criterion = L.CrossVal("mse", cv=3)
    starts = []
    original = _solver.solve_quadratic

    def recording(design, y, alphas, l2, coef0, *args, **kwargs):
        starts.append(None if coef0 is None else np.array(coef0))
        return original(design, y, alphas, l2, coef0, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_solver, "solve_quadratic", recording)
        value, grad = L.hypergradient(model, criterion, X, y)
    assert starts[0] is None and all(s is not None and np.any(s) for s in starts[1:])
    sk_value, sk_grad = L.hypergradient(model, criterion, X, y, solver=sklearn_solution)
    assert value == pytest.approx(sk_value, rel=1e-9)
    np.testing.assert_allclose(grad, sk_grad, rtol=1e-6)
