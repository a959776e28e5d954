"""How labbook's costs grow with the work: trials in a study, runs in a store; SQLite and PostgreSQL.

Measured side by side in one run, the two backends interleaved step by step (both see the same
machine load), medians over repeats:

- per-trial overhead of a study at trial 1, 100 and 1,000 (the trials before written in bulk as
  Optuna's and MLflow's own rows, then a few real trials timed from there): labbook's own trial loop
  (`tune._Worker.objective` through Optuna's `optimize`, `run_training`'s run creation with its
  tags and params, the progress line) with the notebook replaced by what the train notebook's
  kernel does to the stores (params, a pruning callback rebuilt from the storage, one
  `log_batch` + `report` + `should_prune` per epoch, the executed notebook and HTML attached):
  no training, so every second is overhead;
- `labbook compare --study S --metric val_r2 --top 10`, and the same ranking of every run into a
  CSV file (the real CLI, a fresh process) on 1,000 and 10,000 runs, made in bulk as rows through
  MLflow's own table models;
- the study report notebook (`notebooks/report.ipynb`, papermill) on 1,000 and 10,000 trials;
- `labbook ui`'s first page load on 1,000 and 10,000 runs in headless Chromium (time from
  navigation until the study's row is drawn), if /usr/bin/chromium is installed.

Run: `make bench-growth` (or `.venv/bin/python bench/growth.py [--trials 1 100 1000] [--window 5]
[--runs 1000 10000] [--repeats 3] [--only trials compare report ui]`).
Writes bench/growth.json and bench/growth.md. PostgreSQL:
`LABBOOK_BENCH_POSTGRES` (default postgresql://postgres@127.0.0.1:5432, trust auth); fresh
databases are created and dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.pop("LABBOOK_KERNEL_SERVER", None)  # every command and kernel in its own process here

import nbformat  # noqa: E402
import optuna  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from rich.console import Console  # noqa: E402

from pipelines.execution import notebook  # noqa: E402
from pipelines.nb import in_notebook  # noqa: E402
from pipelines.specs.spec import hyperparameters, load_spec  # noqa: E402
from pipelines.specs.tune_spec import PrunerSpec  # noqa: E402
from pipelines.study import tune  # noqa: E402
from pipelines.tracking import tracking  # noqa: E402
from pipelines.tracking.tags import Tag  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SPEC = BENCH / "trial.yaml"
LABBOOK = Path(sys.executable).with_name("labbook")
POSTGRES = os.environ.get("LABBOOK_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
EPOCHS = 8  # per fake trial: the 8-epoch bench trial's store traffic
warnings.filterwarnings("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)


def say(text: str) -> None:
    print(text, flush=True)


def stats(values: list[float]) -> dict[str, Any]:
    return {"min": min(values), "median": statistics.median(values), "repeats": len(values), "values": values}


def load_now() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores"


# --- stores ---------------------------------------------------------------------------------------


@dataclass
class Store:
    """One backend's fresh MLflow store and Optuna storage."""

    backend: str
    mlflow_uri: str
    optuna_url: str
    folder: Path  # where artifacts and notebook outputs go (the working directory of its commands)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """This store as the process's tracking store (`MLFLOW_TRACKING_URI`) and working directory."""
        before, cwd = os.environ.get("MLFLOW_TRACKING_URI"), Path.cwd()
        os.environ["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        os.chdir(self.folder)
        try:
            yield
        finally:
            os.chdir(cwd)
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before


@contextlib.contextmanager
def stores(
    root: Path, backends: tuple[str, ...], label: str, copies: int = 1
) -> Iterator[dict[tuple[str, int], Store]]:
    """`copies` fresh stores per backend, by (backend, copy): SQLite files under `root`, PostgreSQL
    databases (dropped after)."""
    made: list[str] = []
    admin = None
    found: dict[tuple[str, int], Store] = {}
    try:
        for backend in backends:
            for copy in range(copies):
                folder = root / f"{label}-{backend}-{copy}"
                (folder / "mlruns").mkdir(parents=True)
                if backend == "sqlite":
                    found[backend, copy] = Store(
                        backend,
                        f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}",
                        f"sqlite:///{folder / 'mlruns' / 'optuna.db'}",
                        folder,
                    )
                    continue
                import psycopg

                admin = admin or psycopg.connect(f"{POSTGRES}/postgres", connect_timeout=5, autocommit=True)
                names = [f"labbook_bench_{role}_{uuid.uuid4().hex[:8]}" for role in ("mlflow", "optuna")]
                for name in names:
                    admin.execute(f'CREATE DATABASE "{name}"')
                    made.append(name)
                base = POSTGRES.replace("postgresql://", "postgresql+psycopg://", 1)
                found[backend, copy] = Store(backend, f"{base}/{names[0]}", f"{base}/{names[1]}", folder)
        yield found
    finally:
        if admin is not None:
            for name in made:
                with contextlib.suppress(Exception):
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()


