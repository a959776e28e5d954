"""Schedules: a real APScheduler SQLite job store, the real `labbook scheduler` service, real runs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from pipelines.schedule import cron, schedule, schedule_export
from pipelines.specs.spec_io import SpecError
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
    done = labbook("schedule", "add", str(spec), "--cron", "0 3 * * 0", "--timezone", "UTC", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # Standard cron meaning: day 0 is Sunday (APScheduler's own numbering would say Monday).
    [added] = schedule.list_schedules()
    assert added.id == "nightly" and added.next_fire.weekday() == 6 and added.next_fire.hour == 3
    assert added.timezone == "UTC"

    done = labbook("schedule", "list", cwd=tmp_path, env={"COLUMNS": "200"})
    assert done.returncode == 0 and "nightly" in done.stdout and "never" in done.stdout and "UTC" in done.stdout

    crontab = labbook("schedule", "export", "--format", "crontab", cwd=tmp_path).stdout
    [entry] = [line for line in crontab.splitlines() if line and not line.startswith("#")]
    assert entry.startswith("0 3 * * 0 ")
    assert f"labbook run {spec.resolve()} --trigger scheduled --schedule-id nightly" in entry
    assert f" cd {tmp_path} && " in entry

    units = labbook("schedule", "export", "--format", "systemd", cwd=tmp_path).stdout
    assert "OnCalendar=Sun *-*-* 03:00:00 UTC" in units and "Persistent=true" in units
    assert f"ExecStart={LABBOOK} run {spec.resolve()}" in units

    done = labbook("schedule", "add", str(spec), "--cron", "0 3 * * 0", cwd=tmp_path)
    assert done.returncode == 2 and "exists already" in done.stderr
    assert labbook("schedule", "remove", "nightly", cwd=tmp_path).returncode == 0
    assert schedule.list_schedules() == []
    done = labbook("schedule", "remove", "nightly", cwd=tmp_path)
    assert done.returncode == 2 and "no such schedule" in done.stderr


BAD_CRON = {
    "0 3 * *": "4 field(s)",
    "61 * * * *": "outside 0-59",
    "every day": "2 field(s)",
    "0 3 * * * *": "6 field(s)",
    "0 3 30 2 *": "never fires",  # February has no 30th
    "0 3 31 4,6,9,11 *": "never fires",
    "0 3 30 2 */2": "never fires",  # `*/2` is unrestricted to cron: the days are ANDed
    "0 3 L * *": "not crontab(5) syntax",  # croniter extensions that system cron cannot read
    "0 3 * * 1#2": "not crontab(5) syntax",
    "0 3 * * 5L": "not crontab(5) syntax",
    "0 3 ? * *": "not crontab(5) syntax",
    "H 3 * * *": "not crontab(5) syntax",
    "5/10 * * * *": "crons disagree on N/S",  # Vixie ignores the /10, cronie reads 5-59/10
    "0 3 5-1 * *": "from low to high",
    "*/0 * * * *": "step must be 1 or more",
    "0 3 * * monday": "outside 0-7 or Sun-Sat",
    "@daily": "1 field(s)",
}


@pytest.mark.parametrize("cron", list(BAD_CRON))
def test_an_invalid_cron_expression_exits_2_and_stores_nothing(store: str, tmp_path: Path, cron: str) -> None:
    done = labbook("schedule", "add", str(pipeline(tmp_path, "p")), "--cron", cron, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "--cron:" in done.stderr and BAD_CRON[cron] in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr) <= 500
    assert not (tmp_path / "mlruns" / "scheduler.db").exists()


@pytest.mark.fast
def test_february_29th_and_other_rare_dates_stay_valid() -> None:
    utc = ZoneInfo("UTC")
    after = datetime(2026, 11, 29, tzinfo=utc)
    assert cron.next_fire(cron.parse("0 0 29 2 *"), utc, after) == datetime(2028, 2, 29, tzinfo=utc)
    assert cron.next_fire(cron.parse("0 0 31 * *"), utc, after) == datetime(2026, 12, 31, tzinfo=utc)
    # Feb 29th on a Sunday (ANDed: `*/7` is unrestricted to cron) comes in 2032.
    assert cron.next_fire(cron.parse("0 0 29 2 */7"), utc, after) == datetime(2032, 2, 29, tzinfo=utc)


# --- one meaning: the scheduler, a crontab(5) reference, systemd ------------------------------

EXPRESSIONS = [
    "0 3 */2 * 1",  # the issue's case: odd days that are Mondays (cron ANDs: a field starts with *)
    "0 3 1,15 * 0",  # both restricted: the 1st, the 15th OR a Sunday
    "0 0 1-31 * 1",  # `1-31` is restricted: every day (OR), though it lists every day
    "0 0 * * 0-6",  # `*` day-of-month: ANDed with every weekday: every day
    "*/15 * * * *",
    "0 9 * * 1-5",
    "0 9 * * mon-fri",
    "30 2 * * *",
    "0 0 1 * *",
    "0 0 29 2 *",
    "5-59/20 */3 * * *",
    "0 12 * * sun",
    "0 0 13 * fri",  # Friday the 13th? No: the 13th OR a Friday
    "0 0 */10 * mon-fri",  # days 1, 11, 21, 31 that are weekdays
    "0 6 1-7 * 1",
    "0 6 * jan-mar,oct */2",
    "0 0 31 * *",
    "0 0 * * 7",
    "0 0 * * 0,7",
    "0 22 * * 5-7",
    "59 23 31 12 *",
    "*/7 */5 */9 */4 */3",
    "0 0 5 * */2",
    "1 1 1 1 *",
    "0 0 30 1-3 *",
    "0,30 8-18/2 * * 2,4",
]


def crontab5_reference(expression: str, after: datetime, count: int) -> list[datetime]:
    """The next fire times by crontab(5)'s text alone, checked day by day and minute by minute.

    Written apart from pipelines/schedule/cron.py on purpose: an independent reading of the man page
    ("If both fields are restricted (i.e., don't start with *), the command will be run when
    either field matches the current time"; 0 and 7 are Sunday; names are the first three
    letters). Wall-clock UTC, so no DST.
    """
    days = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
    months = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
    names = {n: i for i, n in enumerate(days)} | {n: i + 1 for i, n in enumerate(months)}

    def values(field: str, low: int, high: int) -> set[int]:
        found: set[int] = set()
        for item in field.split(","):
            span, _, step = item.partition("/")
            if span == "*":
                first, last = low, high
            else:
                a, _, b = span.partition("-")
                first = names.get(a.lower(), None) if not a.isdigit() else int(a)
                last = (names[b.lower()] if not b.isdigit() else int(b)) if b else first
            found |= set(range(first, last + 1, int(step or 1)))
        return found

    minute, hour, dom, month, dow = expression.split()
    minutes, hours = sorted(values(minute, 0, 59)), sorted(values(hour, 0, 23))
    days, months = values(dom, 1, 31), values(month, 1, 12)
    weekdays = {d % 7 for d in values(dow, 0, 7)}
    either = not (dom.startswith("*") or dow.startswith("*"))
    found: list[datetime] = []
    day = after.replace(hour=0, minute=0, second=0, microsecond=0)
    while len(found) < count:
        by_day, by_weekday = day.day in days, (day.weekday() + 1) % 7 in weekdays
        if day.month in months and ((by_day or by_weekday) if either else (by_day and by_weekday)):
            for h in hours:
                for m in minutes:
                    moment = day.replace(hour=h, minute=m)
                    if moment > after and len(found) < count:
                        found.append(moment)
        day += timedelta(days=1)
    return found


def scheduler_fires(expression: str, timezone: str, after: datetime, count: int) -> list[datetime]:
    """What `labbook scheduler` fires: the stored trigger, asked as APScheduler asks it."""
    trigger = schedule.CronTrigger(expression, timezone)
    found, previous = [], None
    while len(found) < count:
        previous = trigger.get_next_fire_time(previous, after + timedelta(microseconds=1))  # strictly after
        found.append(previous.astimezone(UTC))
    return found


def systemd_fires(values: list[str], after: datetime, count: int) -> list[datetime]:
    """What a timer with these `OnCalendar=` values fires, by `systemd-analyze calendar` (UTC)."""
    base = after.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    done = subprocess.run(
        ["systemd-analyze", "calendar", f"--iterations={count}", f"--base-time={base}", *values],
        capture_output=True,
        text=True,
        env={**os.environ, "TZ": "UTC"},
    )
    assert done.returncode == 0, done.stderr
    found = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", done.stdout)
    return sorted({datetime.fromisoformat(f).replace(tzinfo=UTC) for f in found})[:count]


def export_values(expression: str, timezone: str, now: datetime) -> list[str]:
    s = schedule.Schedule("x", "/p.yaml", "/", "", None, 60, cron=expression, timezone=timezone)
    timer = schedule_export.units(s, now)["labbook-x.timer"]
    return [line.split("=", 1)[1] for line in timer.splitlines() if line.startswith("OnCalendar=")]


@pytest.mark.fast
@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_the_scheduler_fires_what_crontab5_says(expression: str) -> None:
    after = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    assert scheduler_fires(expression, "UTC", after, 20) == crontab5_reference(expression, after, 20)


@pytest.mark.fast
def test_the_issue_expression_fires_on_odd_mondays_only() -> None:
    after = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    fired = scheduler_fires("0 3 */2 * 1", "UTC", after, 6)
    assert all(f.weekday() == 0 and f.day % 2 == 1 for f in fired), fired  # croniter alone: Mon 30, Tue 1, ...


@pytest.mark.fast
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("timezone", ["UTC", "Europe/Berlin", "America/New_York"])
def test_the_systemd_export_fires_what_the_scheduler_fires(timezone: str) -> None:
    """Every expression, from an ordinary day and from just before both DST changes of 2026/27."""
    for after in (
        datetime(2026, 11, 29, 12, 0, tzinfo=UTC),
        datetime(2026, 10, 24, 21, 0, tzinfo=UTC),  # Europe: 2026-10-25 01:00 UTC, back
        datetime(2027, 3, 27, 21, 0, tzinfo=UTC),  # Europe: 2027-03-28 01:00 UTC, forward
        datetime(2027, 3, 14, 3, 0, tzinfo=UTC),  # US: 2027-03-14 07:00 UTC, forward
        datetime(2026, 11, 1, 2, 0, tzinfo=UTC),  # US: 2026-11-01 06:00 UTC, back
    ):
        for expression in EXPRESSIONS:
            values = export_values(expression, timezone, after - timedelta(days=1))
            expected = scheduler_fires(expression, timezone, after, 20)
            assert systemd_fires(values, after, 20) == expected, (expression, timezone, after, values)


# --- DST and the time zone ------------------------------------------------------------------


@pytest.mark.fast
def test_a_nightly_schedule_fires_once_on_both_dst_nights_as_cron_does() -> None:
    berlin = ZoneInfo("Europe/Berlin")

    def local(fired: list[datetime]) -> list[str]:
        return [f.astimezone(berlin).strftime("%m-%d %H:%M %Z") for f in fired]

    # Fall back: 02:30 comes twice (CEST, then CET); cron runs a fixed-time job once.
    fall = scheduler_fires("30 2 * * *", "Europe/Berlin", datetime(2026, 10, 24, 12, tzinfo=UTC), 3)
    assert local(fall) == ["10-25 02:30 CEST", "10-26 02:30 CET", "10-27 02:30 CET"]
    # Spring forward: 02:30 never comes; cron runs it right after the jump, at 03:00 CEST.
    spring = scheduler_fires("30 2 * * *", "Europe/Berlin", datetime(2027, 3, 27, 12, tzinfo=UTC), 3)
    assert local(spring) == ["03-28 03:00 CEST", "03-29 02:30 CEST", "03-30 02:30 CEST"]
    # A wildcard job (minute or hour starts with *) runs in the repeated hour again, and skips the lost one.
    fall = scheduler_fires("*/30 * * * *", "Europe/Berlin", datetime(2026, 10, 24, 23, 45, tzinfo=UTC), 5)
    assert local(fall) == [
        "10-25 02:00 CEST",
        "10-25 02:30 CEST",
        "10-25 02:00 CET",
        "10-25 02:30 CET",
        "10-25 03:00 CET",
    ]
    spring = scheduler_fires("*/30 * * * *", "Europe/Berlin", datetime(2027, 3, 28, 0, 15, tzinfo=UTC), 2)
    assert local(spring) == ["03-28 01:30 CET", "03-28 03:00 CEST"]


def test_the_time_zone_is_explicit_stored_and_shown(store: str, tmp_path: Path) -> None:
    spec = pipeline(tmp_path, "nightly")
    berlin = {"TZ": "Europe/Berlin"}  # the machine's zone is the default
    done = labbook("schedule", "add", str(spec), "--cron", "30 2 * * *", cwd=tmp_path, env=berlin)
    assert done.returncode == 0, done.stderr
    listed = labbook("schedule", "list", cwd=tmp_path, env={"COLUMNS": "250"}).stdout
    assert "cron '30 2 * * *' Europe/Berlin" in listed
    assert "Europe/Berlin" in labbook("schedule", "export", "--format", "systemd", cwd=tmp_path).stdout
    # The stored trigger (what `labbook scheduler` asks) fires once on each DST night.
    opened = schedule.open_store()
    trigger = opened.lookup_job("nightly").trigger
    opened.shutdown()
    first = trigger.get_next_fire_time(None, datetime(2026, 10, 24, 12, tzinfo=UTC))
    second = trigger.get_next_fire_time(first, first)
    assert [first.astimezone(UTC).hour, second.astimezone(UTC).hour] == [0, 1]  # 02:30 CEST, then 02:30 CET
    assert second.date() == first.date() + timedelta(days=1)
    # A cron schedule in another zone than system cron's is not exported as a crontab line that would lie.
    crontab = labbook("schedule", "export", "--format", "crontab", cwd=tmp_path).stdout
    assert not [line for line in crontab.splitlines() if line and not line.startswith("#")]
    assert "# nightly: fires in Europe/Berlin" in crontab

    for bad in ("Mars/Olympus", "../../etc/passwd", "", "Europe/berlin "):
        done = labbook(
            "schedule", "add", str(spec), "--cron", "0 3 * * *", "--id", "x", "--timezone", bad, cwd=tmp_path
        )
        assert done.returncode == 2 and "--timezone:" in done.stderr, (bad, done.stderr)
    assert [s.id for s in schedule.list_schedules()] == ["nightly"]


# --- ids, quoting, exports that run ---------------------------------------------------------


@pytest.mark.parametrize(
    "bad_id", ["x; touch /tmp/INJECTED #", "../../../ESC", "a'b\"c", "-rf", ".hidden", "a b", "x" * 65, "$(id)", "é"]
)
def test_an_unsafe_schedule_id_exits_2_and_stores_nothing(store: str, tmp_path: Path, bad_id: str) -> None:
    done = labbook("schedule", "add", str(pipeline(tmp_path, "p")), "--every", "60", "--id", bad_id, cwd=tmp_path)
    assert done.returncode == 2 and "--id:" in done.stderr and done.stderr.strip().count("\n") == 0
    assert not (tmp_path / "mlruns" / "scheduler.db").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--every", "5", "--grace", "99999999999999999999"], "--grace:"),
        (["--every", "5", "--grace", "0"], "--grace:"),
        (["--every", "inf"], "--every:"),
        (["--every", "1e20"], "--every:"),
        (["--every", "1e308"], "--every:"),
        (["--every", "nan"], "--every:"),
        (["--every", "0"], "--every:"),
    ],
)
def test_an_interval_or_grace_time_out_of_range_exits_2_and_stores_nothing(
    store: str, tmp_path: Path, flags: list[str], named: str
) -> None:
    done = labbook("schedule", "add", str(pipeline(tmp_path, "p")), *flags, "--id", "g1", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and named in done.stderr and "31622400" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlruns" / "scheduler.db").exists()


@pytest.mark.fast
def test_interval_and_grace_bounds_are_inclusive() -> None:
    assert schedule.check_every(1) == 1 and schedule.check_every(schedule.MAX_EVERY_SECONDS)
    assert schedule.check_grace(1) == 1 and schedule.check_grace(schedule.MAX_GRACE_SECONDS)
    for bad in (0.5, schedule.MAX_EVERY_SECONDS + 1, float("inf"), float("-inf"), float("nan")):
        with pytest.raises(SpecError, match="--every"):
            schedule.check_every(bad)
    for bad in (0, schedule.MAX_GRACE_SECONDS + 1, 10**20, True):
        with pytest.raises(SpecError, match="--grace"):
            schedule.check_grace(bad)


BAD_STORES = {
    "bogus": "not a database URL",
    "mysql://x/y": "driver is not installed",
    "sqlite:////nonexistent/dir/x.db": "cannot be opened or created",
    "postgresql://u:hunter2@127.0.0.1:1/x": "cannot be reached",
}


@pytest.mark.parametrize("url", list(BAD_STORES))
def test_a_bad_store_url_exits_2_in_one_line_in_every_schedule_command(store: str, tmp_path: Path, url: str) -> None:
    spec = str(pipeline(tmp_path, "p"))
    commands = [
        ("schedule", "add", spec, "--every", "60", "--store", url),
        ("schedule", "list", "--store", url),
        ("schedule", "remove", "p", "--store", url),
        ("schedule", "export", "--format", "systemd", "--store", url),
        ("scheduler", "--store", url),
    ]
    for command in commands if url == "bogus" else commands[1:2] + commands[-1:]:  # one place opens the store
        done = labbook(*command, cwd=tmp_path)
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.strip().count("\n") == 0 and "schedule store" in done.stderr, (command, done.stderr)
        assert BAD_STORES[url] in done.stderr and "hunter2" not in done.stderr and "Traceback" not in done.stderr


def test_a_corrupt_job_store_or_a_bad_environment_url_exits_2_without_quoting_it(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    (tmp_path / "mlruns" / "scheduler.db").write_text("garbage SECRET-CONTENT\n")
    for command in (("schedule", "list"), ("scheduler",)):
        done = labbook(*command, cwd=tmp_path)
        assert done.returncode == 2 and "not a SQLite database" in done.stderr, done.stderr
        assert "SECRET-CONTENT" not in done.stderr and done.stderr.strip().count("\n") == 0
    monkeypatch.setenv("LABBOOK_SCHEDULER_DB", "bogus")
    done = labbook("scheduler", cwd=tmp_path)
    assert done.returncode == 2 and "LABBOOK_SCHEDULER_DB" in done.stderr, done.stderr


def store_raw(schedule_id: str, spec: Path, cwd: Path) -> None:
    """A row as labbook before the id rule wrote it (no check)."""
    from apscheduler.job import Job
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    opened = schedule.open_store()
    job = Job(
        BackgroundScheduler(), id=schedule_id, func=schedule.fire, trigger=IntervalTrigger(seconds=60),
        executor="default", args=[str(spec), schedule_id, str(cwd)], kwargs={}, name=schedule_id,
        misfire_grace_time=60, coalesce=True, max_instances=1, next_run_time=datetime.now(UTC) + timedelta(hours=1),
    )  # fmt: skip
    opened.add_job(job)
    opened.shutdown()


def test_rows_stored_before_the_id_rule_are_skipped_not_run_or_exported(store: str, tmp_path: Path) -> None:
    spec = pipeline(tmp_path, "p")
    assert labbook("schedule", "add", str(spec), "--every", "60", "--id", "good", cwd=tmp_path).returncode == 0
    for bad in ("../../../ESC", "a'b\"c", "x; touch INJECTED #"):
        store_raw(bad, spec, tmp_path)
    listed = labbook("schedule", "list", cwd=tmp_path, env={"COLUMNS": "250"})
    assert listed.returncode == 0, listed.stderr  # a quote of each kind made it crash for every schedule
    assert "good" in listed.stdout and listed.stderr.count("warning: schedule") == 3
    for format_ in ("crontab", "systemd"):
        exported = labbook("schedule", "export", "--format", format_, cwd=tmp_path)
        assert exported.returncode == 0 and "good" in exported.stdout
        assert "ESC" not in exported.stdout and "INJECTED" not in exported.stdout
    # A fire of such a row writes no log outside mlruns/logs (it wrote tmp/../../../ESC-<time>.log).
    assert schedule.fire(str(spec), "../../../ESC", str(tmp_path)) == -1
    assert not list(tmp_path.parent.parent.parent.glob("ESC*")) and not list(tmp_path.glob("**/ESC*"))
    assert labbook("schedule", "remove", "a'b\"c", cwd=tmp_path).returncode == 0  # removable by its id


@pytest.mark.fast
@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="systemd-escape is not installed")
@pytest.mark.parametrize("text", ["nightly", "digits-nightly", "a.b_c-1", "x-y-z", "_x"])
def test_unit_names_are_escaped_as_systemd_escape_does(text: str) -> None:
    expected = subprocess.run(["systemd-escape", text], capture_output=True, text=True, check=True).stdout.strip()
    assert schedule_export.unit_escape(text) == expected


@pytest.mark.fast
def test_a_checkout_path_ending_in_a_space_is_refused_by_the_systemd_export(tmp_path: Path) -> None:
    # systemd strips a value's trailing whitespace and unquotes nothing in WorkingDirectory=.
    trail = schedule.Schedule("t1", "/x/p.yaml", "/tmp/x/trail ", "every 60 s", None, 60, every_seconds=60)
    inner = schedule.Schedule("t2", "/x/p.yaml", "/tmp/x/in ner", "every 60 s", None, 60, every_seconds=60)
    text = schedule_export.systemd([trail, inner])
    assert "# t1: not exported: its folder" in text and "ends in whitespace" in text
    assert "WorkingDirectory=/tmp/x/trail" not in text and "WorkingDirectory=/tmp/x/in ner\n" in text
    with pytest.raises(ValueError, match="t1: not exported"):
        schedule_export.write_units([inner, trail], tmp_path / "units")
    assert not (tmp_path / "units").exists() or not list((tmp_path / "units").iterdir())  # nothing half-written


def test_the_exported_crontab_line_runs_in_a_checkout_whose_path_has_a_space(store: str, tmp_path: Path) -> None:
    checkout = tmp_path / "my check-out 100% $HOME 'q'"  # a space, cron's %, a shell $, a quote
    checkout.mkdir()
    spec = pipeline(checkout, "nightly")
    assert (
        labbook("schedule", "add", str(spec), "--cron", "0 3 * * *", "--timezone", "UTC", cwd=checkout).returncode == 0
    )
    crontab = labbook("schedule", "export", "--format", "crontab", cwd=checkout).stdout
    [entry] = [line for line in crontab.splitlines() if line and not line.startswith("#")]
    command = entry.split(None, 5)[5]
    assert not re.search(r"(?<!\\)%", command)  # cron would cut the command at a bare %
    command = command.replace("\\%", "%")  # what cron hands to sh -c
    done = subprocess.run(["sh", "-c", command], env=os.environ, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    log = checkout / "mlruns" / "logs" / "nightly.log"
    assert log.exists() and not (tmp_path / "my").exists()
    [run] = pipeline_runs(store, "nightly")
    assert run.info.status == "FINISHED" and run.data.tags["labbook.schedule_id"] == "nightly"

    if shutil.which("systemd-analyze"):
        units = checkout / "units"
        found = schedule.list_schedules(f"sqlite:///{checkout / 'mlruns' / 'scheduler.db'}")
        written = schedule_export.write_units(found, units)
        assert len(written) == 2
        checked = subprocess.run(["systemd-analyze", "verify", *map(str, written)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr


@pytest.mark.fast
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_exec_start_quoting_reaches_an_executable_under_a_path_with_a_space_and_percent(tmp_path: Path) -> None:
    folder = tmp_path / "a b 100% $x"
    folder.mkdir()
    program = folder / "true"
    shutil.copy("/bin/true", program)
    unit = tmp_path / "probe.service"
    unit.write_text(
        f'[Service]\nType=oneshot\nExecStart={schedule_export.exec_quote(str(program), executable=True)} "x"\n'
    )
    checked = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    unit.write_text(f"[Service]\nType=oneshot\nExecStart={program}\n")  # unquoted: systemd cannot find it
    assert subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True).returncode != 0


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


# --- one fire per fire time, however many schedulers --------------------------------------------

POSTGRES = os.environ.get("LABBOOK_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


@pytest.fixture(params=["sqlite", "postgresql"])
def scheduler_store(request: pytest.FixtureRequest, store: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The job store URL (set as LABBOOK_SCHEDULER_DB): the default SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield schedule.store_url()
        return
    try:
        import psycopg

        admin = psycopg.connect(f"{POSTGRES}/postgres", connect_timeout=5, autocommit=True)
    except Exception as exc:
        reason = f"PostgreSQL not reachable at {POSTGRES} ({type(exc).__name__})"
        if os.environ.get("LABBOOK_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    name = f"labbook_test_schedules_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    monkeypatch.setenv(schedule.STORE_ENV, f"{POSTGRES}/{name}")
    try:
        yield schedule.store_url()
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_two_schedulers_on_one_job_store_run_each_fire_time_once(
    scheduler_store: str, store: str, tmp_path: Path
) -> None:
    spec = pipeline(tmp_path, "shared")
    assert labbook("schedule", "add", str(spec), "--every", "4", cwd=tmp_path).returncode == 0
    first, first_log = start_scheduler(tmp_path, "scheduler-a.log")
    second, second_log = start_scheduler(tmp_path, "scheduler-b.log")
    logs = tmp_path / "mlruns" / "logs"
    try:
        wait_for(lambda: sum(r.info.status == "FINISHED" for r in pipeline_runs(store, "shared")) >= 2, 240, "2 runs")
    finally:
        codes = stop(first), stop(second)
    outputs = first_log.read_text(), second_log.read_text()
    assert codes == (0, 0), outputs
    claimed = [re.findall(r"schedule shared: fire time (\S+) claimed by", output) for output in outputs]
    lost = [re.findall(r"schedule shared: fire time (\S+) skipped, claimed by", output) for output in outputs]
    # Each fire time was claimed by one scheduler only; the other said that it skipped it.
    assert not set(claimed[0]) & set(claimed[1]), outputs
    assert len(claimed[0]) == len(set(claimed[0])) and len(claimed[1]) == len(set(claimed[1]))
    assert lost[0] or lost[1], outputs  # both saw fire times due (the race is there)
    assert set(lost[0]) <= set(claimed[1]) and set(lost[1]) <= set(claimed[0])
    # One pipeline run per fire time (two schedulers ran two, into one log file); a run stopped
    # with the schedulers may have had no time to open its MLflow run.
    started = sum(len(re.findall(r"schedule shared: running ", output)) for output in outputs)
    assert started == len(list(logs.glob("shared-*.log"))) >= len(pipeline_runs(store, "shared")) >= 2, outputs
    from sqlalchemy import create_engine, text

    with create_engine(scheduler_store).connect() as connection:
        rows = connection.execute(text(f"SELECT fire_time FROM {schedule.CLAIMS_TABLE}")).scalars().all()
    assert sorted(rows) == sorted(claimed[0] + claimed[1])


@pytest.mark.fast
@pytest.mark.parametrize(
    ("expression", "zone", "night"),
    [
        ("30 1-3 * * *", "Europe/Dublin", "2027-03-28"),  # negative DST: systemd skipped the whole day
        ("0 */2 * * *", "Africa/Casablanca", "2027-03-14"),  # Ramadan's negative DST
        ("15,45 * * * *", "Pacific/Chatham", "2027-09-26"),  # a change at :45: 03:45 never fired
    ],
)
def test_a_timer_systemd_would_fire_otherwise_on_a_dst_night_is_not_exported(
    expression: str, zone: str, night: str
) -> None:
    """The exported timer must fire what the scheduler fires, or not be written (issue 23 case 4)."""
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    s = schedule.Schedule("odd", "/p.yaml", "/", "", None, 60, cron=expression, timezone=zone)
    exported = schedule_export.systemd([s], now)
    assert exported.startswith(f"# odd: not exported: on the DST change of {night} in {zone}"), exported
    assert "OnCalendar" not in exported
    with pytest.raises(ValueError, match="systemd would fire otherwise than cron"):
        schedule_export.units(s, now)
    # The same expression where systemd agrees with cron is still exported.
    fine = schedule.Schedule("fine", "/p.yaml", "/", "", None, 60, cron=expression, timezone="Europe/Berlin")
    assert "OnCalendar=" in schedule_export.systemd([fine], now)


def test_a_scheduled_training_spec_is_tagged_and_listed_as_its_schedules_last_run(store: str, tmp_path: Path) -> None:
    """A plain training spec (no steps) on a schedule: its run carries the trigger and the schedule
    id, as a pipeline's does, so `schedule list` shows it (it said "never" before)."""
    spec = yaml.safe_load((tracking.PROJECT_ROOT / "pipelines" / "regression_mlp.yaml").read_text())
    spec["trainer"]["max_epochs"], spec["data"]["n_samples"] = 1, 200
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert labbook("schedule", "add", str(path), "--every", "3600", "--id", "tiny", cwd=tmp_path).returncode == 0
    assert schedule.fire(str(path), "tiny", str(tmp_path)) == 0
    from mlflow import MlflowClient

    client = MlflowClient(store)
    [run] = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`labbook.spec` = 'regression_mlp'"
    )
    assert run.data.tags["labbook.trigger"] == "scheduled" and run.data.tags["labbook.schedule_id"] == "tiny"
    assert schedule.last_runs(["tiny"])["tiny"][2] == run.info.run_id
    listed = labbook("schedule", "list", cwd=tmp_path, env={"COLUMNS": "250"}).stdout
    assert run.info.run_id in listed and "never" not in listed
    done = labbook("run", str(path), "--trigger", "sometimes", cwd=tmp_path)
    assert done.returncode == 2 and "--trigger: got 'sometimes'; expected manual or scheduled" in done.stderr
