"""Cron expressions with the meaning Vixie cron gives them: crontab(5) as system cron reads it.

One meaning for the scheduler and both exports (README, Scheduling):

- five fields, `minute hour day-of-month month day-of-week`; each a list of `*`, `N`, `N-M`,
  `*/S` or `N-M/S`; month and weekday also by three-letter English names; weekday 0 and 7 are
  Sunday. Nothing else: `N/S` (Vixie cron silently ignores the `/S`, cronie does not), `L`, `W`,
  `#`, `?`, `H`, a seconds or year field and `@daily` are not read the same by every cron, and
  are refused with the reason;
- day-of-month and day-of-week: when both are restricted (neither starts with `*`) a day matches
  if EITHER matches; when either starts with `*` (`*/2` too) BOTH must match. This is Vixie's
  `DOM_STAR`/`DOW_STAR` rule (entry.c, cron.c), which croniter's `day_or` does not apply by
  itself: it ORs `*/2` with a weekday, so we pass it the flag;
- times are wall-clock times in the schedule's time zone. Across a DST change Vixie cron runs a
  *fixed-time* job (neither minute nor hour starts with `*`) whose time was skipped right after
  the jump, and runs it once when an hour repeats; a *wildcard* job (minute or hour starts with
  `*`) skips the skipped times and runs again in the repeated hour. `fire_times` does the same
  (several skipped times of one job run once, at the jump).

Parsing is written here, not taken from croniter: croniter accepts more (the extensions above)
and ORs the day fields differently, and no kept library parses exactly Vixie's grammar. croniter
still walks the calendar.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo

from croniter import croniter

from pipelines.specs.spec_io import SpecError

MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FIELDS = (  # name, lowest, highest, names (value of names[i] = i + offset)
    ("minute", 0, 59, None, 0),
    ("hour", 0, 23, None, 0),
    ("day-of-month", 1, 31, None, 0),
    ("month", 1, 12, MONTHS, 1),
    ("day-of-week", 0, 7, DAYS, 0),
)
_ITEM = re.compile(r"(?:(?P<star>\*)|(?P<low>[0-9]+|[A-Za-z]+)(?:-(?P<high>[0-9]+|[A-Za-z]+))?)(?:/(?P<step>[0-9]+))?")
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # Feb 29 exists (leap years)
# The largest clock change that the DST rule looks around (Vixie treats jumps up to 3 h as DST).
_WINDOW = timedelta(hours=3)
# Files in the zoneinfo folder that `zoneinfo.available_timezones()` lists but are no IANA zone.
NOT_ZONE_NAMES = frozenset({"localtime", "posixrules"})
FORM = "'minute hour day-of-month month day-of-week', e.g. '0 3 * * *'"


@dataclass(frozen=True)
class CronExpression:
    """A parsed expression: the matching values of each field and Vixie's star flags."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0-6, Sunday = 0
    minute_star: bool
    hour_star: bool
    day_star: bool
    weekday_star: bool

    @property
    def days_or(self) -> bool:
        """Day-of-month OR day-of-week (both restricted), else AND."""
        return not (self.day_star or self.weekday_star)

    @property
    def wildcard(self) -> bool:
        """Vixie's wildcard job (minute or hour starts with `*`): the DST rule treats it apart."""
        return self.minute_star or self.hour_star

    def matches(self, wall: datetime) -> bool:
        """Whether a wall-clock minute matches (crontab(5)'s rule, DST aside)."""
        weekday = (wall.weekday() + 1) % 7  # Python: Monday = 0; cron: Sunday = 0
        day_ok, weekday_ok = wall.day in self.days, weekday in self.weekdays
        return (
            wall.minute in self.minutes
            and wall.hour in self.hours
            and wall.month in self.months
            and ((day_ok or weekday_ok) if self.days_or else (day_ok and weekday_ok))
        )

    def croniter_text(self) -> str:
        """The same sets as plain numbers, for croniter (with `day_or=self.days_or`)."""
        full = (range(60), range(24), range(1, 32), range(1, 13), range(7))
        values = (self.minutes, self.hours, self.days, self.months, self.weekdays)
        keep = (False, False, self.days_or, False, self.days_or)  # croniter reads a day `*` as unrestricted
        return " ".join(
            "*" if field == set(every) and not explicit else ",".join(map(str, sorted(field)))
            for field, every, explicit in zip(values, full, keep, strict=True)
        )