# --- 1. per-trial overhead ------------------------------------------------------------------------


def _value(params: dict[str, Any], epoch: int) -> float:
    """A made-up learning curve with an optimum at lr 1e-3: something for TPE and the pruner to read."""
    best = 0.98 - 0.05 * abs(math.log10(params["lr"]) + 3) - 0.01 * abs(math.log10(params["weight_decay"]) + 4)
    return best * (1 - 0.5 ** (epoch + 1))


def kernel_side(
    nb_path: Path,
    output_dir: Path,
    parameters: dict[str, Any],
    cwd: Path | None = None,
    progress_bar: bool = True,
    kernels: Any = None,
    render: bool = True,
) -> notebook.ExecutedNotebook:
    """In place of `notebook.execute`: what the train notebook's kernel does to the stores, no training.

    The logger's params (`in_notebook.mlflow_logger` logs them the same way), the pruning callback
    rebuilt from the shared storage (`in_notebook.pruning_callback`), one `log_batch` and one
    `report` + `should_prune` per epoch, then an executed notebook and its HTML for the driver to attach
    (with `render=False`, as `notebook.execute`, the HTML is left to the driver's run closer).
    """
    started = time.perf_counter()
    client = tracking.client(parameters["tracking_uri"])
    run_id = parameters["run_id"]
    tracking.log_params(client, run_id, hyperparameters(parameters), tags={Tag.PYTHON_EXECUTABLE: sys.executable})
    callback = in_notebook.pruning_callback(parameters)
    trial = callback._trial  # the Trial Optuna's callback reports to (its own attribute)
    error = None
    for epoch in range(EPOCHS):
        value = _value(parameters, epoch)
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[
                Metric("val_r2", value, now, epoch),
                Metric("train_loss", 1 - value, now, epoch),
                Metric("epoch", epoch, now, epoch),
            ],
        )
        trial.report(value, epoch)
        if trial.should_prune():
            error = f"TrialPruned: Trial was pruned at epoch {epoch}."
            break
    output_dir.mkdir(parents=True, exist_ok=True)
    ipynb = output_dir / nb_path.name
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"val_r2 = {value}")]
    nbformat.write(nb, ipynb)
    html = notebook.render_html(ipynb) if render else None
    KERNEL_SECONDS.append(time.perf_counter() - started)
    return notebook.ExecutedNotebook(ipynb=ipynb, html=html, error=error)


KERNEL_SECONDS: list[float] = []


def _spec(pruner: PrunerSpec) -> Any:
    spec = load_spec(SPEC)
    return spec.model_copy(update={"tune": spec.tune.model_copy(update={"pruner": pruner})})


