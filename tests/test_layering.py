"""The core's imports only go down its floors, and no module imports itself back through a cycle.

Floors, lowest first (a module may import its own floor and the floors below it, never one above):
    modeling -> parallel -> data, tokenizer -> args -> recipe, build -> rewards -> evals -> training -> tools
The stage scripts (sft/, rlhf/, reward_models/) stand on top of everything and are imported by nothing in the core.
Imports are read from the source (every `import` / `from ... import`, also those inside functions), so a late import
cannot hide a back arrow.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CORE = REPO_ROOT / "dbrx_tune"

FLOORS = [
    ("modeling",),
    ("parallel",),
    ("data", "tokenizer"),
    ("args",),
    ("recipe", "build"),
    ("rewards",),
    ("evals",),
    ("training",),
    ("tools",),
]
FLOOR_OF = {part: level for level, parts in enumerate(FLOORS) for part in parts}
SCRIPT_FOLDERS = ("sft", "rlhf", "reward_models")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """The first-party modules `path` imports, resolved to module names (relative imports too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            # `from dbrx_tune.evals import vibes` imports the submodule dbrx_tune.evals.vibes
            folder = REPO_ROOT / base.replace(".", os.sep)
            found.update(
                f"{base}.{alias.name}"
                for alias in node.names
                if (folder / alias.name).is_dir() or (folder / f"{alias.name}.py").is_file()
            )
    return {name for name in found if name.split(".")[0] in ("dbrx_tune", *SCRIPT_FOLDERS)}


def floor(module: str) -> int | None:
    """The floor of a core module (None for the package root `dbrx_tune`)."""
    parts = module.split(".")
    return FLOOR_OF[parts[1]] if len(parts) > 1 else None


def core_modules() -> dict[str, Path]:
    return {module_name(path): path for path in CORE.rglob("*.py")}


def test_every_core_module_has_a_floor():
    unplaced = sorted(name for name in core_modules() if name != "dbrx_tune" and name.split(".")[1] not in FLOOR_OF)
    assert not unplaced, f"place these in a floor of tests/test_layering.py (or move them): {unplaced}"


def test_core_imports_only_go_down():
    back_arrows = []
    for name, path in core_modules().items():
        here = floor(name)
        for target in imported_modules(path):
            if target.split(".")[0] in SCRIPT_FOLDERS:
                back_arrows.append(f"{name} -> {target} (a stage script)")
            elif target != "dbrx_tune" and here is not None and floor(target) > here:
                back_arrows.append(f"{name} (floor {here}) -> {target} (floor {floor(target)})")
    assert not back_arrows, "imports that run back up:\n" + "\n".join(sorted(back_arrows))


def test_no_import_cycles():
    modules = core_modules()
    graph = {name: {t for t in imported_modules(path) if t in modules and t != name} for name, path in modules.items()}
    # a package's __init__ re-exporting its own modules is not a cycle with them
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(trail[trail.index(target) :] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_scripts_are_not_installed_and_not_packages():
    """The stage folders are run by path from a checkout; as packages in site-packages their names would collide."""
    for folder in SCRIPT_FOLDERS:
        assert not (REPO_ROOT / folder / "__init__.py").exists(), f"{folder}/ must stay a folder of scripts"
    setup = (REPO_ROOT / "setup.cfg").read_text(encoding="utf-8")
    include = setup.split("[options.packages.find]")[1].split("[")[0]
    assert [line.strip() for line in include.splitlines() if line.strip() and not line.startswith("include")] == [
        "dbrx_tune",
        "dbrx_tune.*",
    ]


def test_the_layering_test_sees_a_planted_back_arrow():
    """The reader finds imports inside functions and relative imports, so a planted back arrow cannot hide."""
    planted = CORE / "modeling" / "_planted_back_arrow.py"
    planted.write_text("def late():\n    from ..training import stage\n    from dbrx_tune.args import ModelArguments\n")
    try:
        found = imported_modules(planted)
        assert {"dbrx_tune.training", "dbrx_tune.training.stage", "dbrx_tune.args"} <= found
        assert max(floor(name) for name in found) > floor("dbrx_tune.modeling._planted_back_arrow")
    finally:
        planted.unlink()
