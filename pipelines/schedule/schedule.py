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
  MLflow runs as interrupted, to be continued with `--from`) and exit 0;
- several schedulers may share one job store (two machines on PostgreSQL, say): each fire time
  is claimed once, by a row with a unique key in the store's database, and the schedulers that
  lose the claim log that they skipped it.

Cron expressions mean what Vixie cron makes them mean, in the schedule's time zone
(pipelines/schedule/cron.py); pipelines/schedule/schedule_export.py writes them for cron and systemd.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from pipelines.errors import listing
from pipelines.schedule import cron as cronlib
from pipelines.specs.spec_io import SpecError
from pipelines.tracking import tracking
from pipelines.tracking.tags import Tag

STORE_ENV = "LABBOOK_SCHEDULER_DB"
TABLE = "labbook_schedules"
CLAIMS_TABLE = "labbook_schedule_fires"
CLAIMS_KEPT = timedelta(days=30)
DEFAULT_GRACE_SECONDS = 3600
# --every and --grace, in seconds: APScheduler makes timedeltas of them (a C int of seconds), and a
# year is more than any schedule needs (a larger value overflowed at every fire, or at `add`).
MAX_EVERY_SECONDS = 366 * 24 * 3600
MAX_GRACE_SECONDS = 366 * 24 * 3600
# Ids name log files, crontab lines and systemd units: a safe alphabet, so nothing needs escaping
# to mean one thing (`../x`, quotes, `;` and spaces are refused at `add`).
ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
log = logging.getLogger("labbook.scheduler")


def store_url(explicit: str | None = None) -> str:
    """`--store`, else `LABBOOK_SCHEDULER_DB`, else SQLite under `./mlruns/`.

    A plain `postgresql://` URL uses psycopg (3) when psycopg2, SQLAlchemy's default, is absent.
    """
    url = explicit or os.environ.get(STORE_ENV) or f"sqlite:///{tracking.default_store() / 'scheduler.db'}"
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        import importlib.util

        if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
            return f"postgresql+psycopg://{rest}"
    return url


def check_id(schedule_id: str) -> str:
    """`schedule_id`, or SpecError: 1-64 of A-Z a-z 0-9 . _ -, not starting with . or -."""
    if not ID_PATTERN.fullmatch(schedule_id):
        shown = ascii(schedule_id[:60]) + ("..." if len(schedule_id) > 60 else "")
        raise SpecError(
            f"--id: {shown} is not a schedule id; expected 1-64 of A-Z a-z 0-9 . _ - not starting with . or -"
        )
    return schedule_id


def check_every(seconds: float) -> float:
    """`seconds` (an --every interval), or SpecError naming --every and its range (1 s to 366 days)."""
    if not (isinstance(seconds, int | float) and math.isfinite(seconds) and 1 <= seconds <= MAX_EVERY_SECONDS):
        raise SpecError(f"--every: got {str(seconds)[:40]}; expected 1 to {MAX_EVERY_SECONDS} seconds (366 days)")
    return seconds


def check_grace(seconds: int) -> int:
    """`seconds` (a --grace time), or SpecError naming --grace and its range (1 s to 366 days)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= MAX_GRACE_SECONDS:
        raise SpecError(
            f"--grace: got {str(seconds)[:40]}; expected whole seconds, 1 to {MAX_GRACE_SECONDS} (366 days)"
        )
    return seconds


def check_timezone(name: str | None) -> str:
    """An IANA time zone name (default: this machine's), or SpecError naming --timezone."""
    name = cronlib.local_zone_name() if name is None else name
    cronlib.zone(name)
    return name


def _check_path(what: str, path: str) -> str:
    if any(ord(char) < 32 or ord(char) == 127 for char in path):
        raise SpecError(f"{what}: the path holds a control character (a line break?); cron and systemd cannot run it")
    return path


class CronTrigger(BaseTrigger):
    """A crontab(5) expression in a time zone, with Vixie cron's meaning (pipelines/schedule/cron.py).

    Written here (not APScheduler's `CronTrigger.from_crontab`) because APScheduler 3 reads a
    numeric day of week with 0 = Monday, ORs nothing and knows no DST rule; croniter walks the
    calendar, with the day-field flag and the DST rule that Vixie cron applies.
    """

    def __init__(self, expression: str, timezone: str) -> None:
        self.expression = check_cron(expression)
        self.timezone_name = timezone
        self.timezone = cronlib.zone(timezone)

    def __getstate__(self) -> dict[str, Any]:
        return {"version": 2, "expression": self.expression, "timezone_name": self.timezone_name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Version 1 (before time zones were explicit) stored a tzinfo as `timezone`.
        old = state.get("timezone")
        self.expression = state["expression"]
        self.timezone_name = state.get("timezone_name") or getattr(old, "key", None) or "UTC"
        self.timezone = ZoneInfo(self.timezone_name)

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime:
        after = previous_fire_time or now - timedelta(microseconds=1)
        return cronlib.next_fire(cronlib.parse(self.expression), self.timezone, after)

    def __str__(self) -> str:
        return f"cron {self.expression!r} {self.timezone_name}"


def check_cron(expression: str) -> str:
    """The expression, whitespace normalized, or a one-line SpecError naming `--cron` and the reason
    (not crontab(5) syntax, a croniter-only extension, or a date that never comes)."""
    return cronlib.parse(" ".join(expression.split())).text


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
    timezone: str | None = None  # a cron schedule's IANA time zone


def _scheduler(url: str) -> BackgroundScheduler:
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore

    return BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=url, tablename=TABLE)},
        executors={"default": ClaimingExecutor(url)},
        job_defaults={"coalesce": True, "max_instances": 1},
    )


