"""Bad input of one kind everywhere: numbers Python will not convert, digits that are not ASCII,
long lists of allowed values, names that are not IANA zones. Each is one line naming the field,
exit 2, at most 500 characters, before anything is written (README, Known problems)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.errors import LIMIT, listing, reason
from pipelines.schedule import cron, schedule
from pipelines.specs import spec_yaml
from pipelines.specs.spec_io import PROJECT_ROOT, SpecError, shown
from tests.conftest import labbook

pytestmark = pytest.mark.fast  # no notebook, no kernel server

SPECS = PROJECT_ROOT / "pipelines"
NINES = "9" * 5000  # past Python's 4300-digit limit on int(str)


def refused(done, *named: str) -> str:
    """`done` exited 2 with one line, at most LIMIT characters, naming `named`, quoting no long value."""
    line = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and line.count("\n") == 0, done.stderr[-2000:]
    assert len(line) <= LIMIT and "9" * 100 not in line, line
    for name in named:
        assert name in line, (name, line)
    return line


# -- numbers too long for int(): YAML, --set, cron, CLI options ------------------------------------


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (NINES, ["--set", "lr=", "4300"]),  # the tester's case
        (f"-{NINES}", ["--set", "lr="]),
        (f"[1, {NINES}]", ["--set", "[1]"]),  # inside a list: its place named
        (f"{{a: {NINES}}}", ["--set", "a:"]),
        (f"0x{NINES}", ["--set", "4300"]),  # hex is read without the limit, into an int nothing can print
        ("1" + ":00" * 3000, ["--set", "4300"]),  # YAML 1.1's base 60: the same
    ],
)
def test_a_set_value_with_too_many_digits_exits_2_naming_it(tmp_path: Path, value: str, named: list[str]) -> None:
    done = labbook("validate", str(SPECS / "digits_mlp.yaml"), "--set", f"lr={value}", cwd=tmp_path)
    refused(done, *named)


def test_a_spec_number_with_too_many_digits_exits_2_naming_its_field_and_line(tmp_path: Path) -> None:
    raw = yaml.safe_load((SPECS / "digits_mlp.yaml").read_text())
    raw["trainer"]["max_epochs"] = 1
    text = yaml.safe_dump(raw).replace("max_epochs: 1\n", f"max_epochs: {NINES}\n")
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    line = refused(labbook("validate", str(path), cwd=tmp_path), "trainer.max_epochs", "line ", "4300")
    assert f"line {text[: text.index(NINES)].count(chr(10)) + 1}:" in line
    # A pipeline spec is read by the same loader (`labbook run`/`schedule add` refuse it the same way).
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(f"name: p\nsteps:\n  - name: a\n    kind: tune\n    spec: x.yaml\n    n_trials: {NINES}\n")
    refused(labbook("validate", str(pipeline), cwd=tmp_path), "steps[0].n_trials", "line 6")


@pytest.mark.parametrize(
    ("spec", "setting"),
    [
        ("regression_mlp.yaml", f"n_samples={10**400}"),  # was an OverflowError traceback in the split
        ("regression_mlp.yaml", f"max_epochs={'9' * 4000}"),  # was "ok" on a 4,062-character line
        ("regression_mlp.yaml", f"batch_size={10**30}"),  # was "ok", then islice failed in the run
        ("regression_mlp.yaml", f"hidden_sizes=[{10**30}]"),  # was "ok", then torch.empty overflowed
        ("tinygpt.yaml", f"block_size={10**400}"),
    ],
)
def test_a_whole_number_past_2_to_the_53_is_refused_by_validate(spec: str, setting: str) -> None:
    line = refused(labbook("validate", str(SPECS / spec), "--set", setting), setting.split("=")[0])
    assert "less than or equal to 9007199254740992" in line, line


def test_numbers_python_reads_stay_numbers() -> None:
    assert spec_yaml.load("a: " + "9" * 4300) == {"a": int("9" * 4300)}
    assert spec_yaml.load("a: [0x1f, 1:30, -7, 1_000, 2.5e+3]") == {"a": [31, 90, -7, 1000, 2500.0]}
    with pytest.raises(spec_yaml.SpecYAMLError, match=r"^x\.y\[2\]: a number of 5000 characters"):
        spec_yaml.load(f"x:\n  y: [1, 2, {NINES}]")
    assert shown(int("f" * 5000, 16)) == "an integer of 20000 bits"  # repr() itself would raise


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--cron", f"{NINES} 3 * * *"], ["--cron:", "minute", "outside 0-59"]),  # the tester's case
        (["--cron", f"0 {NINES} * * *"], ["--cron:", "hour", "outside 0-23"]),
        (["--cron", f"0-{NINES} 3 * * *"], ["--cron:", "minute"]),
        (["--cron", f"*/{NINES} 3 * * *"], ["--cron:", "step"]),
        (["--cron", f"5/{NINES} * * * *"], ["--cron:", "step"]),
        (["--every", "60", "--grace", NINES], ["--grace:", "whole number"]),
        (["--every", NINES], ["--every:", "31622400"]),
        (["--every", "²"], ["--every:", "a number"]),
        (["--every", "60", "--grace", "³"], ["--grace:", "whole number"]),
    ],
)
def test_a_schedule_number_with_too_many_digits_exits_2_and_stores_nothing(
    tmp_path: Path, flags: list[str], named: list[str]
) -> None:
    zone = [] if "--every" in flags else ["--timezone", "UTC"]  # an interval reads no clock
    done = labbook("schedule", "add", str(SPECS / "digits_nightly.yaml"), "--id", "t1", *flags, *zone, cwd=tmp_path)
    refused(done, *named)
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--n-trials", NINES], ["--n-trials:", "whole number", "1 or more"]),
        (["--n-trials", "²"], ["--n-trials:", "whole number"]),
        (["--workers", NINES], ["--workers:", "whole number"]),
        (["--timeout", NINES], ["--timeout:", "finite"]),  # a float: read as inf, a study without end
        (["--timeout", "inf"], ["--timeout:", "finite"]),
    ],
)
def test_a_cli_number_typer_cannot_convert_is_one_line_naming_the_option(
    tmp_path: Path, flags: list[str], named: list[str]
) -> None:
    done = labbook("tune", str(SPECS / "digits_mlp_tune.yaml"), *flags, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    refused(done, *named)
    assert not (tmp_path / "mlruns").exists()


def test_other_usage_errors_are_one_line_too_and_help_still_shows(tmp_path: Path) -> None:
    refused(labbook("tune", cwd=tmp_path), "Missing argument 'spec'")
    refused(labbook("tune", "x.yaml", "--bogus", cwd=tmp_path), "--bogus")
    refused(labbook("no-such-verb", cwd=tmp_path), "no-such-verb")
    shown_help = labbook("schedule", cwd=tmp_path)  # a group alone shows its help, as before
    assert "add" in shown_help.stdout + shown_help.stderr and "remove" in shown_help.stdout + shown_help.stderr
    assert labbook("--help", cwd=tmp_path).returncode == 0


# -- cron reads ASCII digits only -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "field"),
    [
        ("0 3 * * THU-²", "day-of-week"),  # the tester's case: '²'.isdigit() is True, int('²') raises
        ("0 3 * * ²", "day-of-week"),
        ("0 3 * ¹-3 *", "month"),
        ("0 3 * * 1-5/²", "day-of-week"),
        ("0 3 * * ٣", "day-of-week"),  # Arabic-Indic 3: int() reads it, cron does not
        ("٠ 3 * * *", "minute"),
        ("0 3 ３ * *", "day-of-month"),  # fullwidth 3
    ],
)
def test_cron_fields_take_ascii_digits_only(tmp_path: Path, expression: str, field: str) -> None:
    with pytest.raises(SpecError, match=field):
        cron.parse(expression)
    done = labbook("schedule", "add", str(SPECS / "digits_nightly.yaml"), "--cron", expression, cwd=tmp_path)
    refused(done, "--cron:", field)
    assert not (tmp_path / "mlruns").exists()


def test_cron_names_holding_extension_letters_are_still_names() -> None:
    # `thu` has an H and `wed` a W: croniter's letters are looked for outside the names only.
    assert cron.parse("0 3 * * THU-SAT").weekdays == frozenset({4, 5, 6})
    assert cron.parse("0 3 * * wed").weekdays == frozenset({3})
    assert cron.parse("*/0000000015 * * * *").minutes == frozenset({0, 15, 30, 45})
    assert cron.parse("*/100 * * * *").minutes == frozenset({0})  # a step past the span, as cron reads it
    for extension in ("0 3 * * THU-L", "0 3 * * 5L", "0 3 * * 1#2"):
        with pytest.raises(SpecError, match="not crontab"):
            cron.parse(extension)


# -- lists of allowed values fit the line, whole names first by closeness ---------------------------


def test_the_allowed_strategies_fit_one_line_with_the_closest_first(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    known = {"auto", *StrategyRegistry.available_strategies()}
    for given, first in (("foo", None), ("fdsp", "fsdp"), ("deepspeed_stage_4", "deepspeed_stage_")):
        done = labbook("validate", str(SPECS / "digits_mlp.yaml"), "--set", f"strategy={given}", cwd=tmp_path)
        line = refused(done, "trainer.strategy", "allowed: ")
        listed = line.split("allowed: ", 1)[1]
        names, _, more = listed.partition(", … and ")
        assert set(names.split(", ")) <= known, line  # every name whole
        assert more.endswith(" more") and int(more.split()[0]) == len(known) - len(names.split(", ")), line
        if first:
            assert names.startswith(first), line


def test_known_settings_fit_one_line_under_a_long_path(tmp_path: Path) -> None:
    folder = tmp_path / ("d" * 200)
    folder.mkdir()
    spec = folder / "digits_mlp.yaml"
    spec.write_text((SPECS / "digits_mlp.yaml").read_text())
    line = refused(labbook("validate", str(spec), "--set", "lr_rate=1", cwd=tmp_path), "--set 'lr_rate'", "known: ")
    names, _, more = line.split("known: ", 1)[1].partition(", … and ")
    assert more.endswith(" more") and all(name.isidentifier() for name in names.split(", ")), line


def test_listing_never_cuts_a_name_and_counts_what_it_left_out() -> None:
    names = [f"name_{i:03d}_{'x' * (i % 7)}" for i in range(200)]
    assert listing(names[:3]) == ", ".join(names[:3])
    short = listing(names, "name_150_xxx", budget=120)
    kept, _, more = short.partition(", … and ")
    assert len(short) <= 120 and kept.split(", ")[0] == "name_150_xxx"
    assert set(kept.split(", ")) <= set(names) and int(more.split()[0]) == 200 - len(kept.split(", "))
    # The last resort (any long line): cut between words, start and end kept, one line.
    line = reason("failed: " + "word " * 300 + "at run abc123")
    assert len(line) <= LIMIT and line.endswith("at run abc123") and " … " in line
    assert all(part in ("word", "failed:", "…", "at", "run", "abc123") for part in line.split())


# -- time zones: IANA names only ----------------------------------------------------------------------


def test_localtime_is_no_time_zone_name_and_utc_stays_one(tmp_path: Path) -> None:
    assert schedule.check_timezone("UTC") == "UTC" and schedule.check_timezone("Europe/Berlin") == "Europe/Berlin"
    for bad in ("localtime", "posixrules"):
        with pytest.raises(SpecError, match="--timezone"):
            schedule.check_timezone(bad)
    spec = str(SPECS / "digits_nightly.yaml")
    done = labbook("schedule", "add", spec, "--cron", "0 3 * * *", "--timezone", "localtime", cwd=tmp_path)
    refused(done, "--timezone:", "'localtime'", "IANA")
    assert not (tmp_path / "mlruns").exists()
