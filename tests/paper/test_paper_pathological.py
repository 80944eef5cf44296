"""examples/paper/pathological.py asserts what it claims."""

import importlib.util
import pathlib

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "paper" / "pathological.py"


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("pathological", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("pathological")
    result = module.main(["--quick", "--out", str(out)])
    assert (out / "pathological.png").exists()
    return result


def test_diagnostics_flag_the_singular_initial_point(outcome):
    report = outcome["report"]
    assert not report.invertible and report.smallest_singular_value == 0.0
    assert report.spectral_radius == pytest.approx(1.0)
    assert outcome["healthy"].invertible


def test_implicit_descent_stalls_at_a_non_critical_point(outcome):
    stalled = outcome["runs"]["implicit, GMRES (stalls)"]
    assert stalled["theta"] == 0.0 and stalled["loss"] == pytest.approx(0.5)
    assert stalled["true_gradient"] == pytest.approx(-1.0)  # not a critical point


def test_neumann_backward_explodes(outcome):
    assert outcome["runs"]["implicit, Neumann (explodes)"]["max_abs_step"] > 10.0


@pytest.mark.parametrize("remedy", ["remedy: relu'(0) = 1/2", "remedy: random init"])
def test_remedies_converge(outcome, remedy):
    run = outcome["runs"][remedy]
    assert abs(run["theta"] - 1.0) < 1e-2 and run["loss"] < 1e-4
