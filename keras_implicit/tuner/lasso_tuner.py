"""A keras-tuner Tuner for the penalties of ``ki.lasso`` models, by hypergradients."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
from keras_tuner.engine.base_tuner import BaseTuner

from keras_implicit import lasso as ki_lasso
from keras_implicit.tuner.oracle import (
    DEFAULT_OBJECTIVE,
    MAX_TABLE_ROWS,
    HypergradientOracle,
    gradient_metric,
    summarize_values,
)

HEAD_FILE = "sparse_head.npz"
ESTIMATORS = (
    ki_lasso.Lasso,
    ki_lasso.ElasticNet,
    ki_lasso.WeightedLasso,
    ki_lasso.SparseLogisticRegression,
)


def penalty_names(estimator, n_features: int) -> list[str]:
    """Hyperparameter names of ``estimator``'s penalties (in ``get_log_penalties`` order)."""
    if isinstance(estimator, ki_lasso.WeightedLasso):
        width = len(str(n_features - 1))
        return [f"alpha_{j:0{width}d}" for j in range(n_features)]
    if isinstance(estimator, ki_lasso.ElasticNet):
        return ["alpha_l1", "alpha_l2"]
    return ["alpha"]


def build_head_model(coef, intercept, *, logistic=False, feature_extractor=None):
    """Keras model ``x -> Dense(1)(features(x))`` carrying a fitted sparse linear head.

    The head is a float64 ``Dense(1)`` (sigmoid for the logistic loss) whose kernel and
    bias are the estimator's ``coef_`` and ``intercept_``: ``model.predict(x)[:, 0]``
    equals ``estimator.predict`` (regression) or ``predict_proba(x)[:, 1]`` (logistic);
    exactly when called as ``model(x)`` (float64 throughout), to float32 input precision
    with ``model.predict`` (whose data adapter casts numpy inputs to ``floatx``).
    """
    coef = np.asarray(coef, dtype=np.float64).ravel()
    if feature_extractor is None:
        inputs = keras.Input(shape=(coef.size,), dtype="float64", name="features")
        features = inputs
    else:
        feature_extractor.trainable = False  # frozen: only the head was fitted
        inputs = keras.Input(shape=tuple(feature_extractor.input_shape[1:]), name="inputs")
        features = feature_extractor(inputs)
    head = keras.layers.Dense(
        1, activation="sigmoid" if logistic else None, dtype="float64", name="sparse_head"
    )
    outputs = head(features)
    head.set_weights([coef[:, None], np.array([intercept], dtype=np.float64)])
    return keras.Model(inputs, outputs, name="sparse_linear_head")


