"""keras-tuner plugin: hypergradient search of Lasso-type penalties.

``HypergradientOracle`` is a generic ``keras_tuner.Oracle``: any Tuner whose trials
report the objective (default ``"val_criterion"``) and, for every log-sampled Float
hyperparameter ``name``, the metric ``"hypergradient/<name>"`` (derivative of the
objective with respect to ``log(value)``) can use it. ``LassoTuner`` is such a Tuner
for the ``ki.lasso`` estimators.
"""

from keras_implicit import _backend  # noqa: F401  (must precede any keras import)
from keras_implicit.tuner.lasso_tuner import LassoTuner, build_head_model, penalty_names
from keras_implicit.tuner.oracle import GRADIENT_PREFIX, HypergradientOracle, gradient_metric

__all__ = [
    "GRADIENT_PREFIX",
    "HypergradientOracle",
    "LassoTuner",
    "build_head_model",
    "gradient_metric",
    "penalty_names",
]
