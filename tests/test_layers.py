"""The layers (docs/architecture.md): the core (`dali_skd`, but `dali_skd.commands`) imports neither `preprocess` nor
a command; a command imports the core and `preprocess`, never another command; `preprocess` imports only the core.
Every import statement counts, those inside functions too; and each core module imports in a fresh interpreter with
`preprocess` and the commands blocked: no cycle, no layer above needed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def imported(path: Path) -> set[str]:
    """Every module an import statement in `path` names (`from a import b` names a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((REPO / package).rglob("*.py"))}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


CORE = {name: path for name, path in modules("dali_skd").items() if not within(name, "dali_skd.commands")}
COMMANDS = {name: path for name, path in modules("dali_skd/commands").items() if name != "dali_skd.commands"}


def test_the_core_imports_neither_preprocess_nor_a_command() -> None:
    found = {
        name: sorted(n for n in imported(path) if within(n, "preprocess") or within(n, "dali_skd.commands"))
        for name, path in CORE.items()
    }
    assert {name: names for name, names in found.items() if names} == {}
    assert {"dali_skd.training", "dali_skd.evaluation", "dali_skd.comparison", "dali_skd.checkpoint"} <= set(CORE)


def test_a_command_never_imports_another() -> None:
    assert set(COMMANDS) == {
        f"dali_skd.commands.{c}"
        for c in ("train", "eval", "predict", "features", "compare", "demo", "bench", "plot", "preview", "export")
    }
    found = {
        name: sorted(n for n in imported(path) if within(n, "dali_skd.commands") and n != "dali_skd.commands")
        for name, path in COMMANDS.items()
    }
    assert {name: names for name, names in found.items() if names} == {}


def test_preprocess_imports_only_the_core() -> None:
    found = {
        name: sorted(n for n in imported(path) if within(n, "dali_skd.commands") or n == "cli")
        for name, path in modules("preprocess").items()
    }
    assert {name: names for name, names in found.items() if names} == {}
    assert any(within(n, "dali_skd") for path in modules("preprocess").values() for n in imported(path))


FRESH_IMPORTS = """
import importlib, sys
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "dali_skd" or m.startswith("dali_skd.")]:
        del sys.modules[loaded]  # each core module imported as in a fresh interpreter (torch and DALI stay loaded)
    sys.modules["preprocess"] = sys.modules["dali_skd.commands"] = sys.modules["cli"] = None
    importlib.import_module(name)
print("imported", len(sys.argv) - 1)
"""


def test_each_core_module_imports_alone_without_the_layers_above() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FRESH_IMPORTS, *CORE], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"imported {len(CORE)}"


def import_graph() -> dict[str, set[str]]:
    """Each module of the project (the core, the commands, `preprocess`, cli.py) and the project's modules it names
    in an import statement, wherever the statement is (a function's too)."""
    project = {**modules("dali_skd"), **modules("preprocess"), "cli": REPO / "cli.py"}
    return {name: {n for n in imported(path) if n in project and n != name} for name, path in project.items()}


def test_no_module_imports_itself_through_others() -> None:
    """A cycle of imports works only in one order, or through an import hidden in a function: none is left."""
    graph, cycles = import_graph(), []
    for start in graph:  # a path back to `start` from each module it imports, depth first
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            name, path = stack.pop()
            for nxt in sorted(graph[name]):
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert cycles == []
    assert "dali_skd.methods" in graph["dali_skd.step"]  # the graph sees imports


def test_settings_are_read_by_name_not_by_string() -> None:
    """No config class is made at run time (`dataclasses.make_dataclass`), and no attribute is read by a name built
    in a string (`getattr(aug, f"p_{name}")`): a type checker, and a reader following a setting, see every one."""
    found = []
    for path in [*modules("dali_skd").values(), *modules("preprocess").values(), REPO / "cli.py"]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            by_string = called in ("getattr", "setattr") and any(isinstance(a, ast.JoinedStr) for a in node.args)
            if called == "make_dataclass" or by_string:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert found == []
