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
    """MLflow's basic-auth settings: users in `database_uri`, no access without a login.

    The file names the users' database (whose URL may hold a password): it is this user's alone (0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    private_file(path).write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {admin_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n"
    )
    return path


def private_file(path: Path) -> Path:
    """`path` created if missing, and made readable and writable by this user only (0600), before
    anything secret is written to it. A file that exists already (from an older labbook) is fixed too."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # created 0600 whatever the umask
    os.chmod(path, 0o600)
    return path


def private_sqlite(database_uri: str) -> None:
    """A SQLite users' database (`sqlite:///…`) made this user's alone before MLflow opens it: it holds
    every login's password hash, which MLflow would create 0644 (readable by any local user).
    SQLite gives its journal files the database file's permissions. Other databases: unchanged."""
    if not database_uri.startswith("sqlite:///"):
        return
    path = Path(database_uri.removeprefix("sqlite:///").split("?", 1)[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    private_file(path)  # an empty file is an empty SQLite database: MLflow creates its tables in it
    for suffix in ("-journal", "-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.chmod(side, 0o600)


def basic_auth(env: dict[str, str], auth_db: str | None = None) -> list[str]:
    """Turn MLflow's basic-auth app on for a server (or UI) started with `env`: its settings, users'
    database and admin login go into `env`; returns the arguments to add to `mlflow server`/`mlflow ui`.

    The admin login is MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD, the variables clients
    already send; users live in `auth_db` (default: `sqlite:///mlruns/basic_auth.db`, created 0600).
    Raises ValueError when either variable is missing or the password breaks MLflow's rule
    (at least 12 characters).
    """
    username, password = env.get(USERNAME_ENV), env.get(PASSWORD_ENV)
    if not username or not password:
        raise ValueError(
            f"--auth: set {USERNAME_ENV} and {PASSWORD_ENV}: they become the server's admin login, "
            "and clients (workers, a browser) send the same login"
        )
    # MLflow's own password rule, asked before anything is written (it would refuse the admin
    # login only once the server starts, after the users' database and settings exist).
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_password  # no public equivalent in MLflow 3

    try:
        _validate_password(password)
    except MlflowException as exc:
        raise ValueError(f"--auth: {PASSWORD_ENV}: {exc.message}") from None
    auth_db = auth_db or f"sqlite:///{Path.cwd() / 'mlruns' / 'basic_auth.db'}"
    private_sqlite(auth_db)
    config = auth_config(Path.cwd() / "mlruns" / "basic_auth.ini", auth_db, username)
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = password  # used once, when the user store is empty
    # Signs the UI's CSRF tokens; servers behind one load balancer must share it.
    env.setdefault(SECRET_ENV, secrets.token_hex(32))
    return ["--app-name", "basic-auth"]


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
    # The store URL (with its password) in MLflow's own variable, not on the command line, which
    # every local user can read (`mlflow server --backend-store-uri` reads MLFLOW_BACKEND_STORE_URI).
    env["MLFLOW_BACKEND_STORE_URI"] = backend_store_uri
    argv = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
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
        argv += basic_auth(env, auth_db)
    return ServerCommand(argv, env, f"http://{host}:{port}")
