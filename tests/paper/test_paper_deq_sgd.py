"""examples/paper/deq_sgd.py asserts what it claims."""

import importlib.util
import math
import pathlib

import numpy as np
import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "paper" / "deq_sgd.py"
N_TRAIN, EPOCHS, BATCH = 512, 8, 32  # the example's quick mode


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("deq_sgd", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("deq_sgd")
    result = module.main(["--quick", "--out", str(out)])
    assert (out / "deq_sgd.png").exists()
    return result


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_training_loss_decreases(outcome, optimizer):
    run = outcome["runs"][optimizer]
    # the initial loss is that of a near-uniform classifier (log 2 for two classes)
    assert run["initial_loss"] == pytest.approx(math.log(2.0), abs=0.1)
    assert run["train_loss"] < 0.25 * run["initial_loss"]
    assert run["epoch_losses"][-1] < 0.5 * run["epoch_losses"][0]


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_beats_the_linear_baseline_by_a_margin(outcome, optimizer):
    baseline = outcome["baseline"]
    # a linear classifier cannot separate concentric circles: it is at chance level
    assert baseline["logistic_accuracy"] < baseline["chance"] + 0.1
    accuracy = outcome["runs"][optimizer]["test_accuracy"]
    assert accuracy > 0.9
    assert accuracy > max(baseline["logistic_accuracy"], baseline["chance"]) + 0.3


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_solvers_converged_and_the_output_is_the_equilibrium(outcome, optimizer):
    run = outcome["runs"][optimizer]
    assert run["forward_converged"].min() >= 0.99  # DEQ metric, every epoch
    assert run["backward_residual"].max() < 1e-4  # mean GMRES residual below its tol
    # recomputed from the weights, independently of the solver's own residual
    assert run["equilibrium_residual"] < 1e-2
    # the implicit system is invertible along training: sym(I - W) >= m I
    assert run["monotonicity"] >= 0.1 - 1e-5


def test_sgd_step_sizes_vanish_as_scheduled(outcome):
    config = outcome["schedule"]
    assert 0.5 < config["gamma"] <= 1.0
    rates = outcome["runs"]["SGD"]["step_sizes"]
    steps = np.arange(1, EPOCHS + 1) * math.ceil(N_TRAIN / BATCH)
    expected = (
        config["initial_learning_rate"] / (1 + steps / config["decay_steps"]) ** config["gamma"]
    )
    np.testing.assert_allclose(rates, expected, rtol=1e-6)
    assert np.all(np.diff(rates) < 0) and rates[-1] < 0.5 * config["initial_learning_rate"]
