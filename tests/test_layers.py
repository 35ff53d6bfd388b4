"""The layers are a rule, not a picture: data flows one way through src/tracesock.

core -> telemetry -> sockets -> patching -> the ways in and out (cli, exporters,
report, bootstrap, conformance, instrumentor, demo, example, the package itself).
Read from the source (AST), every import between tracesock's modules must:

* go to the same layer or one below (never up);
* form no cycle;
* sit at module level: an import inside a function is how a cycle hides (allowed for
  other packages -- optional extras, start-up cost -- in the two sitecustomize
  hooks, which run at interpreter start and must survive a tracesock that cannot
  be imported, and in the pytest plugin's entry point, loaded into every pytest run);
* name nothing private: a name two modules share is public in the module that owns
  it (``from x import _y`` is refused; the C extension ``_speedups`` is loaded by
  ``core.speedups`` alone).
"""

from __future__ import annotations

import ast
import os

import pytest

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
PACKAGE = os.path.join(SRC, "tracesock")
LAYERS = {"version": 0, "_speedups": 0, "core": 1, "telemetry": 2, "sockets": 3, "patching": 4}
OUTER = 5
# Loaded where tracesock must cost nothing until used: the two sitecustomize hooks (at
# interpreter start) and the pytest plugin's entry point (in every pytest run).
LAZY_HOOKS = {"tracesock.bootstrap.sitecustomize", "tracesock.conformance.sitecustomize",
              "tracesock.pytest_plugin"}


def _modules():
    out = {}
    for folder, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = path
    return out


MODULES = _modules()


def _is_package(module):
    return MODULES[module].endswith("__init__.py")


def _layer(module):
    parts = module.split(".")
    return LAYERS.get(parts[1], OUTER) if len(parts) > 1 else OUTER


def _imports(module):
    """(line, target module, names taken from it, inside a function) for each tracesock import."""
    with open(MODULES[module], encoding="utf-8") as f:
        tree = ast.parse(f.read())
    base = module if _is_package(module) else module.rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "tracesock":
                        found.append((child.lineno, alias.name, (), nested))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = base.split(".")
                    parts = parts[:len(parts) - child.level + 1]
                    target = ".".join(parts + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "tracesock":
                    for alias in child.names:
                        sub = f"{target}.{alias.name}"
                        if sub in MODULES or alias.name == "_speedups":
                            found.append((child.lineno, sub, (), nested))
                        else:
                            found.append((child.lineno, target, (alias.name,), nested))
            visit(child, nested)

    visit(tree, False)
    return found


def _graph():
    return {m: sorted({t for _l, t, _n, f in _imports(m) if not f and t in MODULES and t != m})
            for m in MODULES}


def test_the_tree_has_the_layers():
    for layer in ("core", "telemetry", "sockets", "patching"):
        assert f"tracesock.{layer}" in MODULES
    assert "tracesock.version" in MODULES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_higher_layer(module):
    upward = [(line, target) for line, target, _names, _f in _imports(module)
              if target.startswith("tracesock.") and _layer(target) > _layer(module)]
    assert not upward, f"{module} (layer {_layer(module)}) imports from above: {upward}"


def test_no_import_cycle():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def walk(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(set(MODULES) - LAZY_HOOKS))
def test_no_tracesock_import_inside_a_function(module):
    hidden = [(line, target) for line, target, _names, in_function in _imports(module) if in_function]
    assert not hidden, f"{module} imports tracesock modules inside functions: {hidden}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_across_modules(module):
    private = [(line, target, name) for line, target, names, _f in _imports(module)
               for name in names if name.startswith("_") and name != "__version__"]
    private += [(line, target, "") for line, target, _n, _f in _imports(module)
                if target.rpartition(".")[2].startswith("_") and target != "tracesock._speedups"
                and not target.endswith("__main__")]
    if module != "tracesock.core.speedups":
        private += [(line, target, "") for line, target, _n, _f in _imports(module)
                    if target == "tracesock._speedups"]
    assert not private, f"{module} takes private names from other modules: {private}"


def test_the_rule_sees_a_violation(tmp_path):
    """The checker itself: an upward import and a private name are found."""
    global MODULES
    saved = MODULES
    bad = tmp_path / "bad.py"
    bad.write_text("from ..patching import _active\n\ndef f():\n    from ..sockets import tls\n")
    MODULES = dict(saved, **{"tracesock.core.bad": str(bad)})
    try:
        found = _imports("tracesock.core.bad")
    finally:
        MODULES = saved
    assert (1, "tracesock.patching", ("_active",), False) in found
    assert (4, "tracesock.sockets.tls", (), True) in found
