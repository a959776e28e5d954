"""Schedules written for the system's scheduler: crontab(5) lines and systemd units.

Both run `labbook run SPEC --trigger scheduled --schedule-id ID` in the schedule's folder, at the
times `labbook scheduler` fires it (pipelines/schedule/cron.py has the one meaning of an expression):

- crontab: the expression as written (system cron reads the same text, in the machine's time
  zone: a schedule in another zone is written commented out, with the reason), the command
  quoted for `sh -c` (`shlex.quote`) and `%` escaped (cron turns a bare `%` into a newline);
- systemd: `OnCalendar=` values in the schedule's time zone, two of them when cron ORs the day
  fields (systemd ANDs them), plus the DST nights of the next ten years written out in UTC
  where systemd's rule differs from cron's (systemd skips a time the clock jumps over and runs a
  repeated hour once); `ExecStart=` quoted by systemd's rules, unit names by `systemd-escape`'s.

The quoting and the OnCalendar form are written by hand: no kept Python library writes systemd
unit syntax or converts cron to OnCalendar.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from croniter import croniter

from pipelines.schedule import cron as cronlib
from pipelines.schedule.schedule import Schedule

_SYSTEMD_DAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")
_UTC_NAMES = {"UTC", "Etc/UTC", "Etc/Universal", "Universal", "Etc/Zulu", "Zulu", "Etc/GMT", "GMT", "Etc/GMT0"}
DST_YEARS = 10
_NEAR = timedelta(hours=3)  # how far from a DST change its effects are looked for


def command(s: Schedule) -> list[str]:
    """The command a fire runs, as an argument list."""
    labbook = str(Path(sys.executable).with_name("labbook"))
    return [labbook, "run", s.spec, "--trigger", "scheduled", "--schedule-id", s.id]


# --- crontab -------------------------------------------------------------------------------


def cron_daemon_zone() -> str:
    """The time zone system cron runs in: /etc/localtime's (cron ignores a user's TZ)."""
    target = os.path.realpath("/etc/localtime")
    if "/zoneinfo/" in target:
        return target.split("/zoneinfo/", 1)[1]
    try:
        return Path("/etc/timezone").read_text().strip() or "UTC"
    except OSError:
        return "UTC"


def _same_zone(a: str, b: str) -> bool:
    return a == b or (a in _UTC_NAMES and b in _UTC_NAMES)


def crontab_line(s: Schedule, daemon_zone: str) -> str:
    """One crontab(5) line, or a comment saying why this schedule cannot be one."""
    when = s.cron or _every_as_cron(s.every_seconds)
    if when is None:
        return f"# {s.id}: every {s.every_seconds:g} s cannot be written as a crontab entry"
    if s.cron and s.timezone and not _same_zone(s.timezone, daemon_zone):
        return (
            f"# {s.id}: fires in {s.timezone}, system cron here in {daemon_zone}: not exported"
            f" (use --format systemd or labbook scheduler, or add it with --timezone {daemon_zone})"
        )
    logs = Path(s.cwd) / "mlruns" / "logs"
    line = (
        f"{when} cd {shlex.quote(s.cwd)} && mkdir -p {shlex.quote(str(logs))} && {shlex.join(command(s))}"
        f" >> {shlex.quote(str(logs / f'{s.id}.log'))} 2>&1"
    )
    return line.replace("%", "\\%")  # crontab(5): an unescaped % ends the command


def crontab(schedules: list[Schedule]) -> str:
    """crontab(5) lines that run the same pipelines with `labbook run`."""
    zone = cron_daemon_zone()
    lines = [f"# labbook schedules: install with `crontab -e` (or append to your crontab); cron's time zone: {zone}"]
    lines += [crontab_line(s, zone) for s in schedules]
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


# --- systemd -------------------------------------------------------------------------------


def _runs(values: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and runs[-1][1] == value - 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs


def _numbers(values: frozenset[int], every: range) -> str:
    if values == set(every):
        return "*"
    return ",".join(f"{a:02d}" if a == b else f"{a:02d}..{b:02d}" for a, b in _runs(sorted(values)))


def _weekdays(values: frozenset[int]) -> str:
    order = sorted(values, key=lambda d: (d - 1) % 7)  # systemd's week starts on Monday
    ranked = [(d - 1) % 7 for d in order]
    return ",".join(
        _SYSTEMD_DAYS[(a + 1) % 7] if a == b else f"{_SYSTEMD_DAYS[(a + 1) % 7]}..{_SYSTEMD_DAYS[(b + 1) % 7]}"
        for a, b in _runs(ranked)
    )


def on_calendar(expression: str, timezone: str) -> list[str]:
    """`OnCalendar=` values that match what cron matches, DST nights aside (`dst_nights`).

    cron ORs day-of-month and day-of-week when both are restricted; systemd ANDs a weekday and
    a date, so that case takes two values.
    """
    c = cronlib.parse(expression)
    time_part = f"{_numbers(c.hours, range(24))}:{_numbers(c.minutes, range(60))}:00 {timezone}"
    months = _numbers(c.months, range(1, 13))
    days = _numbers(c.days, range(1, 32))
    all_week = c.weekdays == set(range(7))
    if c.days_or:
        return [f"*-{months}-{days} {time_part}", f"{_weekdays(c.weekdays)} *-{months}-* {time_part}"]
    prefix = "" if all_week else f"{_weekdays(c.weekdays)} "
    return [f"{prefix}*-{months}-{days} {time_part}"]


def _transitions(zone: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """The moments (UTC) `zone`'s offset changes between start and end."""
    found = []
    step = timedelta(hours=6)
    moment = start
    while moment < end:
        later = moment + step
        if moment.astimezone(zone).utcoffset() != later.astimezone(zone).utcoffset():
            low, high = moment, later
            while high - low > timedelta(minutes=1):
                middle = low + (high - low) / 2
                if low.astimezone(zone).utcoffset() == middle.astimezone(zone).utcoffset():
                    low = middle
                else:
                    high = middle
            found.append(high.replace(second=0, microsecond=0))
        moment = later
    return found


