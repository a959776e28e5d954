"""What every `labbook` verb shares: the Typer app, the consoles, the options, and how errors end a command.

Bad input exits 2 with one line (`error: ...`); an unreachable or refusing tracking server exits 1;
Ctrl-C exits 130, SIGTERM 143 and SIGHUP 129 after an orderly stop; a full or read-only store exits
1 in one line. `reported()` says which of these a verb turns into its exit, in one place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from pipelines.errors import TrackingUnavailable, reason
from pipelines.kernels.env import quiet_defaults
from pipelines.specs.spec_io import SpecError

try:  # typer >= 0.22 carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - an older typer on click
    from click.exceptions import UsageError  # type: ignore[assignment]


def usage_line(exc: UsageError) -> str:
    """A usage error (an option's value Typer could not convert, a missing argument, an unknown
    option or command) as one line naming the option and what it takes: `--grace: expected a whole
    number; see labbook schedule add --help`. Never the value given (it may be 5000 digits)."""
    param = getattr(exc, "param", None)
    opts = [opt for opt in getattr(param, "opts", None) or [] if opt.startswith("--")] or getattr(param, "opts", [])
    info = getattr(getattr(param, "type_descriptor", None), "parameter_info", None)
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    low, high = getattr(info, "min", None), getattr(info, "max", None)
    if opts and annotation in (int, float) and type(exc).__name__ == "BadParameter":
        kind = "a whole number" if annotation is int else "a number"
        bounds = f" from {low} to {high}" if low is not None and high is not None else ""
        bounds = bounds or (f", {low} or more" if low is not None else f", at most {high}" if high is not None else "")
        text = f"{opts[0]}: expected {kind}{bounds}"
    elif opts and type(exc).__name__ == "BadParameter":
        text = f"{opts[0]}: {exc.message}"
    else:
        text = exc.format_message().rstrip(".")
    command = getattr(exc.ctx, "command_path", None) if exc.ctx is not None else None
    return f"{text}; see {command} --help" if command else text


class _Group(TyperGroup):
    """The `labbook` command group: every usage error, in any verb, is one line and exit 2 (`usage_line`)."""

    def make_context(self, info_name: str | None, args: list[str], parent=None, **extra):
        with _usage_in_one_line():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _usage_in_one_line():
            return super().invoke(ctx)


@contextlib.contextmanager
def _usage_in_one_line() -> Iterator[None]:
    try:
        yield
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `labbook schedule` alone: the help, as asked
            raise
        raise fail(usage_line(exc)) from None


app = typer.Typer(
    help="Deep-learning experiments as parameterized notebooks, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)


quiet_defaults()  # before MLflow and nbformat are imported (inside the commands)
# A store that cannot be written is said in one line (`store_problem`); MLflow would also log
# the database error with its traceback.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


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
    """SIGTERM or SIGHUP (its terminal closed), turned into the same orderly stop as Ctrl-C
    (runs closed FAILED "interrupted", notebooks kept)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum


def stop_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def exit_code(exc: KeyboardInterrupt) -> int:
    return 128 + exc.signum if isinstance(exc, Terminated) else 130


RESUMES = "run the same command again to resume"


