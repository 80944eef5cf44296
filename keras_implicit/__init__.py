"""keras_implicit: implicit layers for TensorFlow/Keras.

Fixed points, roots and argmins as differentiable operations whose backward pass
solves the implicit linear system (nonsmooth implicit function theorem, Bolte et al.,
NeurIPS 2021), plus the layers built on them: deep equilibrium models, projections
and cones, convex programs, and Lasso hyperparameter search by hypergradients.
"""

from keras_implicit import (
    _backend,  # noqa: F401  (must precede any keras import)
    diagnostics,
    linalg,
    solvers,
)
from keras_implicit._version import __version__
from keras_implicit.errors import ConvergenceError, ConvergenceWarning
from keras_implicit.implicit import argmin, custom_fixed_point, custom_root, fixed_point, root
from keras_implicit.solvers import SolverStats

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "SolverStats",
    "__version__",
    "argmin",
    "custom_fixed_point",
    "custom_root",
    "diagnostics",
    "fixed_point",
    "linalg",
    "root",
    "solvers",
]
