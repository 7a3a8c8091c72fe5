"""The package's floors (docs/architecture.md): every import, lazy ones inside functions included, goes to the
same floor or a lower one, no module imports another back (no cycle), and runtime code never imports the test
stand-ins. Read from the source files' syntax trees, so a new module is checked the day it is added."""

import ast
import pathlib
from typing import Dict, List, Set, Tuple

import meteor_plugin

PACKAGE = pathlib.Path(meteor_plugin.__file__).parent

# Floor of each part of the package, by path relative to the package (the longest prefix that matches wins).
FLOORS: Tuple[Tuple[str, int], ...] = (
    # 0: foundations, which know no model
    ("config.py", 0), ("registry.py", 0), ("percall.py", 0), ("stats.py", 0), ("progress.py", 0), ("flops.py", 0),
    ("checkpoint_files.py", 0), ("distributed.py", 0), ("core/", 0), ("compat/", 0), ("source_edits/", 0),
    # 1: the stages, and which config applies to a model
    ("stages/", 1), ("runtime.py", 1),
    # 2: what a family is written with: the record, the pieces families share, the refusal of the others
    ("adapters/family.py", 2), ("adapters/shared/", 2), ("adapters/refusal.py", 2), ("adapters/support.py", 2),
    # 3: the families, one folder each
    ("adapters/", 3),
    # 4: the registry of families
    ("adapters/__init__.py", 4),
    # 5: the tools built on the families
    ("patching.py", 5), ("training/", 5), ("patcher/", 5), ("calibrate.py", 5), ("operating_points.py", 5), ("entry.py", 5),
    # 6: entry points and the applications on top
    ("__init__.py", 6), ("cli.py", 6), ("run.py", 6), ("train.py", 6), ("demo.py", 6), ("bench/", 6),
    ("fidelity/", 6), ("testing/", 6),
)
# Entry points: a subpackage's ``__main__.py`` and maintainer scripts run from the top, whatever folder they sit in.
ENTRY_POINTS = ("patcher/__main__.py", "patcher/make_patches.py")
# What a user's `import meteor_plugin`, `meteor-plugin calibrate`, `convert`, `patch` and `train` reach.
RUNTIME = ("config.py", "registry.py", "percall.py", "stats.py", "progress.py", "flops.py", "checkpoint_files.py",
           "distributed.py", "core/", "compat/", "source_edits/", "stages/", "runtime.py", "adapters/",
           "patching.py", "training/", "patcher/", "calibrate.py", "operating_points.py", "entry.py", "__init__.py", "run.py", "train.py")


def floor_of(relative: str) -> int:
    if relative in ENTRY_POINTS:
        return 6
    matches = [(len(prefix), floor) for prefix, floor in FLOORS
               if relative == prefix or (prefix.endswith("/") and relative.startswith(prefix))]
    assert matches, f"{relative} has no floor in tests/test_architecture.py (and docs/architecture.md)"
    return max(matches)[1]


def _modules() -> Dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("testing/eagle_like/eagle/"):
            continue  # the EAGLE stand-in's own package (imported as `eagle`, not as part of meteor_plugin)
        out[relative] = path
    return out


def _target(name: str, modules: Dict[str, pathlib.Path]) -> str:
    """The file a dotted module name inside the package refers to ('' when it is not one of ours)."""
    parts = name.split(".")[1:]
    for candidate in ("/".join(parts) + ".py", "/".join(parts + ["__init__.py"])):
        if candidate in modules:
            return candidate
    return ""


def _imports(relative: str, path: pathlib.Path, modules: Dict[str, pathlib.Path]) -> List[Tuple[int, str]]:
    package = ["meteor_plugin"] + relative.split("/")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "meteor_plugin"]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module.split(".")[0] != "meteor_plugin":
                continue
            names = [f"{module}.{a.name}" if _target(f"{module}.{a.name}", modules) else module for a in node.names]
        for name in names:
            target = _target(name, modules)
            if target and target != relative:
                found.append((node.lineno, target))
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {rel: {t for _, t in _imports(rel, path, modules)} for rel, path in modules.items()}


def test_every_import_goes_to_the_same_floor_or_down():
    modules = _modules()
    upward = []
    for relative, path in sorted(modules.items()):
        for line, target in _imports(relative, path, modules):
            if floor_of(target) > floor_of(relative):
                upward.append(f"{relative}:{line} (floor {floor_of(relative)}) imports {target} "
                              f"(floor {floor_of(target)})")
    assert upward == []


def test_no_import_cycles():
    graph = _graph()
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert cycles == []


def test_runtime_code_never_imports_the_test_stand_ins():
    modules = _modules()
    found = []
    for relative, path in sorted(modules.items()):
        if not any(relative == p or (p.endswith("/") and relative.startswith(p)) for p in RUNTIME):
            continue
        for line, target in _imports(relative, path, modules):
            if target.startswith(("testing/", "fidelity/", "bench/", "demo.py")):
                found.append(f"{relative}:{line} imports {target}")
    assert found == []


def test_a_module_on_a_wrong_floor_is_found():
    """The checks are not vacuous: a lower module importing a higher one is reported."""
    assert floor_of("core/select.py") == 0 and floor_of("adapters/eagle/inference.py") == 3
    assert floor_of("adapters/__init__.py") == 4 and floor_of("patcher/__main__.py") == 6
    modules = _modules()
    assert ("stages/decoder.py", "percall.py") in {(r, t) for r, p in modules.items() for _, t in _imports(r, p, modules)}
