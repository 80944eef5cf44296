"""Hypergradients of a criterion with respect to the (log) penalties of a Lasso-type model.

For the Lasso-type problems here the solution map is nonsmooth, but on a neighbourhood
where the support S and the signs s_S do not change it is given by the optimality
conditions restricted to S (a special case of the nonsmooth implicit function theorem
of Bolte et al., NeurIPS 2021, applied to the proximal-gradient fixed point):

    squared loss:  (Xc_S^T Xc_S / n + l2 I) b_S = Xc_S^T yc / n - alphas_S * s_S
    logistic:      grad_S f(b, b0) + alphas_S * s_S = 0,  d f / d b0 = 0

Differentiating, with ``K`` the restricted Hessian (``Xc_S^T Xc_S / n + l2 I``, or
``[X_S, 1]^T D [X_S, 1] / n`` with ``D = sigma (1 - sigma)`` for the logistic loss) and
``g`` the gradient of the criterion restricted to S (plus intercept), the adjoint
``v = K^{-1} g`` gives

    dC/d alphas_j = -v_j s_j  (j in S, 0 outside),     dC/d l2 = -v^T b_S,

and the model maps those to d/d(log hyperparameters). The restricted systems are
solved in ``_adjoint.py``; what calls keep for the next (warm starts, converted data)
is a ``_state.HypergradientState``.
"""

from __future__ import annotations

import time

import numpy as np

from keras_implicit import _validation as V
from keras_implicit.lasso import estimators as est
from keras_implicit.lasso._adjoint import EmptySupportWarning, IllConditionedWarning
from keras_implicit.lasso._data import as_design_input, as_sample_weight, as_targets
from keras_implicit.lasso._state import Evaluation, HypergradientInfo, HypergradientState
from keras_implicit.lasso.criteria import Criterion, evaluate

__all__ = ["EmptySupportWarning", "HypergradientInfo", "IllConditionedWarning", "hypergradient"]

check_model = est.check_model


def _checked_inputs(X, y, sample_weight, state):
    """``as_design_input`` / ``as_targets`` / ``as_sample_weight``, once per
    (X, y, sample_weight) triple of a state.

    Repeated calls of a search with the same arrays skip the conversion and the
    finite-value scan (6 ms per call at 500 x 20000); other arrays are converted and
    the data converted from the previous ones are dropped."""
    seen = state.inputs
    if seen is not None and all(a is b for a, b in zip(seen[:3], (X, y, sample_weight))):
        return seen[3:]
    X_checked = as_design_input(X)
    y_checked = as_targets(y, X_checked.shape[0])
    w_checked = as_sample_weight(sample_weight, X_checked.shape[0])
    if seen is not None:
        state.forget_data()
    state.inputs = (X, y, sample_weight, X_checked, y_checked, w_checked)
    return X_checked, y_checked, w_checked


def hypergradient(
    model,
    criterion,
    X,
    y,
    *,
    sample_weight=None,
    coef=None,
    intercept=None,
    solver=None,
    linear_solver="auto",
    cholesky_max=2000,
    return_info=False,
    state=None,
):
    """Criterion value and its gradient with respect to the log hyperparameters.

    Args:
      model: a ``ki.lasso`` estimator carrying its penalties (``Lasso(alpha)``, ...).
        It is fitted in place on (X, y) (on the last fold for ``CrossVal``).
      criterion: ``HeldOutMSE``, ``HeldOutLogistic``, ``CrossVal`` or ``SURE``.
      X, y: training data (all the data for ``CrossVal``); dense or sparse X. For
        the squared-loss models y may be (n, n_targets): one inner problem per
        target, the criterion averaged over targets (see ``ki.lasso.criteria``) and
        the gradient summed over the targets' contributions, with respect to the
        penalties shared by all targets.
      sample_weight: optional (n,) non-negative weights of the training samples in
        the inner problems (as ``fit(X, y, sample_weight)``); ``CrossVal`` also
        weights its held-out folds with them. ``SURE`` refuses them.
      coef, intercept: a solution computed by any external solver for the model
        fitted on (X, y) (single-fit criteria only). ``intercept`` defaults to
        ``mean(y) - mean(X) coef`` for the squared loss.
      solver: optional callable ``solver(model, X, y) -> (coef, intercept)`` used for
        every inner problem (e.g. scikit-learn), instead of the built-in solver;
        called with ``sample_weight=`` as well when weights are given.
      linear_solver: ``"auto"`` (Cholesky up to ``cholesky_max`` support size, else
        CG), ``"cholesky"`` or ``"cg"``.
      return_info: also return a ``HypergradientInfo``.
      state: a dict reused across calls to warm-start the inner solves and reuse the
        converted data (``search`` passes one); it must be used with one training set
        (other X or y arrays drop the converted data). A warm start that already meets
        the model's ``tol`` at the new penalties is refined to ``tol / 100``, so that
        nearby penalties do not return the previous solution unchanged.

    Returns:
      ``(value, gradient)`` with ``gradient`` a 1-D numpy array with one entry per
      hyperparameter (1 for Lasso and SparseLogisticRegression, 2 for ElasticNet,
      n_features for WeightedLasso); ``(value, gradient, info)`` with ``return_info``.
    """
    check_model(model)
    if not isinstance(criterion, Criterion):
        raise ValueError(
            "`criterion` must be a ki.lasso criterion (HeldOutMSE, HeldOutLogistic, "
            f"CrossVal, SURE). Received: criterion={criterion!r}"
        )
    V.one_of("linear_solver", linear_solver, ("auto", "cholesky", "cg"))
    V.non_negative_int("cholesky_max", cholesky_max)
    if solver is not None and not callable(solver):
        raise ValueError(f"`solver` must be callable. Received: solver={solver!r}")
    tic = time.perf_counter()
    typed_state = HypergradientState.of(state)
    X, y, sample_weight = _checked_inputs(X, y, sample_weight, typed_state)
    info = HypergradientInfo()
    evaluation = Evaluation(
        typed_state, info, coef, intercept, solver, linear_solver, int(cholesky_max)
    )
    value, grad_alphas, grad_l2 = evaluate(criterion, model, X, y, sample_weight, evaluation)
    if coef is not None and not evaluation.used_override:
        raise ValueError(
            f"`coef` can only be given for single-fit criteria; {type(criterion).__name__} "
            "solves several inner problems. Pass `solver=` instead."
        )
    gradient = np.asarray(model.log_penalty_gradient(grad_alphas, grad_l2), dtype=np.float64)
    if not (np.isfinite(value) and np.all(np.isfinite(gradient))):
        # The inner fits check their own arithmetic; this is the criterion's (e.g.
        # validation data or a supplied solution too large for float64).
        raise ValueError(
            f"The criterion or its hypergradient is not finite (value {value!r}, gradient "
            f"{gradient.tolist() if gradient.size <= 4 else 'with non-finite entries'}): "
            "float64 arithmetic overflowed on this data. Rescale X, y and the "
            "validation data (e.g. standardize the columns) before tuning."
        )
    info.seconds = time.perf_counter() - tic
    if return_info:
        return float(value), gradient, info
    return float(value), gradient