def open_store(url: str | None = None) -> Any:
    """The job store itself, for add/list/remove while a scheduler may be running elsewhere.

    A scheduler is never started for these: even paused, its thread could fire or skip due jobs.
    Raises SpecError (one line naming the store, its password redacted) when it cannot be opened.
    """
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from sqlalchemy import select

    resolved = store_url(url)
    try:
        store = SQLAlchemyJobStore(url=resolved, tablename=TABLE)
        store.start(BackgroundScheduler(), "default")  # the (never started) owner that rebuilds jobs
        with store.engine.connect() as connection:  # a corrupt file or a wrong table fails here, not later
            connection.execute(select(store.jobs_t.c.id).limit(1)).all()
    except Exception as exc:
        where = "--store" if url else (STORE_ENV if os.environ.get(STORE_ENV) else "the default store")
        raise SpecError(f"schedule store {tracking.redact(resolved)[:200]} ({where}): {_store_reason(exc)}") from None
    return store


def _store_reason(exc: BaseException) -> str:
    """Why a job store cannot be opened, in fixed words: the database's own text may quote SQL,
    values or a URL with its password, so it is never shown."""
    from sqlalchemy.exc import ArgumentError, DatabaseError

    orig = getattr(exc, "orig", None)
    text = str(orig or exc).lower()
    if isinstance(exc, ImportError):
        return f"its database driver is not installed (no module {exc.name or '?'}); install it or use another URL"
    if isinstance(exc, ArgumentError):
        return "not a database URL SQLAlchemy reads; expected e.g. sqlite:///PATH or postgresql://USER@HOST/DB"
    if "file is not a database" in text or "malformed" in text:
        return "its file is not a SQLite database (corrupt, or another kind of file); move it aside or use another URL"
    if "unable to open database file" in text:
        return "its SQLite file cannot be opened or created (does its folder exist, and may this user write it?)"
    if isinstance(exc, DatabaseError):
        return (
            f"the database cannot be reached or read ({type(orig or exc).__name__}); is the server up, the URL right?"
        )
    return f"it cannot be opened ({type(exc).__name__})"


def _describe(job: Any) -> Schedule:
    """A stored job as a Schedule; ValueError (the reason) for a row that is not a valid schedule."""
    try:
        spec, schedule_id, cwd = job.args
    except (TypeError, ValueError):
        raise ValueError("its arguments are not (spec, id, folder)") from None
    if not ID_PATTERN.fullmatch(str(job.id)) or schedule_id != job.id:
        raise ValueError("its id is not in the safe alphabet (A-Z a-z 0-9 . _ -)")
    for path in (spec, cwd):
        _check_path("path", str(path))
    grace = job.misfire_grace_time
    if grace is not None and not (isinstance(grace, int) and 1 <= grace <= MAX_GRACE_SECONDS):
        raise ValueError(f"its grace time is not 1 to {MAX_GRACE_SECONDS} seconds")  # it would crash every fire
    trigger = job.trigger
    if isinstance(trigger, CronTrigger):
        try:
            check_cron(trigger.expression)
        except SpecError:
            raise ValueError("its cron expression is not crontab(5) syntax any more") from None
        return Schedule(
            schedule_id, spec, cwd, str(trigger), job.next_run_time, job.misfire_grace_time,
            cron=trigger.expression, timezone=trigger.timezone_name,
        )  # fmt: skip
    if isinstance(trigger, IntervalTrigger):
        every = trigger.interval.total_seconds()
        return Schedule(
            schedule_id, spec, cwd, f"every {every:g} s", job.next_run_time, job.misfire_grace_time, every_seconds=every
        )
    raise ValueError(f"its trigger {type(trigger).__name__} is not one labbook writes")


