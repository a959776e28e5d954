"""Reading spec files and reporting their problems in one line: no heavy imports here.

`labbook --help`, the schedule commands and notebook-only pipelines need these without
paying for torch and Lightning, which `pipelines.spec` imports to check model settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class SpecError(ValueError):
    """A spec is invalid; the message is one line naming the file and the field."""


MAX_ERROR = 500  # characters of one error line: a value quoted in it is cut to fit


def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters: an error line never carries a whole huge value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def bounded(message: str, limit: int = MAX_ERROR) -> str:
    """One line of at most `limit` characters."""
    message = " ".join(message.split())
    return message if len(message) <= limit else f"{message[: limit - 3]}..."


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
