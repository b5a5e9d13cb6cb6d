"""Dependencies run one way (DESIGN.md, "Which way dependencies run"):

    base (errors, registry, config, constants, devices, files, tables)
      -> nn -> data -> encoders -> objectives (and convert) -> runs -> train, eval -> commands

A module imports only modules of its own layer or below, also inside functions; train and eval
never import each other; an objective imports no other objective's file (shared pieces live in
nn/ or data/); no import circle among mmssl's modules; every module imports alone; and a
function-local import says why it is not at the top (``# lazy: reason``), which is only to keep a
heavy optional library out of start-up.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmssl"

# prefix -> layer; the longest matching prefix wins
LAYERS = {
    "mmssl": 0,
    "mmssl.errors": 0,
    "mmssl.registry": 0,
    "mmssl.config": 0,
    "mmssl.constants": 0,
    "mmssl.devices": 0,
    "mmssl.files": 0,
    "mmssl.tables": 0,
    "mmssl.nn": 1,
    "mmssl.data": 2,
    "mmssl.encoders": 3,
    "mmssl.objectives": 4,
    "mmssl.convert": 4,
    "mmssl.runs": 5,
    "mmssl.train": 6,
    "mmssl.eval": 6,
    "mmssl.commands": 7,
    "mmssl.cli": 7,
    "mmssl.serve": 7,
    "mmssl.testing": 7,
}
PEERS_APART = ("mmssl.train", "mmssl.eval")  # same layer, never importing each other


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[best]


def package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = package_of(module).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, ast.stmt, bool]]:
    """``(imported mmssl module, statement, inside a function)`` for every import of ``module``;
    ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    local = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            targets = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "mmssl" or target.startswith("mmssl."):
                while target not in MODULES:  # `import mmssl.x.y` of a name inside a module
                    target = target.rsplit(".", 1)[0]
                found.append((target, node, id(node) in local))
    return found


GRAPH = {m: sorted({t for t, _, _ in imports(m)} - {m}) for m in MODULES}


def test_every_module_has_a_layer():
    assert all(layer_of(m) >= 0 for m in MODULES)


def test_no_lower_layer_imports_a_higher_one():
    wrong = [
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in GRAPH.items()
        for t in targets
        if layer_of(t) > layer_of(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_train_and_eval_do_not_import_each_other():
    a, b = PEERS_APART
    wrong = [
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        for t in targets
        if (m.startswith(a) and t.startswith(b)) or (m.startswith(b) and t.startswith(a))
    ]
    assert not wrong, "\n".join(wrong)


def test_objectives_share_code_through_lower_layers_not_each_other():
    allowed = {"mmssl.objectives", "mmssl.objectives.base"}
    wrong = [
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        if m.startswith("mmssl.objectives.")
        for t in targets
        if t.startswith("mmssl.objectives") and t not in allowed
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    """Tarjan's strongly connected components over every import, function-local ones included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for t in GRAPH[m]:
            if t not in index:
                visit(t)
                low[m] = min(low[m], low[t])
            elif t in stack:
                low[m] = min(low[m], index[t])
        if low[m] == index[m]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == m:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(MODULES)))
    for m in MODULES:
        if m not in index:
            visit(m)
    assert not circles, f"import circles: {circles}"


def _is_lazy_comment(line: str) -> bool:
    return line.strip().startswith("# lazy:") and len(line.strip()) > len("# lazy:") + 3


def test_function_local_imports_say_why():
    """Allowed only to keep a heavy optional library out of start-up, with ``# lazy: reason`` on
    the line above (one comment covers the import lines right under it) or at the end of the line."""
    missing = []
    for path in MODULES.values():
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                row = node.lineno - 1
                while row > 0 and lines[row - 1].lstrip().startswith(("import ", "from ")):
                    row -= 1  # the first of a run of import lines
                if "# lazy:" not in lines[node.lineno - 1] and not (
                    row > 0 and _is_lazy_comment(lines[row - 1])
                ):
                    missing.append(
                        f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}"
                    )
    assert not missing, "function-local imports without a `# lazy: reason` comment:\n" + "\n".join(missing)


IMPORT_EACH = """
import importlib, json, sys, time, traceback
failed, slow = {}, []
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "mmssl" or m.startswith("mmssl.")]:
        del sys.modules[loaded]  # a fresh mmssl each time; third-party libraries stay loaded
    start = time.perf_counter()
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=3)
    slow.append((time.perf_counter() - start, name))
print(json.dumps({"failed": failed, "slowest": sorted(slow)[-3:]}))
"""


def test_every_module_imports_alone():
    names = sorted(MODULES)
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, json.dumps(names)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["failed"], "\n".join(f"{k}:\n{v}" for k, v in result["failed"].items())


def test_the_command_line_starts_without_torch():
    """``mmssl --help`` lists the commands without importing any of them (or PyTorch)."""
    code = (
        "import sys, mmssl.cli as c; c._available(); "
        "print(sorted(m for m in sys.modules if m.startswith('torch'))[:3])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