def _rows(store: Any) -> tuple[list[Any], list[str]]:
    """Every stored job that can be read, and a warning line per row that cannot (left in place:
    APScheduler's own reader deletes such rows)."""
    from sqlalchemy import select

    jobs, skipped = [], []
    table = store.jobs_t
    with store.engine.begin() as connection:
        rows = list(connection.execute(select(table.c.id, table.c.job_state).order_by(table.c.next_run_time)))
    for row in rows:
        try:
            jobs.append(store._reconstitute_job(row.job_state))
        except Exception as exc:  # an old or foreign pickle: say so, keep listing the others
            skipped.append(f"schedule {ascii(str(row.id)[:60])}: skipped, unreadable ({type(exc).__name__})")
    return jobs, skipped


def read_schedules(store: str | None = None) -> tuple[list[Schedule], list[str]]:
    """The valid schedules, and one warning line per stored row that is not one (skipped).

    Rows written before ids were checked (`../x`, quotes) are skipped, not shown or exported;
    `labbook schedule remove ID` removes them.
    """
    opened = open_store(store)
    try:
        jobs, skipped = _rows(opened)
    finally:
        opened.shutdown()
    found = []
    for job in jobs:
        try:
            found.append(_describe(job))
        except ValueError as exc:
            skipped.append(
                f"schedule {ascii(str(job.id)[:60])}: skipped, {exc}; remove it with `labbook schedule remove`"
            )
    return found, skipped


def when(s: Schedule) -> str:
    """A schedule's next fire time as text, on its own time zone's clock (`-` if none)."""
    if s.next_fire is None:
        return "-"
    moment = s.next_fire.astimezone(ZoneInfo(s.timezone)) if s.timezone else s.next_fire.astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z")


