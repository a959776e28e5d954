"""`labbook ui`, `server` and `kernel-server`: long-running processes in the foreground."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipelines.cli.common import (
    COMMANDS,
    app,
    close_dead_runs,
    out,
    reported,
    serve,
)


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 exposes it to the network.")] = "127.0.0.1",
    auth: Annotated[
        bool,
        typer.Option(
            help="MLflow's basic auth (as labbook server --auth): on a shared machine any local user reaches "
            "127.0.0.1; admin login from MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD."
        ),
    ] = False,
) -> None:
    """Start the MLflow UI on the store labbook's runs use."""
    from pipelines.tracking.tracking import redact, tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        out.print(f"runs are tracked by the MLflow server at {redact(uri)}: open it in a browser")
        return
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    # The store URL goes in MLflow's own variable (`mlflow ui --backend-store-uri` reads
    # MLFLOW_BACKEND_STORE_URI), not on the command line, which every local user can read.
    command = [str(mlflow_bin), "ui", "--host", host, "--port", str(port)]
    # One person's local UI: one server process (its requests run in a thread pool), not MLflow's
    # default 4, each importing MLflow (~2 s of CPU) and holding ~200 MB. `labbook server` scales.
    command += ["--workers", "1"]
    # MLflow's background job runner serves its GenAI features, not ours: off unless asked.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_BACKEND_STORE_URI": uri}
    if auth:
        from pipelines.tracking.server import basic_auth

        with reported(ValueError):
            command += basic_auth(env)
    close_dead_runs()
    login = " (basic auth)" if auth else ""
    out.print(f"MLflow UI{login} for {redact(uri)} at http://{host}:{port}  (Ctrl-C to stop)")
    serve(command, env)


@app.command()
def server(
    backend_store_uri: Annotated[
        str, typer.Option(help="Where runs live: postgresql://user@db/mlflow (or a sqlite:/// file).")
    ],
    artifacts_destination: Annotated[
        str, typer.Option(help="Where the server keeps artifacts: a folder, s3://, gs://, ... Workers need no access.")
    ],
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 lets other machines in.")] = "127.0.0.1",
    auth: Annotated[
        bool,
        typer.Option(help="MLflow's basic auth; admin login from MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD."),
    ] = False,
    auth_db: Annotated[
        str | None, typer.Option(help="Where --auth keeps users (default: sqlite:///mlruns/basic_auth.db).")
    ] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Server worker processes.")] = None,
) -> None:
    """Start an MLflow tracking server with proxied artifacts, for workers on many machines."""
    from pipelines.tracking.server import server_command
    from pipelines.tracking.tracking import redact

    with reported(ValueError):
        command = server_command(backend_store_uri, artifacts_destination, host, port, auth, auth_db, workers)
    login = " (basic auth)" if auth else ""
    out.print(f"MLflow server{login} for {redact(backend_store_uri)} at {command.url}  (Ctrl-C to stop)")
    out.print(f"workers: MLFLOW_TRACKING_URI={command.url} labbook worker SPEC --storage postgresql://...")
    serve(command.argv, command.env)


@app.command("kernel-server")
def kernel_server(
    socket_path: Annotated[Path, typer.Option("--socket", help="The Unix socket to listen on.")] = Path(
        "mlruns/kernels.sock"
    ),
    preload: Annotated[
        list[str] | None, typer.Option(help="Also import this module of yours once (repeatable).")
    ] = None,
) -> None:
    """Fork every labbook command, and every notebook's kernel, from one warm process.

    Point labbook at it with LABBOOK_KERNEL_SERVER=<socket>: a command then starts in ~0.5 s and
    its kernels too. Each kernel is still a fresh process running one notebook; the server stops
    itself when code it imported is edited. It imports on one thread and refuses to start (exit 2)
    when a --preload module starts a thread (OpenMP's pool, say): a fork of it could hang.
    """
    from pipelines.kernels.socket_claim import SocketPathTaken, check_free

    path = socket_path.resolve()
    # A user's file, or a live server's socket, is never replaced (the server checks again as it binds).
    with reported(SocketPathTaken):
        check_free(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.print(f"kernel server on {path}  (Ctrl-C to stop)")
    out.print(f"use it: export LABBOOK_KERNEL_SERVER={path}")
    command = [sys.executable, "-m", "pipelines.kernels.kernel_fork", "--listen", str(path), "--commands", COMMANDS]
    command += [a for module in preload or [] for a in ("--preload", module)]
    serve(command, dict(os.environ))
