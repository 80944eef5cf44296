"""The shape of ki.lasso: an acyclic module graph, no private member used across
modules, inputs validated once per hypergradient call, the typed state behind
``state=`` and the restricted solves by ``ki.linalg.CG``."""

import ast
import pathlib

import numpy as np
import pytest
from lasso_reference import criterion_from_sklearn, diabetes

import keras_implicit.lasso as L
from keras_implicit import linalg
from keras_implicit.lasso import _adjoint, _state
from keras_implicit.lasso import estimators as est

PACKAGE = pathlib.Path(L.__file__).parent
# Modules whose switch to the interface of estimators / _state is pending.


def _lasso_imports(path):
    """Names of the ki.lasso modules that ``path`` imports (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "keras_implicit.lasso":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("keras_implicit.lasso."):
                found.add(node.module.rsplit(".", 1)[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("keras_implicit.lasso."):
                    found.add(alias.name.rsplit(".", 1)[1])
    return {name for name in found if (PACKAGE / f"{name}.py").exists()}


def test_module_graph_has_no_cycle():
    graph = {p.stem: _lasso_imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    done, active = set(), []

    def visit(module):
        if module in active:
            cycle = [*active[active.index(module) :], module]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        active.append(module)
        for dependency in sorted(graph.get(module, ())):
            visit(dependency)
        active.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def _defined_names(tree):
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        names.add(sub.id)
                    elif isinstance(sub, ast.Attribute):
                        names.add(sub.attr)
    return names


def _private(name):
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_no_private_member_is_used_across_modules(path):
    tree = ast.parse(path.read_text())
    own = _defined_names(tree)
    foreign = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            on_self = isinstance(base, ast.Name) and base.id in ("self", "cls")
            if not on_self and node.attr not in own:
                foreign.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keras_implicit"):
            for alias in node.names:
                is_module = (PACKAGE / f"{alias.name}.py").exists() or (
                    PACKAGE.parent / f"{alias.name}.py"
                ).exists()
                if _private(alias.name) and not is_module:
                    foreign.append(f"line {node.lineno}: imports {alias.name}")
    assert not foreign, foreign


def test_penalties_are_validated_once_per_hypergradient_call(monkeypatch):
    X, y = diabetes()
    criterion = L.HeldOutMSE(X[300:], y[300:])
    calls = []
    original = est._check_penalty
    monkeypatch.setattr(est, "_check_penalty", lambda *a: calls.append(a) or original(*a))
    state = {}
    for alpha in (0.5, 0.4):
        calls.clear()
        L.hypergradient(L.Lasso(alpha=alpha), criterion, X[:300], y[:300], state=state)
        assert len(calls) == 1, calls
    calls.clear()
    L.hypergradient(L.Lasso(alpha=0.5), L.CrossVal(cv=3), X, y)
    assert len(calls) == 1, calls


def test_a_dict_state_holds_the_typed_state():
    X, y = diabetes()
    criterion = L.HeldOutMSE(X[300:], y[300:])
    state = {}
    first = L.hypergradient(L.Lasso(alpha=0.5), criterion, X[:300], y[:300], state=state)
    typed = _state.HypergradientState.of(state)
    assert isinstance(typed, _state.HypergradientState) and state[_state.DICT_KEY] is typed
    assert typed.problems["main"].data is not None and typed.latest is not None
    # The typed state itself is accepted too, with the same result.
    again = L.hypergradient(L.Lasso(alpha=0.5), criterion, X[:300], y[:300], state=typed)
    np.testing.assert_allclose(again[1], first[1], rtol=1e-8)
    with pytest.raises(ValueError, match="Received: state of type list"):
        L.hypergradient(L.Lasso(alpha=0.5), criterion, X[:300], y[:300], state=[])


def test_a_state_reused_on_other_data_converts_them_again():
    """The converted data of the first (X, y) must not answer for other arrays."""
    X, y = diabetes()
    criterion = L.HeldOutMSE(X[300:], y[300:])
    model = L.Lasso(alpha=0.5, tol=1e-12)
    state = {}
    L.hypergradient(model, criterion, X[:300], y[:300], state=state)
    value, _ = L.hypergradient(model, criterion, X[:200], y[:200], state=state)
    reference = criterion_from_sklearn(model, criterion, X[:200], y[:200])
    assert value == pytest.approx(reference, rel=1e-8)


def test_restricted_cg_is_ki_linalg_cg_and_matches_a_dense_solve(monkeypatch):
    rng = np.random.default_rng(0)
    block = rng.standard_normal((40, 12))
    weights = rng.uniform(0.5, 1.5, 40)
    rhs = rng.standard_normal(12)
    calls = []
    original = linalg.CG.__call__
    monkeypatch.setattr(linalg.CG, "__call__", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(_adjoint, "_cg_functions", {})  # traced again with the patch
    info = _state.HypergradientInfo()
    evaluation = _state.Evaluation(_state.HypergradientState(), info, linear_solver="cg")
    import tensorflow as tf

    v = _adjoint._solve_restricted(
        lambda: tf.constant(block), tf.constant(weights), 0.3, rhs, evaluation
    )
    reference = np.linalg.solve(block.T @ (weights[:, None] * block) + 0.3 * np.eye(12), rhs)
    np.testing.assert_allclose(v, reference, rtol=1e-8)
    assert calls and info.linear_solvers == ["cg"] and info.ridge == [0.0]
