"""The `labbook` command: parse, call, print. Bad input exits 2 with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipelines.spec import SpecError, load_spec, parse_overrides

app = typer.Typer(
    help="Deep-learning experiments as parameterized notebooks, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

EXIT_BAD_INPUT = 2

SpecArg = Annotated[Path, typer.Argument(help="Pipeline spec (YAML), e.g. pipelines/digits_mlp.yaml.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a setting by its name, e.g. --set lr=0.01 (repeatable)."),
]


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _load(spec: Path, overrides: list[str] | None):
    try:
        return load_spec(spec, parse_overrides(overrides or []))
    except SpecError as exc:
        raise _fail(str(exc)) from None


@app.command()
def validate(spec: SpecArg, set_: SetOpt = None) -> None:
    """Check a spec (and overrides) without running anything."""
    loaded = _load(spec, set_)
    out.print(f"{spec}: ok ({loaded.model.name} on {loaded.data.name}, {loaded.trainer.max_epochs} epochs)")


@app.command()
def run(
    spec: SpecArg,
    set_: SetOpt = None,
    run_name: Annotated[str | None, typer.Option(help="MLflow run name (default: the spec's name).")] = None,
) -> None:
    """Train a spec's model as one executed notebook, tracked as one MLflow run."""
    from pipelines.run import run_training
    from pipelines.tracking import tracking_uri

    loaded = _load(spec, set_)
    out.print(f"running {spec} → {tracking_uri()}")
    result = run_training(loaded, spec_path=spec, run_name=run_name)
    out.print(f"run id: {result.run_id}  status: {result.status}")
    out.print(f"executed notebook: {result.notebook}")
    if result.metrics:
        table = Table("metric", "value", title="final metrics")
        for name in sorted(k for k in result.metrics if k.startswith(("test_", "val_", "train_"))):
            table.add_row(name, f"{result.metrics[name]:.4f}")
        out.print(table)
    if result.error:
        raise _fail(f"notebook failed: {result.error}", code=1)


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 exposes it to the network.")] = "127.0.0.1",
) -> None:
    """Start the MLflow UI on the store labbook's runs use."""
    from pipelines.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        out.print(f"runs are tracked by the MLflow server at {uri}: open it in a browser")
        return
    out.print(f"MLflow UI for {uri} at http://{host}:{port}  (Ctrl-C to stop)")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_bin), "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    try:
        raise typer.Exit(subprocess.call(command, env=os.environ.copy()))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
