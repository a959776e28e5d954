"""Hostile input and other local users: nothing leaks, runs or escapes that the user did not ask for.

Each test names the security case of issue 22 it covers (see README, "What happens when…"). The
other user is `nobody`, entered with `setpriv` (these tests need root to switch to it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import nbformat
import pytest
import yaml
from mlflow import MlflowClient

from pipelines.kernels.env import trusted_connection, untrusted_socket
from pipelines.specs.spec import PROJECT_ROOT
from tests.conftest import LABBOOK, labbook
from tests.test_scale_out import database  # noqa: F401, F811 - a fixture: fresh PostgreSQL databases

SPECS = PROJECT_ROOT / "pipelines"
SECRET = "s3cret-password-of-the-caller"
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to act as another user"
)

# A kernel server impostor: listens on a socket anyone may connect to and records what each
# connection sends (bytes and passed file descriptors). Standard library only (it runs as nobody).
IMPOSTOR = r"""
import os, socket, sys
path, log, mode = sys.argv[1], sys.argv[2], int(sys.argv[3], 8)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, mode)
server.listen(16)
open(log + ".ready", "w").close()
while True:
    connection, _ = server.accept()
    connection.settimeout(5)
    data, fds = b"", []
    try:
        while True:
            chunk, received, _, _ = socket.recv_fds(connection, 1 << 16, 8)
            fds += received
            if not chunk:
                break
            data += chunk
            if data.endswith(b"\n"):
                break
    except OSError:
        pass
    with open(log, "ab") as out:
        out.write(b"connection %d bytes %d fds: " % (len(data), len(fds)) + data + b"\n")
    for fd in fds:  # a caller's stdout held open here would keep its own caller waiting
        os.close(fd)
    connection.close()
