"""The shape of the tree stays what ARCHITECTURE.md says it is.

The dependency rules themselves are import-linter contracts (.importlinter, run by .ci/run
as `lint-imports`); these tests pin what the contracts cannot say:

- every module under engine/ and storage_node/ is named in ARCHITECTURE.md's code map;
- importing the quorum core or the materialiser in a fresh interpreter loads neither grpc
  nor lmdb (the formats and the quorum core are what a lab or the simulator takes alone);
- no import cycle exists among the project's modules, an import inside a function
  included (grimp, import-linter's own graph library, reads them);
- no module is longer than about 1,000 lines (generated code aside).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("engine", "storage_node")
#: "About 1,000 lines" (issue 15): a module past this is doing two things.
MODULE_LINES_MAX = 1_100


def _modules() -> list[str]:
    """Paths (relative to the repo) of every hand-written Python module of the packages."""
    out = []
    for package in PACKAGES:
        for folder, _dirs, files in os.walk(os.path.join(ROOT, package)):
            if "__pycache__" in folder:
                continue
            for name in files:
                if name.endswith((".py", ".pyx")) and name != "__init__.py":
                    out.append(os.path.relpath(os.path.join(folder, name), ROOT))
    return sorted(out)


def test_every_module_is_in_the_code_map():
    """Scenario: a module added without a line in ARCHITECTURE.md's code map fails here."""
    with open(os.path.join(ROOT, "ARCHITECTURE.md")) as f:
        text = f.read()
    missing = [path for path in _modules() if f"`{path}`" not in text]
    assert not missing, f"not in ARCHITECTURE.md's code map (as `path`): {missing}"


@pytest.mark.parametrize("module", ["engine.writer.quorum", "engine.materialiser",
                                    "engine.format.redo", "engine.format.page"])
def test_quorum_core_and_materialiser_load_no_grpc_or_lmdb(module):
    """Scenario: a fresh interpreter imports the module; sys.modules then holds no grpc,
    lmdb or asyncio-based transport."""
    code = (f"import sys, {module}\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'lmdb', 'grpc_health'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.strip()
    assert out == "", f"importing {module} loaded {out}"


def test_no_import_cycles():
    """Scenario: the import graph of engine/ and storage_node/ (imports inside functions
    too) has no strongly connected component larger than one module."""
    import grimp   # import-linter's graph library (a test dependency)
    graph = grimp.build_graph(*PACKAGES)
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    # Tarjan's algorithm, iterative.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            succ = edges.get(node, [])
            if i < len(succ):
                work.append((node, i + 1))
                nxt = succ[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_is_over_about_a_thousand_lines():
    """Scenario: a module that grows past MODULE_LINES_MAX lines must be split by concern."""
    long = {}
    for path in _modules():
        with open(os.path.join(ROOT, path)) as f:
            lines = sum(1 for _ in f)
        if lines > MODULE_LINES_MAX:
            long[path] = lines
    assert not long, f"split these modules by concern: {long}"