def _fail(expression: str, reason: str) -> SpecError:
    shown = expression if len(expression) <= 80 else expression[:77] + "..."
    return SpecError(f"--cron: {shown!r}: {reason}; expected 5 fields {FORM}")


# Digits a number in a field may have: a longer value is past every field's range (and Vixie cron
# refuses a number of 100 digits; this one is refused with its field named), a longer step too.
_LONGEST = 9


def _number(text: str) -> int | None:
    """ASCII digits as a number (cron reads no other digits: `²`, `٣` are not numbers to it), else None.

    One longer than `_LONGEST` digits is read as 10**_LONGEST: Python's `int()` refuses 4300 digits.
    """
    if not (text.isascii() and text.isdigit()):
        return None
    text = text.lstrip("0") or "0"
    return int(text) if len(text) <= _LONGEST else 10**_LONGEST


def _quoted(text: str) -> str:
    """`text` quoted for an error line, cut to 20 characters: the expression itself is shown already."""
    return repr(text if len(text) <= 20 else text[:17] + "...")


def _value(text: str, low: int, high: int, names: tuple[str, ...] | None, offset: int) -> int | None:
    number = _number(text)
    if number is not None:
        return number
    if names and text.lower() in names:
        return names.index(text.lower()) + offset
    return None


def _field(expression: str, text: str, spec: tuple) -> tuple[set[int], bool]:
    name, low, high, names, offset = spec
    allowed = f"{low}-{high}" + (f" or {names[0].title()}-{names[-1].title()}" if names else "")
    values: set[int] = set()
    for item in text.split(","):
        match = _ITEM.fullmatch(item)
        # croniter's letters, looked for outside the names a field takes (`thu` has an H, `wed` a W).
        unnamed = [part for part in re.split(r"[-/]", item) if _value(part, low, high, names, offset) is None]
        if re.search(r"[LW#?H]", "".join(unnamed)):
            reason = (
                f"{name} {_quoted(item)}: L, W, #, ? and H are not crontab(5) syntax (system cron cannot read them)"
            )
            raise _fail(expression, reason)
        if match is None:
            raise _fail(expression, f"{name} {_quoted(item)} is not N, N-M, *, */S or N-M/S with N, M in {allowed}")
        step = (_number(match["step"]) or 0) if match["step"] else 1
        if match["step"] and not 1 <= step < 10**_LONGEST:
            raise _fail(expression, f"{name} {_quoted(item)}: a step must be 1 or more, of at most {_LONGEST} digits")
        if match["star"]:
            first, last = low, high
        else:
            first = _value(match["low"], low, high, names, offset)
            last = _value(match["high"], low, high, names, offset) if match["high"] else first
            for part, value in ((match["low"], first), (match["high"], last)):
                if part is not None and (value is None or not low <= value <= high):
                    raise _fail(expression, f"{name} {_quoted(part)} is outside {allowed}")
            if match["step"] and not match["high"]:
                write = f"{match['low'][:10]}-{high}/{match['step'][:10]}"
                raise _fail(expression, f"{name} {_quoted(item)}: crons disagree on N/S; write {write}")
            if last < first:
                raise _fail(expression, f"{name} {_quoted(item)}: a range runs from low to high (cron matches nothing)")
        values.update(range(first, last + 1, step))
    return values, text.startswith("*")