class LassoTuner(BaseTuner):
    """Tunes the penalties of a ``ki.lasso`` estimator with a hypergradient oracle.

    Each trial fits the estimator at the trial's penalties (warm-started from the
    previous fit), evaluates the validation criterion (held-out MSE or logistic loss,
    or K-fold cross-validation) and its gradient with respect to the log penalties,
    and reports them as ``"val_criterion"`` and ``"hypergradient/<name>"``.

    Hyperparameters (all ``Float(sampling="log")``): ``"alpha"`` (Lasso,
    SparseLogisticRegression), ``"alpha_l1"``, ``"alpha_l2"`` (ElasticNet), or one
    ``"alpha_<j>"`` per feature (WeightedLasso). Unless declared beforehand in the
    oracle's ``hyperparameters``, they are declared at ``search`` time with bounds
    ``penalty_range * alpha_max(x, y)`` and default ``initial_penalty * alpha_max``
    (the l2 penalty of ElasticNet is scaled by the mean feature variance instead).

    Args:
      estimator: a ``ki.lasso`` estimator (its other parameters, e.g. ``tol``, are
        kept). Defaults to ``ki.lasso.Lasso()``.
      oracle: defaults to ``HypergradientOracle(max_trials=max_trials)``.
      max_trials: used when ``oracle`` is not given.
      feature_extractor: optional Keras model applied (frozen) to the inputs; the
        sparse head is fitted on its outputs.
      penalty_range, initial_penalty: bounds and starting value relative to
        ``alpha_max``.
      penalty_groups: ``WeightedLasso`` only: one label per feature; the features of
        a group share one penalty, tuned as the hyperparameter ``"alpha_<label>"``
        (e.g. one penalty per data source, as in IPF-Lasso). Its hypergradient is the
        sum of its features' hypergradients (chain rule). ``None`` (default): one
        penalty per feature.
      tensorboard: per-trial TensorBoard scalars. ``True`` writes them under
        ``<project_dir>/tensorboard``, a string under that directory; ``None``
        (default) writes none unless ``search`` gets a
        ``keras.callbacks.TensorBoard(log_dir)`` callback, whose ``log_dir`` is then
        used (the usual keras-tuner idiom). Each Tuner (``tuner_id``) writes to its
        own subdirectory, with the trial number as step: ``val_criterion``,
        ``best_val_criterion``, ``gradient_norm``, ``n_active`` and, for at most 10
        penalties, ``penalty/<name>`` and ``hypergradient/<name>``; for more,
        ``penalty/min``, ``penalty/median``, ``penalty/max`` and a histogram
        ``penalty/log10``. View with ``tensorboard --logdir <dir>``.
      directory, project_name, overwrite: as every keras-tuner Tuner.
    """

    def __init__(
        self,
        estimator=None,
        oracle=None,
        *,
        max_trials=25,
        feature_extractor=None,
        penalty_range=(1e-4, 1.0),
        initial_penalty=0.1,
        penalty_groups=None,
        tensorboard=None,
        directory=None,
        project_name=None,
        overwrite=False,
        **kwargs,
    ):
        estimator = ki_lasso.Lasso() if estimator is None else estimator
        if not isinstance(estimator, ESTIMATORS):
            raise ValueError(
                "`estimator` must be a ki.lasso estimator (Lasso, ElasticNet, "
                f"WeightedLasso or SparseLogisticRegression). Received: estimator={estimator!r}"
            )
        if feature_extractor is not None and not isinstance(feature_extractor, keras.Model):
            raise ValueError(
                "`feature_extractor` must be a keras.Model (or None). "
                f"Received: feature_extractor={feature_extractor!r}"
            )
        low, high = _check_range(penalty_range, initial_penalty)
        if oracle is None:
            oracle = HypergradientOracle(objective=DEFAULT_OBJECTIVE, max_trials=max_trials)
        self.estimator = estimator
        self.feature_extractor = feature_extractor
        self.penalty_range = (low, high)
        self.initial_penalty = float(initial_penalty)
        self.penalty_groups = _check_groups(estimator, penalty_groups)
        if not (tensorboard is None or isinstance(tensorboard, bool | str | os.PathLike)):
            raise ValueError(
                "`tensorboard` must be None, a bool or a directory path. "
                f"Received: tensorboard={tensorboard!r}"
            )
        self.tensorboard = tensorboard
        self._state = {}
        self._writer = None
        self._logdir = None
        super().__init__(
            oracle=oracle,
            hypermodel=None,
            directory=directory,
            project_name=project_name,
            overwrite=overwrite,
            **kwargs,
        )

    @property
    def _logistic(self):
        return isinstance(self.estimator, ki_lasso.SparseLogisticRegression)

    # -- search -------------------------------------------------------------------------
    def search(self, x, y, validation_data=None, cv=None, verbose=1, callbacks=None):
        """Searches the penalties.

        Args:
          x, y: training data (all the data with ``cv``).
          validation_data: ``(x_val, y_val)`` for a held-out criterion.
          cv: number of folds (int >= 2) for a cross-validation criterion instead.
          verbose: keras-tuner's display verbosity.
          callbacks: optional list holding a ``keras.callbacks.TensorBoard``: the
            per-trial scalars go to its ``log_dir`` (no Keras training happens, so
            other callbacks have nothing to observe and are rejected).
        """
        self._logdir = self._resolve_logdir(callbacks)
        if (validation_data is None) == (cv is None):
            raise ValueError(
                "LassoTuner.search needs exactly one validation scheme: "
                "`validation_data=(x_val, y_val)` or `cv=K` (K-fold cross-validation). "
                f"Received: validation_data={_describe(validation_data)}, cv={cv!r}"
            )
        if cv is not None and (not isinstance(cv, int) or isinstance(cv, bool) or cv < 2):
            raise ValueError(f"`cv` must be an integer >= 2. Received: cv={cv!r}")
        if validation_data is not None:
            if not isinstance(validation_data, tuple | list) or len(validation_data) != 2:
                raise ValueError(
                    "`validation_data` must be a tuple (x_val, y_val). "
                    f"Received: validation_data={_describe(validation_data)}"
                )
            x_val, y_val = validation_data
            validation_data = (self._features(x_val), np.asarray(y_val))
        x = self._features(x)
        y = np.asarray(y)
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"`x` and `y` have mismatched numbers of samples: {x.shape[0]} and {y.shape[0]}."
            )
        if self.penalty_groups is not None and self.penalty_groups.size != x.shape[1]:
            raise ValueError(
                "`penalty_groups` needs one label per feature: "
                f"{self.penalty_groups.size} labels for {x.shape[1]} features."
            )
        self._declare_space(x, y)
        self._state = {}  # warm starts and converted data belong to this data set
        try:
            super().search(x, y, validation_data=validation_data, cv=cv, verbose=verbose)
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    # -- TensorBoard ----------------------------------------------------------------------
    def _resolve_logdir(self, callbacks):
        logdir = None
        for callback in callbacks or []:
            if not isinstance(callback, keras.callbacks.TensorBoard):
                raise ValueError(
                    "LassoTuner.search accepts only keras.callbacks.TensorBoard callbacks "
                    "(there is no Keras training to observe). "
                    f"Received: callbacks={callbacks!r}"
                )
            logdir = callback.log_dir
        if logdir is None and self.tensorboard:
            logdir = (
                os.path.join(self.project_dir, "tensorboard")
                if self.tensorboard is True
                else os.fspath(self.tensorboard)
            )
        if logdir is None:
            return None
        return os.path.join(logdir, str(self.tuner_id))

    def _log_trial(self, trial, metrics, values):
        """Writes one trial's scalars (step: the trial number) for TensorBoard."""
        if self._logdir is None:
            return
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self._logdir)
        try:
            step = int(trial.trial_id)
        except ValueError:
            step = len(self.oracle.trials)
        best = [t.score for t in self.oracle.trials.values() if t.score is not None]
        value = metrics[DEFAULT_OBJECTIVE]
        scalars = {
            DEFAULT_OBJECTIVE: value,
            "best_" + DEFAULT_OBJECTIVE: min([value, *best]),
            "gradient_norm": metrics["gradient_norm"],
            "n_active": metrics["n_active"],
        }
        histogram = None
        if len(values) <= MAX_TABLE_ROWS:
            for name, penalty in values.items():
                scalars[f"penalty/{name}"] = penalty
                scalars[gradient_metric(name)] = metrics[gradient_metric(name)]
        else:
            array = np.array(list(values.values()), dtype=np.float64)
            scalars["penalty/min"] = float(array.min())
            scalars["penalty/median"] = float(np.median(array))
            scalars["penalty/max"] = float(array.max())
            histogram = np.log10(array)
        with self._writer.as_default(step=step):
            for tag, number in scalars.items():
                _write_scalar(tag, number, step)
            if histogram is not None:
                _write_histogram("penalty/log10", histogram, step)
        self._writer.flush()

    def _features(self, x):
        if self.feature_extractor is None:
            return x  # dense or sparse: ki.lasso converts it
        return np.asarray(self.feature_extractor.predict(x, verbose=0), dtype=np.float64)

    def _declare_space(self, x, y):
        """Declares the penalties as log Floats scaled by alpha_max (if not yet declared)."""
        loss = "logistic" if self._logistic else "squared"
        fit_intercept = bool(self.estimator.fit_intercept)
        scale = ki_lasso.alpha_max(x, y, fit_intercept=fit_intercept, loss=loss)
        if not scale > 0:
            raise ValueError("alpha_max(x, y) is 0: `y` is constant or `x` is all zeros.")
        hp = self.oracle.get_space()
        low, high = self.penalty_range
        for name in self._hyperparameter_names(x.shape[1]):
            if hp._exists(name):
                continue
            unit = _feature_variance(x) if name == "alpha_l2" else scale
            hp.Float(
                name,
                min_value=low * unit,
                max_value=high * unit,
                sampling="log",
                default=self.initial_penalty * unit,
            )
        self.oracle.update_space(hp)

    def _criterion(self, validation_data, cv):
        kind = "logistic" if self._logistic else "mse"
        if cv is not None:
            return ki_lasso.CrossVal(criterion=kind, cv=cv)
        x_val, y_val = validation_data
        if self._logistic:
            return ki_lasso.HeldOutLogistic(x_val, y_val)
        return ki_lasso.HeldOutMSE(x_val, y_val)

    def _hyperparameter_names(self, n_features):
        if self.penalty_groups is None:
            return penalty_names(self.estimator, n_features)
        return [f"alpha_{label}" for label in np.unique(self.penalty_groups)]

    def _group_index(self):
        """Index of each feature's group in ``_hyperparameter_names`` order."""
        return np.unique(self.penalty_groups, return_inverse=True)[1].ravel()

    def _estimator_at(self, hyperparameters, n_features):
        model = ki_lasso.clone(self.estimator)
        names = self._hyperparameter_names(n_features)
        log_values = np.log([hyperparameters.get(name) for name in names])
        if self.penalty_groups is not None:
            log_values = log_values[self._group_index()]  # each feature its group's value
        model.set_log_penalties(log_values)
        return model

    # -- one trial ----------------------------------------------------------------------
    def run_trial(self, trial, x, y, validation_data=None, cv=None, verbose=None):
        del verbose
        hp = trial.hyperparameters
        n_features = x.shape[1]
        model = self._estimator_at(hp, n_features)
        criterion = self._criterion(validation_data, cv)
        value, grad = ki_lasso.hypergradient(model, criterion, x, y, state=self._state)
        if cv is not None:
            # CrossVal leaves the model fitted on its last fold: refit on all the data.
            model = self._estimator_at(hp, n_features).fit(x, y)
        self.save_model(trial.trial_id, model)
        metrics = {
            DEFAULT_OBJECTIVE: float(value),
            "gradient_norm": float(np.linalg.norm(grad)),
            "n_active": float(np.count_nonzero(model.coef_)),
        }
        names = self._hyperparameter_names(n_features)
        if self.penalty_groups is not None:
            # alpha_j = alpha_group for every feature j of the group: the group's
            # log-derivative is the sum of its features' log-derivatives.
            grad = np.bincount(self._group_index(), weights=grad, minlength=len(names))
        for name, g in zip(names, grad, strict=True):
            metrics[gradient_metric(name)] = float(g)
        self._log_trial(trial, metrics, {name: float(hp.get(name)) for name in names})
        if self.oracle.objective.name != DEFAULT_OBJECTIVE:
            metrics[self.oracle.objective.name] = float(value)
        return metrics

    # -- models ---------------------------------------------------------------------------
    def save_model(self, trial_id, model, step=0):
        del step
        path = os.path.join(self.get_trial_dir(trial_id), HEAD_FILE)
        classes = getattr(model, "classes_", None)
        np.savez(
            path,
            coef=model.coef_,
            intercept=np.array(model.intercept_),
            classes=np.array([] if classes is None else classes),
            params=np.array(json.dumps(_jsonable(model.get_params()))),
        )

    def load_estimator(self, trial):
        """The fitted ``ki.lasso`` estimator of ``trial``."""
        path = os.path.join(self.get_trial_dir(trial.trial_id), HEAD_FILE)
        if not os.path.exists(path):
            raise ValueError(
                f"Trial {trial.trial_id} has no saved model (status {trial.status}); "
                "it did not complete."
            )
        with np.load(path) as saved:
            params = json.loads(str(saved["params"]))
            model = type(self.estimator)(**params)
            model.coef_ = saved["coef"].astype(np.float64)
            model.intercept_ = float(saved["intercept"])
            model.n_features_in_ = model.coef_.size
            if saved["classes"].size:
                model.classes_ = saved["classes"]
        return model

    def load_model(self, trial):
        model = self.load_estimator(trial)
        return build_head_model(
            model.coef_,
            model.intercept_,
            logistic=self._logistic,
            feature_extractor=self.feature_extractor,
        )

    def get_best_estimators(self, num_models=1):
        """The fitted ``ki.lasso`` estimators of the best trials."""
        return [self.load_estimator(t) for t in self.oracle.get_best_trials(num_models)]

    # -- reporting ------------------------------------------------------------------------
    def results_summary(self, num_trials=10):
        """Prints the best trials: penalties (summarized when many), criterion, gradient."""
        print("Results summary")
        print(f"Results in {self.project_dir}")
        print(f"Showing {num_trials} best trials")
        print(f"{self.oracle.objective}")
        for trial in self.oracle.get_best_trials(num_trials):
            print()
            print(trial_summary(trial, self.oracle.objective.name))


