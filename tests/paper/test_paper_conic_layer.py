"""examples/paper/conic_layer.py asserts what it claims."""

import importlib.util
import pathlib

import numpy as np
import pytest
import tensorflow as tf

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "paper" / "conic_layer.py"


@pytest.fixture(scope="module")
def module():
    spec = importlib.util.spec_from_file_location("conic_layer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def outcome(module, tmp_path_factory):
    out = tmp_path_factory.mktemp("conic_layer")
    result = module.main(["--quick", "--out", str(out)])
    assert (out / "conic_layer.png").exists()
    return result


def test_training_loss_decreases_substantially(outcome):
    loss = outcome["log"]["loss"]
    assert loss[-1] < 0.1 * loss[0]
    assert np.all(outcome["log"]["unsolved"] == 0)  # every training solve succeeded


def test_beats_the_baselines_on_held_out_data(outcome):
    mse = outcome["test_mse"]
    assert mse["conic layer"] < 0.1 * mse["untrained model"]
    assert mse["conic layer"] < 0.5 * mse["least squares"]
    assert mse["conic layer"] < mse["MLP"]
    # the unconstrained MLP leaves the true feasible set, the layer's outputs do not
    assert outcome["infeasible_fraction"]["MLP"] > 0.05


def test_outputs_are_feasible_solved_and_match_cvxpy(outcome):
    assert np.all(outcome["status"] == 0)
    assert outcome["max_violation"] < 1e-5  # in the learned cone
    assert outcome["cvxpy_agreement"] < 1e-4  # Clarabel, at the learned parameters


def test_conic_layer_gradient_matches_central_finite_differences(module):
    rng = np.random.default_rng(3)
    layer = module.ki.layers.ConeProgram(
        module.CONE,
        A=module.A_MATRIX,
        return_status=True,
        dtype="float64",
        tol=1e-11,
        max_iter=50000,
        backward_tol=1e-12,
    )
    c = tf.constant(rng.standard_normal((4, module.N)))
    b = tf.constant(np.tile(module.b_vector(module.TRUE_BALL), (4, 1)))
    weights = tf.constant(rng.standard_normal((4, module.N)))

    def objective(c, b):
        x, status = layer({"c": c, "b": b})
        assert np.all(status.numpy() == 0)
        return tf.reduce_sum(weights * x)

    with tf.GradientTape() as tape:
        tape.watch([c, b])
        value = objective(c, b)
    grad_c, grad_b = tape.gradient(value, [c, b])
    eps = 1e-6
    for grad, make in (
        (grad_c, lambda d: (c + d, b)),
        (grad_b, lambda d: (c, b + d)),
    ):
        direction = tf.constant(rng.standard_normal(grad.shape))
        fd = float(objective(*make(eps * direction))) - float(objective(*make(-eps * direction)))
        fd /= 2 * eps
        implicit = float(tf.reduce_sum(grad * direction))
        assert implicit == pytest.approx(fd, rel=1e-4, abs=1e-6)
