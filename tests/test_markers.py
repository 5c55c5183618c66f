"""Every test that runs a peer tool carries the ``peer`` marker.

A test needs a peer when it calls ``require_tool`` (tests/support.py), or a
helper or fixture that does, directly or through others.  ``pytest -m "not
peer"`` then runs exactly the tests that need nothing but Python, and
``-m peer`` the ones that prove behaviour against real peers.
"""

from __future__ import annotations

import ast
import pathlib

TESTS = pathlib.Path(__file__).parent


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    """Module-level functions and fixtures (and methods, by bare name)."""
    out: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out.setdefault(node.name, node)
    return out


def _uses(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Functions ``fn`` calls or passes on by name, and the fixtures it takes."""
    names = {a.arg for a in fn.args.args}
    for n in ast.walk(fn):
        if isinstance(n, ast.Call):
            f = n.func
            names.add(f.id if isinstance(f, ast.Name) else getattr(f, "attr", ""))
            names |= {a.id for a in n.args if isinstance(a, ast.Name)}
    return names


def _marked_peer(decorators: list[ast.expr]) -> bool:
    return any("mark.peer" in ast.unparse(d) for d in decorators)


def _module_marked(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return "mark.peer" in ast.unparse(node.value)
    return False


def _closure(graph: dict[str, set[str]], seeds: set[str]) -> set[str]:
    users = set(seeds)
    changed = True
    while changed:
        changed = False
        for name, calls in graph.items():
            if name not in users and calls & users:
                users.add(name)
                changed = True
    return users


def _helpers(tree: ast.Module) -> dict[str, set[str]]:
    return {name: _uses(fn) for name, fn in _functions(tree).items()
            if not name.startswith("test_")}


def unmarked_peer_tests() -> list[str]:
    """Tests that run a peer tool (through helpers of their module, tests/support.py
    or tests/conftest.py) but carry no ``peer`` marker."""
    trees = {p.name: ast.parse(p.read_text()) for p in sorted(TESTS.glob("*.py"))}
    shared: dict[str, set[str]] = {}
    for name in ("support.py", "conftest.py"):
        shared.update(_helpers(trees[name]))
    shared_users = _closure(shared, {"require_tool"})
    missing = []
    for name, tree in trees.items():
        if not name.startswith("test_") or _module_marked(tree):
            continue
        users = _closure({**shared, **_helpers(tree)}, shared_users)
        classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
        candidates = [(n, []) for n in tree.body
                      if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        candidates += [(n, c.decorator_list) for c in classes for n in c.body
                       if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        for fn, outer in candidates:
            if not fn.name.startswith("test_"):
                continue
            if _uses(fn) & users and not _marked_peer(fn.decorator_list + outer):
                missing.append(f"{name}::{fn.name}")
    return missing


def test_tests_that_run_peer_tools_are_marked_peer() -> None:
    missing = unmarked_peer_tests()
    assert not missing, "add @pytest.mark.peer to: " + ", ".join(missing)
