"""Scheduled pipeline runs: APScheduler with its SQLAlchemy job store, beside the runs.

The schedules live in `sqlite:///mlruns/scheduler.db` by default (or `LABBOOK_SCHEDULER_DB`,
e.g. PostgreSQL for a team), so they survive restarts and `schedule add/list/remove` work
while no scheduler runs. `labbook scheduler` is the foreground service that fires them:

- each fire runs `labbook run SPEC --trigger scheduled --schedule-id ID` as a child process,
  so a crashing pipeline never takes the scheduler down, and its output goes to a log file;
- a pipeline still running when its next fire comes is not started again (APScheduler's
  `max_instances=1`, plus one lock per pipeline across schedules);
- fire times missed while the scheduler was down are coalesced into one run, if the latest
  is within the schedule's grace time (`coalesce`, `misfire_grace_time`);
- SIGTERM / Ctrl-C stop firing, forward SIGTERM to running pipelines (which close their
  MLflow runs as interrupted, to be continued with `--from`) and exit 0.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger
from croniter import croniter

from pipelines.specs.spec_io import SpecError
from pipelines.tracking import tracking
from pipelines.tracking.tags import Tag

STORE_ENV = "LABBOOK_SCHEDULER_DB"
TABLE = "labbook_schedules"
DEFAULT_GRACE_SECONDS = 3600
log = logging.getLogger("labbook.scheduler")


def store_url(explicit: str | None = None) -> str:
    """`--store`, else `LABBOOK_SCHEDULER_DB`, else SQLite under `./mlruns/`."""
    return explicit or os.environ.get(STORE_ENV) or f"sqlite:///{tracking.default_store() / 'scheduler.db'}"


class CronTrigger(BaseTrigger):
    """A crontab expression with standard cron meaning, computed by croniter.

    Written here (not APScheduler's `CronTrigger.from_crontab`) because APScheduler 3 reads a
    numeric day of week with 0 = Monday, so `0 3 * * 0` would fire on Mondays; croniter follows
    crontab(5) (0 and 7 = Sunday, day-of-month OR day-of-week), the same rules `export` prints for.
    """

    def __init__(self, expression: str, timezone: tzinfo) -> None:
        self.expression = check_cron(expression)
        self.timezone = timezone

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime:
        base = previous_fire_time or now - timedelta(microseconds=1)
        return croniter(self.expression, base.astimezone(self.timezone)).get_next(datetime)

    def __str__(self) -> str:
        return f"cron {self.expression!r}"


def check_cron(expression: str) -> str:
    """The expression, normalized, or a one-line error naming `--cron` and the expected form."""
    normalized = " ".join(expression.split())
    if len(normalized.split()) != 5 or not croniter.is_valid(normalized):
        raise SpecError(
            f"--cron: {expression!r} is not a valid cron expression; expected 5 fields "
            "'minute hour day-of-month month day-of-week', e.g. '0 3 * * *'"
        )
    return normalized


@dataclass(frozen=True)
class Schedule:
    id: str
    spec: str
    cwd: str
    trigger: str  # "cron '0 3 * * *'" or "every 60 s"
    next_fire: datetime | None
    grace_seconds: int | None
    cron: str | None = None
    every_seconds: float | None = None


def _scheduler(url: str) -> BackgroundScheduler:
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore

    return BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=url, tablename=TABLE)},
        job_defaults={"coalesce": True, "max_instances": 1},
    )


def open_store(url: str | None = None) -> Any:
    """The job store itself, for add/list/remove while a scheduler may be running elsewhere.

    A scheduler is never started for these: even paused, its thread could fire or skip due jobs.
    """
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore

    store = SQLAlchemyJobStore(url=store_url(url), tablename=TABLE)
    store.start(BackgroundScheduler(), "default")  # the (never started) owner that rebuilds jobs
    return store


def _describe(job: Any) -> Schedule:
    spec, schedule_id, cwd = job.args
    trigger = job.trigger
    cron = trigger.expression if isinstance(trigger, CronTrigger) else None
    every = trigger.interval.total_seconds() if isinstance(trigger, IntervalTrigger) else None
    shown = str(trigger) if cron else f"every {every:g} s"
    return Schedule(schedule_id, spec, cwd, shown, job.next_run_time, job.misfire_grace_time, cron, every)


def add(
    spec: Path,
    cron: str | None = None,
    every: float | None = None,
    schedule_id: str | None = None,
    grace_seconds: int = DEFAULT_GRACE_SECONDS,
    store: str | None = None,
) -> Schedule:
    """Register a schedule for a (validated) pipeline spec; it fires once a scheduler runs."""
    from tzlocal import get_localzone

    if (cron is None) == (every is None):
        raise SpecError("--cron/--every: give exactly one of them")
    trigger: BaseTrigger = CronTrigger(cron, get_localzone()) if cron else IntervalTrigger(seconds=every)
    spec_path = spec.resolve()
    name = schedule_id or re.sub(r"[^A-Za-z0-9_.-]+", "-", spec_path.stem)
    store = open_store(store)
    try:
        if store.lookup_job(name) is not None:
            raise SpecError(f"--id: a schedule {name!r} exists already; remove it or give another --id")
        job = Job(
            BackgroundScheduler(),  # never started: it only lends the job its time zone
            id=name,
            name=name,
            func=fire,
            trigger=trigger,
            executor="default",
            args=[str(spec_path), name, str(Path.cwd())],
            kwargs={},
            misfire_grace_time=grace_seconds,
            coalesce=True,
            max_instances=1,
            next_run_time=trigger.get_next_fire_time(None, datetime.now().astimezone()),
        )
        store.add_job(job)
        return _describe(job)
    finally:
        store.shutdown()


def list_schedules(store: str | None = None) -> list[Schedule]:
    opened = open_store(store)
    try:
        return [_describe(job) for job in opened.get_all_jobs()]
    finally:
        opened.shutdown()


def remove(schedule_id: str, store: str | None = None) -> None:
    from apscheduler.jobstores.base import JobLookupError

    opened = open_store(store)
    try:
        opened.remove_job(schedule_id)
    except JobLookupError:
        known = ", ".join(j.id for j in opened.get_all_jobs()) or "none"
        raise SpecError(f"schedule id {schedule_id!r}: no such schedule; schedules: {known}") from None
    finally:
        opened.shutdown()


def last_runs(schedule_ids: list[str]) -> dict[str, tuple[datetime, str, str]]:
    """Each schedule's latest pipeline run in MLflow: (start time, status, run id)."""
    client = tracking.client()
    experiments = [e.experiment_id for e in client.search_experiments()]
    found: dict[str, tuple[datetime, str, str]] = {}
    for schedule_id in schedule_ids:
        runs = client.search_runs(
            experiments,
            filter_string=f"tags.`{Tag.SCHEDULE_ID}` = {tracking.literal(schedule_id)}",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            run = runs[0]
            start = datetime.fromtimestamp(run.info.start_time / 1000).astimezone()
            found[schedule_id] = (start, run.info.status, run.info.run_id)
    return found


# --- the service ------------------------------------------------------------------------------

_children: dict[int, subprocess.Popen] = {}
_children_lock = threading.Lock()
_pipeline_locks: dict[str, threading.Lock] = {}
_stopping = threading.Event()


def fire(spec: str, schedule_id: str, cwd: str) -> int:
    """One scheduled run: `labbook run SPEC` as a child process, its output in a log file."""
    if _stopping.is_set():
        return -1
    lock = _pipeline_locks.setdefault(spec, threading.Lock())
    if not lock.acquire(blocking=False):
        log.warning("schedule %s: skipped, pipeline %s is still running", schedule_id, spec)
        return -1
    try:
        logs = Path(cwd) / "mlruns" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{schedule_id}-{datetime.now():%Y%m%d-%H%M%S}.log"
        command = [
            str(Path(sys.executable).with_name("labbook")),
            "run",
            spec,
            "--trigger",
            "scheduled",
            "--schedule-id",
            schedule_id,
        ]
        log.info("schedule %s: running %s (log: %s)", schedule_id, spec, log_path)
        with open(log_path, "w") as output:
            child = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
            with _children_lock:
                _children[child.pid] = child
            code = child.wait()
            with _children_lock:
                _children.pop(child.pid, None)
        state = {0: "finished", 143: "interrupted"}.get(code, f"failed (exit {code})")
        log.info("schedule %s: pipeline %s %s", schedule_id, spec, state)
        return code
    finally:
        lock.release()


def serve(store: str | None = None, poll_seconds: float = 1.0) -> int:
    """Fire due schedules until SIGTERM or Ctrl-C; then stop the running pipelines and return 0."""
    from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED

    url = store_url(store)
    scheduler = _scheduler(url)

    def on_event(event: Any) -> None:
        if event.code == EVENT_JOB_MAX_INSTANCES:
            log.warning("schedule %s: skipped, its previous run is still going", event.job_id)
        else:
            log.warning(
                "schedule %s: fire time %s missed by more than its grace time", event.job_id, event.scheduled_run_time
            )

    scheduler.add_listener(on_event, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    scheduler.start()
    jobs = scheduler.get_jobs()
    log.info("scheduler on %s: %d schedule(s)", tracking.redact(url), len(jobs))
    for job in jobs:
        log.info("schedule %s: %s, next fire %s", job.id, _describe(job).trigger, job.next_run_time)
    while not stop.wait(poll_seconds):
        scheduler.wakeup()  # see schedules added or removed by other processes since the last look
    log.info("stopping: no new runs; stopping %d running pipeline(s)", len(_children))
    _stopping.set()
    scheduler.pause()
    with _children_lock:
        running = list(_children.values())
    for child in running:
        child.send_signal(signal.SIGTERM)  # labbook run closes its MLflow runs as interrupted
    deadline = time.monotonic() + 60
    for child in running:
        try:
            child.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    scheduler.shutdown(wait=True)
    log.info("scheduler stopped")
    return 0


# --- export for the system's scheduler ------------------------------------------------------


def _command(s: Schedule) -> str:
    labbook = Path(sys.executable).with_name("labbook")
    return f"{labbook} run {s.spec} --trigger scheduled --schedule-id {s.id}"


def crontab(schedules: list[Schedule]) -> str:
    """crontab(5) lines that run the same pipelines with `labbook run`."""
    lines = ["# labbook schedules: install with `crontab -e` (or append to your crontab)"]
    for s in schedules:
        when = s.cron or _every_as_cron(s.every_seconds)
        if when is None:
            lines.append(f"# {s.id}: every {s.every_seconds:g} s cannot be written as a crontab entry")
            continue
        logs = Path(s.cwd) / "mlruns" / "logs" / f"{s.id}.log"
        lines.append(f"{when} cd {s.cwd} && {_command(s)} >> {logs} 2>&1")
    return "\n".join(lines) + "\n"


def _every_as_cron(seconds: float | None) -> str | None:
    if not seconds or seconds % 60:
        return None
    minutes = int(seconds // 60)
    if minutes < 60 and 60 % minutes == 0:
        return f"*/{minutes} * * * *"
    if minutes % 60 == 0 and 24 % (minutes // 60) == 0:
        return f"0 */{minutes // 60} * * *"
    return None


_DAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def _calendar_field(field: str, width: int = 2) -> str:
    """One cron field in systemd.time(7) syntax: `*/15` → `00/15`, `1-5` → `01..05`."""
    if field == "*":
        return "*"
    parts = []
    for part in field.split(","):
        value, _, step = part.partition("/")
        start, _, end = value.partition("-")
        start = "0" if start == "*" else start
        text = start.zfill(width) + (f"..{end.zfill(width)}" if end else "")
        parts.append(text + (f"/{step}" if step else ""))
    return ",".join(parts)


def _day_names(field: str) -> str:
    parts = []
    for part in field.split(","):
        start, _, end = part.partition("-")
        name = _DAYS[int(start)] if start.isdigit() else start.title()
        if end:
            name += ".." + (_DAYS[int(end)] if end.isdigit() else end.title())
        parts.append(name)
    return ",".join(parts)


def on_calendar(expression: str) -> list[str]:
    """A cron expression as systemd `OnCalendar=` values.

    Written by hand: no kept library converts between the two. cron fires when day-of-month OR
    day-of-week matches (both restricted); systemd ANDs them, so that case becomes two values.
    """
    minute, hour, dom, month, dow = expression.split()
    time_part = f"{_calendar_field(hour)}:{_calendar_field(minute)}:00"
    date = f"*-{_calendar_field(month)}-{{dom}}"
    if dom != "*" and dow != "*":
        return [
            f"*-{_calendar_field(month)}-{_calendar_field(dom)} {time_part}",
            f"{_day_names(dow)} {date.format(dom='*')} {time_part}",
        ]
    prefix = f"{_day_names(dow)} " if dow != "*" else ""
    return [f"{prefix}{date.format(dom=_calendar_field(dom))} {time_part}"]


def systemd(schedules: list[Schedule]) -> str:
    """A `.service` and a `.timer` unit per schedule (`Persistent=true` catches up missed runs)."""
    blocks = []
    for s in schedules:
        if s.cron:
            timing = "\n".join(f"OnCalendar={value}" for value in on_calendar(s.cron)) + "\nPersistent=true"
        else:
            timing = f"OnActiveSec={s.every_seconds:g}s\nOnUnitActiveSec={s.every_seconds:g}s"
        blocks.append(
            f"# --- labbook-{s.id}.service ---\n"
            f"[Unit]\nDescription=labbook pipeline {s.id}\n\n"
            f"[Service]\nType=oneshot\nWorkingDirectory={s.cwd}\nExecStart={_command(s)}\n\n"
            f"# --- labbook-{s.id}.timer ---\n"
            f"[Unit]\nDescription=labbook schedule {s.id} ({s.trigger})\n\n"
            f"[Timer]\n{timing}\n\n[Install]\nWantedBy=timers.target\n"
        )
    return "\n".join(blocks)