@lru_cache(maxsize=256)
def parse(expression: str) -> CronExpression:
    """A crontab(5) expression, parsed; SpecError (one line naming --cron and the reason) if it is
    not one system cron reads the same way, or if it can never fire (`0 3 30 2 *`)."""
    fields = expression.split()
    if len(fields) != 5:
        raise _fail(expression, f"{len(fields)} field(s)")
    parsed = [_field(expression, text, spec) for text, spec in zip(fields, _FIELDS, strict=True)]
    (minutes, minute_star), (hours, hour_star), (days, day_star), (months, _), (weekdays, weekday_star) = parsed
    weekdays = {d % 7 for d in weekdays}
    cron = CronExpression(
        " ".join(fields),
        frozenset(minutes),
        frozenset(hours),
        frozenset(days),
        frozenset(months),
        frozenset(weekdays),
        minute_star,
        hour_star,
        day_star,
        weekday_star,
    )
    if not cron.days_or and not any(day <= _MONTH_DAYS[month - 1] for month in months for day in days):
        raise _fail(expression, "no month in it has that day, so it never fires")
    return cron


def _wall(moment: datetime) -> datetime:
    return moment.replace(tzinfo=None)


def instants(cron: CronExpression, zone: tzinfo, wall: datetime) -> list[datetime]:
    """The real moments (in UTC) one matching wall-clock time fires at, by Vixie's DST rule.

    Compared in UTC: Python compares two times of one zone by their wall clocks, ignoring fold.
    """
    first, second = (wall.replace(tzinfo=zone, fold=fold).astimezone(UTC) for fold in (0, 1))
    if _wall(first.astimezone(zone)) != wall:  # skipped by a clock jump forward
        if cron.wildcard:
            return []
        after = wall
        while _wall(after.replace(tzinfo=zone).astimezone(UTC).astimezone(zone)) != after:
            after += timedelta(minutes=1)
        return [after.replace(tzinfo=zone).astimezone(UTC)]  # right after the jump, as cron's catch-up runs it
    if first != second:  # an hour that repeats
        return [first, second] if cron.wildcard else [first]
    return [first]


def next_fire(cron: CronExpression, zone: tzinfo, after: datetime) -> datetime:
    """The first fire time strictly after `after` (aware), in `zone`'s wall clock."""
    after = after.astimezone(UTC)
    start = _wall(after.astimezone(zone)) - _WINDOW  # a repeated hour's second pass lies behind
    walk = croniter(cron.croniter_text(), start, day_or=cron.days_or)
    best: datetime | None = None
    while True:
        wall = walk.get_next(datetime)
        if best is not None and wall > _wall(best.astimezone(zone)) + _WINDOW:
            return best.astimezone(zone)
        for moment in instants(cron, zone, wall):
            if moment > after and (best is None or moment < best):
                best = moment


def fire_times(cron: CronExpression, zone: tzinfo, after: datetime) -> Iterator[datetime]:
    """The fire times after `after`, in order (aware, in `zone`)."""
    while True:
        after = next_fire(cron, zone, after)
        yield after


def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name`, or SpecError naming --timezone."""
    from zoneinfo import available_timezones

    # `available_timezones()` lists every file under the system's zoneinfo folder, `localtime`
    # (a link to /etc/localtime, this machine's zone, whatever it is) among them: not a name.
    if name not in available_timezones() or name in NOT_ZONE_NAMES:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise SpecError(f"--timezone: {shown!r} is not an IANA time zone name; expected e.g. Europe/Berlin or UTC")
    return ZoneInfo(name)


def local_zone_name() -> str:
    """This machine's time zone (TZ, else /etc/localtime), as an IANA name."""
    from tzlocal import get_localzone_name

    name = get_localzone_name()
    if not name or name in NOT_ZONE_NAMES:
        raise SpecError("--timezone: this machine's time zone has no IANA name; give --timezone, e.g. UTC")
    return name
