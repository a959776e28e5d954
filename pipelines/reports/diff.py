"""`labbook diff RUN_A RUN_B`: what differs between two runs, their executed notebooks included.

MLflow's compare view shows parameters and metrics. The executed notebook is where a run's
story is (what each cell printed, which plot changed), so the two notebooks are compared cell
by cell with nbdime, the Jupyter project's notebook diff, which aligns cells and outputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipelines.tracking import tracking
from pipelines.tracking.records import PROVENANCE, executed_notebook
from pipelines.tracking.tags import Tag

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes in captured output (Lightning's rich tables)
TAGS = {**PROVENANCE, "seed": Tag.SEED, "notebook": Tag.NOTEBOOK}


@dataclass
class RunDiff:
    run_a: str
    run_b: str
    params: pd.DataFrame  # name, a, b: parameters that differ
    metrics: pd.DataFrame  # name, a, b, diff (b - a): every final metric of either run
    tags: pd.DataFrame  # name, a, b: provenance that differs
    cells: pd.DataFrame  # cell, first_line, changed (source/outputs), a, b: cells that differ


def diff(run_a: str, run_b: str) -> RunDiff:
    """Compare two runs: params, final metrics, provenance tags, and their notebooks cell by cell."""
    client = tracking.client()
    a, b = client.get_run(run_a), client.get_run(run_b)
    params = [
        {"name": k, "a": a.data.params.get(k), "b": b.data.params.get(k)}
        for k in sorted(set(a.data.params) | set(b.data.params))
        if a.data.params.get(k) != b.data.params.get(k)
    ]
    metrics = [
        {"name": k, "a": a.data.metrics.get(k), "b": b.data.metrics.get(k), "diff": _minus(a, b, k)}
        for k in sorted(set(a.data.metrics) | set(b.data.metrics))
    ]
    tags = [
        {"name": name, "a": a.data.tags.get(tag, ""), "b": b.data.tags.get(tag, "")}
        for name, tag in TAGS.items()
        if a.data.tags.get(tag, "") != b.data.tags.get(tag, "")
    ]
    cells = notebook_cells(executed_notebook(client, run_a), executed_notebook(client, run_b), (run_a, run_b))
    return RunDiff(
        run_a,
        run_b,
        pd.DataFrame(params, columns=["name", "a", "b"]),
        pd.DataFrame(metrics, columns=["name", "a", "b", "diff"]),
        pd.DataFrame(tags, columns=["name", "a", "b"]),
        cells,
    )


def _minus(a: Any, b: Any, key: str) -> float | None:
    if key in a.data.metrics and key in b.data.metrics:
        return b.data.metrics[key] - a.data.metrics[key]
    return None


def notebook_cells(a: Any, b: Any, run_ids: tuple[str, str] = ("", "")) -> pd.DataFrame:
    """One row per cell whose source or outputs differ (nbdime's alignment), with both outputs as text.

    Each run's own id (printed, and inside its output paths) reads `<run id>` in the text, so the
    shown difference starts where the results differ, not at an id that always does.
    """

    def text(cell: Any, run_id: str) -> str:
        return _text(cell).replace(run_id, "<run id>") if run_id else _text(cell)

    from nbdime import diff_notebooks

    rows = []
    for entry in diff_notebooks(a, b):
        if entry["key"] != "cells":
            continue
        for change in entry["diff"]:
            index = change["key"]
            if change["op"] == "patch":
                parts = [d["key"] for d in change["diff"] if d["key"] in ("source", "outputs")]
                if parts:
                    cell = a.cells[index]
                    other = b.cells[_b_index(entry, index)]
                    text_a, text_b = _where_they_differ(text(cell, run_ids[0]), text(other, run_ids[1]))
                    rows.append(_row(index, cell, "+".join(parts), text_a, text_b))
            elif change["op"] == "addrange":
                for cell in change["valuelist"]:
                    rows.append(_row(index, cell, "only in B", "", text(cell, run_ids[1])))
            elif change["op"] == "removerange":
                for offset in range(change["length"]):
                    cell = a.cells[index + offset]
                    rows.append(_row(index + offset, cell, "only in A", text(cell, run_ids[0]), ""))
    return pd.DataFrame(rows, columns=["cell", "first_line", "changed", "a", "b"])


def _b_index(entry: dict, index: int) -> int:
    """Where cell `index` of A sits in B, after the cells added or removed before it."""
    shift = 0
    for change in entry["diff"]:
        if change["op"] == "addrange" and change["key"] <= index:
            shift += len(change["valuelist"])
        elif change["op"] == "removerange" and change["key"] < index:
            shift -= change["length"]
    return index + shift


def _where_they_differ(a: str, b: str, context: int = 20) -> tuple[str, str]:
    """Both texts from a little before their first difference: the shared start says nothing."""
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    start = max(0, same - context)
    start = a.rfind(" ", 0, start + 1) + 1 if start else 0  # back to the start of a word
    return (("…" if start else "") + a[start:], ("…" if start else "") + b[start:])


def _row(index: int, cell: Any, changed: str, a: str, b: str, limit: int = 240) -> dict[str, Any]:
    first = next((line for line in cell.source.splitlines() if line.strip()), "")
    a, b = (t if len(t) <= limit else t[: limit - 1] + "…" for t in (a, b))
    return {"cell": index, "first_line": first[:80], "changed": changed, "a": a, "b": b}


def _text(cell: Any) -> str:
    """A cell's outputs as short text: streams, plain-text results, errors; images as a marker."""
    parts = []
    for output in cell.get("outputs", []):
        kind = output.get("output_type")
        if kind == "stream":
            parts.append(output.get("text", ""))
        elif kind == "error":
            parts.append(f"{output.get('ename')}: {output.get('evalue')}")
        else:
            data = output.get("data", {})
            images = [m for m in data if m.startswith("image/")]
            parts.append(f"[{images[0]}]" if images else data.get("text/plain", ""))
    return " ".join(ANSI.sub("", " ".join(parts)).split())
