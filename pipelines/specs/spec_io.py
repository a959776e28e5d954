"""Reading spec files and reporting their problems in one line: no heavy imports here.

`labbook --help`, the schedule commands and notebook-only pipelines need these without
paying for torch and Lightning, which `pipelines.specs.spec` imports to check model settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class SpecError(ValueError):
    """A spec is invalid; the message is one line naming the file and the field."""


def one_line(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"] if part not in ("float", "int", "categorical")) or "spec"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required field is missing"
    elif first["type"].startswith("literal_error"):
        message = f"got {first['input']!r}; {message[0].lower()}{message[1:]}"
    elif "input" in first and first["type"] not in ("value_error",):
        message = f"{message} (got {first['input']!r})"
    return f"{source}: {field}: {message}"


def read_yaml(path: Path) -> Any:
    """A spec file's YAML, read with the safe loader only; a syntax error is one line with its line."""
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{path}:{where}: malformed YAML: {getattr(exc, 'problem', exc)}") from None
