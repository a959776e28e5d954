"""A spec's or a pipeline step's `launcher:` section: where its training or study runs.

`launcher: {name: slurm, partition: gpu, time: "2:00:00"}`. Here only what can be judged
without the cluster is checked (the shape, the time limit's format); whether the partition
exists and the limit fits its MaxTime is asked of SLURM (`pipelines/launchers/slurm.py`'s
`check`) by the commands that launch, and by `labbook validate`. Imports no torch.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lightning_modules.settings import checked_type

TIME_FORMATS = "minutes or SLURM's MIN:SEC, H:MIN:SEC, D-H:MIN"


def minutes(text: str) -> int | None:
    """SLURM's time limit `text` in whole minutes (seconds round up); None for no limit.

    Raises ValueError for anything SLURM would not parse. Hand-written: SLURM's own parser is C
    inside sbatch, and `sbatch --test-only` accepts a limit over the partition's MaxTime.
    """
    value = text.strip().lower()
    if value in ("infinite", "unlimited"):
        return None
    match = re.fullmatch(r"(?:([0-9]+)-)?([0-9]+)(?::([0-9]+))?(?::([0-9]+))?", value)
    if not match:
        raise ValueError(text)
    days, *rest = match.groups()
    parts = [int(p) for p in rest if p is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, mins, secs = (parts + [0, 0])[:3]
        total = int(days) * 1440 + hours * 60 + mins + (secs > 0)
    elif len(parts) == 1:  # M
        total = parts[0]
    elif len(parts) == 2:  # M:S
        total = parts[0] + (parts[1] > 0)
    else:  # H:M:S
        total = parts[0] * 60 + parts[1] + (parts[2] > 0)
    return total


def time_problem(text: str) -> str | None:
    """Why `text` is no time limit a job can have (`expected ...`), or None if it is one."""
    try:
        asked = minutes(text)
    except ValueError:
        return f"expected {TIME_FORMATS}"
    if asked is None or asked < 1:
        return "expected a limit of at least 1 minute"
    return None


class LauncherSpec(BaseModel):
    """Where a spec's training or study runs: `launcher: {name: slurm, partition: gpu, time: "2:00:00"}`.

    Flags of the same name (`--launcher`, `--partition`, `--time`, ...) override these. In a
    pipeline, a train or tune step's own `launcher:` replaces its spec's.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)
    name: Literal["local", "slurm"] = "local"
    partition: str | None = Field(None, min_length=1, max_length=200)
    time: str | None = Field(None, min_length=1, max_length=40)  # SLURM's format: minutes, H:MIN:SEC, D-H:MIN
    # Never a boolean as a count (`cpus_per_task: true` is refused, not taken as 1), as every setting.
    cpus_per_task: checked_type(int) | None = Field(None, ge=1)
    gpus_per_task: checked_type(int) | None = Field(None, ge=0)
    mem: str | None = Field(None, min_length=1, max_length=40)

    @field_validator("time", mode="before")
    @classmethod
    def _minutes_as_text(cls, value: Any) -> Any:
        """`time: 30` in YAML is an int: SLURM's minutes."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, value: str | None) -> str | None:
        problem = None if value is None else time_problem(value)
        if problem:
            raise ValueError(f"got {value!r}; {problem}")
        return value

    @model_validator(mode="after")
    def _slurm_settings_need_slurm(self) -> LauncherSpec:
        """`partition:` under `name: local` would be ignored silently: refused, as the flags are."""
        given = [k for k, v in self.slurm_options().items() if v is not None]
        if self.name == "local" and given:
            raise ValueError(f"{given[0]}: a SLURM setting; only with name: slurm")
        return self

    def slurm_options(self) -> dict[str, Any]:
        """The SLURM settings given, as `launchers.slurm.SlurmOptions` fields."""
        return {k: v for k, v in self.model_dump().items() if k != "name" and v is not None}
