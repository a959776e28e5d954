"""Move `pipelines/`'s flat modules into packages by concern, and point every import at the new place.

    python tools/restructure.py            # apply (idempotent: a second run changes nothing)
    python tools/restructure.py --check    # exit 1 if anything would change (CI, after a merge)

Issue 24. The mechanical half of the restructuring, kept as a script so that it can be run again
on a tree that gained files or import lines since (a merge of main): it

1. moves `pipelines/<old>.py` to `pipelines/<package>/<old>.py` (git mv; module names kept) and
   creates a package's `__init__.py` when missing (the hand-written docstrings are not touched);
2. rewrites what names a moved module, in Python files, notebooks' code cells, and text files
   (README, Makefile, pyproject.toml, CI scripts):
   - `from pipelines import a, b as c`          -> `from pipelines.<pkg> import a` / `... import b as c`
   - `from pipelines.a import x`, `import pipelines.a`, `pipelines.a.x`, the string `"pipelines.a"`,
     `-m pipelines.kernel_fork`                 -> `pipelines.<pkg>.a...`
   - the path `pipelines/a.py`                  -> `pipelines/<pkg>/a.py`
3. sorts the imports it changed with ruff (`--select I --fix`), as `make lint` expects.

Four old modules have the name of their new package (`tracking`, `study`, `pipeline`,
`schedule`): `pipelines.tracking.tracking` is the module, `pipelines.tracking` the package. A
dotted name already followed by one of the package's modules, and a `from pipelines.tracking
import X` whose names are all modules of the package, are left alone; so write a package as a
path (`pipelines/tracking/`) in prose, never as the bare dotted name, or a later run rewrites it;
a file that must name packages bare (tests/test_import_graph.py) carries the mark
`restructure: new-layout` and is skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# old module (pipelines.<name>) -> its package; the module keeps its name inside it.
MOVES: dict[str, str] = {
    # specs: YAML -> validated objects
    "spec": "specs",
    "spec_io": "specs",
    "tune_spec": "specs",
    "pipeline_spec": "specs",
    # tracking: MLflow glue, the registry, the tracking server
    "tracking": "tracking",
    "champion": "tracking",
    "server": "tracking",
    # execution: a notebook executed into a run, and the verbs built on one run
    "notebook": "execution",
    "run": "execution",
    "resume": "execution",
    "script": "execution",
    "rerun": "execution",
    # nb: what notebook kernels import
    "in_notebook": "nb",
    "trained": "nb",
    # kernels: the warm pool and the fork server
    "kernel_pool": "kernels",
    "kernel_fork": "kernels",
    # study: Optuna glue, the study driver, seed-robust selection
    "study": "study",
    "tune": "study",
    "confirm": "study",
    # pipeline / schedule
    "pipeline": "pipeline",
    "schedule": "schedule",
    # reports: reading recorded runs back
    "compare": "reports",
    "diff": "reports",
    # Modules main added after the first run of this script (merged in):
    "spec_yaml": "specs",  # the strict YAML loader specs are read with
    "environment": "specs",  # every LABBOOK_* variable, checked up front (imported from layer 3 up)
    "driver": "tracking",  # a run's driver tags and liveness (tracking.create_run tags every run)
    "reap": "execution",  # closes runs whose driver died, attaching the partial notebook (execution.notebook)
    "guarded_sampler": "study",
    "cron": "schedule",
    "schedule_export": "schedule",
    "socket_claim": "kernels",  # the kernel server's socket path, claimed under a lock
}
PACKAGES = sorted(set(MOVES.values()))

# Where names are rewritten (relative to the root); the script itself is skipped.
PY_DIRS = ("pipelines", "lightning_modules", "tests", "bench", "tools")
NOTEBOOK_DIRS = ("notebooks", "tests/notebooks")
TEXT_FILES = ("README.md", "Makefile", "pyproject.toml", ".ci/run", "mlruns/README.md")
TEXT_GLOBS = ("docs/*.md",)


@functools.cache  # asked once per dotted name; the folders do not change while names are rewritten
def submodules(package: str) -> frozenset[str]:
    """The modules of a new package: those moved there, and those now in its folder."""
    found = {old for old, pkg in MOVES.items() if pkg == package}
    folder = ROOT / "pipelines" / package
    if folder.is_dir():
        found |= {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
        found |= {p.name for p in folder.iterdir() if (p / "__init__.py").exists()}
    return found


# --- 1. moving files -----------------------------------------------------------------------------


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def tracked(path: Path) -> bool:
    return git("ls-files", "--error-unmatch", str(path.relative_to(ROOT))).returncode == 0


def move_modules(apply: bool, notes: list[str]) -> list[Path]:
    changed: list[Path] = []
    for package in PACKAGES:
        init = ROOT / "pipelines" / package / "__init__.py"
        if not init.exists():
            notes.append(f"create {init.relative_to(ROOT)}")
            if apply:
                init.parent.mkdir(parents=True, exist_ok=True)
                init.write_text(f'"""pipelines/{package}/: see pipelines/__init__.py."""\n')
                git("add", str(init.relative_to(ROOT)))
            changed.append(init)
    for old, package in MOVES.items():
        source = ROOT / "pipelines" / f"{old}.py"
        target = ROOT / "pipelines" / package / f"{old}.py"
        if not source.exists():
            continue
        if target.exists():
            # A merge brought the old file back (changed on the other side): its changes must be
            # carried over by hand, then the old file deleted.
            notes.append(f"CONFLICT: both {source.relative_to(ROOT)} and {target.relative_to(ROOT)} exist")
            continue
        notes.append(f"move {source.relative_to(ROOT)} -> {target.relative_to(ROOT)}")
        if apply:
            if tracked(source):
                done = git("mv", str(source.relative_to(ROOT)), str(target.relative_to(ROOT)))
                if done.returncode != 0:
                    sys.exit(done.stderr)
            else:
                shutil.move(source, target)
            # One folder deeper: a path computed from __file__ climbs one level more.
            text = target.read_text()
            text = text.replace("Path(__file__).resolve().parents[1]", "Path(__file__).resolve().parents[2]")
            target.write_text(text)
        changed.append(target)
    return changed


# --- 2. rewriting names --------------------------------------------------------------------------

FROM_PIPELINES = re.compile(
    r"^(?P<indent>[ \t]*)from pipelines import (?P<names>\([^)]*\)|[^\n#]*?)(?P<comment>[ \t]*#[^\n]*)?$",
    re.MULTILINE,
)
DOTTED = re.compile(r"(?<![\w./])pipelines((?:\.[A-Za-z_]\w*)+)")
PATH = re.compile(r"(?<![\w./])pipelines/(?P<name>\w+)\.py\b")


def _split_names(raw: str) -> list[tuple[str, str | None]]:
    raw = raw.strip()
    if raw.startswith("("):
        raw = raw[1:-1]
    raw = re.sub(r"#[^\n]*", "", raw)  # comments inside a parenthesized list
    names = []
    for part in raw.replace("\n", " ").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, alias = part.partition(" as ")
        names.append((name.strip(), alias.strip() or None))
    return names


def _rewrite_from_pipelines(match: re.Match) -> str:
    names = _split_names(match.group("names"))
    if not any(name in MOVES for name, _ in names):
        return match.group(0)
    indent, comment = match.group("indent"), match.group("comment") or ""
    groups: dict[str, list[str]] = {}
    for name, alias in names:
        module = f"pipelines.{MOVES[name]}" if name in MOVES else "pipelines"
        groups.setdefault(module, []).append(name + (f" as {alias}" if alias else ""))
    return "\n".join(f"{indent}from {module} import {', '.join(items)}{comment}" for module, items in groups.items())


def _imported_names(text: str, end: int) -> list[str] | None:
    """The names of `from <dotted> import ...` when the dotted name ends at `end`, else None."""
    after = re.match(r"\s+import\s+(\([^)]*\)|[^\n#]*)", text[end:])
    if after is None:
        return None
    return [name for name, _ in _split_names(after.group(1))]


def _rewrite_dotted(text: str) -> str:
    def replace(match: re.Match) -> str:
        parts = match.group(1)[1:].split(".")
        old = parts[0]
        if old not in MOVES:
            return match.group(0)
        package = MOVES[old]
        if old in PACKAGES:  # `pipelines.tracking`: the old module, or already the new package?
            modules = submodules(package)
            if len(parts) > 1 and parts[1] in modules:
                return match.group(0)
            if len(parts) == 1:
                before = text[max(0, match.start() - 5) : match.start()]
                names = _imported_names(text, match.end()) if before == "from " else None
                if names and all(name in modules for name in names):
                    return match.group(0)
        return "pipelines." + ".".join([package, *parts])

    return DOTTED.sub(replace, text)


def _rewrite_path(text: str) -> str:
    def replace(match: re.Match) -> str:
        name = match.group("name")
        return f"pipelines/{MOVES[name]}/{name}.py" if name in MOVES else match.group(0)

    return PATH.sub(replace, text)


def rewrite_code(text: str) -> str:
    text = FROM_PIPELINES.sub(_rewrite_from_pipelines, text)
    text = _rewrite_dotted(text)
    return _rewrite_path(text)


def rewrite_text(text: str) -> str:
    return _rewrite_path(_rewrite_dotted(text))


def rewrite_notebook(raw: str) -> str:
    notebook = json.loads(raw)
    for cell in notebook.get("cells", []):
        source = cell.get("source")
        if cell.get("cell_type") != "code" or not source:
            continue
        joined = "".join(source) if isinstance(source, list) else source
        new = rewrite_code(joined)
        if new != joined:
            cell["source"] = new.splitlines(keepends=True) if isinstance(source, list) else new
    out = json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
    return out if out != json.dumps(json.loads(raw), indent=1, ensure_ascii=False) + "\n" else raw


def files_to_rewrite() -> list[Path]:
    me = Path(__file__).resolve()
    found: list[Path] = []
    for folder in PY_DIRS:
        found += [p for p in sorted((ROOT / folder).rglob("*.py")) if p.resolve() != me and ".venv" not in p.parts]
    for folder in NOTEBOOK_DIRS:
        found += sorted((ROOT / folder).glob("*.ipynb"))
    found += [ROOT / name for name in TEXT_FILES if (ROOT / name).exists()]
    for pattern in TEXT_GLOBS:
        found += sorted(ROOT.glob(pattern))
    return found


NEW_LAYOUT_MARK = "restructure: new-layout"  # a file written for the new layout names packages bare: skip it


def rewrite_files(apply: bool, notes: list[str]) -> list[Path]:
    changed = []
    for path in files_to_rewrite():
        old = path.read_text(encoding="utf-8")
        if NEW_LAYOUT_MARK in old:
            continue
        if path.suffix == ".py":
            new = rewrite_code(old)
        elif path.suffix == ".ipynb":
            new = rewrite_notebook(old)
        else:
            new = rewrite_text(old)
        if new != old:
            notes.append(f"rewrite {path.relative_to(ROOT)}")
            changed.append(path)
            if apply:
                path.write_text(new, encoding="utf-8")
    return changed


# --- 3. import order -----------------------------------------------------------------------------


def sort_imports(paths: list[Path]) -> None:
    code = [str(p) for p in paths if p.suffix in (".py", ".ipynb") and p.exists()]
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if code and Path(ruff).exists():
        subprocess.run([ruff, "check", "--quiet", "--select", "I", "--fix", *code], cwd=ROOT)
        subprocess.run([ruff, "format", "--quiet", *code], cwd=ROOT, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything would change")
    options = parser.parse_args()
    apply = not options.check
    notes: list[str] = []
    moved = move_modules(apply, notes)
    rewritten = rewrite_files(apply, notes)
    if apply:
        sort_imports(moved + rewritten)
    for note in notes:
        print(note)
    if options.check and notes:
        sys.exit(1)
    if any(note.startswith("CONFLICT") for note in notes):
        sys.exit(2)
    if not notes:
        print("nothing to do")


if __name__ == "__main__":
    main()
