"""HypergradientOracle on its own: a toy Tuner with an analytic objective (no Lasso)."""

import keras_tuner
import numpy as np
import pytest
from keras_tuner.engine.base_tuner import BaseTuner

from keras_implicit.tuner import HypergradientOracle, gradient_metric
from keras_implicit.tuner.oracle import summarize_values

TARGET = {"a": 0.3, "b": 20.0}  # minimizer of the toy objective (inside the bounds)


def toy_space(low_b=1e-2, high_b=1e3):
    hp = keras_tuner.HyperParameters()
    hp.Float("a", 1e-3, 10.0, sampling="log", default=5.0)
    hp.Float("b", low_b, high_b, sampling="log", default=0.1)
    return hp


class QuadraticTuner(BaseTuner):
    """Objective: a quadratic in log space; reports the exact log-gradient."""

    def __init__(self, *args, report_gradient=True, **kwargs):
        self.report_gradient = report_gradient
        super().__init__(*args, **kwargs)

    def run_trial(self, trial, scales=(1.0, 4.0), verbose=None):
        metrics = {"val_criterion": 1.0}
        for (name, target), scale in zip(TARGET.items(), scales, strict=True):
            delta = np.log(trial.hyperparameters.get(name)) - np.log(target)
            metrics["val_criterion"] += 0.5 * scale * delta**2
            if self.report_gradient:
                metrics[gradient_metric(name)] = scale * delta
        return metrics

    def save_model(self, trial_id, model, step=0):
        pass


def make_tuner(tmp_path, oracle, **kwargs):
    return QuadraticTuner(oracle=oracle, directory=str(tmp_path), project_name="toy", **kwargs)


def best_values(tuner):
    return tuner.get_best_hyperparameters()[0].values


@pytest.mark.parametrize("policy", ["quasi_newton", "line_search"])
def test_descends_to_the_minimizer(tmp_path, policy):
    oracle = HypergradientOracle(max_trials=25, policy=policy, hyperparameters=toy_space())
    tuner = make_tuner(tmp_path, oracle)
    tuner.search(verbose=0)
    best = best_values(tuner)
    assert best["a"] == pytest.approx(TARGET["a"], rel=0.05)
    assert best["b"] == pytest.approx(TARGET["b"], rel=0.05)
    assert len(oracle.trials) <= 25
    first = oracle.trials[oracle.start_order[0]].hyperparameters.values
    assert first["a"] == pytest.approx(5.0) and first["b"] == pytest.approx(0.1)


def test_adam_decreases_the_objective(tmp_path):
    # Objective 61 at the defaults, 1.0 at the minimizer.
    oracle = HypergradientOracle(max_trials=60, policy="adam", hyperparameters=toy_space())
    tuner = make_tuner(tmp_path, oracle)
    tuner.search(verbose=0)
    assert oracle.get_best_trials()[0].score < 1.1


def test_line_search_stops_on_convergence_before_max_trials(tmp_path):
    oracle = HypergradientOracle(max_trials=200, hyperparameters=toy_space())
    tuner = make_tuner(tmp_path, oracle)
    tuner.search(verbose=0)
    assert len(oracle.trials) < 60
    assert oracle.chain_summary()["tuner0"]["stop_reason"] is not None


def test_stays_within_bounds_and_stops_at_the_bound(tmp_path):
    # The minimizer b = 20 lies above max_value = 5: the search ends on that bound.
    oracle = HypergradientOracle(max_trials=40, hyperparameters=toy_space(high_b=5.0))
    tuner = make_tuner(tmp_path, oracle)
    tuner.search(verbose=0)
    for trial in oracle.trials.values():
        assert 1e-2 <= trial.hyperparameters.get("b") <= 5.0
        assert 1e-3 <= trial.hyperparameters.get("a") <= 10.0
    assert best_values(tuner)["b"] == pytest.approx(5.0, rel=1e-6)
    assert best_values(tuner)["a"] == pytest.approx(TARGET["a"], rel=0.05)