"""


class Impostor:
    """A process of another user (or ours) on a socket; `received` is what connections sent it."""

    def __init__(self, folder: Path, mode: int = 0o777, user: list[str] | None = None) -> None:
        self.path = folder / "kernels.sock"
        self.log = folder / "received.log"
        script = folder / "impostor.py"
        script.write_text(IMPOSTOR)
        script.chmod(0o644)
        command = [*(user or []), "/usr/bin/python3", str(script), str(self.path), str(self.log), f"{mode:o}"]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not Path(f"{self.log}.ready").exists():
            assert self.process.poll() is None and time.monotonic() < deadline, "the impostor did not start"
            time.sleep(0.05)

    @property
    def received(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder every user may write to, sticky as /tmp is (a short path: sockets have ~100 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="lb-shared-", dir="/tmp"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _refusals(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "not using the kernel server" in line]


def _validate_with_server(socket_path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """`labbook validate` of a shipped spec, pointed at `socket_path`, with a secret in its environment."""
    env = {"LABBOOK_KERNEL_SERVER": str(socket_path), "MLFLOW_TRACKING_PASSWORD": SECRET}
    return labbook("validate", str(SPECS / "regression_mlp.yaml"), cwd=tmp_path, env=env)


@needs_root
def test_1_a_server_of_another_user_on_a_world_writable_socket_gets_nothing(
    shared_folder: Path, tmp_path: Path
) -> None:
    impostor = Impostor(shared_folder, 0o777, AS_NOBODY)
    try:
        assert impostor.path.stat().st_uid != os.getuid()
        done = _validate_with_server(impostor.path, tmp_path)
        link = tmp_path / "kernels.sock"  # a link of ours to their socket: the socket is still theirs
        link.symlink_to(impostor.path)
        linked = _validate_with_server(link, tmp_path)
    finally:
        impostor.stop()
    for command in (done, linked):
        assert command.returncode == 0, command.stderr[-2000:]
        assert "ok (mlp_regressor on regression" in command.stdout  # the command ran here, cold
        refusals = _refusals(command.stderr)
        assert len(refusals) == 1 and "belongs to uid" in refusals[0], command.stderr
    assert impostor.received == ""  # not even a connection: no environment, no stdio, no password


@needs_root
def test_1_a_socket_of_ours_served_by_another_user_is_refused_on_its_peer_credentials(
    store: str, shared_folder: Path, tmp_path: Path
) -> None:
    """The socket file looks like ours (owner, mode 0600): SO_PEERCRED says who listens. A real run
    asks twice (the command, then its notebook's kernel), and both go elsewhere."""
    impostor = Impostor(shared_folder, 0o777, AS_NOBODY)
    try:
        os.chown(impostor.path, os.getuid(), os.getgid())
        impostor.path.chmod(0o600)
        spec = tmp_path / "spec.yaml"
        raw = yaml.safe_load((SPECS / "regression_mlp.yaml").read_text())
        raw["trainer"]["max_epochs"] = 1
        raw["data"]["n_samples"] = 200
        spec.write_text(yaml.safe_dump(raw))
        env = {"LABBOOK_KERNEL_SERVER": str(impostor.path), "MLFLOW_TRACKING_PASSWORD": SECRET}
        done = labbook("run", str(spec), env=env)
    finally:
        impostor.stop()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "status: FINISHED" in done.stdout
    refusals = _refusals(done.stderr)
    assert len(refusals) == 1 and "runs as uid" in refusals[0], done.stderr
    connections = impostor.received.splitlines()
    assert connections and all(line == "connection 0 bytes 0 fds: " for line in connections), connections
    assert SECRET not in impostor.received


@pytest.mark.parametrize(
    ("folder_mode", "socket_mode", "why"),
    [
        (0o777, 0o600, "world-writable without the sticky bit"),
        (0o700, 0o666, "writable by other users"),
    ],
)
def test_1_a_socket_others_could_replace_or_use_is_refused(
    tmp_path: Path, folder_mode: int, socket_mode: int, why: str
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="lb-", dir="/tmp"))
    try:
        impostor = Impostor(folder, socket_mode)  # this user's own process, so only the file is wrong
        folder.chmod(folder_mode)
        try:
            done = _validate_with_server(impostor.path, tmp_path)
        finally:
            impostor.stop()
        assert done.returncode == 0, done.stderr[-2000:]
        refusals = _refusals(done.stderr)
        assert len(refusals) == 1 and why in refusals[0], done.stderr
        assert impostor.received == ""
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_1_this_users_own_kernel_server_passes_the_checks(tmp_path: Path, kernel_server: str | None) -> None:
    """The checks refuse nothing of ours (tests/test_kernel_pool.py shows commands forked by it)."""
    if kernel_server is None:
        pytest.skip("LABBOOK_TEST_KERNEL_SERVER=0")
    assert untrusted_socket(kernel_server) is None
    connection = trusted_connection(kernel_server)
    assert connection is not None
    connection.close()  # a connection that sends nothing: the server goes on
    done = _validate_with_server(Path(kernel_server), tmp_path)
    assert done.returncode == 0 and not _refusals(done.stderr), done.stderr


