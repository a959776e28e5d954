"""`labbook server`: the `mlflow server` command line that scaling out needs, and nothing more.

Workers on other machines send every run, metric and artifact (executed notebooks included)
through this server: artifacts are proxied (`--artifacts-destination`), so no worker needs a
shared disk. The server is MLflow's own; this module only picks safe defaults (bound to
127.0.0.1, the job runner off) and wires MLflow's basic-auth app to the credentials clients
already read (`MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`).
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
SECRET_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"


@dataclass(frozen=True)
class ServerCommand:
    argv: list[str]
    env: dict[str, str]
    url: str


# Seconds a server worker trusts a login it has checked. MLflow's default (0) checks the password
# hash (scrypt, ~0.16 s of CPU here) on every request, and a trial makes dozens: measured on one
# 3-epoch trial, its fit took 5.5 s and its model logging 10.4 s with auth against 2.7 s and 2.0 s
# without. The price: a changed or revoked password still works for up to this long on the
# server workers that had accepted it.
AUTH_CACHE_SECONDS = 60


def auth_config(path: Path, database_uri: str, admin_username: str) -> Path:
    """MLflow's basic-auth settings: users in `database_uri`, no access without a login."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {admin_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n"
    )
    return path


def server_command(
    backend_store_uri: str,
    artifacts_destination: str,
    host: str = "127.0.0.1",
    port: int = 5000,
    auth: bool = False,
    auth_db: str | None = None,
    workers: int | None = None,
    environ: dict[str, str] | None = None,
) -> ServerCommand:
    """The `mlflow server` argv and environment; raises ValueError on missing credentials."""
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(environ if environ is not None else os.environ)}
    argv = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
    ]
    if workers:
        argv += ["--workers", str(workers)]
    if auth:
        username, password = env.get(USERNAME_ENV), env.get(PASSWORD_ENV)
        if not username or not password:
            raise ValueError(
                f"--auth: set {USERNAME_ENV} and {PASSWORD_ENV}: they become the server's admin login, "
                "and workers send the same two variables"
            )
        auth_db = auth_db or f"sqlite:///{Path.cwd() / 'mlruns' / 'basic_auth.db'}"
        config = auth_config(Path.cwd() / "mlruns" / "basic_auth.ini", auth_db, username)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = password  # used once, when the user store is empty
        # Signs the UI's CSRF tokens; servers behind one load balancer must share it.
        env.setdefault(SECRET_ENV, secrets.token_hex(32))
        argv += ["--app-name", "basic-auth"]
    return ServerCommand(argv, env, f"http://{host}:{port}")