def test_resume_continues_the_same_chain(tmp_path):
    reference = HypergradientOracle(max_trials=10, hyperparameters=toy_space())
    make_tuner(tmp_path / "reference", reference).search(verbose=0)
    expected = [reference.trials[t].hyperparameters.values for t in reference.start_order]

    first = HypergradientOracle(max_trials=4, hyperparameters=toy_space())
    make_tuner(tmp_path, first).search(verbose=0)
    assert len(first.trials) == 4
    resumed = HypergradientOracle(max_trials=10, hyperparameters=toy_space())
    tuner = make_tuner(tmp_path, resumed)  # overwrite=False: reloads the project
    assert len(resumed.trials) == 4
    tuner.search(verbose=0)
    got = [resumed.trials[t].hyperparameters.values for t in resumed.start_order]
    assert len(expected) > 5  # the resumed part is not empty
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a["a"] == pytest.approx(b["a"], rel=1e-12)
        assert a["b"] == pytest.approx(b["b"], rel=1e-12)


def _finish(oracle, trial, grad_a=1.0, grad_b=-1.0):
    oracle.update_trial(
        trial.trial_id,
        {"val_criterion": 2.0, gradient_metric("a"): grad_a, gradient_metric("b"): grad_b},
    )
    trial.status = "COMPLETED"
    oracle.end_trial(trial)


def test_idle_while_the_chain_waits_then_running_then_stopped(tmp_path):
    oracle = HypergradientOracle(max_trials=3, hyperparameters=toy_space())
    oracle._set_project_dir(str(tmp_path), "manual")
    first = oracle.create_trial("tuner0")
    assert first.status == "RUNNING"
    # Another request for the same chain while its trial is pending (as after a
    # reload, when the pending trial waits in the retry queue) gets IDLE.
    assert oracle.populate_space("99")["status"] == "IDLE"
    _finish(oracle, first)
    second = oracle.create_trial("tuner0")
    assert second.status == "RUNNING"
    # A descent step: a goes down and b up (signs of the gradient).
    assert second.hyperparameters.get("a") < 5.0
    assert second.hyperparameters.get("b") > 0.1
    _finish(oracle, second, grad_a=0.5, grad_b=-0.5)
    _finish(oracle, oracle.create_trial("tuner0"))
    assert oracle.create_trial("tuner0").status == "STOPPED"  # max_trials reached


def test_non_finite_objective_counts_as_a_failed_step(tmp_path):
    # A trial whose objective is NaN is no result: the next trial goes halfway back
    # from it towards the last accepted point.
    oracle = HypergradientOracle(max_trials=4, hyperparameters=toy_space())
    oracle._set_project_dir(str(tmp_path), "nan")
    _finish(oracle, oracle.create_trial("tuner0"))
    second = oracle.create_trial("tuner0")
    oracle.update_trial(
        second.trial_id,
        {"val_criterion": float("nan"), gradient_metric("a"): 0.0, gradient_metric("b"): 0.0},
    )
    second.status = "COMPLETED"
    oracle.end_trial(second)
    third = oracle.create_trial("tuner0")
    for name, start in (("a", 5.0), ("b", 0.1)):
        failed = np.log(second.hyperparameters.get(name))
        expected = np.log(start) + 0.5 * (failed - np.log(start))
        assert np.log(third.hyperparameters.get(name)) == pytest.approx(expected, rel=1e-12)
    assert oracle._chains["tuner0"]["policy"]["backtracks"] == 1


def test_state_round_trips_through_get_state(tmp_path):
    oracle = HypergradientOracle(max_trials=5, hyperparameters=toy_space())
    make_tuner(tmp_path, oracle).search(verbose=0)
    state = oracle.get_state()
    clone = HypergradientOracle(max_trials=5, hyperparameters=toy_space())
    clone.trials = oracle.trials
    clone.set_state(state)
    assert clone._chains == oracle._chains
    assert "hypergradient_chains" in state


def test_flat_chain_state_is_resumed(tmp_path):
    # A chain saved flat (the policy state beside the bookkeeping keys) resumes as the
    # same chain.
    oracle = HypergradientOracle(max_trials=5, policy="adam", hyperparameters=toy_space())
    make_tuner(tmp_path, oracle).search(verbose=0)
    state = oracle.get_state()
    nested = state["hypergradient_chains"]["tuner0"]
    renamed = {"m": "adam_m", "v": "adam_v", "t": "adam_t", "lr": "adam_lr"}
    flat = {renamed.get(k, k): v for k, v in nested["policy"].items()}
    flat.update({k: v for k, v in nested.items() if k != "policy"})
    state["hypergradient_chains"] = {"tuner0": flat}
    clone = HypergradientOracle(max_trials=5, policy="adam", hyperparameters=toy_space())
    clone.trials = oracle.trials
    clone.set_state(state)
    assert clone._chains == oracle._chains