def trial_summary(trial, objective_name=DEFAULT_OBJECTIVE) -> str:
    """A few lines describing one trial (penalties summarized when there are many)."""
    lines = [f"Trial {trial.trial_id} ({trial.status})"]
    penalties = summarize_values(trial.hyperparameters.values)
    label = "penalties" if len(penalties) < len(trial.hyperparameters.values) else "penalty"
    lines.append(f"  {label}: " + ", ".join(f"{k}={v}" for k, v in penalties))
    metrics = trial.metrics
    for name, text in ((objective_name, "criterion"), ("gradient_norm", "gradient norm")):
        if metrics.exists(name):
            lines.append(f"  {text}: {metrics.get_last_value(name):.6g}")
    if metrics.exists("n_active"):
        lines.append(f"  active features: {int(metrics.get_last_value('n_active'))}")
    if trial.message:
        lines.append(f"  message: {trial.message.strip().splitlines()[-1]}")
    return "\n".join(lines)


# tf.summary.scalar / histogram live in the tensorboard package, which TensorFlow does
# not require: write the same records (TensorBoard's plugin metadata) with TF alone.
def _metadata(plugin, data_class):
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin),
        data_class=data_class,
    )


def _write_scalar(tag, value, step):
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = _metadata("scalars", summary_pb2.DATA_CLASS_SCALAR)
    tf.summary.write(tag, tf.constant(float(value), tf.float32), step=step, metadata=metadata)