def per_trial(
    root: Path, backends: tuple[str, ...], points: list[int], window: int, pruner: PrunerSpec
) -> dict[str, Any]:
    """Trials number `point`..`point + window - 1` of a study, for each point and backend, interleaved.

    The trials before `point` are written in bulk (the rows `tell` and the notebook leave behind:
    `bulk_trials`, `bulk_runs`), so that trial 1,000 costs what it costs without running 999 first.
    """
    original = notebook.execute
    notebook.execute = kernel_side  # run.run_notebook calls notebook.execute at call time
    workers: dict[tuple[str, int], tuple[Store, Any, optuna.Study, str]] = {}
    seconds: dict[str, list[float]] = {}
    kernel: dict[str, list[float]] = {}
    spec = _spec(pruner)
    try:
        with stores(root, backends, "trials", copies=len(points)) as found:
            for (backend, copy), store in found.items():
                point = points[copy]
                with store.active():
                    handle = tune.open_study(spec, SPEC, n_trials=point + window, storage=store.optuna_url)
                    _, parent = tune.create(handle)
                    if point > 1:
                        _, _, ids = bulk_runs(store, point - 1, handle.name, spec.experiment_name, parent)
                        bulk_trials(store, handle.name, ids, parent)
                    worker = tune._Worker(handle, parent, Console(file=open(os.devnull, "w")))  # noqa: SIM115
                    workers[backend, point] = (store, worker, handle.load(), parent)
            for r in range(window):
                for point in points:
                    for backend in backends:
                        store, worker, study, _ = workers[backend, point]
                        with store.active():
                            KERNEL_SECONDS.clear()
                            start = time.perf_counter()
                            study.optimize(
                                worker.objective,
                                n_trials=1,
                                catch=(tune.TrialFailed,),
                                callbacks=[worker.after_trial],
                                gc_after_trial=False,
                            )
                            seconds.setdefault(f"{backend}_{point}", []).append(time.perf_counter() - start)
                            kernel.setdefault(f"{backend}_{point}", []).append(sum(KERNEL_SECONDS))
                say(
                    f"  round {r + 1}/{window}: "
                    + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in seconds.items())
                    + f"; {load_now()}"
                )
            for store, _worker, study, parent in workers.values():
                with store.active():
                    numbers = len(study.get_trials(deepcopy=False))
                    assert numbers >= window, numbers
                    tracking.finish_run(tracking.client(), parent)
    finally:
        notebook.execute = original
    result: dict[str, Any] = {"points": points, "window": window, "epochs": EPOCHS, "pruner": pruner.model_dump()}
    for backend in backends:
        result[backend] = {
            str(point): {
                "trials": f"{point}-{point + window - 1}",
                "seconds": stats(seconds[f"{backend}_{point}"]),
                "kernel_side_seconds": stats(kernel[f"{backend}_{point}"]),
                "driver_side_seconds": stats(
                    [s - k for s, k in zip(seconds[f"{backend}_{point}"], kernel[f"{backend}_{point}"], strict=True)]
                ),
            }
            for point in points
        }
    return result


# --- bulk runs and trials ---------------------------------------------------------------------------


def bulk_runs(
    store: Store, n: int, study_name: str, experiment: str = "growth", parent: str | None = None
) -> tuple[str, str, list[str]]:
    """`n` finished trial runs of one study under its parent run, written as rows in a few statements.

    Through MLflow's own table models (mlflow.store.tracking.dbmodels), as `create_run` and
    `log_batch` would write them: a run, its tags, params, metric history and latest metrics.
    Returns (experiment id, parent run id, run ids).
    """
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag

    client = tracking.client(store.mlflow_uri)
    experiment_id = tracking.ensure_experiment(client, experiment)
    if parent is None:
        parent = client.create_run(experiment_id, run_name=f"study:{study_name}").info.run_id
        client.set_terminated(parent)
    rng = random.Random(n)
    start = int(time.time() * 1000) - n * 1000
    runs, tags, params, metrics, latest, ids = [], [], [], [], [], []
    artifact_root = client.get_experiment(experiment_id).artifact_location
    for i in range(n):
        run_id = uuid.uuid4().hex
        ids.append(run_id)
        began = start + i * 1000
        runs.append(
            {
                "run_uuid": run_id,
                "name": f"{study_name}-trial-{i}",
                "source_type": "NOTEBOOK",
                "source_name": "notebooks/train.ipynb",
                "entry_point_name": "",
                "user_id": "bench",
                "status": "FINISHED",
                "start_time": began,
                "end_time": began + 900,
                "source_version": "",
                "lifecycle_stage": "active",
                "artifact_uri": f"{artifact_root}/{run_id}/artifacts",
                "experiment_id": int(experiment_id),
            }
        )
        for key, value in {
            "mlflow.runName": f"{study_name}-trial-{i}",
            "mlflow.parentRunId": parent,
            "mlflow.source.name": "notebooks/train.ipynb",
            "mlflow.source.type": "NOTEBOOK",
            Tag.STUDY_NAME: study_name,
            Tag.TRIAL_NUMBER: str(i),
            Tag.TRIAL_STATE: "COMPLETE",
            Tag.SPEC: "bench_trial",
            Tag.SEED: "42",
        }.items():
            tags.append({"key": key, "value": value, "run_uuid": run_id})
        p = {"lr": 10 ** rng.uniform(-4, -2), "weight_decay": 10 ** rng.uniform(-6, -2)}
        for key, value in {**p, "batch_size": 64, "max_epochs": EPOCHS, "hidden_sizes": "[256, 256]"}.items():
            params.append({"key": key, "value": str(value), "run_uuid": run_id})
        for epoch in range(EPOCHS):
            value = _value(p, epoch)
            for key, v in (("val_r2", value), ("train_loss", 1 - value)):
                row = {"key": key, "value": v, "timestamp": began + epoch, "step": epoch, "is_nan": False}
                metrics.append({**row, "run_uuid": run_id})
                if epoch == EPOCHS - 1:
                    latest.append({**row, "run_uuid": run_id})
    engine = client._tracking_client.store.engine
    with engine.begin() as connection:
        for model, rows in ((SqlRun, runs), (SqlTag, tags), (SqlParam, params), (SqlMetric, metrics)):
            connection.execute(model.__table__.insert(), rows)
        connection.execute(SqlLatestMetric.__table__.insert(), latest)
    return experiment_id, parent, ids