def dst_nights(expression: str, timezone: str, start: datetime, years: int = DST_YEARS) -> list[datetime]:
    """Fire times (UTC) on the DST nights of the next `years` that systemd's rule would not fire.

    systemd fires each existing wall-clock match once; cron also runs a fixed-time job whose time
    the clock jumped over (right after the jump) and a wildcard job's repeated hour twice.
    """
    c = cronlib.parse(expression)
    zone = ZoneInfo(timezone)
    start = start.astimezone(UTC)
    extra: set[datetime] = set()
    for change in _transitions(zone, start, start + timedelta(days=366 * years)):
        low, high = ((change + hours).astimezone(zone).replace(tzinfo=None) for hours in (-_NEAR, _NEAR))
        walk = croniter(c.croniter_text(), low - timedelta(minutes=1), day_or=c.days_or)
        while (wall := walk.get_next(datetime)) <= high:
            for i, moment in enumerate(cronlib.instants(c, zone, wall)):
                # the second pass of a repeated hour, or a skipped time run after the jump (03:00
                # itself not matching: systemd fires a matching 03:00 anyway)
                if i == 1 or not c.matches(moment.astimezone(zone).replace(tzinfo=None)):
                    extra.add(moment)
    return sorted(extra)


def _dated(moments: list[datetime]) -> list[str]:
    """Absolute `OnCalendar=` values (UTC) for these moments, one per day and hour."""
    by_hour: dict[tuple[str, int], list[int]] = defaultdict(list)
    for moment in moments:
        by_hour[(moment.strftime("%Y-%m-%d"), moment.hour)].append(moment.minute)
    return [
        f"{day} {hour:02d}:{','.join(f'{m:02d}' for m in sorted(set(minutes)))}:00 UTC"
        for (day, hour), minutes in sorted(by_hour.items())
    ]


def unit_escape(text: str) -> str:
    """`text` as a unit name part, by `systemd-escape`'s rules (`-` → `\\x2d`, a leading `.` escaped)."""
    out = []
    for i, char in enumerate(text):
        if char == "/":
            out.append("-")
        elif (char.isascii() and (char.isalnum() or char in ":_.")) and not (i == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out)


def exec_quote(argument: str, executable: bool = False) -> str:
    """One `ExecStart=` word, quoted by systemd's rules (systemd.service(5), "Command lines").

    Inside double quotes systemd reads C escapes; `%` starts a specifier (`%%` is one `%`)
    everywhere, and `$` an environment variable (`$$` is one `$`) in the arguments, not in the
    executable's path (systemd-analyze verify finds `a$$b/true` missing).
    """
    escaped = argument.replace("%", "%%")
    if not executable:
        escaped = escaped.replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@+=:,./-]+", argument):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _specifiers(text: str) -> str:
    return text.replace("%", "%%")


def systemd_refusal(s: Schedule, now: datetime | None = None) -> str | None:
    """A comment line saying why this schedule cannot be a systemd unit, or None.

    systemd strips whitespace at the end of a value and reads `WorkingDirectory=` without quotes or
    escapes (systemd 252: `"/x/trail "` is "not absolute", `\\x20` stays literal), so a folder whose
    name ends in whitespace cannot be written. And a timer whose DST nights systemd would fire
    differently from cron (`dst_disagreement`) is not written either.
    """
    if s.cwd != s.cwd.rstrip(" \t\n\r"):  # systemd's WHITESPACE
        return (
            f"# {s.id}: not exported: its folder {ascii(s.cwd[-60:])} ends in whitespace, which systemd strips"
            " from WorkingDirectory= (no quoting keeps it); rename the folder, or use labbook scheduler"
        )
    if s.cron:
        zone = s.timezone or "UTC"
        now = now or datetime.now(UTC)
        values = on_calendar(s.cron, zone) + _dated(dst_nights(s.cron, zone, now))
        differs = dst_disagreement(s.cron, zone, values, now)
        if differs:
            return f"# {s.id}: not exported: {differs}; use labbook scheduler"
    return None