def test_non_log_hyperparameter_is_rejected(tmp_path):
    hp = keras_tuner.HyperParameters()
    hp.Float("a", 0.1, 1.0)  # linear sampling
    with pytest.raises(ValueError, match="sampling='log'.*Received"):
        HypergradientOracle(hyperparameters=hp, max_trials=3).create_trial("tuner0")
    hp = keras_tuner.HyperParameters()
    hp.Int("units", 1, 10)
    oracle = HypergradientOracle(max_trials=3)
    with pytest.raises(ValueError, match="only Float hyperparameters with sampling='log'"):
        oracle.update_space(hp)


def test_fixed_hyperparameters_pass_through(tmp_path):
    hp = toy_space()
    hp.Fixed("activation", "relu")
    oracle = HypergradientOracle(max_trials=3, hyperparameters=hp)
    make_tuner(tmp_path, oracle).search(verbose=0)
    assert all(t.hyperparameters.get("activation") == "relu" for t in oracle.trials.values())


def test_missing_hypergradient_metric_is_a_clear_error(tmp_path):
    oracle = HypergradientOracle(max_trials=3, hyperparameters=toy_space())
    tuner = make_tuner(tmp_path, oracle, report_gradient=False)
    with pytest.raises(ValueError, match="hypergradient/a"):
        tuner.search(verbose=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"policy": "sgd"}, "policy"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": float("inf")}, "Received: learning_rate=inf"),
        ({"gradient_tol": -1.0}, "Received: gradient_tol=-1.0"),
        ({"patience": 0}, "patience"),
        ({"first_step": 0.0}, "first_step"),
        ({"max_growth": 1.0}, "max_growth"),
        ({"memory": 0}, "memory"),
        ({"max_trials": 0}, "max_trials"),
        ({"objective": keras_tuner.Objective("acc", "max")}, "minimizes"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HypergradientOracle(**kwargs)


def test_summarize_values_is_compact_for_many_values():
    many = {f"alpha_{j:03d}": float(j + 1) for j in range(500)}
    rows = dict(summarize_values(many))
    assert rows == {"count": "500", "min": "1", "median": "250.5", "max": "500"}
    few = dict(summarize_values({"alpha": 0.5}))
    assert few == {"alpha": "0.5"}


def test_quasi_newton_first_step_is_one_decade_down_the_gradient(tmp_path):
    oracle = HypergradientOracle(max_trials=2, hyperparameters=toy_space())
    tuner = make_tuner(tmp_path, oracle)
    tuner.search(verbose=0)
    first, second = (oracle.trials[t].hyperparameters.values for t in oracle.start_order)
    # Gradient at the defaults: a = 5 > 0.3 (positive), b = 0.1 < 20 (negative, 4x
    # steeper). The step has Euclidean length log(10) in log space, along -gradient.
    grad = np.array([np.log(5.0 / TARGET["a"]), 4.0 * np.log(0.1 / TARGET["b"])])
    move = np.log([second["a"] / first["a"], second["b"] / first["b"]])
    np.testing.assert_allclose(move, -np.log(10.0) * grad / np.linalg.norm(grad), rtol=1e-9)


class ExpQuadraticTuner(QuadraticTuner):
    """Objective exp(quadratic in log a): quasi_newton models its logarithm."""

    def run_trial(self, trial, verbose=None):
        delta = np.log(trial.hyperparameters.get("a")) - np.log(TARGET["a"])
        value = np.exp(0.5 * delta**2)
        return {"val_criterion": value, gradient_metric("a"): delta * value}


def test_quasi_newton_is_exact_on_a_one_dimensional_log_quadratic(tmp_path):
    # The secant step on the derivative of log(objective), a quadratic here, lands
    # on its minimizer.
    hp = keras_tuner.HyperParameters()
    hp.Float("a", 1e-3, 10.0, sampling="log", default=5.0)
    oracle = HypergradientOracle(max_trials=6, hyperparameters=hp)
    ExpQuadraticTuner(oracle=oracle, directory=str(tmp_path), project_name="exp").search(verbose=0)
    values = [oracle.trials[t].hyperparameters.get("a") for t in oracle.start_order]
    # trial 2 is one decade down (5 -> 0.5), not past the minimizer 0.3: the pair of
    # trials 1-2 gives the secant, exact for a quadratic.
    assert values[1] == pytest.approx(0.5, rel=1e-9)
    assert values[2] == pytest.approx(TARGET["a"], rel=1e-9)


class ValleyTuner(QuadraticTuner):
    """A log-space quadratic whose curvatures differ 400-fold: a sharp valley in a,
    a shallow bowl in b (like the l1 and l2 penalties of an ElasticNet)."""

    def run_trial(self, trial, verbose=None):
        return super().run_trial(trial, scales=(100.0, 0.25))


def test_resume_continues_the_quasi_newton_memory(tmp_path):
    # Stop after 5 trials, when the chain holds secant pairs; a fresh oracle given
    # the saved state proposes exactly what the uninterrupted run proposes next.
    reference = HypergradientOracle(max_trials=9, patience=40, hyperparameters=toy_space())
    ValleyTuner(oracle=reference, directory=str(tmp_path), project_name="ref").search(verbose=0)
    expected = [reference.trials[t].hyperparameters.values for t in reference.start_order]

    first = HypergradientOracle(max_trials=5, patience=40, hyperparameters=toy_space())
    ValleyTuner(oracle=first, directory=str(tmp_path), project_name="cut").search(verbose=0)
    chain = first._chains["tuner0"]["policy"]
    assert len(chain["memory_s"]) >= 2 and chain["next_theta"] is not None
    resumed = HypergradientOracle(max_trials=9, patience=40, hyperparameters=toy_space())
    tuner = ValleyTuner(oracle=resumed, directory=str(tmp_path), project_name="cut")
    assert resumed._chains["tuner0"]["policy"]["memory_s"] == chain["memory_s"]
    tuner.search(verbose=0)
    got = [resumed.trials[t].hyperparameters.values for t in resumed.start_order]
    assert len(got) == len(expected) == 9
    for a, b in zip(got, expected, strict=True):
        assert a["a"] == pytest.approx(b["a"], rel=1e-12)
        assert a["b"] == pytest.approx(b["b"], rel=1e-12)


PLATEAU_EDGE = 0.5  # b above it: the objective is flat in b (like a switched-off group)


class PlateauTuner(QuadraticTuner):
    """The quadratic with a flat region: b is clipped at PLATEAU_EDGE before the
    objective is evaluated, so its derivative is exactly zero above the edge."""

    def run_trial(self, trial, verbose=None):
        t_a = np.log(trial.hyperparameters.get("a")) - np.log(TARGET["a"])
        t_b = np.log(min(trial.hyperparameters.get("b"), PLATEAU_EDGE)) - np.log(0.3)
        slope_b = 4.0 * t_b if trial.hyperparameters.get("b") < PLATEAU_EDGE else 0.0
        return {
            "val_criterion": 1.0 + 0.5 * t_a**2 + 2.0 * t_b**2,
            gradient_metric("a"): t_a,
            gradient_metric("b"): slope_b,
        }


def test_quasi_newton_probes_back_from_a_plateau(tmp_path):
    # From the defaults (b = 0.1, steepest), the first step raises b to 0.70: past the
    # edge, where its derivative is zero although its minimizer (0.3) lies before
    # the edge. The step is accepted (the objective decreased); the next
    # trial moves b alone back to 0.1 (worse: the backtracking then searches between
    # 0.1 and 0.70), and the search ends at the minimizer. Without the probe a search stops
    # with b still on the plateau (objective 1.52 against 1.0).
    oracle = HypergradientOracle(max_trials=25, hyperparameters=toy_space())
    tuner = PlateauTuner(oracle=oracle, directory=str(tmp_path), project_name="flat")
    tuner.search(verbose=0)
    values = [oracle.trials[t].hyperparameters.values for t in oracle.start_order]
    assert values[1]["b"] > PLATEAU_EDGE
    assert values[2]["b"] == pytest.approx(0.1, rel=1e-9)
    assert values[2]["a"] == pytest.approx(values[1]["a"], rel=1e-12)
    assert 0.1 < values[3]["b"] < PLATEAU_EDGE
    assert best_values(tuner)["b"] == pytest.approx(0.3, rel=0.05)
    assert best_values(tuner)["a"] == pytest.approx(TARGET["a"], rel=0.05)