def bulk_trials(store: Store, study_name: str, run_ids: list[str], parent: str) -> None:
    """A finished study of `len(run_ids)` trials, each pointing at its run, written as rows.

    Through Optuna's own table models (optuna.storages._rdb.models), as `tell` would leave them.
    """
    from optuna.distributions import FloatDistribution, distribution_to_json
    from optuna.storages._rdb import models as m

    storage = optuna.storages.RDBStorage(store.optuna_url)
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize", load_if_exists=True)
    study.set_user_attr("metric", "val_r2")
    study.set_user_attr("mlflow_parent_run_id", parent)
    dists = {"lr": FloatDistribution(1e-4, 1e-2, log=True), "weight_decay": FloatDistribution(1e-6, 1e-2, log=True)}
    rng = random.Random(len(run_ids))
    start = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=len(run_ids))
    with storage.engine.begin() as connection:
        connection.execute(
            m.TrialModel.__table__.insert(),
            [
                {
                    "number": i,
                    "study_id": study._study_id,
                    "state": optuna.trial.TrialState.COMPLETE,
                    "datetime_start": start + timedelta(seconds=i),
                    "datetime_complete": start + timedelta(seconds=i + 0.9),
                }
                for i in range(len(run_ids))
            ],
        )
        found = connection.execute(
            m.TrialModel.__table__.select().where(m.TrialModel.__table__.c.study_id == study._study_id)
        ).fetchall()
        by_number = {row.number: row.trial_id for row in found}
        params, values, steps, attrs = [], [], [], []
        for i, run_id in enumerate(run_ids):
            trial_id = by_number[i]
            p = {name: 10 ** rng.uniform(math.log10(d.low), math.log10(d.high)) for name, d in dists.items()}
            for name, value in p.items():
                params.append(
                    {
                        "trial_id": trial_id,
                        "param_name": name,
                        "param_value": value,
                        "distribution_json": distribution_to_json(dists[name]),
                    }
                )
            values.append(
                {
                    "trial_id": trial_id,
                    "objective": 0,
                    "value": _value(p, EPOCHS - 1),
                    "value_type": m.TrialValueModel.TrialValueType.FINITE,
                }
            )
            for epoch in range(EPOCHS):
                steps.append(
                    {
                        "trial_id": trial_id,
                        "step": epoch,
                        "intermediate_value": _value(p, epoch),
                        "intermediate_value_type": m.TrialIntermediateValueModel.TrialIntermediateValueType.FINITE,
                    }
                )
            attrs.append({"trial_id": trial_id, "key": "mlflow_run_id", "value_json": json.dumps(run_id)})
        connection.execute(m.TrialParamModel.__table__.insert(), params)
        connection.execute(m.TrialValueModel.__table__.insert(), values)
        connection.execute(m.TrialIntermediateValueModel.__table__.insert(), steps)
        connection.execute(m.TrialUserAttributeModel.__table__.insert(), attrs)
    storage.engine.dispose()


# --- 2. compare, 3. report, 4. ui -------------------------------------------------------------------


