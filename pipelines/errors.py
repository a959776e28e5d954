"""Errors the command line words for users, importable without MLflow or torch (for a fast CLI).

`reason` is the one place an exception (or a message) becomes the line a user reads: printed by
the CLI or stored in a run's `labbook.error` tag. That line is one line, at most `LIMIT`
characters, and never quotes a file's contents: the readers of notebooks (nbformat, json,
jsonschema) put the first bytes of what they could not parse into their messages, and a
`notebook: /etc/passwd` would otherwise land in the tracking store for everyone who reads it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

LIMIT = 500  # characters of an error line or tag
LIST_BUDGET = 300  # characters of the allowed values an error line lists (`listing`)


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


def listing(names: Iterable[str], given: str | None = None, budget: int = LIST_BUDGET, hidden: int = 0) -> str:
    """`names` joined by ", " in at most `budget` characters, never a name cut: all of them when they
    fit, else those closest to `given` first (difflib), then the others in order, then `… and N more`
    (`hidden`: names left out already, by an earlier listing of the same list)."""
    names = list(dict.fromkeys(names))
    whole = ", ".join(names) + (f", … and {hidden} more" if hidden else "")
    if len(whole) <= budget:
        return whole
    close = difflib.get_close_matches(given, names, n=5, cutoff=0.5) if given else []
    ordered = close + [name for name in names if name not in close]
    kept: list[str] = []
    for name in ordered:
        tail = f", … and {len(ordered) - len(kept) - 1 + hidden} more"
        if len(", ".join([*kept, name])) + len(tail) > budget:
            break
        kept.append(name)
    return ", ".join(kept) + f"{', ' if kept else ''}… and {len(ordered) - len(kept) + hidden} more"


# Where an error line lists the values a field takes; a line too long has that list shortened.
_LIST = re.compile(
    r"(?P<head>.*?\b(?:allowed|known|expected one of|must be one of|steps):? )(?P<items>[^;,]+(?:, [^;,]+)+)"
)


def _bounded(text: str) -> str:
    """One line (runs of whitespace, newlines included, become one space) of at most LIMIT characters.

    A longer one that lists allowed values (`...; allowed: a, b, c`) keeps the names closest to the
    value it quotes first and says how many more there are (`listing`). Else it keeps its start
    (what failed) and its end (where: a run id, a kept file), cut between words where there are any.
    """
    line = " ".join(text.split())
    if len(line) <= LIMIT:
        return line
    found = _LIST.match(line)
    if found:
        head, rest = found["head"], line[found.end() :]
        quoted = re.search(r"'([^']{1,80})'", head)
        budget = LIMIT - len(head) - len(rest)
        if budget >= 40:
            items = found["items"].split(", ")
            earlier = re.fullmatch(r"… and (\d+) more", items[-1])  # listed once already: its count kept
            hidden = int(earlier[1]) if earlier else 0
            names = items[:-1] if earlier else items
            return head + listing(names, quoted[1] if quoted else None, budget, hidden) + rest
    head, tail = _cut(line[: LIMIT * 2 // 3], keep="start"), None
    tail = _cut(line[len(line) - (LIMIT - len(head) - 3) :], keep="end")
    return f"{head} … {tail}"


def _cut(part: str, keep: str) -> str:
    """`part` without the word the cut went through, unless that would drop more than a quarter of it."""
    if keep == "start":
        space = part.rfind(" ")
        return part[:space] if space > len(part) * 3 // 4 else part
    space = part.find(" ")
    return part[space + 1 :] if 0 <= space < len(part) // 4 else part
