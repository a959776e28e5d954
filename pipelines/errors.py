"""Errors the command line words for users, importable without MLflow or torch (for a fast CLI).

`reason` is the one place an exception (or a message) becomes the line a user reads: printed by
the CLI or stored in a run's `labbook.error` tag. That line is one line, at most `LIMIT`
characters, and never quotes a file's contents: the readers of notebooks (nbformat, json,
jsonschema) put the first bytes of what they could not parse into their messages, and a
`notebook: /etc/passwd` would otherwise land in the tracking store for everyone who reads it.
"""

from __future__ import annotations

LIMIT = 500  # characters of an error line or tag


class TrackingUnavailable(RuntimeError):
    """The MLflow server refused or could not be reached: nothing was started."""


def reason(problem: BaseException | str) -> str:
    """`problem` as one line of at most LIMIT characters that quotes no file contents.

    Exceptions whose text quotes what they read (nbformat's "does not appear to be JSON: '…'",
    jsonschema's failing instance, json's document) are worded from their kind and position
    only; a failed notebook cell is `Name: value (cell N)`, a dead kernel `kernel died: …`.
    """
    if isinstance(problem, str):
        return _bounded(problem)
    name, module = type(problem).__name__, type(problem).__module__
    if name == "PapermillExecutionError":
        evalue = getattr(problem, "evalue", "")
        text = f"{getattr(problem, 'ename', name)}: {evalue} (cell {getattr(problem, 'exec_count', '?')})"
    elif name == "NotJSONError":
        text = "not a Jupyter notebook: not JSON"
    elif name == "ValidationError" and module.startswith(("jsonschema", "nbformat")):
        where = "/".join(str(part) for part in getattr(problem, "absolute_path", ()))
        text = "not a Jupyter notebook: nbformat's schema refuses it" + (f" at {where}" if where else "")
    elif name == "JSONDecodeError":
        text = f"not JSON: {problem.msg} at line {problem.lineno} column {problem.colno}"  # type: ignore[attr-defined]
    elif isinstance(problem, UnicodeDecodeError):
        text = f"not UTF-8 text (byte {problem.start})"
    else:
        said = str(problem)
        text = f"kernel died: {said}" if name == "DeadKernelError" else (f"{name}: {said}" if said else name)
    return _bounded(text)


def _bounded(text: str) -> str:
    """One line (runs of whitespace, newlines included, become one space) of at most LIMIT characters:
    a longer one keeps its start (what failed) and its end (where: a run id, a kept file), cut between."""
    line = " ".join(text.split())
    if len(line) <= LIMIT:
        return line
    head = LIMIT * 2 // 3
    return f"{line[:head]} … {line[-(LIMIT - head - 3) :]}"
