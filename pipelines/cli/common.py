"""What every `labbook` verb shares: the Typer app, the consoles, the options, and how errors end a command.

Bad input exits 2 with one line (`error: ...`); an unreachable or refusing tracking server exits 1;
Ctrl-C exits 130 and SIGTERM 143 after an orderly stop. `reported()` says which of these a verb
turns into its exit, in one place.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from pipelines.errors import TrackingUnavailable
from pipelines.kernels.env import quiet_defaults
from pipelines.specs.spec_io import SpecError

app = typer.Typer(
    help="Deep-learning experiments as parameterized notebooks, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


quiet_defaults()  # before MLflow and nbformat are imported (inside the commands)


out = Console(soft_wrap=True)  # progress lines stay whole in logs and CI output


err = Console(stderr=True, soft_wrap=True)


EXIT_BAD_INPUT = 2


COMMANDS = "pipelines.cli:app"  # what a kernel server runs for a forked `labbook` command


SpecArg = Annotated[Path, typer.Argument(help="Pipeline spec (YAML), e.g. pipelines/digits_mlp.yaml.")]


SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a setting by its name, e.g. --set lr=0.01 (repeatable)."),
]


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the same orderly stop as Ctrl-C (runs closed, notebooks kept)."""


def stop_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, handler)


def interrupted(exc: KeyboardInterrupt) -> typer.Exit:
    err.print("interrupted: run the same command again to resume")
    return typer.Exit(143 if isinstance(exc, Terminated) else 130)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def reported(
    *bad_input: type[Exception], tracking: bool = False, interrupts: bool = False, squash: bool = False
) -> Iterator[None]:
    """Turn what a verb's work raises into its exit: `bad_input` exceptions exit 2 with their message
    (on one line with `squash`), TrackingUnavailable exits 1 (`tracking`), Ctrl-C/SIGTERM exit 130/143
    (`interrupts`). Anything else goes on up."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if not interrupts:
            raise
        raise interrupted(exc) from None
    except TrackingUnavailable as exc:
        if not tracking:
            raise
        raise fail(str(exc), code=1) from None
    except bad_input as exc:
        raise fail(" ".join(str(exc).split()) if squash else str(exc)) from None


def load_training_spec(spec: Path, overrides: list[str] | None):
    from pipelines.specs.spec import load_spec, parse_overrides

    with reported(SpecError):
        return load_spec(spec, parse_overrides(overrides or []))


def is_pipeline(spec: Path) -> bool:
    from pipelines.specs.spec_io import read_yaml

    try:
        return "steps" in (read_yaml(spec) or {})
    except (SpecError, TypeError):
        return False


def load_pipeline_spec(spec: Path):
    from pipelines.specs.pipeline_spec import load_pipeline

    with reported(SpecError):
        return load_pipeline(spec)


def cell(value: object) -> str:
    """A table cell: floats to 4 significant digits; `[image/png]` is text here, not rich markup."""
    return f"{value:.4g}" if isinstance(value, float) else escape(str(value))


def serve(command: list[str], env: dict[str, str]) -> None:
    """Run a server in the foreground until it exits, Ctrl-C or SIGTERM; exit with its code."""
    # Its own process group, so stopping labbook (Ctrl-C or SIGTERM) stops the server's whole tree.
    server = subprocess.Popen(command, env=env, start_new_session=True)
    stop_on_sigterm()
    try:
        code = server.wait()
    except KeyboardInterrupt as exc:
        code = 143 if isinstance(exc, Terminated) else 130
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    raise typer.Exit(code)


def when(moment) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z") if moment else "-"
