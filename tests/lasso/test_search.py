"""The outer loop: each step policy decreases the criterion; trace and progress."""

import importlib

import numpy as np
import pytest
from lasso_reference import ar1_design, criterion_from_sklearn, diabetes, sklearn_solution

import keras_implicit.lasso as L

# The module, not the function `ki.lasso.search` that the package exports under its name.
search_module = importlib.import_module("keras_implicit.lasso.search")


def _problem():
    X, y = diabetes()
    return X[:300], y[:300], L.HeldOutMSE(X[300:], y[300:])


@pytest.mark.parametrize("optimizer", ["quasi_newton", "line_search", "adam"])
def test_search_decreases_the_criterion(optimizer, capsys):
    X, y, criterion = _problem()
    start = L.Lasso(alpha=0.5 * L.alpha_max(X, y))
    result = L.search(start, criterion, X, y, optimizer=optimizer, max_iter=15, verbose=0)
    assert capsys.readouterr().out == ""
    values = result.history("criterion")
    assert result.best_value == pytest.approx(values.min())
    assert result.best_value < values[0]
    assert start.alpha == pytest.approx(0.5 * L.alpha_max(X, y))  # input model untouched
    assert result.best_model.alpha == pytest.approx(result.best_penalties[0])
    assert result.best_model.coef_.shape == (10,)
    entry = result.trace[0]
    assert set(entry) >= {"iteration", "criterion", "penalties", "grad_norm", "time", "elapsed"}
    assert all(0 < e["solve_time"] <= e["time"] for e in result.trace)
    assert result.stop_reason


@pytest.mark.parametrize("optimizer", ["quasi_newton", "line_search", "adam"])
def test_search_reaches_the_grid_minimum(optimizer):
    X, y, criterion = _problem()
    grid = L.alpha_max(X, y) * np.logspace(0, -3, 60)
    values = [L.Lasso(alpha=a).fit(X, y) for a in grid]
    values = [np.mean((criterion.y_val - m.predict(criterion.X_val)) ** 2) for m in values]
    result = L.search(L.Lasso(alpha=grid[5]), criterion, X, y, optimizer=optimizer, verbose=0)
    assert result.best_value <= min(values) * 1.01


def _trial_moves(result):
    """Largest log-penalty move of each trial from the point accepted before it."""
    current = np.log(result.trace[0]["penalties"])
    moves = []
    for entry in result.trace[1:]:
        trial = np.log(entry["penalties"])
        moves.append(float(np.max(np.abs(trial - current))))
        if entry["accepted"]:
            current = trial
    return np.array(moves)


def test_line_search_moves_are_bounded_and_above_the_penalty_resolution():
    X, y, criterion = _problem()
    start = L.Lasso(alpha=0.5 * L.alpha_max(X, y))
    result = L.search(start, criterion, X, y, optimizer="line_search", verbose=0)
    moves = _trial_moves(result)
    assert moves.size >= 3
    assert np.all(moves <= search_module.MAX_LOG_MOVE * (1 + 1e-12))
    assert np.all(moves >= search_module.MIN_LOG_MOVE)


@pytest.mark.parametrize("optimizer", ["quasi_newton", "line_search"])
def test_secant_steps_find_the_cross_validation_minimum_in_few_evaluations(optimizer):
    # Reference: the same 4-fold criterion with every fold solved by scikit-learn to
    # tol 1e-10, on a fine grid around the minimum (0.059 alpha_max).
    X, y, _ = ar1_design(150, 400, rho=0.5, k=10, noise=1.0, seed=0)
    criterion = L.CrossVal("mse", cv=4)
    a_max = L.alpha_max(X, y)
    grid = a_max * np.geomspace(0.045, 0.075, 13)
    reference = min(criterion_from_sklearn(L.Lasso(alpha=a), criterion, X, y) for a in grid)
    start = L.Lasso(alpha=a_max / 10)
    result = L.search(start, criterion, X, y, optimizer=optimizer, max_iter=50, verbose=0)
    assert result.best_value == pytest.approx(reference, rel=2e-3)
    assert len(result.trace) <= 12


def test_nearby_penalties_give_distinct_criterion_values():
    # At tol=1e-4 the solution at alpha already meets the tolerance at 1.01 alpha
    # (scikit-learn's tolerance on diabetes); returned unchanged, it would repeat the
    # criterion value exactly and a line search would read "no decrease".
    X, y, criterion = _problem()
    a = 0.01 * L.alpha_max(X, y)
    state = {}
    first, _ = L.hypergradient(L.Lasso(alpha=a), criterion, X, y, state=state)
    second, _ = L.hypergradient(L.Lasso(alpha=1.01 * a), criterion, X, y, state=state)
    reference = criterion_from_sklearn(L.Lasso(alpha=1.01 * a), criterion, X, y)
    assert second != first
    assert abs(second - reference) < 0.1 * abs(first - reference)