def dst_disagreement(expression: str, timezone: str, values: list[str], now: datetime) -> str | None:
    """Where a timer with these `OnCalendar=` values fires otherwise than cron near a DST change, or None.

    Asked of `systemd-analyze calendar` itself around each change of the next DST_YEARS years:
    systemd 252 skips some DST nights whole in zones whose tz rules are unusual (negative DST in
    Europe/Dublin and Africa/Casablanca, a change at :45 in Pacific/Chatham), which no rule written
    here could predict. None where systemd-analyze is not installed (nothing to ask) or in UTC.
    """
    tool = shutil.which("systemd-analyze")
    if tool is None or timezone in _UTC_NAMES:
        return None
    cron, zone = cronlib.parse(expression), ZoneInfo(timezone)
    for change in _transitions(zone, now.astimezone(UTC), now.astimezone(UTC) + timedelta(days=366 * DST_YEARS)):
        after, until = change - _NEAR + timedelta(seconds=30), change + _NEAR  # fires fall on :00 seconds
        expected = []
        for moment in cronlib.fire_times(cron, zone, after):
            if moment > until:
                break
            expected.append(moment.astimezone(UTC))
        base = f"--base-time={after:%Y-%m-%d %H:%M:%S} UTC"
        done = subprocess.run(
            [tool, "calendar", f"--iterations={len(expected) + 1}", base, *values],
            capture_output=True, text=True, env={**os.environ, "TZ": "UTC"}, timeout=60,
        )  # fmt: skip
        found = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", done.stdout)
        fired = sorted({datetime.fromisoformat(f).replace(tzinfo=UTC) for f in found})
        fired = [moment for moment in fired if moment <= until]
        if done.returncode != 0 or fired != expected:
            missed = sorted(set(expected) ^ set(fired))
            when = missed[0].astimezone(zone).strftime("%Y-%m-%d %H:%M %Z") if missed else "?"
            return (
                f"on the DST change of {change.astimezone(zone):%Y-%m-%d} in {timezone} systemd would fire "
                f"otherwise than cron (first at {when})"
            )
    return None


def units(s: Schedule, now: datetime | None = None) -> dict[str, str]:
    """The `.service` and `.timer` unit files of one schedule: {file name: text}; ValueError (the
    `systemd_refusal` line) for a schedule systemd cannot run as written."""
    refused = systemd_refusal(s, now)
    if refused:
        raise ValueError(refused.removeprefix("# "))
    name = f"labbook-{unit_escape(s.id)}"
    if s.cron:
        zone = s.timezone or "UTC"
        nights = _dated(dst_nights(s.cron, zone, now or datetime.now(UTC)))
        values = on_calendar(s.cron, zone) + nights
        timing = "\n".join(f"OnCalendar={value}" for value in values) + "\nPersistent=true"
        if nights:
            until = (now or datetime.now(UTC)).year + DST_YEARS
            timing = f"# DST nights up to {until} follow cron's rule (UTC values): export again before then\n{timing}"
    else:
        timing = f"OnActiveSec={s.every_seconds:g}s\nOnUnitActiveSec={s.every_seconds:g}s"
    service = (
        f"[Unit]\nDescription=labbook pipeline {_specifiers(s.id)}\n\n"
        f"[Service]\nType=oneshot\nWorkingDirectory={_specifiers(s.cwd)}\n"
        f"ExecStart={' '.join(exec_quote(a, executable=i == 0) for i, a in enumerate(command(s)))}\n"
    )
    timer = (
        f"[Unit]\nDescription=labbook schedule {_specifiers(s.id)} ({_specifiers(s.trigger)})\n\n"
        f"[Timer]\n{timing}\n\n[Install]\nWantedBy=timers.target\n"
    )
    return {f"{name}.service": service, f"{name}.timer": timer}


def systemd(schedules: list[Schedule], now: datetime | None = None) -> str:
    """A `.service` and a `.timer` unit per schedule (`Persistent=true` catches up missed runs)."""
    blocks = []
    for s in schedules:
        refused = systemd_refusal(s, now)
        if refused:
            blocks.append(refused + "\n")
            continue
        for file_name, text in units(s, now).items():
            blocks.append(f"# --- {file_name} ---\n{text}")
    return "\n".join(blocks)


def write_units(schedules: list[Schedule], folder: Path, now: datetime | None = None) -> list[Path]:
    """Write each schedule's unit files into `folder` (e.g. ~/.config/systemd/user); their paths.

    Raises ValueError (one line, nothing written) when a schedule cannot be a unit (`systemd_refusal`).
    """
    for s in schedules:
        units(s, now)  # refuse before writing any
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for s in schedules:
        for file_name, text in units(s, now).items():
            path = folder / file_name
            path.write_text(text)
            written.append(path)
    return written