def interrupted(exc: KeyboardInterrupt, then: str = RESUMES) -> typer.Exit:
    """Ctrl-C/SIGTERM/SIGHUP as the command's exit, saying what the same command does next (`then`)."""
    with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
        err.print(f"interrupted: {then}", markup=False, highlight=False)
    return typer.Exit(exit_code(exc))


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    # The whole line, `error: ` included, is at most errors.LIMIT characters.
    err.print(reason(f"error: {message}"), markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def before_writing() -> None:
    """Checks before a command writes anything: every LABBOOK_* setting (exit 2), a read-only store (exit 1)."""
    from pipelines.specs import environment
    from pipelines.tracking.tracking import check_writable, store_problem

    with reported(ValueError):
        environment.check()
    try:
        check_writable()
    except OSError as exc:
        raise fail(store_problem(exc) or str(exc), code=1) from None


def close_dead_runs() -> None:
    """Runs whose driver died, closed FAILED on the way into a command (never failing it).

    A tracking server is probed first: MLflow's client retries an unreachable one for minutes
    (measured: 248 s before `labbook tune` said so), and the probe says it in one line now.
    """
    from pipelines.execution.reap import reap_quietly
    from pipelines.tracking.tracking import check_server

    check_server()
    reap_quietly(lambda line: err.print(line, markup=False, highlight=False))


def store_failed(exc: Exception) -> typer.Exit:
    """A full or read-only store, said in one line (exit 1); any other error goes on as it was."""
    from pipelines.tracking.tracking import store_problem

    problem = store_problem(exc)
    if problem is None:
        raise exc
    return fail(problem, code=1)


@contextlib.contextmanager
def reported(
    *bad_input: type[Exception],
    tracking: bool = False,
    interrupts: bool | str = False,
    squash: bool = False,
    failures: tuple[type[Exception], ...] = (),
    store: bool = False,
) -> Iterator[None]:
    """Turn what a verb's work raises into its exit: `bad_input` exceptions exit 2 with their message
    (on one line with `squash`), TrackingUnavailable (`tracking`) and `failures` exit 1, Ctrl-C/SIGTERM/
    SIGHUP exit 130/143/129 (`interrupts`: True, or what running the command again does, when it
    does not resume), a full or read-only store exits 1 in one line (`store`). Anything else goes on up."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if not interrupts:
            raise
        raise interrupted(exc, interrupts if isinstance(interrupts, str) else RESUMES) from None
    except TrackingUnavailable as exc:
        if not tracking:
            raise
        raise fail(str(exc), code=1) from None
    except bad_input as exc:
        raise fail(" ".join(str(exc).split()) if squash else str(exc)) from None
    except failures as exc:
        raise fail(str(exc), code=1) from None
    except Exception as exc:
        if not store:
            raise
        raise store_failed(exc) from None


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
    """The validated pipeline; its steps' SLURM `launcher:` sections checked against the cluster."""
    from pipelines.launchers.slurm import check_pipeline
    from pipelines.specs.pipeline_spec import load_pipeline

    with reported(SpecError):
        pipeline = load_pipeline(spec)
        check_pipeline(pipeline, spec)
        return pipeline


LauncherOpt = Annotated[
    str | None, typer.Option(help="local (default) or slurm: where the work runs (default: the spec's launcher:).")
]
PartitionOpt = Annotated[str | None, typer.Option(help="SLURM partition (default: the spec's, else the cluster's).")]
TimeOpt = Annotated[str | None, typer.Option("--time", help="SLURM time limit per job: minutes, H:MIN:SEC or D-H:MIN.")]
MemOpt = Annotated[str | None, typer.Option(help="SLURM memory per node, e.g. 8G.")]


def slurm_options(spec, launcher, partition, time_limit, cpus, gpus, mem, nodes: int = 1, tasks: int = 1):
    """The SLURM options of a launch (spec's `launcher:`, then flags), checked against the cluster;
    None for a local launch. Bad input exits 2 here, before any study or run exists."""
    from pipelines.launchers import slurm

    chosen = launcher or getattr(getattr(spec, "launcher", None), "name", None) or "local"
    if chosen not in ("local", "slurm"):
        raise fail(f"--launcher: got {chosen!r}; expected local or slurm")
    given = {"--partition": partition, "--time": time_limit, "--mem": mem, "--cpus/--gpus": cpus or gpus}
    if chosen == "local":
        if any(v is not None for v in given.values()):
            raise fail(f"{next(k for k, v in given.items() if v is not None)}: only with --launcher slurm")
        return None
    from_spec = spec.launcher.slurm_options() if getattr(spec, "launcher", None) else {}
    flags = {"partition": partition, "time": time_limit, "cpus_per_task": cpus, "gpus_per_task": gpus, "mem": mem}
    options = slurm.SlurmOptions(**from_spec).merged(**flags)
    # A setting the spec gave (and no flag overrode) is named as the spec names it.
    names = {k: f"launcher.{k}" for k in from_spec if flags.get(k) is None}
    if names:
        names["request"] = "launcher"
    with reported(SpecError):
        slurm.check(options, nodes=nodes, tasks_per_node=tasks, names=names)
    return options


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
        code = exit_code(exc)
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