def test_weighted_lasso_search_beats_single_alpha():
    X, y, beta = ar1_design(80, 30, rho=0.3, k=6, noise=1.0, seed=4)
    X_val, y_val, _ = ar1_design(200, 30, rho=0.3, k=6, noise=1.0, seed=4)
    y_val = X_val @ beta + np.random.default_rng(9).standard_normal(200)
    criterion = L.HeldOutMSE(X_val, y_val)
    a0 = 0.1 * L.alpha_max(X, y)
    single = L.search(L.Lasso(alpha=a0), criterion, X, y, verbose=0)
    weighted = L.search(
        L.WeightedLasso(alphas=np.full(30, single.best_penalties[0])),
        criterion,
        X,
        y,
        optimizer="adam",
        max_iter=40,
        verbose=0,
    )
    assert weighted.best_penalties.shape == (30,)
    assert weighted.best_value < single.best_value


def test_search_restarts_below_alpha_max_and_prints_progress(capsys):
    X, y, criterion = _problem()
    result = L.search(L.Lasso(alpha=4 * L.alpha_max(X, y)), criterion, X, y, max_iter=3, verbose=1)
    assert any("halved" in m for m in result.messages)
    assert result.best_penalties[0] < L.alpha_max(X, y)
    assert "criterion" in capsys.readouterr().out


def test_search_with_crossval_and_elastic_net():
    X, y = diabetes()
    result = L.search(
        L.ElasticNet(alpha_l1=0.5, alpha_l2=0.5), L.CrossVal(cv=3), X, y, max_iter=5, verbose=0
    )
    assert result.best_penalties.shape == (2,)
    assert result.best_value <= result.trace[0]["criterion"]


def test_search_validation():
    X, y, criterion = _problem()
    with pytest.raises(ValueError, match="Received: optimizer='sgd'"):
        L.search(L.Lasso(), criterion, X, y, optimizer="sgd")
    with pytest.raises(ValueError, match="Received: max_iter=0"):
        L.search(L.Lasso(), criterion, X, y, max_iter=0)
    with pytest.raises(ValueError, match="Received: learning_rate=inf"):
        L.search(L.Lasso(), criterion, X, y, learning_rate=float("inf"))
    with pytest.raises(ValueError, match="Unknown arguments"):
        L.search(L.Lasso(), criterion, X, y, foo=1)


def test_alpha_max_gives_empty_support():
    X, y = diabetes()
    a = L.alpha_max(X, y)
    assert np.all(L.Lasso(alpha=a * 1.0001).fit(X, y).coef_ == 0)
    assert np.any(L.Lasso(alpha=a * 0.99, tol=1e-10).fit(X, y).coef_ != 0)
    labels = (y > np.median(y)).astype(float)
    a = L.alpha_max(X, labels, loss="logistic")
    assert np.all(L.SparseLogisticRegression(alpha=a * 1.0001).fit(X, labels).coef_ == 0)
    assert np.any(L.SparseLogisticRegression(alpha=a * 0.99, tol=1e-10).fit(X, labels).coef_ != 0)


def test_weighted_lasso_scalar_alphas_are_broadcast():
    X, y, criterion = _problem()
    result = L.search(L.WeightedLasso(alphas=0.2), criterion, X, y, max_iter=2, verbose=0)
    assert result.best_penalties.shape == (10,)
    _, grad = L.hypergradient(L.WeightedLasso(alphas=0.2), criterion, X, y)
    assert grad.shape == (10,)


def test_refit_warm_starts_from_the_search_and_matches_sklearn():
    X_all, y_all, _ = ar1_design(240, 300, rho=0.5, k=10, seed=3)
    X, y, criterion = X_all[:120], y_all[:120], L.HeldOutMSE(X_all[120:], y_all[120:])
    result = L.search(L.Lasso(alpha=0.3 * L.alpha_max(X, y)), criterion, X, y, verbose=0)
    best = result.best_model
    cold = L.Lasso(alpha=best.alpha).fit(X, y)
    coef, intercept = sklearn_solution(best, X, y)
    scale = np.abs(coef).max()
    np.testing.assert_allclose(best.coef_, coef, atol=1e-4 * scale)
    assert best.intercept_ == pytest.approx(intercept, abs=1e-4 * scale)
    assert best.n_iter_ < cold.n_iter_  # the refit started from the search's solution
