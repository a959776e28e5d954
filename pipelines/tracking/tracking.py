"""MLflow glue: where runs go, how they are created and closed, and what every run records.

The embedded default needs no server: SQLite at `mlruns/mlflow.db` (under the working
directory) with artifacts in `mlruns/artifacts/`. `MLFLOW_TRACKING_URI` overrides it
(another SQLite file, PostgreSQL, or an MLflow tracking server).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

from pipelines.errors import TrackingUnavailable, reason
from pipelines.specs import environment
from pipelines.tracking import driver
from pipelines.tracking.tags import Tag

environment.telemetry_off()  # every process that talks to MLflow imports this module

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Names kept for code written before tags.py: new code says Tag.PREFIX, Tag.OUTPUT_PREFIX, Tag.GIT_COMMIT.
TAG_PREFIX = Tag.PREFIX
OUTPUT_TAG_PREFIX = Tag.OUTPUT_PREFIX
GIT_COMMIT_TAG = Tag.GIT_COMMIT


def default_store() -> Path:
    """`./mlruns/`, made if missing: the embedded home of runs, studies and notebook outputs."""
    store = Path.cwd() / "mlruns"
    store.mkdir(parents=True, exist_ok=True)
    return store


def tracking_uri(given: str | None = None) -> str:
    """`given` (a notebook parameter, whose password `reveal` gives back), else `MLFLOW_TRACKING_URI`
    if set, else the embedded SQLite store under `./mlruns/`."""
    if given:
        return reveal(given)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{default_store() / 'mlflow.db'}"


def local_store_dir(uri: str) -> Path | None:
    """The folder of a SQLite store (`.../mlruns`), where artifacts and notebook outputs go beside it."""
    match = re.match(r"sqlite:///(.+)$", uri)
    return Path(match.group(1)).resolve().parent if match else None


def files_dir(uri: str) -> Path:
    """Where labbook keeps files of its own: beside a local store, else `./mlruns` (a server store)."""
    return local_store_dir(uri) or Path.cwd() / "mlruns"


def output_dir(uri: str, run_id: str) -> Path:
    """Where papermill writes a run's executed notebook and checkpoints: beside a local store."""
    return files_dir(uri) / "outputs" / run_id


def folder_name(name: str, limit: int = 100) -> str:
    """A folder name from a user's experiment, spec or study name: no separators, no `..`, short.

    Names may be 500 characters (MLflow's limit for an experiment), folder names 255 bytes: a long
    name keeps its first characters and gains a digest of the whole, so two names stay apart.
    """
    import hashlib

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip(".") or "_"
    if len(safe) <= limit:
        return safe
    return f"{safe[: limit - 13]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


REDACTED = "***"
# A password in a URL: `scheme://user:PASSWORD@host`, or a query argument libpq, SQLAlchemy or
# an HTTP store takes (`?password=`, `&sslpassword=`, `?token=`).
_SECRET_QUERY = re.compile(r"([?&](?:[a-z_]*password|passwd|pwd|token|secret|[a-z_]*key)=)[^&#]*", re.IGNORECASE)


def redact(url: str) -> str:
    """A storage or tracking URL fit to print, tag or write into a notebook: its password
    (`user:PASSWORD@`, `?password=...`, `?token=...`) replaced by `***`."""
    # The user may be empty (`postgresql://:PW@host/db?user=me`) and the password hold spaces.
    return _SECRET_QUERY.sub(rf"\1{REDACTED}", re.sub(r"://([^:/@]*):[^@/]*@", rf"://\1:{REDACTED}@", url))


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\n]*\Z")  # a password may hold spaces


def _secret_urls() -> list[str]:
    try:
        found = json.loads(os.environ.get(environment.SECRET_URLS_ENV) or "[]")
    except ValueError:
        return []
    return [url for url in found if isinstance(url, str)] if isinstance(found, list) else []


