"""Imports point one way: no cycle, no layer importing a higher one, no orchestration in a notebook's kernel.

The graph is built with `ast` from the source, imports inside functions (and under
TYPE_CHECKING) included: a lazy import is still a dependency. The layers are the table in
`pipelines/__init__.py`; a new package fails here until it is given a place in LAYERS.
"""

# restructure: new-layout (tools/restructure.py leaves this file alone: its bare names are packages)
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]

# Module prefix -> layer; the longest matching prefix wins. A module may import a lower layer or
# its own package (`pipelines.cli.runs` -> `pipelines.cli.common`), never a higher layer.
LAYERS = {
    "lightning_modules": -1,
    "pipelines.errors": 0,
    "pipelines.specs": 1,
    "pipelines.tracking": 2,
    "pipelines.study.study": 3,
    "pipelines.study.guarded_sampler": 3,
    "pipelines.nb": 4,
    "pipelines.kernels": 4,
    "pipelines.execution": 5,
    "pipelines.reports": 5,
    "pipelines.study": 6,
    "pipelines.pipeline": 8,
    "pipelines.launchers": 7,
    "pipelines.schedule": 8,
    "pipelines.cli": 9,
    "pipelines.launch": 10,
}
PACKAGE_ROOTS = {"pipelines"}  # the namespace itself (its docstring): no layer, imports nothing
# What a notebook kernel must never load: executing notebooks, kernels, the CLI, drivers.
NOT_IN_A_KERNEL_MODULES = (
    "pipelines.execution",
    "pipelines.kernels",
    "pipelines.cli",
    "pipelines.launch",
    "pipelines.study.tune",
    "pipelines.study.confirm",
    "pipelines.pipeline",
    "pipelines.schedule",
)
NOT_IN_A_KERNEL_PACKAGES = ("papermill", "nbclient", "nbconvert", "jupyter_client", "typer")


def _modules() -> dict[str, Path]:
    found = {}
    for top in ("pipelines", "lightning_modules"):
        for path in sorted((ROOT / top).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def _imports(tree: ast.AST, package: str) -> set[str]:
    """Every module name an import statement in `tree` names (function-level ones included)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between project modules, third-party top-level packages each module imports)."""
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    external: dict[str, set[str]] = {m: set() for m in modules}
    imported = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        imported[module] = _imports(ast.parse(path.read_text()), package)
    # A package whose __init__ imports nothing (a docstring) adds nothing when `from pkg import mod` runs it.
    inert = {m for m, path in modules.items() if path.name == "__init__.py" and not imported[m]}
    for module, names in imported.items():
        for name in names:
            target = _resolve(name, modules)
            if target is None:
                external[module].add(name.split(".")[0])
            elif target != module and not module.startswith(target + ".") and target not in inert:
                edges[module].add(target)
    return edges, external


def _layer(module: str) -> int | None:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def _package(module: str) -> str:
    """`pipelines.cli` for `pipelines.cli.runs`; `lightning_modules` for its modules."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pipelines" else parts[0]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _reachable(starts: set[str], edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(starts)
    while todo:
        module = todo.pop()
        if module in seen or module not in edges:
            continue
        seen.add(module)
        todo += edges[module]
    return seen


def test_there_is_no_import_cycle() -> None:
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_every_module_has_a_layer() -> None:
    edges, _ = _graph()
    missing = [m for m in edges if _layer(m) is None and m not in PACKAGE_ROOTS]
    assert not missing, f"give these a layer in LAYERS (and in pipelines/__init__.py's table): {missing}"


def test_imports_point_down_the_layers() -> None:
    edges, _ = _graph()
    upward = [
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, targets in sorted(edges.items())
        for b in sorted(targets)
        if a not in PACKAGE_ROOTS
        and b not in PACKAGE_ROOTS
        and _package(a) != _package(b)
        and (_layer(b) if _layer(b) is not None else 99) >= (_layer(a) if _layer(a) is not None else -99)
    ]
    assert not upward, "\n".join(upward)


def test_nothing_imports_the_cli_back() -> None:
    edges, _ = _graph()
    back = [
        (a, b)
        for a, targets in edges.items()
        for b in targets
        if _package(b) == "pipelines.cli" and _package(a) != "pipelines.cli" and a != "pipelines.launch"
    ]
    assert not back


def test_lightning_modules_import_nothing_from_pipelines() -> None:
    edges, _ = _graph()
    assert not [
        (a, b) for a, t in edges.items() for b in t if a.startswith("lightning_modules") and b.startswith("pipelines")
    ]


def _notebook_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
            names |= _imports(ast.parse(code), "")
    return names


@pytest.mark.parametrize(
    "where",
    ["pipelines.nb", *sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))],
)
def test_a_notebook_kernel_imports_no_orchestration(where: str) -> None:
    """What runs in a kernel (the notebooks and `pipelines/nb/`) never loads papermill, kernels or drivers."""
    edges, external = _graph()
    modules = set(edges)
    if where == "pipelines.nb":
        starts = {m for m in modules if m == where or m.startswith(where + ".")}
        third_party: set[str] = set()
    else:
        names = _notebook_imports(ROOT / "notebooks" / where)
        starts = {t for t in (_resolve(n, dict.fromkeys(modules)) for n in names) if t}  # type: ignore[arg-type]
        third_party = {n.split(".")[0] for n in names if _resolve(n, dict.fromkeys(modules)) is None}  # type: ignore[arg-type]
    loaded = _reachable(starts, edges)
    third_party |= {package for module in loaded for package in external[module]}
    orchestration = sorted(m for m in loaded if m.startswith(NOT_IN_A_KERNEL_MODULES))
    assert not orchestration
    assert not sorted(third_party & set(NOT_IN_A_KERNEL_PACKAGES))


def test_every_package_says_what_it_owns_and_may_import() -> None:
    for init in sorted((ROOT / "pipelines").glob("*/__init__.py")):
        doc = " ".join((ast.get_docstring(ast.parse(init.read_text())) or "").split())
        assert "Owns" in doc and ("May import" in doc or "may import" in doc), (
            f"{init}: say what it owns and may import"
        )


def test_no_old_module_path_is_left() -> None:
    """Code written for the flat layout (`from pipelines import tracking`, `pipelines/tune.py`) is
    rewritten by `python tools/restructure.py`; this fails until it has been run."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "restructure.py"), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, f"run `python tools/restructure.py`:\n{done.stdout}{done.stderr}"
