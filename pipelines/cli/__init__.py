"""pipelines/cli/: the `labbook` command, a module per verb group. Nothing imports it back.

Owns: parsing arguments, calling the packages below, printing, exit codes (common.py says
how errors end a command). May import anything in `pipelines/` and `lightning_modules/`; may be
imported only by `pipelines.launch` (the console script) and by itself. A kernel server runs it
by name (`--commands pipelines.cli:app`), not by import. Heavy imports stay inside the verbs:
`labbook validate` must answer before torch would have loaded.

    common.py     the Typer app, consoles, shared options, `reported()` (errors -> exit codes)
    runs.py       validate, script, run (a spec or a pipeline)
    studies.py    tune, worker, jobs
    history.py    compare, rerun, diff, reap
    servers.py    ui, server, kernel-server
    schedules.py  schedule add|list|remove|export, scheduler
"""

from __future__ import annotations

# Importing a verb module registers its commands on `app`, in this order: `labbook --help`'s.
# isort: off
from pipelines.cli.common import app
from pipelines.cli import runs  # noqa: F401
from pipelines.cli import studies  # noqa: F401
from pipelines.cli import history  # noqa: F401
from pipelines.cli import servers  # noqa: F401
from pipelines.cli import schedules  # noqa: F401

# isort: on

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry point
    app()