def notebook_parameter(value: Any) -> Any:
    """`value` as it may be written into a notebook's parameters: a URL's password replaced by `***`.

    An executed notebook is kept beside the store and attached to its run (ipynb and HTML, and
    papermill copies the parameters into its metadata), where anyone who can read the store or
    open the MLflow UI reads it: a database password in `tracking_uri` or `optuna_storage` must
    not be there. The real URL goes to the kernels this process starts through their
    environment (`LABBOOK_SECRET_URLS`, a JSON list; kernels inherit this process's environment
    as `MLFLOW_TRACKING_URI` already is), and `reveal` gives it back in the kernel.
    """
    if not isinstance(value, str) or not _URL.match(value):
        return value  # only a URL's password: any other text reaches the notebook as it is
    share_with_kernels(value)
    return redact(value)


def share_with_kernels(url: str) -> None:
    """Put `url` in `LABBOOK_SECRET_URLS` when it holds a password, so that every kernel this
    process starts from now on can `reveal` it (call it as soon as a URL is known: a pool warms
    kernels before their notebook's parameters exist)."""
    if redact(url) != url:
        known = _secret_urls()
        if url not in known:
            os.environ[environment.SECRET_URLS_ENV] = json.dumps([*known, url])


def reveal(value: str, field: str = "tracking_uri") -> str:
    """The URL a redacted notebook parameter stands for (`notebook_parameter`); any other value as is.

    Looks in `LABBOOK_SECRET_URLS`, `MLFLOW_TRACKING_URI` and `LABBOOK_OPTUNA_STORAGE` for the one
    URL that redacts to `value`. Raises ValueError (one line, naming `field`) when none does: the
    notebook was run by hand with a redacted URL, or by a process that did not pass the password.
    """
    if not value or REDACTED not in value or not _URL.match(value) or redact(value) != value:
        return value
    candidates = [
        *_secret_urls(),
        os.environ.get("MLFLOW_TRACKING_URI", "").strip(),
        os.environ.get(environment.OPTUNA_STORAGE_ENV, "").strip(),
    ]
    for url in candidates:
        if url and url != value and redact(url) == value:
            return url
    raise ValueError(
        f"{field}: {value[:200]} has its password redacted and this process was not given it "
        f"(labbook passes it to the kernels it starts in {environment.SECRET_URLS_ENV}; by hand, pass the full URL)"
    )


def literal(value: str) -> str:
    """`value` as a string literal in an MLflow search filter.

    MLflow's filter grammar has no escape for a quote inside a quoted string (a backslash or a
    doubled quote match nothing); it takes either quote character, so use the one not inside.
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r}: MLflow cannot search for a value holding both ' and \"")


def model_uri(mlflow: MlflowClient, run_id: str) -> str:
    """The model a run logged: MLflow 3's own model URI (tagged by `log_model`), else `runs:/<id>/model`."""
    return mlflow.get_run(run_id).data.tags.get(Tag.MODEL_URI, f"runs:/{run_id}/model")


_OPENED: set[str] = set()  # PostgreSQL stores this process has opened (and so created, if new)


@contextlib.contextmanager
def advisory_lock(uri: str, key: str) -> Iterator[None]:
    """A PostgreSQL session advisory lock on `key` (a 64-bit hash of it), held by one connection.

    Every process and machine using the database sees it (PostgreSQL docs, "Advisory Locks");
    it is released when the block ends or the connection drops (a killed holder frees it).
    """
    import sqlalchemy

    number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:n)"), {"n": number})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:n)"), {"n": number})
    finally:
        engine.dispose()


