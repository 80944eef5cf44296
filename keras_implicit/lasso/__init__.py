"""Lasso-type bilevel problems: exact inner solvers and support-restricted hypergradients.

Estimators (scikit-learn conventions, TensorFlow/XLA inner solver):
``Lasso``, ``ElasticNet``, ``WeightedLasso``, ``SparseLogisticRegression``; the
squared-loss ones take ``positive=True``, ``fit(X, y, sample_weight)`` and a 2-D y
(one problem per target) as scikit-learn's Lasso, and so do their hypergradients.
Criteria: ``HeldOutMSE``, ``HeldOutLogistic``, ``CrossVal``, ``SURE``.
``hypergradient(model, criterion, X, y)`` returns the criterion and its gradient with
respect to the log penalties; ``search(model, criterion, X, y)`` tunes them.
"""

from keras_implicit import _backend  # noqa: F401  (must precede any keras import)
from keras_implicit.lasso._kernels import cd_quadratic, logistic_prox_newton, soft_threshold
from keras_implicit.lasso.criteria import SURE, Criterion, CrossVal, HeldOutLogistic, HeldOutMSE
from keras_implicit.lasso.estimators import (
    ElasticNet,
    Lasso,
    SparseLogisticRegression,
    WeightedLasso,
    clone,
)
from keras_implicit.lasso.hypergradient import (
    EmptySupportWarning,
    HypergradientInfo,
    IllConditionedWarning,
    hypergradient,
)
from keras_implicit.lasso.search import SearchResult, alpha_max, search

__all__ = [
    "SURE",
    "Criterion",
    "CrossVal",
    "ElasticNet",
    "EmptySupportWarning",
    "HeldOutLogistic",
    "HeldOutMSE",
    "HypergradientInfo",
    "IllConditionedWarning",
    "Lasso",
    "SearchResult",
    "SparseLogisticRegression",
    "WeightedLasso",
    "alpha_max",
    "cd_quadratic",
    "clone",
    "hypergradient",
    "logistic_prox_newton",
    "search",
    "soft_threshold",
]
