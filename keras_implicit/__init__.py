"""keras_implicit: implicit layers for TensorFlow/Keras.

Fixed points, roots and argmins as differentiable operations whose backward pass
solves the implicit linear system (nonsmooth implicit function theorem, Bolte et al.,
NeurIPS 2021), plus the layers built on them: deep equilibrium models, projections
and cones, convex programs, and Lasso hyperparameter search by hypergradients.
"""

from keras_implicit import _cli

if _cli.running_as_cli():  # before TensorFlow loads: its start-up notes are not for the tour
    _cli.silence_native_stderr()

from keras_implicit import (
    _backend,  # noqa: F401  (must precede any keras import)
    diagnostics,
    lasso,
    layers,
    linalg,
    ops,
    solvers,
)
from keras_implicit._version import __version__
from keras_implicit.errors import ConvergenceError, ConvergenceWarning
from keras_implicit.implicit import (
    argmin,
    custom_fixed_point,
    custom_root,
    fixed_point,
    root,
)
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
    "lasso",
    "layers",
    "linalg",
    "ops",
    "root",
    "solvers",
    "tuner",
]


def __getattr__(name):
    # keras-tuner takes seconds to import: load `ki.tuner` on first use only
    if name == "tuner":
        import importlib

        module = importlib.import_module("keras_implicit.tuner")
        globals()["tuner"] = module
        return module
    raise AttributeError(f"module 'keras_implicit' has no attribute {name!r}")
