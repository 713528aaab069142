"""The package's floors hold: imports only point down, no cycles, no private name used outside
its module, and fire_core imports sit at module top (tools may defer theirs, saying why).

Floors, bottom to top:
  0  config, provenance, plots, files         (no domain knowledge)
  1  mechanisms: world, checker, prompts, feedback (the oracle), models, vision, sft, records,
     client, annotate, language, dialogue, metrics, eval
  2  stages.common                             (what several stages share)
  3  stages.<one per stage>                    (each has one entry point, run(cfg))
  4  tools: pipeline, readiness, serve, bench, audit, report (they use the mechanisms, never a stage)
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import fire_core

PKG = Path(fire_core.__file__).parent
BOTTOM = {"config", "provenance", "plots", "files"}
TOOLS = {"pipeline", "readiness", "serve", "bench", "audit", "report"}


def module_name(path: Path, pkg: Path) -> str:
    rel = path.relative_to(pkg.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def floor(mod: str) -> int:
    short = mod.split(".", 1)[1] if "." in mod else ""
    if not short or short in BOTTOM:
        return 0
    if short in ("stages", "stages.common"):
        return 2
    if short.startswith("stages."):
        return 3
    if short in TOOLS:
        return 4
    return 1


def modules(pkg: Path) -> dict[str, Path]:
    return {module_name(p, pkg): p for p in sorted(pkg.rglob("*.py"))}


def edges(path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported package module, line, at module top?) for every import in the file, the ones
    inside functions included. ``from fire_core import x`` counts as module x."""
    root = next(iter(known)).split(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == root:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                targets.append(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == root]
        out += [(t, node.lineno, id(node) in top) for t in targets]
    return out


def downward_violations(pkg: Path) -> list[str]:
    known = modules(pkg)
    bad = []
    for mod, path in known.items():
        for target, line, _ in edges(path, known):
            if target == mod:
                continue
            if floor(target) > floor(mod):
                bad.append(f"{path.name}:{line} {mod} (floor {floor(mod)}) imports {target} (floor {floor(target)})")
            elif floor(mod) == 4 and floor(target) in (2, 3):
                bad.append(f"{path.name}:{line} tool {mod} imports stage code {target}: tools use mechanisms only")
            elif floor(mod) == 3 and floor(target) == 3:
                bad.append(f"{path.name}:{line} stage {mod} imports stage {target}: share it through stages.common")
    return bad


def find_cycle(pkg: Path) -> list[str] | None:
    known = modules(pkg)
    graph = {m: {t for t, *_ in edges(p, known) if t != m and t in known} for m, p in known.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def lazy_imports(pkg: Path) -> list[str]:
    """A package import inside a function hides the dependency graph; only tools may defer
    one, with a comment on the line saying why (import cost)."""
    known = modules(pkg)
    bad = []
    for mod, path in known.items():
        lines = path.read_text().splitlines()
        for target, line, at_top in edges(path, known):
            if not at_top and not (floor(mod) == 4 and "#" in lines[line - 1]):
                bad.append(f"{path.name}:{line} imports {target} inside a function")
    return bad


def private_uses(path: Path, known: dict[str, Path]) -> list[str]:
    root = next(iter(known)).split(".")[0]
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == root:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in known:
                    aliases[a.asname or a.name] = sub
                elif a.name.startswith("_") and not a.name.startswith("__"):
                    bad.append(f"{path.name}:{node.lineno} imports private {node.module}.{a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == root and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            bad.append(f"{path.name}:{node.lineno} uses private {aliases[node.value.id]}.{node.attr}")
    return bad


def test_every_module_imports():
    for m in pkgutil.walk_packages(fire_core.__path__, "fire_core."):
        importlib.import_module(m.name)


def test_imports_point_down_and_never_between_stages():
    bad = downward_violations(PKG)
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    cycle = find_cycle(PKG)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_package_imports_sit_at_module_top():
    bad = lazy_imports(PKG)
    assert not bad, "\n".join(bad)


def test_no_private_name_is_used_outside_its_module():
    known = modules(PKG)
    tests = {f"tests.{p.stem}": p for p in Path(__file__).parent.glob("*.py")}
    bad = [b for p in [*known.values(), *tests.values()] for b in private_uses(p, known)]
    assert not bad, "\n".join(bad)


def test_every_stage_has_one_entry_point_named_run():
    stages = [m for m in modules(PKG) if floor(m) == 3]
    assert len(stages) >= 7, stages
    for m in stages:
        assert callable(getattr(importlib.import_module(m), "run", None)), f"{m} has no run(cfg)"


def test_the_checks_catch_what_they_look_for(tmp_path):
    """On a throwaway package: an upward import, a stage importing a stage, a lazy import, a
    private name and a cycle are each reported."""
    pkg = tmp_path / "fire_core"
    (pkg / "stages").mkdir(parents=True)
    for f in ("__init__.py", "config.py", "stages/__init__.py", "stages/common.py"):
        (pkg / f).write_text("")
    (pkg / "world.py").write_text("from fire_core import checker\n")
    (pkg / "checker.py").write_text("from fire_core import world\n\n\ndef f():\n"
                                     "    from fire_core.stages import teacher\n    return world._font, teacher\n")
    (pkg / "stages" / "teacher.py").write_text("from fire_core.stages import student\n")
    (pkg / "stages" / "student.py").write_text("")
    (pkg / "config.py").write_text("from fire_core import world\n")
    known = modules(pkg)
    down = downward_violations(pkg)
    assert any("fire_core.config (floor 0) imports fire_core.world" in b for b in down)
    assert any("fire_core.checker (floor 1) imports fire_core.stages.teacher" in b for b in down)
    assert any("stage fire_core.stages.teacher imports stage fire_core.stages.student" in b for b in down)
    assert find_cycle(pkg) in (["fire_core.checker", "fire_core.world", "fire_core.checker"],
                               ["fire_core.config", "fire_core.world", "fire_core.checker", "fire_core.world"])
    assert lazy_imports(pkg) == ["checker.py:5 imports fire_core.stages.teacher inside a function"]
    assert private_uses(pkg / "checker.py", known) == ["checker.py:6 uses private fire_core.world._font"]