def compare_seconds(store: Store, study_name: str, top: bool) -> float:
    """Wall seconds of `labbook compare --study S --metric val_r2` as a fresh process: `--top 10` to
    the terminal, or every run ranked into a CSV file (`--format csv --output`)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.mlflow_uri, "COLUMNS": "160"}
    command = [str(LABBOOK), "compare", "--study", study_name, "--metric", "val_r2"]
    command += ["--top", "10"] if top else ["--format", "csv", "--output", str(store.folder / "compare.csv")]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=store.folder, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    expected = "10 runs" if top else "runs written to"
    if done.returncode != 0 or expected not in done.stdout:
        raise RuntimeError(f"labbook compare failed ({done.returncode}): {done.stderr[-1500:]}{done.stdout[-500:]}")
    return seconds


def report_seconds(store: Store, study_name: str, parent: str) -> float:
    """Wall seconds of the study report notebook (papermill, a cold kernel), as `labbook tune` runs it."""
    with store.active():
        start = time.perf_counter()
        executed = notebook.execute(
            ROOT / "notebooks" / "report.ipynb",
            store.folder / "report" / uuid.uuid4().hex[:8],
            {
                "study_name": study_name,
                "storage": store.optuna_url,
                "tracking_uri": store.mlflow_uri,
                "parent_run_id": parent,
            },
            progress_bar=False,
        )
        seconds = time.perf_counter() - start
    if executed.error:
        raise RuntimeError(f"report notebook failed: {executed.error}")
    return seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def ui_server(store: Store) -> Iterator[str]:
    """`labbook ui` on the store, up and answering; its URL."""
    import urllib.request

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.mlflow_uri}
    server = subprocess.Popen(
        [str(LABBOOK), "ui", "--port", str(port)],
        cwd=store.folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/health", timeout=2).close()  # noqa: S310 - our own server
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("labbook ui did not start")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, 15)
        server.wait(timeout=30)


def page_seconds(url: str, experiment_id: str, first_run: str) -> float:
    """Seconds from navigating a fresh headless Chromium to the experiment until `first_run`'s name shows.

    MLflow's UI nests a study's trial runs under its parent run, the newest row: its name is the
    first row of the first page.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-extensions",
        "--no-first-run",
        "--window-size=1600,1000",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        start = time.perf_counter()
        browser.get(f"{url}/#/experiments/{experiment_id}/runs")
        WebDriverWait(browser, 180, poll_frequency=0.05).until(
            expected_conditions.presence_of_element_located((By.XPATH, f"//*[text()='{first_run}']"))
        )
        return time.perf_counter() - start
    finally:
        browser.quit()


