"""The project as a newcomer meets it: demo, examples, lint, public API."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# examples/paper/ scripts are run by tests/paper, which also assert their claims
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))
PAPER_EXAMPLES = sorted((ROOT / "examples" / "paper").glob("*.py"))


def _run(args, tmp_path, timeout=900):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "MPLBACKEND": "Agg"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_runs_quietly(tmp_path):
    result = _run([sys.executable, "-m", "keras_implicit", "--quick"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Summary" in result.stdout and "NOT converged" not in result.stdout
    # no TensorFlow start-up noise reaches the terminal
    assert "cuda" not in result.stderr.lower() and "absl" not in result.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_runs_in_quick_mode(example, tmp_path):
    result = _run([sys.executable, str(example), "--quick", "--out", str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.glob("*.png")), "every example saves its figure"


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_clean():
    for command in (["ruff", "check", "."], ["ruff", "format", "--check", "."]):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:]


def test_wheel_carries_the_license(tmp_path):
    build = ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    result = _run([sys.executable, "-m", "pip", *build, str(ROOT)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("keras_implicit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        # setuptools < 77 writes .dist-info/LICENSE, later ones .dist-info/licenses/LICENSE
        licenses = [
            n
            for n in archive.namelist()
            if n.endswith((".dist-info/LICENSE", ".dist-info/licenses/LICENSE"))
        ]
        assert licenses, archive.namelist()
        assert "Apache License" in archive.read(licenses[0]).decode()


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="mkdocs not installed")
def test_api_reference_builds_strictly_and_covers_every_public_name(tmp_path):
    """The docs site (mkdocs + mkdocstrings) builds with warnings as errors, and every
    name in each public module's __all__ has its own entry in that module's page."""
    import keras_implicit as ki

    result = _run(["mkdocs", "build", "--strict", "-q", "-d", str(tmp_path)], tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    pages = {
        "implicit": ("keras_implicit.implicit", ki.implicit.__all__),
        "solvers": ("keras_implicit.solvers", ki.solvers.__all__),
        "linalg": ("keras_implicit.linalg", ki.linalg.__all__),
        "ops": ("keras_implicit.ops", ki.ops.__all__),
        "layers": ("keras_implicit.layers", ki.layers.__all__),
        "lasso": ("keras_implicit.lasso", ki.lasso.__all__),
        "tuner": ("keras_implicit.tuner", ki.tuner.__all__),
        "diagnostics": ("keras_implicit.diagnostics", ki.diagnostics.__all__),
    }
    for page, (module, names) in pages.items():
        html = (tmp_path / "api" / page / "index.html").read_text()
        # a function named like its module (lasso.search.search) is documented as such
        missing = [
            name
            for name in names
            if f'id="{module}.{name}"' not in html and f'id="{module}.{name}.{name}"' not in html
        ]
        assert not missing, (page, missing)


def test_robustness_table_names_tests_that_exist():
    """Every row of docs/robustness.md names a test function that exists in that file."""
    import re

    table = (ROOT / "docs" / "robustness.md").read_text()
    references = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", table)
    assert len(references) >= 40
    missing = [
        f"{path}::{name}"
        for path, name in references
        if not re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.MULTILINE)
    ]
    assert not missing


def test_public_api_contract():
    import keras_implicit as ki

    for name in (
        "fixed_point",
        "root",
        "argmin",
        "custom_fixed_point",
        "custom_root",
        "SolverStats",
        "solvers",
        "linalg",
        "diagnostics",
    ):
        assert hasattr(ki, name), name
    for name in ("FixedPointIteration", "Anderson", "Broyden", "get"):
        assert hasattr(ki.solvers, name), name
    for name in ("CG", "GMRES", "BiCGStab", "Broyden", "Neumann", "Dense", "get"):
        assert hasattr(ki.linalg, name), name
    assert set(ki.SolverStats._fields) == {"iterations", "residual", "converged"}
    ops = """projection_non_negative projection_box projection_hyperplane projection_halfspace
        projection_affine_set projection_simplex projection_l1_ball projection_l1_sphere
        projection_l2_ball projection_l2_sphere projection_linf_ball
        projection_second_order_cone projection_psd_cone projection_exp_cone sparsemax
        prox_lasso prox_elastic_net prox_group_lasso prox_ridge prox_non_negative_lasso"""
    for name in ops.split():
        assert callable(getattr(ki.ops, name)), name
    for name in (
        "DEQ",
        "DenseCell",
        "ConvCell",
        "MonotoneDenseCell",
        "Projection",
        "Sparsemax",
        "SimplexProjection",
        "PSDProjection",
        "QuadraticProgram",
        "ConeProgram",
        "CvxpyLayer",
    ):
        assert hasattr(ki.layers, name), name
    for name in (
        "Lasso",
        "ElasticNet",
        "WeightedLasso",
        "SparseLogisticRegression",
        "HeldOutMSE",
        "HeldOutLogistic",
        "CrossVal",
        "SURE",
        "hypergradient",
    ):
        assert hasattr(ki.lasso, name), name
    for name in ("HypergradientOracle", "LassoTuner"):
        assert hasattr(ki.tuner, name), name


def test_refuses_other_keras_backends():
    code = "import keras_implicit"
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "Received: KERAS_BACKEND='jax'" in result.stderr


def test_every_paper_example_has_a_claim_test():
    tested = {p.name.removeprefix("test_paper_") for p in (ROOT / "tests" / "paper").glob("*.py")}
    for example in PAPER_EXAMPLES:
        assert example.name in tested, f"{example.name} has no tests/paper/test_paper_ file"
