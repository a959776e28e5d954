"""Reading spec files and reporting their problems in one line: no heavy imports here.

`labbook --help`, the schedule commands and notebook-only pipelines need these without
paying for torch and Lightning, which `pipelines.specs.spec` imports to check model settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipelines.errors import LIMIT, reason
from pipelines.specs import spec_yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Names end up in stores with limits of their own. A spec's or study's name names its runs
# (MLflow keeps 250 characters, a trial adds `-trial-<n>`), its registered model and folders.
MAX_NAME = 200
MAX_EXPERIMENT = 500  # MLflow's MAX_EXPERIMENT_NAME_LENGTH


class SpecError(ValueError):
    """A spec is invalid; the message is one line naming the file and the field."""


MAX_ERROR = LIMIT  # characters of one error line: a value quoted in it is cut to fit


def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters: an error line never carries a whole huge value."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300 digits (read from hex, or made by arithmetic)
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def bounded(message: str) -> str:
    """One line of at most MAX_ERROR characters: `errors.reason`, the one place error lines are cut."""
    return reason(message)


def one_line(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    # Pydantic's loc names the union member or function a value went through: not a field.
    field = ".".join(
        str(part) for part in first["loc"] if part not in ("float", "int", "categorical") and "[" not in str(part)
    )
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required field is missing"
    elif first["type"].startswith("literal_error"):
        message = f"got {shown(first['input'])}; {message[0].lower()}{message[1:]}"
    elif "input" in first and first["type"] not in ("value_error",):
        message = f"{message} (got {shown(first['input'])})"
    return bounded(f"{source}: {field}: {message}" if field else f"{source}: {message}")


MAX_SPEC_BYTES = 1_000_000  # a spec is a few kB; a bigger file is not one


def read_yaml(path: Path) -> Any:
    """A spec file's YAML, read with `SpecLoader` (safe, no duplicate keys, no alias bombs).

    Every problem is one bounded line naming the file and, where known, the line.
    """
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: {size} bytes; a spec file is at most {MAX_SPEC_BYTES} bytes")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(f"{path}: line {line}: not UTF-8 text (byte {exc.start}); save the spec as UTF-8") from None
    try:
        return spec_yaml.load(text)
    except spec_yaml.SpecYAMLError as exc:
        where = f" line {exc.line}:" if exc.line else ""
        raise SpecError(bounded(f"{path}:{where} {exc.message}")) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(bounded(f"{path}:{where}: malformed YAML: {getattr(exc, 'problem', exc)}")) from None
    except RecursionError:
        raise SpecError(f"{path}: values nested too deeply for a spec") from None


MAX_NOTEBOOK_BYTES = 64 * 2**20  # a source notebook is kB to a few MB (with plots); past this it is not one


def check_notebook(notebook: Path, named: str, where: str) -> None:
    """Raise SpecError (`<where>.notebook: ...`, one bounded line) unless `notebook` is a
    parameterized notebook (`notebook_problem`); `named` is the path as the spec wrote it."""
    if not notebook.exists():
        raise SpecError(bounded(f"{where}notebook: no such notebook {shown(named, 200)}"))
    problem = notebook_problem(notebook)
    if problem is not None:
        raise SpecError(bounded(f"{where}notebook: {shown(named, 200)}: {problem}"))


def notebook_problem(path: Path) -> str | None:
    """Why `path` cannot be a notebook a run executes, in one line quoting none of its contents; None when it can.

    It must be a readable file papermill can run: a Jupyter notebook (JSON, valid against nbformat's
    schema) with a code cell tagged `parameters`, after which papermill injects the run's settings
    (without the tag the notebook would run on its own defaults, whatever the spec says).
    """
    import nbformat  # here, not at import: `labbook --help` stays light

    from pipelines.errors import reason

    if not path.exists():
        return "no such notebook"
    if not path.is_file():
        return "not a file"
    try:
        if path.stat().st_size > MAX_NOTEBOOK_BYTES:
            return f"over {MAX_NOTEBOOK_BYTES} bytes: not a source notebook"
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    except Exception as exc:  # noqa: BLE001 - nbformat raises many kinds on bad input; each is worded by reason()
        return f"not a Jupyter notebook ({reason(exc).removeprefix('not a Jupyter notebook: ')})"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    if not any("parameters" in cell.get("metadata", {}).get("tags", []) for cell in code):
        return "no code cell tagged 'parameters' (papermill injects the run's settings after it; tag it in Jupyter)"
    return None