def _write_histogram(tag, values, step, bins=30):
    """TensorBoard's histogram record: a ``(bins, 3)`` tensor of [left, right, count]."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    low, high = float(np.min(values)), float(np.max(values))
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    buckets = np.stack([edges[:-1], edges[1:], counts], axis=1).astype(np.float64)
    metadata = _metadata("histograms", summary_pb2.DATA_CLASS_TENSOR)
    tf.summary.write(tag, tf.constant(buckets), step=step, metadata=metadata)


def _feature_variance(x):
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x, dtype=np.float64)
    return max(float(np.mean(np.var(x, axis=0))), 1e-12)


def _check_range(penalty_range, initial_penalty):
    try:
        low, high = (float(v) for v in penalty_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"`penalty_range` must be a pair (low, high). Received: penalty_range={penalty_range!r}"
        ) from None
    if not 0 < low < high:
        raise ValueError(
            "`penalty_range` must satisfy 0 < low < high. "
            f"Received: penalty_range={penalty_range!r}"
        )
    if not isinstance(initial_penalty, int | float) or not low <= initial_penalty <= high:
        raise ValueError(
            "`initial_penalty` must lie within `penalty_range`. "
            f"Received: initial_penalty={initial_penalty!r}, penalty_range={penalty_range!r}"
        )
    return low, high


def _check_groups(estimator, penalty_groups):
    if penalty_groups is None:
        return None
    if not isinstance(estimator, ki_lasso.WeightedLasso):
        raise ValueError(
            "`penalty_groups` needs a ki.lasso.WeightedLasso estimator (one penalty per "
            f"feature to share within groups). Received: estimator={estimator!r}"
        )
    labels = np.asarray(penalty_groups)
    if labels.ndim != 1 or labels.size == 0 or labels.dtype.kind not in "iuU":
        raise ValueError(
            "`penalty_groups` must be a non-empty 1-D sequence of integer or string "
            f"labels, one per feature. Received: penalty_groups={penalty_groups!r}"
        )
    return labels


def _jsonable(params):
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in params.items()}


def _describe(value):
    if value is None:
        return "None"
    return f"<{type(value).__name__}>"