def client(uri: str | None = None) -> MlflowClient:
    """A client of the store; a SQLite store is opened under a file lock beside it.

    MLflow creates and migrates a new SQLite store in whichever process opens it first, and two
    processes doing so at once fail ("table experiments already exists", "duplicate column name")
    and can leave it half-migrated: 10 of 12 processes failed, started 4 at a time on new stores.
    A kernel server makes commands start fast enough to meet there (a scheduled run and the
    process watching it); so could any two workers started together.
    """
    uri = tracking_uri(uri)
    match = re.match(r"sqlite:///(.+)$", uri)
    if uri.startswith("postgresql") and uri not in _OPENED:
        # The same race on a new PostgreSQL store (alembic in each process): a database-wide lock
        # instead of a file, once per process (MLflow caches the store per URI after that).
        with advisory_lock(uri, "labbook.store:create"):
            opened = MlflowClient(tracking_uri=uri)
        _OPENED.add(uri)
        return opened
    if match is None:
        return MlflowClient(tracking_uri=uri)
    database = Path(match.group(1))
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        lock = open(database.with_name(database.name + ".lock"), "a")  # noqa: SIM115 - closed below
    except OSError:
        if database.is_file():  # a read-only store: reading needs no lock, and nobody can migrate it here
            return MlflowClient(tracking_uri=uri)
        raise
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed; MLflow keeps the store open after
        return MlflowClient(tracking_uri=uri)


_FULL = ("database or disk is full", "no space left on device", "disk quota exceeded")
_READ_ONLY = ("readonly database", "read-only file system")


def store_problem(exc: BaseException, uri: str | None = None) -> str | None:
    """One line when `exc` (or what caused it) says the store cannot be written: read-only or full.

    None for any other error, which the caller lets through. The line names the store, never
    the database's error text (it may quote SQL and values).
    """
    import errno

    seen: BaseException | None = exc
    text = ""
    for _ in range(10):  # the chain of causes, bounded
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            text = "no space left on device"
            break
        if isinstance(seen, OSError) and seen.errno == errno.EROFS:
            text = "read-only file system"
            break
        text = f"{text} {seen}".lower()
        seen = seen.__cause__ or seen.__context__
    where = redact(uri or tracking_uri())
    if any(marker in text for marker in _FULL):
        return f"the store {where} cannot be written: its disk is full; free space, then run the command again"
    if any(marker in text for marker in _READ_ONLY):
        return f"the store {where} is read-only: labbook can read it (compare, diff) but not add runs to it"
    return None


def check_writable(uri: str | None = None) -> None:
    """Before a command writes anything: a local store that cannot be written says so now, in one line.

    Raises OSError (EROFS) for a read-only SQLite store or folder; a store elsewhere is left to
    the writes themselves (see `store_problem`).
    """
    import errno

    uri = uri or tracking_uri()
    folder = local_store_dir(uri)
    if folder is None or not folder.exists():
        return
    database = Path(uri.removeprefix("sqlite:///"))
    targets = [folder, database] if database.exists() else [folder]
    if not all(os.access(path, os.W_OK) for path in targets):
        raise OSError(errno.EROFS, "read-only file system", str(folder))


def check_server(uri: str | None = None) -> None:
    """Before a study or worker starts anything: a server that says no says it now, in one line."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    from mlflow.exceptions import MlflowException

    try:  # one quick probe: MLflow's own client retries an unreachable server for minutes
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()  # noqa: S310 - http(s) only
    except urllib.error.HTTPError:
        pass  # it answered; whether it lets us in is checked next
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(
            f"MLflow server {redact(uri)}: unreachable ({reason}); "
            "start it (`labbook server`) or fix MLFLOW_TRACKING_URI"
        ) from None
    try:
        client(uri).search_experiments(max_results=1)
    except MlflowException as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "401" in message:
            message = "401 unauthenticated: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        elif "403" in message:
            message = "403 forbidden: this user may not read experiments"
        raise TrackingUnavailable(f"MLflow server {redact(uri)}: {message}") from None


def ensure_experiment(mlflow: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created with its artifacts beside a local store if new."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            mlflow.restore_experiment(found.experiment_id)
        return found.experiment_id
    store = local_store_dir(mlflow.tracking_uri)
    location = None
    if store is not None:
        location = (store / "artifacts" / folder_name(name)).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:
        # Another worker created it between our lookup and create: use theirs.
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def notebook_sha256(data: bytes) -> str:
    """The SHA-256 (hex) of a notebook file's bytes: what `labbook rerun` checks a source notebook against."""
    return hashlib.sha256(data).hexdigest()