def default_id(spec: Path) -> str:
    """A schedule id from a spec's file name, in the safe alphabet."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.stem).lstrip(".-")[:64]
    return name or "schedule"


def add(
    spec: Path,
    cron: str | None = None,
    every: float | None = None,
    schedule_id: str | None = None,
    grace_seconds: int = DEFAULT_GRACE_SECONDS,
    store: str | None = None,
    timezone: str | None = None,
) -> Schedule:
    """Register a schedule for a (validated) pipeline spec; it fires once a scheduler runs.

    `timezone` (IANA name, default this machine's) is the wall clock a cron expression reads.
    Raises SpecError (one line, nothing stored) for a bad expression, id, time zone, path, interval
    (`check_every`) or grace time (`check_grace`).
    """
    if (cron is None) == (every is None):
        raise SpecError("--cron/--every: give exactly one of them")
    if every is not None and timezone is not None:
        raise SpecError("--timezone: only a --cron schedule reads a clock; --every counts seconds")
    name = check_id(schedule_id) if schedule_id is not None else default_id(spec)
    every = check_every(every) if every is not None else None
    grace_seconds = check_grace(grace_seconds)
    zone = check_timezone(timezone) if cron else None
    trigger: BaseTrigger = CronTrigger(cron, zone) if cron else IntervalTrigger(seconds=every)
    spec_path = spec.resolve()
    _check_path("spec", str(spec_path))
    _check_path("the current folder", str(Path.cwd()))
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
    """The valid schedules (see `read_schedules` for the rows skipped)."""
    return read_schedules(store)[0]


def remove(schedule_id: str, store: str | None = None) -> None:
    from apscheduler.jobstores.base import JobLookupError

    opened = open_store(store)
    try:
        opened.remove_job(schedule_id)  # any stored id, also one written before ids were checked
    except JobLookupError:
        known = listing((ascii(j.id)[1:-1] for j in _rows(opened)[0]), schedule_id) or "none"
        shown = ascii(schedule_id[:60])
        raise SpecError(f"schedule id {shown}: no such schedule; schedules: {known}") from None
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


def fire(spec: str, schedule_id: str, cwd: str, fire_time: str | None = None) -> int:
    """One scheduled run: `labbook run SPEC` as a child process, its output in a log file.

    `fire_time` (ISO, UTC) names the log file, so one fire time has one log.
    """
    if _stopping.is_set():
        return -1
    if not ID_PATTERN.fullmatch(schedule_id):  # a row stored before ids were checked
        log.warning("schedule %s: skipped, its id is not a safe file name; remove it", ascii(schedule_id[:60]))
        return -1
    lock = _pipeline_locks.setdefault(spec, threading.Lock())
    if not lock.acquire(blocking=False):
        log.warning("schedule %s: skipped, pipeline %s is still running", schedule_id, spec)
        return -1
    try:
        logs = Path(cwd) / "mlruns" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        moment = datetime.fromisoformat(fire_time) if fire_time else datetime.now(UTC)
        log_path = logs / f"{schedule_id}-{moment.astimezone(UTC):%Y%m%dT%H%M%SZ}.log"
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


# --- one fire per fire time, across schedulers -------------------------------------------------


def _claims(url: str) -> tuple[Any, Any]:
    """The store's engine and its claims table (created if missing): (schedule id, fire time) unique."""
    from sqlalchemy import Column, Float, MetaData, String, Table, create_engine

    engine = create_engine(url)
    table = Table(
        CLAIMS_TABLE,
        MetaData(),
        Column("schedule_id", String(64), primary_key=True),
        Column("fire_time", String(40), primary_key=True),  # ISO 8601, UTC
        Column("claimed_by", String(300), nullable=False),
        Column("claimed_at", Float, nullable=False),  # Unix time, s
    )
    from sqlalchemy import inspect
    from sqlalchemy.exc import DBAPIError

    try:
        table.create(engine, checkfirst=True)
    except DBAPIError:  # two schedulers starting at once: the other one created it first
        if not inspect(engine).has_table(CLAIMS_TABLE):
            raise
    return engine, table


def claim(engine: Any, table: Any, schedule_id: str, fire_time: datetime, claimant: str) -> str | None:
    """Claim one fire of a schedule: None if this claimant got it, else who had claimed it.

    One INSERT in its own transaction against a primary key: the database lets exactly one of
    several schedulers (processes or machines, SQLite or PostgreSQL) succeed.
    """
    from sqlalchemy import select
    from sqlalchemy.exc import IntegrityError

    key = fire_time.astimezone(UTC).isoformat()
    try:
        with engine.begin() as connection:
            connection.execute(
                table.insert().values(
                    schedule_id=schedule_id, fire_time=key, claimed_by=claimant, claimed_at=time.time()
                )
            )
        return None
    except IntegrityError:
        with engine.begin() as connection:
            holder = connection.execute(
                select(table.c.claimed_by).where(table.c.schedule_id == schedule_id, table.c.fire_time == key)
            ).scalar()
        return holder or "another scheduler"


class ClaimingExecutor(ThreadPoolExecutor):
    """APScheduler's thread pool that first claims each (schedule, fire time) in the job store's
    database, and skips, with a log line, the fires another scheduler has claimed."""

    def __init__(self, url: str, max_workers: int = 10) -> None:
        super().__init__(max_workers)
        self.url = url
        self.claimant = f"{socket.gethostname()}:{os.getpid()}"[:300]
        self.engine: Any = None
        self.table: Any = None

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        self.engine, self.table = _claims(self.url)
        with self.engine.begin() as connection:  # old claims: nobody asks about them again
            connection.execute(
                self.table.delete().where(self.table.c.claimed_at < time.time() - CLAIMS_KEPT.total_seconds())
            )

    def submit_job(self, job: Job, run_times: list[datetime]) -> None:
        fire_time = run_times[-1]  # coalesced: the latest of the due times is the one run
        holder = claim(self.engine, self.table, job.id, fire_time, self.claimant)
        if holder is not None:
            log.info("schedule %s: fire time %s skipped, claimed by %s", job.id, fire_time.isoformat(), holder)
            return
        log.info("schedule %s: fire time %s claimed by %s", job.id, fire_time.isoformat(), self.claimant)
        copy = Job.__new__(Job)
        copy.__setstate__(job.__getstate__())
        copy._scheduler, copy._jobstore_alias = job._scheduler, job._jobstore_alias
        copy.kwargs = {**job.kwargs, "fire_time": fire_time.astimezone(UTC).isoformat()}
        super().submit_job(copy, run_times)


def serve(store: str | None = None, poll_seconds: float = 1.0) -> int:
    """Fire due schedules until SIGTERM or Ctrl-C; then stop the running pipelines and return 0.

    Raises SpecError (one line) when the job store cannot be opened.
    """
    from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED

    open_store(store).shutdown()  # a store that cannot be opened: one line (SpecError), before any thread starts
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
        try:
            shown = _describe(job).trigger
        except ValueError as exc:
            log.warning("schedule %s: paused, %s; remove it with `labbook schedule remove`", ascii(job.id[:60]), exc)
            scheduler.pause_job(job.id)
            continue
        log.info("schedule %s: %s, next fire %s", job.id, shown, job.next_run_time)
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
