"""Schedules: a real APScheduler SQLite job store, the real `labbook scheduler` service, real runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from croniter import croniter

from pipelines.schedule import schedule
from pipelines.tracking import tracking
from tests.conftest import LABBOOK, labbook

STEP = "tests/notebooks/step.ipynb"


def pipeline(tmp_path: Path, name: str, sleep: float = 0.0) -> Path:
    path = tmp_path / f"{name}.yaml"
    step = {"name": "work", "kind": "notebook", "notebook": STEP, "parameters": {"sleep": sleep}}
    path.write_text(yaml.safe_dump({"name": name, "report": False, "steps": [step]}))
    return path


def pipeline_runs(uri: str, name: str) -> list:
    client = tracking.client(uri)  # under the store's lock: the scheduler's run may be creating it
    found = client.get_experiment_by_name(name)
    if found is None:
        return []
    return client.search_runs(
        [found.experiment_id], "tags.`labbook.kind` = 'pipeline'", order_by=["attributes.start_time ASC"]
    )


def start_scheduler(tmp_path: Path, log_name: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / log_name
    process = subprocess.Popen(
        [str(LABBOOK), "scheduler"], cwd=tmp_path, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ
    )
    return process, log


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=90)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def rewind(schedule_id: str, seconds: float) -> None:
    """As if the scheduler had been down: move the stored next fire time `seconds` into the past."""
    store = schedule.open_store()
    job = store.lookup_job(schedule_id)
    job._modify(next_run_time=datetime.now().astimezone() - timedelta(seconds=seconds))  # no public setter offline
    store.update_job(job)
    store.shutdown()


def test_add_list_export_remove(store: str, tmp_path: Path) -> None:
    spec = pipeline(tmp_path, "nightly")
    done = labbook("schedule", "add", str(spec), "--cron", "0 3 * * 0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # Standard cron meaning: day 0 is Sunday (APScheduler's own numbering would say Monday).
    [added] = schedule.list_schedules()
    assert added.id == "nightly" and added.next_fire.weekday() == 6 and added.next_fire.hour == 3

    done = labbook("schedule", "list", cwd=tmp_path, env={"COLUMNS": "200"})
    assert done.returncode == 0 and "nightly" in done.stdout and "never" in done.stdout

    crontab = labbook("schedule", "export", "--format", "crontab", cwd=tmp_path).stdout
    [entry] = [line for line in crontab.splitlines() if line and not line.startswith("#")]
    fields = entry.split()
    assert croniter.is_valid(" ".join(fields[:5])) and " ".join(fields[:5]) == "0 3 * * 0"
    command = " ".join(fields[5:])
    assert f"labbook run {spec.resolve()} --trigger scheduled --schedule-id nightly" in command
    assert command.startswith(f"cd {tmp_path} && ")

    units = labbook("schedule", "export", "--format", "systemd", cwd=tmp_path).stdout
    assert "OnCalendar=Sun *-*-* 03:00:00" in units and "Persistent=true" in units
    assert f"ExecStart={LABBOOK} run {spec.resolve()}" in units
    if shutil.which("systemd-analyze"):
        checked = subprocess.run(["systemd-analyze", "calendar", "Sun *-*-* 03:00:00"], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr

    done = labbook("schedule", "add", str(spec), "--cron", "0 3 * * 0", cwd=tmp_path)
    assert done.returncode == 2 and "exists already" in done.stderr
    assert labbook("schedule", "remove", "nightly", cwd=tmp_path).returncode == 0
    assert schedule.list_schedules() == []
    done = labbook("schedule", "remove", "nightly", cwd=tmp_path)
    assert done.returncode == 2 and "no such schedule" in done.stderr


@pytest.mark.parametrize("cron", ["0 3 * *", "61 * * * *", "every day", "0 3 * * * *"])
def test_an_invalid_cron_expression_exits_2_and_stores_nothing(store: str, tmp_path: Path, cron: str) -> None:
    done = labbook("schedule", "add", str(pipeline(tmp_path, "p")), "--cron", cron, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--cron:" in done.stderr and "not a valid cron" in done.stderr
    assert not (tmp_path / "mlruns" / "scheduler.db").exists()


def test_exported_cron_days_match_what_the_scheduler_fires() -> None:
    assert schedule.on_calendar("0 9 * * 1-5") == ["Mon..Fri *-*-* 09:00:00"]
    assert schedule.on_calendar("*/15 * * * *") == ["*-*-* *:00/15:00"]
    # cron ORs day-of-month and day-of-week; systemd ANDs them, so this takes two timers.
    assert schedule.on_calendar("0 0 1,15 * 0") == ["*-*-01,15 00:00:00", "Sun *-*-* 00:00:00"]


def test_scheduler_fires_tagged_runs_never_overlapping_and_survives_a_restart(store: str, tmp_path: Path) -> None:
    spec = pipeline(tmp_path, "busy", sleep=4)  # a run takes longer than the 2 s between fires
    assert labbook("schedule", "add", str(spec), "--every", "2", cwd=tmp_path).returncode == 0
    process, log = start_scheduler(tmp_path, "scheduler-1.log")
    try:
        wait_for(lambda: sum(r.info.status == "FINISHED" for r in pipeline_runs(store, "busy")) >= 2, 120, "two runs")
    finally:
        code = stop(process)
    output = log.read_text()
    assert code == 0, output
    assert "skipped" in output and "scheduler stopped" in output
    found = pipeline_runs(store, "busy")
    assert all(r.data.tags["labbook.trigger"] == "scheduled" for r in found)
    assert all(r.data.tags["labbook.schedule_id"] == "busy" for r in found)
    assert all(r.info.status != "RUNNING" for r in found)  # a run cut by the shutdown was closed
    spans = sorted((r.info.start_time, r.info.end_time) for r in found)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False)), spans

    # A new scheduler process finds the schedule in the store and fires it again.
    assert [s.id for s in schedule.list_schedules()] == ["busy"]
    before = len(found)
    process, log = start_scheduler(tmp_path, "scheduler-2.log")
    try:
        wait_for(lambda: len(pipeline_runs(store, "busy")) > before, 90, "a run after the restart")
    finally:
        assert stop(process) == 0, log.read_text()
    listed = labbook("schedule", "list", cwd=tmp_path, env={"COLUMNS": "250"}).stdout
    assert pipeline_runs(store, "busy")[-1].info.run_id in listed


def test_missed_fire_times_coalesce_into_one_run_within_the_grace_time(store: str, tmp_path: Path) -> None:
    for name, every, grace in (("recent", "120", "600"), ("stale", "3600", "60")):
        spec = pipeline(tmp_path, name)
        assert labbook("schedule", "add", str(spec), "--every", every, "--grace", grace, cwd=tmp_path).returncode == 0
    rewind("recent", 300)  # fire times 300, 180 and 60 s ago were missed: one run, now
    rewind("stale", 600)  # missed 10 minutes ago, grace 60 s: skipped, not run late
    process, log = start_scheduler(tmp_path, "scheduler.log")
    try:
        wait_for(lambda: any(r.info.status == "FINISHED" for r in pipeline_runs(store, "recent")), 90, "the catch-up")
        time.sleep(3)
    finally:
        assert stop(process) == 0, log.read_text()
    assert len(pipeline_runs(store, "recent")) == 1
    assert pipeline_runs(store, "stale") == []
    assert "schedule stale: fire time" in log.read_text() and "missed by more than its grace time" in log.read_text()
    stale = next(s for s in schedule.list_schedules() if s.id == "stale")
    assert stale.next_fire > datetime.now().astimezone()