def runs_growth(
    root: Path, backends: tuple[str, ...], sizes: list[int], repeats: int, wanted: set[str]
) -> dict[str, Any]:
    """compare, report and ui at each size, backends and sizes interleaved within each repeat."""
    result: dict[str, Any] = {"sizes": sizes, "repeats": repeats}
    with stores(root, backends, "runs") as copies:
        found = {backend: store for (backend, _), store in copies.items()}
        made: dict[tuple[str, int], tuple[str, str, list[str]]] = {}
        for size in sizes:
            for backend, store in found.items():
                started = time.perf_counter()
                made[backend, size] = bulk_runs(store, size, f"s{size}")
                bulk_trials(store, f"s{size}", made[backend, size][2], made[backend, size][1])
                say(f"  {backend}: {size} runs and trials written in {time.perf_counter() - started:.1f}s")
        timings: dict[str, dict[str, list[float]]] = {}
        for r in range(repeats):
            for size in sizes:
                for backend, store in found.items():
                    key = f"{backend}_{size}"
                    timings.setdefault(key, {})
                    if "compare" in wanted:
                        timings[key].setdefault("compare_top", []).append(compare_seconds(store, f"s{size}", True))
                        timings[key].setdefault("compare_all", []).append(compare_seconds(store, f"s{size}", False))
                    if "report" in wanted:
                        parent = made[backend, size][1]
                        timings[key].setdefault("report", []).append(report_seconds(store, f"s{size}", parent))
                    say(
                        f"  repeat {r + 1}/{repeats} {key}: "
                        + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in timings[key].items())
                        + f"; {load_now()}"
                    )
        if "ui" in wanted and Path("/usr/bin/chromium").exists():
            for backend, store in found.items():
                try:
                    with ui_server(store) as url:
                        page_seconds(url, made[backend, sizes[0]][0], f"study:s{sizes[0]}")  # the server's warm-up
                        for _ in range(repeats):
                            for size in sizes:
                                seconds = page_seconds(url, made[backend, size][0], f"study:s{size}")
                                timings.setdefault(f"{backend}_{size}", {}).setdefault("ui", []).append(seconds)
                                say(f"  ui {backend} {size} runs: {seconds:.2f}s")
                except Exception as exc:  # noqa: BLE001 - the other measurements stand; say why this one is missing
                    result[f"ui_error_{backend}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    say(f"  ui {backend}: {result[f'ui_error_{backend}']}")
        for key, values in timings.items():
            result[key] = {k: stats(v) for k, v in values.items()}
    return result


# --- the report ----------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Machine: {results['machine']}; {results['load']}. Backends interleaved step by step; medians.",
        "",
    ]
    trials = results.get("trials")
    if trials:
        points = trials["points"]
        lines += [
            f"**Per-trial overhead** (labbook's trial loop with the kernel's store traffic for {trials['epochs']} "
            f"epochs and no training; pruner {trials['pruner']['name']}; the trials before each point written in "
            f"bulk; median of {trials['window']} trials from each point), s:",
            "",
            "| backend | part | " + " | ".join(f"trial {n:,}" for n in points) + " |",
            "|---|---|" + "---|" * len(points),
        ]
        for backend in results["backends"]:
            for part, label in (
                ("seconds", "whole trial"),
                ("driver_side_seconds", "driver (ask, run, tell, progress)"),
                ("kernel_side_seconds", "kernel side (params, pruning, metrics, notebook)"),
            ):
                cells = [f"{trials[backend][str(n)][part]['median']:.3f}" for n in points]
                lines.append(f"| {backend} | {label} | " + " | ".join(cells) + " |")
        lines.append("")
    runs = results.get("runs")
    if runs:
        lines += [
            "**Commands on a store of N runs** (one study of N trial runs; fresh process each), s, median:",
            "",
            "| backend | what | " + " | ".join(f"{n:,} runs" for n in runs["sizes"]) + " | ratio |",
            "|---|---|" + "---|" * len(runs["sizes"]) + "---|",
        ]
        for backend in results["backends"]:
            for what, label in (
                ("compare_top", "`labbook compare --study S --metric val_r2 --top 10`"),
                ("compare_all", "`labbook compare --study S --metric val_r2 --format csv --output F` (every run)"),
                ("report", "report notebook (cold kernel)"),
                ("ui", "`labbook ui` first page, headless Chromium"),
            ):
                cells = [runs.get(f"{backend}_{n}", {}).get(what) for n in runs["sizes"]]
                if not all(cells):
                    continue
                ratio = cells[-1]["median"] / cells[0]["median"]
                lines.append(
                    f"| {backend} | {label} | "
                    + " | ".join(f"{c['median']:.2f}" for c in cells)
                    + f" | {ratio:.2f}× for {runs['sizes'][-1] // runs['sizes'][0]}× runs |"
                )
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[1, 100, 1000], help="trial numbers to measure at")
    parser.add_argument("--window", type=int, default=5, help="trials measured from each point")
    parser.add_argument("--runs", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--only", nargs="*", default=None, help="trials compare report ui (default: all)")
    parser.add_argument(
        "--pruner", default='{"name": "median", "n_startup_trials": 3, "n_warmup_steps": 3}', help="as JSON"
    )
    args = parser.parse_args()
    wanted = set(args.only or ["trials", "compare", "report", "ui"])
    backends = tuple(args.backends)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load": f"at start: {load_now()}",
        "backends": list(backends),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    root = Path(tempfile.mkdtemp(prefix="labbook-growth-"))
    try:
        if "trials" in wanted:
            say(f"per-trial overhead, {args.trials} trials ...")
            pruner = PrunerSpec(**json.loads(args.pruner))
            results["trials"] = per_trial(root, backends, sorted(args.trials), args.window, pruner)
        if wanted & {"compare", "report", "ui"}:
            say(f"commands on {args.runs} runs ...")
            results["runs"] = runs_growth(root, backends, sorted(args.runs), args.repeats, wanted)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["load"] += f"; at end: {load_now()}"
    out = BENCH / "growth.json"
    if out.exists() and args.only:  # a partial run keeps the other parts
        results = {**json.loads(out.read_text()), **results}
    out.write_text(json.dumps(results, indent=2) + "\n")
    (BENCH / "growth.md").write_text(markdown(results))
    say(markdown(results))
    say(f"wrote {out}")


if __name__ == "__main__":
    main()