def provenance_tags(seed: int | None, notebook: str | Path) -> dict[str, str]:
    """What a run needs to be repeated: seed, git commit and dirty flag, versions, notebook.

    Versions come from the installed packages' metadata: importing torch and Lightning to read
    `__version__` cost the orchestrator ~4.5 s, which it otherwise never needs.
    """
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    tags = {
        Tag.GIT_COMMIT: commit or "unknown",
        Tag.GIT_DIRTY: "unknown" if status is None else str(bool(status)).lower(),
        Tag.PYTHON_VERSION: platform.python_version(),
        Tag.TORCH_VERSION: installed("torch"),
        Tag.LIGHTNING_VERSION: installed("lightning"),
        Tag.MLFLOW_VERSION: installed("mlflow"),
        Tag.NOTEBOOK: str(notebook),
        MLFLOW_SOURCE_NAME: str(notebook),
        MLFLOW_SOURCE_TYPE: "NOTEBOOK",
    }
    if seed is not None:
        tags[Tag.SEED] = str(seed)
    return tags | scheduler_tags()


def scheduler_tags() -> dict[str, str]:
    """The SLURM job this process runs in (`labbook jobs` reads it): `12_3` for task 3 of array 12."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return {Tag.SLURM_JOB_ID: f"{array}_{task}" if array and task else job}


def start_run(
    mlflow: MlflowClient,
    experiment_name: str,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create a RUNNING run (nested under `parent_run_id` if given) and return its id.

    This process becomes the run's driver (pipelines/tracking/driver.py): tagged with who it is, it
    heart-beats the run until `finish_run`, so a later command can tell when it died.
    """
    experiment_id = ensure_experiment(mlflow, experiment_name)
    all_tags = {**driver.tags(), **(tags or {})}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    if run_name:
        all_tags[MLFLOW_RUN_NAME] = run_name
    run = mlflow.create_run(experiment_id, run_name=run_name or None, tags=all_tags)
    driver.drive(mlflow, run.info.run_id, tag=False)
    _hold_reserve(mlflow.tracking_uri)
    return run.info.run_id


def reopen_run(mlflow: MlflowClient, run_id: str) -> None:
    """A closed run RUNNING again (a resumed study or pipeline), this process its driver now."""
    mlflow.update_run(run_id, status="RUNNING")
    driver.drive(mlflow, run_id)


def finish_run(mlflow: MlflowClient, run_id: str, error: str | None = None) -> None:
    """Close a run: FINISHED, or FAILED with the one-line error as a tag.

    The status is written first: when the store can take only one more write (a full disk),
    the run says FAILED, never FINISHED or RUNNING; the reason follows, best effort.
    """
    driver.release(run_id)
    status = RunStatus.FAILED if error else RunStatus.FINISHED
    try:
        mlflow.set_terminated(run_id, RunStatus.to_string(status))
    except Exception as exc:
        # A full disk (a notebook's output can fill it): this process's reserve frees room for the status.
        if store_problem(exc, mlflow.tracking_uri) is None or not _release_reserve(mlflow.tracking_uri):
            raise
        mlflow.set_terminated(run_id, RunStatus.to_string(status))
    if error:
        with contextlib.suppress(Exception):  # the status already says it failed
            mlflow.set_tag(run_id, Tag.ERROR, reason(error))


RESERVE_BYTES = 256 * 1024  # room for a run's last writes (status, reason) on a disk that filled up
_RESERVE_PREFIX = ".labbook-reserve-"