def _notebook_writing(path: Path, marker: Path) -> Path:
    """A notebook that leaves `marker` behind when it is executed."""
    nb = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell("seed = 0")
    parameters.metadata.tags = ["parameters"]
    nb.cells = [parameters, nbformat.v4.new_code_cell(f"open({str(marker)!r}, 'w').close()")]
    nb.metadata.kernelspec = {"name": "labbook", "display_name": "labbook", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_2_rerun_executes_the_recorded_notebook_never_whatever_a_tag_names(store: str, tmp_path: Path) -> None:
    source = tmp_path / "train.ipynb"  # the run's notebook, outside the project (a user's own copy)
    shutil.copy(PROJECT_ROOT / "notebooks" / "train.ipynb", source)
    raw = yaml.safe_load((SPECS / "regression_mlp.yaml").read_text())
    raw["trainer"]["max_epochs"] = 1
    raw["data"]["n_samples"] = 200
    raw["notebook"] = str(source)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    done = labbook("run", str(spec))
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("regression").experiment_id
    [original] = client.search_runs([experiment])
    run_id, tags = original.info.run_id, original.data.tags
    assert tags["labbook.notebook_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()

    marker = tmp_path / "pwned"
    evil = _notebook_writing(Path(tempfile.mkdtemp(prefix="lb-")) / "evil.ipynb", marker)
    for named in (str(evil), os.path.relpath(evil, PROJECT_ROOT)):  # absolute, and relative out of the project
        client.set_tag(run_id, "labbook.notebook", named)
        refused = labbook("rerun", run_id)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert refused.stderr.count("\n") == 1 and "is not the notebook the run executed" in refused.stderr
        assert not marker.exists() and len(client.search_runs([experiment])) == 1  # nothing executed, no run

    # The hash tag rewritten to match the other notebook as well (the store's writer can do both):
    # a source outside this checkout is never executed; the run's own executed copy runs.
    client.set_tag(run_id, "labbook.notebook", str(evil))
    client.set_tag(run_id, "labbook.notebook_sha256", hashlib.sha256(evil.read_bytes()).hexdigest())
    forged = labbook("rerun", run_id)
    assert forged.returncode == 0, forged.stderr[-2000:]
    assert "verdict: exact" in forged.stdout and not marker.exists()
    client.set_tag(run_id, "labbook.notebook", os.path.relpath(evil, PROJECT_ROOT))

    # Its hash tag removed as well (or a run recorded before hashes): the run's own executed copy runs.
    client.delete_tag(run_id, "labbook.notebook_sha256")
    again = labbook("rerun", run_id)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "verdict: exact" in again.stdout and not marker.exists()
    rerun, _forged = client.search_runs(
        [experiment], filter_string=f"tags.`labbook.rerun_of` = '{run_id}'", order_by=["attributes.start_time DESC"]
    )
    assert rerun.data.tags["labbook.notebook"] == os.path.relpath(evil, PROJECT_ROOT)  # as named, not executed
    assert rerun.data.tags["labbook.notebook_sha256"] == "unknown"

    # The source notebook edited after the run: not what the run executed, refused.
    client.set_tag(run_id, "labbook.notebook", str(source))
    client.set_tag(run_id, "labbook.notebook_sha256", tags["labbook.notebook_sha256"])
    edited = nbformat.read(source, as_version=4)
    edited.cells.append(nbformat.v4.new_code_cell(f"open({str(marker)!r}, 'w').close()"))
    nbformat.write(edited, source)
    refused = labbook("rerun", run_id)
    assert refused.returncode == 2 and "edited since" in refused.stderr, refused.stderr[-2000:]
    assert not marker.exists() and len(client.search_runs([experiment])) == 3
    shutil.rmtree(evil.parent)


def _untagged_notebook(path: Path) -> Path:
    """The train notebook with its `parameters` tag removed (issue 22 case 9)."""
    nb = nbformat.read(PROJECT_ROOT / "notebooks" / "train.ipynb", as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("tags", None)
    nbformat.write(nb, path)
    return path


NOT_NOTEBOOKS: list[tuple[str, Callable[[Path], Path | str], str]] = [
    ("a system file", lambda tmp: "/etc/passwd", "not a Jupyter notebook (not JSON)"),
    ("a binary file", lambda tmp: _write(tmp / "b.ipynb", b"\x89PNG\r\n\x1a\n\x00secret-bytes"), "not UTF-8"),
    ("JSON that is no notebook", lambda tmp: _write(tmp / "j.ipynb", b'{"secret": "hunter2"}'), "schema refuses"),
    ("a JSON list", lambda tmp: _write(tmp / "l.ipynb", b'["hunter2"]'), "not a Jupyter notebook"),
    ("an empty file", lambda tmp: _write(tmp / "e.ipynb", b""), "not a Jupyter notebook (not JSON)"),
    (
        "a truncated notebook",
        lambda tmp: _write(tmp / "t.ipynb", (PROJECT_ROOT / "notebooks" / "train.ipynb").read_bytes()[:400]),
        "not a Jupyter notebook (not JSON)",
    ),
    ("a directory", lambda tmp: str(PROJECT_ROOT / "notebooks"), "not a file"),
    ("a notebook without the parameters tag", lambda tmp: _untagged_notebook(tmp / "u.ipynb"), "tagged 'parameters'"),
]
LEAKS = ("root:", "hunter2", "secret-bytes", '"cells"', "PNG", "cell_type")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("kind", "make", "expected"), NOT_NOTEBOOKS, ids=[k for k, _, _ in NOT_NOTEBOOKS])
def test_3_a_spec_whose_notebook_is_not_a_parameterized_notebook_is_refused_at_validate_quoting_nothing(
    tmp_path: Path, kind: str, make: Callable[[Path], Path | str], expected: str
) -> None:
    raw = yaml.safe_load((SPECS / "regression_mlp.yaml").read_text())
    raw["notebook"] = str(make(tmp_path))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    for command in ("validate", "run"):
        done = labbook(command, str(spec), cwd=tmp_path)
        assert done.returncode == 2, (kind, command, done.stdout[-1000:], done.stderr[-2000:])
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert f"notebook: {raw['notebook']!r}: " in done.stderr
        assert expected in done.stderr and len(done.stderr) <= 510, done.stderr
        assert not any(leak in done.stderr + done.stdout for leak in LEAKS), done.stderr
    assert not (tmp_path / "mlruns").exists()  # nothing written


def test_3_a_pipelines_notebook_step_is_checked_the_same_way(tmp_path: Path) -> None:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        yaml.safe_dump({"name": "p", "steps": [{"name": "x", "kind": "notebook", "notebook": "/etc/passwd"}]})
    )
    done = labbook("validate", str(pipeline), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "steps.x.notebook: '/etc/passwd': not a Jupyter notebook (not JSON)" in done.stderr
    assert "root:" not in done.stderr


def test_3_a_notebook_that_fails_to_load_at_run_time_stores_no_contents_in_its_error_tag(store: str) -> None:
    """Past validation (a file swapped after `validate`, a rerun): the run fails, its tag says why, not what."""
    from pipelines.execution.run import run_notebook

    result = run_notebook(Path("/etc/passwd"), {}, "leaks")
    run = MlflowClient(store).get_run(result.run_id)
    error = run.data.tags["labbook.error"]
    assert run.info.status == "FAILED" and error == result.error
    assert error == "not a Jupyter notebook: not JSON" and "root:" not in error


def test_3_error_lines_and_tags_are_bounded_one_line(store: str) -> None:
    done = labbook("rerun", "f" * 5000)  # MLflow's message quotes the id whole
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert len(done.stderr.strip()) <= len("error: ") + 500, len(done.stderr)
    from pipelines.tracking import tracking

    client = MlflowClient(store)
    run_id = tracking.start_run(client, "bounded")
    tracking.finish_run(client, run_id, "ValueError: " + "x" * 6000 + "\nkept at /some/where.ipynb")
    tag = client.get_run(run_id).data.tags["labbook.error"]
    assert len(tag) <= 500 and "\n" not in tag and tag.endswith("kept at /some/where.ipynb")


def _command_lines() -> list[str]:
    """Every process's command line, as `ps` (and so any local user) sees it."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _status(url: str, login: tuple[str, str] | None = None, body: dict | None = None) -> int:
    """The HTTP status of a GET (or a JSON POST with `body`), with basic auth when given a login."""
    headers = {"Content-Type": "application/json"}
    if login:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as refused:
        return refused.code


def _readable_by_nobody(path: Path) -> bool:
    return subprocess.run([*AS_NOBODY, "cat", str(path)], capture_output=True).returncode == 0


@needs_root
def test_4_and_5_labbook_ui_auth_refuses_anonymous_requests_and_keeps_its_credentials_private(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = Path(tempfile.mkdtemp(prefix="lb-ui-", dir="/tmp"))
    home.chmod(0o755)  # other users may walk in, as into a home or project folder: only file modes protect
    try:
        (home / "mlruns").mkdir(mode=0o755)
        store = f"sqlite:///{home / 'mlruns' / 'mlflow.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
        client = MlflowClient(store)
        run_id = client.create_run(client.create_experiment("shared")).info.run_id
        # Left by an older labbook: readable by everyone, fixed when the UI starts.
        for name in ("basic_auth.db", "basic_auth.ini"):
            (home / "mlruns" / name).touch(mode=0o644)
        login = ("labbook-admin", "s3cret-" + uuid.uuid4().hex[:8])

        refused = labbook(
            "ui", "--auth", cwd=home, env={"MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_PASSWORD": ""}
        )
        assert (
            refused.returncode == 2 and refused.stderr.count("\n") == 1 and "MLFLOW_TRACKING_PASSWORD" in refused.stderr
        )
        # A password MLflow's auth app would refuse once started: refused first, in one line.
        short = labbook(
            "ui", "--auth", cwd=home, env={"MLFLOW_TRACKING_USERNAME": "a", "MLFLOW_TRACKING_PASSWORD": "pw12345678"}
        )
        assert short.returncode == 2 and short.stderr.count("\n") == 1 and "at least 12" in short.stderr, short.stderr

        port = _free_port()
        env = {**os.environ, "MLFLOW_TRACKING_USERNAME": login[0], "MLFLOW_TRACKING_PASSWORD": login[1]}
        command = [str(LABBOOK), "ui", "--auth", "--port", str(port)]
        ui = subprocess.Popen(command, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert "MLflow UI (basic auth)" in ui.stdout.readline()
            api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
            deadline = time.monotonic() + 120
            while True:
                try:
                    anonymous = _status(f"{api}/experiments/search?max_results=5")
                    break
                except OSError:
                    assert ui.poll() is None and time.monotonic() < deadline, "the UI did not answer within 120 s"
                    time.sleep(0.5)
            assert anonymous == 401
            assert _status(f"{api}/runs/delete", body={"run_id": run_id}) == 401  # another local user, no login
            assert _status(f"{api}/experiments/search?max_results=5", (login[0], "wrong")) == 401
            assert _status(f"{api}/experiments/search?max_results=5", login) == 200
            assert client.get_run(run_id).info.lifecycle_stage == "active"

            for name in ("basic_auth.db", "basic_auth.ini"):  # the password hash, the users' database URL
                path = home / "mlruns" / name
                assert oct(path.stat().st_mode & 0o777) == oct(0o600), name
                assert not _readable_by_nobody(path), name
            assert (home / "mlruns" / "basic_auth.db").stat().st_size > 0  # MLflow's users' tables are in it
            assert _readable_by_nobody(home / "mlruns" / "mlflow.db")  # the check can tell: runs stay readable
        finally:
            ui.terminate()
            ui.wait(timeout=30)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_4_labbook_server_auth_makes_its_users_database_and_settings_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`labbook server --auth` shares `labbook ui --auth`'s code (started for real above): same files, same modes."""
    from pipelines.tracking.server import server_command

    monkeypatch.chdir(tmp_path)
    users = tmp_path / "elsewhere" / "users.db"
    env = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "pw-long-enough"}
    previous = os.umask(0o000)  # the most permissive umask: the modes must not depend on it
    try:
        command = server_command(
            "sqlite:///runs.db", str(tmp_path / "a"), auth=True, auth_db=f"sqlite:///{users}", environ=env
        )
    finally:
        os.umask(previous)
    assert command.argv[-2:] == ["--app-name", "basic-auth"]
    for path in (users, tmp_path / "mlruns" / "basic_auth.ini"):
        assert oct(path.stat().st_mode & 0o777) == oct(0o600), path
    assert f"database_uri = sqlite:///{users}" in (tmp_path / "mlruns" / "basic_auth.ini").read_text()


# -- passwords in store URLs (found by a probe after issue 22) ------------------------------------


def test_6_a_store_password_in_a_url_is_redacted_and_given_back_only_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipelines.specs.environment import SECRET_URLS_ENV
    from pipelines.tracking import tracking

    monkeypatch.delenv(SECRET_URLS_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for url, shown in [
        ("postgresql://me:pa:ss@db:5432/x", "postgresql://me:***@db:5432/x"),
        ("postgresql://db/x?sslmode=require&password=pw", "postgresql://db/x?sslmode=require&password=***"),
        ("http://host:5000/?token=abc#x", "http://host:5000/?token=***#x"),
        ("postgresql://:pw@db/x?user=me", "postgresql://:***@db/x?user=me"),  # no user name: libpq's `user=`
        ("postgresql://me:pass word@db/x", "postgresql://me:***@db/x"),  # a space in the password
    ]:
        assert tracking.notebook_parameter(url) == shown
        assert tracking.reveal(shown) == url  # from LABBOOK_SECRET_URLS, which kernels inherit
    assert tracking.notebook_parameter("what?token=5 means") == "what?token=5 means"  # text, not a URL
    assert tracking.notebook_parameter("sqlite:///mlruns/mlflow.db") == "sqlite:///mlruns/mlflow.db"
    with pytest.raises(ValueError, match=r"^optuna_storage: postgresql://other:\*\*\*@db/x has its password redacted"):
        tracking.reveal("postgresql://other:***@db/x", "optuna_storage")


@pytest.mark.parametrize("warm", ["0", "1"])  # a kernel started cold for its trial, or warmed before it
def test_6_database_passwords_reach_no_notebook_html_log_or_terminal_and_the_trial_still_runs(
    tmp_path: Path,
    database: Callable[[str], str],  # noqa: F811 - the fixture imported above
    warm: str,
) -> None:
    """The tracking store's and the Optuna storage's passwords (PostgreSQL trusts 127.0.0.1, so any
    password connects): the trial's kernel logs, prunes and finishes, and no file under the
    working folder (outputs, artifacts, logs) nor the terminal holds either password."""
    tracking_url = database("mlflow").replace("postgresql://postgres@", "postgresql://postgres:TRACKSECRET1@", 1)
    storage_url = database("optuna").replace("postgresql://postgres@", "postgresql://postgres:OPTUNASECRET2@", 1)
    env = {"MLFLOW_TRACKING_URI": tracking_url, "LABBOOK_WARM_KERNELS": warm}
    command = [
        str(LABBOOK), "tune", str(PROJECT_ROOT / "pipelines" / "regression_tune.yaml"), "--n-trials", "2",
        "--workers", "2", "--storage", storage_url, "--set", "max_epochs=2", "--set", "n_samples=256", "--no-report",
        "--no-register",
    ]  # fmt: skip
    tune = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen: list[str] = []  # every local user reads command lines (ps): the second worker's too
    while tune.poll() is None:
        seen += _command_lines()
        time.sleep(0.2)
    stdout, stderr = tune.communicate()
    done = subprocess.CompletedProcess(command, tune.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-2000:]
    assert any(" worker " in line for line in seen), seen
    # The user put one in `labbook tune`'s own command line; no process labbook started shows either.
    started = [line for line in seen if "SECRET" in line and " tune " not in line]
    assert started == [], started
    for secret in ("TRACKSECRET1", "OPTUNASECRET2"):
        assert secret not in done.stdout + done.stderr
        leaked = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert leaked == [], (secret, leaked)
    client = MlflowClient(tracking_url)
    trials = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`labbook.trial_number` != ''"
    )
    assert len(trials) == 2 and all(t.info.status == "FINISHED" and "val_loss" in t.data.metrics for t in trials)
    executed = next(tmp_path.rglob("train.ipynb"))
    parameters = nbformat.read(executed, as_version=4).metadata.papermill.parameters
    assert parameters["tracking_uri"].startswith("postgresql://postgres:***@")
    assert parameters["optuna_storage"].startswith("postgresql://postgres:***@")


def test_6_a_slurm_jobs_script_attached_to_its_run_holds_no_password(tmp_path: Path) -> None:
    from pipelines.execution.script import notebook_script
    from pipelines.specs.spec import load_spec

    spec = load_spec(SPECS / "regression_mlp.yaml")
    url = "postgresql://postgres:SCRIPTSECRET3@127.0.0.1:5432/x"
    script = tmp_path / "train.py"
    notebook_script(spec, SPECS / "regression_mlp.yaml", script, str(tmp_path), extra={"tracking_uri": url})
    text = script.read_text()
    assert "SCRIPTSECRET3" not in text and "postgresql://postgres:***@127.0.0.1:5432/x" in text