def _reserve_path(uri: str) -> Path | None:
    """This process's reserve file beside a local store (`.labbook-reserve-<pid>-<start time>`)."""
    folder = local_store_dir(uri)
    started = driver.start_time(os.getpid())
    return None if folder is None or started is None else folder / f"{_RESERVE_PREFIX}{os.getpid()}-{started}"


def _hold_reserve(uri: str) -> None:
    """Set aside RESERVE_BYTES beside a local store, once per process, removed when it exits.

    Written by hand (the file system's own reserved blocks are root's, and a tmpfs has none):
    when a run fills the disk, its driver can still write that the run FAILED.
    """
    import atexit

    path = _reserve_path(uri)
    if path is None or path.exists():
        return
    try:
        with open(path, "xb") as reserve:
            os.posix_fallocate(reserve.fileno(), 0, RESERVE_BYTES)
    except OSError:  # no room even for that: nothing is set aside
        with contextlib.suppress(OSError):
            path.unlink()
        return
    atexit.register(lambda: path.unlink(missing_ok=True))


def _release_reserve(uri: str) -> bool:
    """Free this process's reserve; False if it had none."""
    path = _reserve_path(uri)
    if path is None or not path.exists():
        return False
    path.unlink()
    return True


def remove_dead_reserves(uri: str) -> None:
    """Reserve files of processes that are gone (killed: their exit handler never ran)."""
    folder = local_store_dir(uri)
    for path in folder.glob(f"{_RESERVE_PREFIX}*") if folder is not None else []:
        pid, _, started = path.name.removeprefix(_RESERVE_PREFIX).partition("-")
        if pid.isdigit() and driver.start_time(int(pid)) != started:
            with contextlib.suppress(OSError):
                path.unlink()


MAX_PARAM_VALUE = 6000  # MLflow 3's limit on a param value (MAX_PARAM_VAL_LENGTH)
LONG_PARAMS_DIR = "params"  # where a value longer than that is kept whole, as params/<key>.txt


def param_value(key: str, value: Any) -> str:
    """The text MLflow keeps for a param: `str(value)` whole up to MLFLOW's limit; past it a cut
    value ending in a marker that names the artifact holding the whole (`log_params` writes it).

    Every writer of a run's params goes through here (labbook's own and the notebook's Lightning
    logger, see `in_notebook.mlflow_logger`): MLflow refuses a param logged twice with two values,
    and Lightning's own logger cut values at 250 characters, failing every run with a longer one.
    """
    text = str(value)
    if len(text) <= MAX_PARAM_VALUE:
        return text
    marker = f" ...[{len(text)} characters; whole value: artifact {LONG_PARAMS_DIR}/{key}.txt]"
    return text[: MAX_PARAM_VALUE - len(marker)] + marker


def log_params(mlflow: MlflowClient, run_id: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> None:
    """Log params (and tags) in batches of 100 (MLflow's most per call), each value as `param_value`
    writes it; a value past MLflow's limit is also attached whole as `params/<key>.txt`."""
    from mlflow.entities import Param, RunTag

    values = {k: param_value(k, v) for k, v in params.items()}
    for key, value in params.items():
        if values[key] != str(value):
            mlflow.log_text(run_id, str(value), f"{LONG_PARAMS_DIR}/{key}.txt")
    items = [Param(k, v) for k, v in values.items()]
    tag_items = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for start in range(0, max(len(items), 1), 100):
        mlflow.log_batch(run_id, params=items[start : start + 100], tags=tag_items if start == 0 else [])


def record_outputs(client: MlflowClient, run_id: str, outputs: dict[str, Any]) -> None:
    """Outputs a later pipeline step can reference (`${step.outputs.key}`): tags `labbook.output.<key>` (JSON)."""
    for key, value in outputs.items():
        client.set_tag(run_id, Tag.OUTPUT_PREFIX + key, json.dumps(value, default=str))
