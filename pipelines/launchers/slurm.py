"""SLURM: a study's workers as one job array (submitit), and the job states the driver shows.

`labbook tune SPEC --launcher slurm --workers N` creates the study and its MLflow parent run
here, then submits N array tasks; each is `labbook worker`'s loop (`tune.run_worker`) on the
study's shared storage, so Optuna and MLflow coordinate them exactly as they do local workers.
The driver runs no trial: it prints progress with the array's job states, fails trials whose
worker went silent (a cancelled or preempted task: the heartbeat and retry path), submits new
workers if every task ended with budget left, and cancels the array on Ctrl-C or SIGTERM.

Every SLURM setting is checked against the cluster before a study or run exists
(`check`): `sbatch` on PATH, the partition (`sinfo`), the time limit against the partition's
MaxTime, and the whole request with `sbatch --test-only` (SLURM itself judges cpus, gpus, mem).

submitit's `job.state` needs SLURM accounting (sacct) and stays UNKNOWN without it, so states
come from `squeue`, which every cluster answers.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.specs.launcher_spec import minutes, time_problem
from pipelines.specs.spec_io import SpecError
from pipelines.tracking.tags import Tag

if TYPE_CHECKING:
    from rich.console import Console

    from pipelines.specs.pipeline_spec import PipelineSpec
    from pipelines.specs.spec import Spec
    from pipelines.study.tune import Study

LIVE = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED"}
)
JOB_TAG = Tag.SLURM_JOB_ID  # on every run created inside a SLURM job (`tracking.scheduler_tags`)
RESUBMITS = 2  # new worker arrays the driver submits when every task ended with budget left
POLL_SECONDS = 2.0


class LaunchFailed(RuntimeError):
    """The jobs ended without doing their work (the study's budget is not spent)."""


@dataclass(frozen=True)
class SlurmOptions:
    """What every SLURM job of a launch asks for; None leaves the cluster's default."""

    partition: str | None = None
    time: str | None = None  # SLURM's format: MIN, MIN:SEC, H:MIN:SEC, D-H, D-H:MIN, D-H:MIN:SEC
    cpus_per_task: int = 1
    gpus_per_task: int = 0
    mem: str | None = None  # per node, SLURM's format: 4G, 500M

    def merged(self, **flags: Any) -> SlurmOptions:
        """These options with the flags that were given (not None) taking precedence."""
        return replace(self, **{k: v for k, v in flags.items() if v is not None})


def _run(*command: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _one_line(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    shown = "; ".join(lines)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def check(
    options: SlurmOptions, nodes: int = 1, tasks_per_node: int = 1, names: Mapping[str, str] | None = None
) -> None:
    """Raise SpecError (one line naming the setting) if SLURM would refuse or never run these jobs.

    `names` says how the user wrote each setting (`partition` -> `launcher.partition` for a
    spec's section); a setting not in it is named as its flag (`--partition`), and the key
    `request` prefixes what SLURM refuses of the request as a whole. Nothing is submitted:
    `sbatch --test-only` asks the controller whether the request fits.
    """
    names = names or {}

    def name(setting: str) -> str:
        return names.get(setting, f"--{setting}")

    if shutil.which("sbatch") is None:
        raise SpecError(
            f"{names.get('request', '--launcher slurm')}: `sbatch` is not on PATH; run on a SLURM login node "
            "(or start the local test cluster: scripts/slurm-local start)"
        )
    if options.partition is not None:
        known = _run("sinfo", "-h", "-o", "%R")
        found = sorted(set(known.stdout.split()))
        if options.partition not in found:
            raise SpecError(
                f"{name('partition')}: got {options.partition!r}; this cluster has {', '.join(found) or 'none'}"
            )
    if options.time is not None:
        problem = time_problem(options.time)
        if problem:
            raise SpecError(f"{name('time')}: got {options.time!r}; {problem}")
        limit, partition = _max_time(options.partition)
        asked = minutes(options.time)
        if limit is not None and asked is not None and asked > limit:
            raise SpecError(
                f"{name('time')}: {options.time} is over partition {partition}'s MaxTime of {limit} minutes"
            )
    probe = _run("sbatch", "--test-only", *_flags(options, nodes, tasks_per_node), "--wrap", "true")
    if probe.returncode != 0:
        where = f"{names['request']}: " if "request" in names else ""
        raise SpecError(
            f"{where}SLURM refuses the request ({' '.join(_flags(options, nodes, tasks_per_node))}): "
            f"{_one_line(probe.stderr)}"
        )


def ranks(spec: Spec) -> tuple[int, int]:
    """(nodes, ranks per node) of a spec's training as a SLURM job: the trainer's `num_nodes` and
    `devices` (a count, or a list of device ids; `auto` is one rank per node)."""
    devices = spec.trainer.devices
    count = len(devices) if isinstance(devices, list) else devices if isinstance(devices, int) else 1
    return spec.trainer.num_nodes, max(count, 1)


def check_pipeline(pipeline: PipelineSpec, path: Path) -> None:
    """`check` for every train or tune step of a pipeline whose `launcher:` (the step's own, else
    its spec's) is SLURM, so a bad one stops the pipeline before any run exists.

    Raises SpecError naming the step's setting (`PATH: steps.search.launcher.partition: got ...`).
    """
    from pipelines.specs.pipeline_spec import TrainStep, TuneStep, step_launcher, step_spec_path
    from pipelines.specs.spec import load_spec

    for step in pipeline.steps:
        if not isinstance(step, TrainStep | TuneStep) or (step.launcher and step.launcher.name == "local"):
            continue
        spec = load_spec(step_spec_path(step, path))
        launcher = step_launcher(step, spec)
        if launcher is None:
            continue
        where = f"{path}: steps.{step.name}." + ("launcher" if step.launcher else "spec: launcher")
        names = {k: f"{where}.{k}" for k in launcher.slurm_options()} | {"request": where}
        nodes, devices = ranks(spec) if isinstance(step, TrainStep) else (1, 1)
        check(SlurmOptions(**launcher.slurm_options()), nodes, devices, names=names)


def _max_time(partition: str | None) -> tuple[int | None, str]:
    """The partition's MaxTime in minutes (None: unlimited) and its name (the default one if None)."""
    args = ["-p", partition] if partition else []
    found = _run("sinfo", "-h", *args, "-o", "%P %l").stdout.split("\n")
    rows = [line.split() for line in found if line.strip()]
    if partition is None:
        rows = [r for r in rows if r[0].endswith("*")] or rows
    if not rows:
        return None, partition or "?"
    name, limit = rows[0][0].rstrip("*"), rows[0][1]
    try:
        return minutes(limit), name
    except ValueError:
        return None, name


def _flags(options: SlurmOptions, nodes: int = 1, tasks_per_node: int = 1) -> list[str]:
    """sbatch flags for one job of these options."""
    flags = [f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", f"--cpus-per-task={options.cpus_per_task}"]
    if options.partition:
        flags.append(f"--partition={options.partition}")
    if options.time:
        flags.append(f"--time={options.time}")
    if options.gpus_per_task:
        flags.append(f"--gpus-per-task={options.gpus_per_task}")
    if options.mem:
        flags.append(f"--mem={options.mem}")
    return flags


# --- job states ---------------------------------------------------------------------------


def states(job_ids: list[str]) -> dict[str, str]:
    """`{"12_0": "RUNNING", "12_1": "PENDING", "13": "COMPLETED"}` for the given jobs (arrays
    expanded); a job the controller no longer knows is absent. Needs no accounting."""
    if not job_ids:
        return {}
    found: dict[str, str] = {}
    for job in job_ids:  # one at a time: squeue refuses the whole list if one id has aged out
        listed = _run("squeue", "-h", "-r", "-t", "all", "-j", job, "-o", "%i %T")
        for line in listed.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                found[parts[0]] = parts[1]
    return found


def describe(found: dict[str, str]) -> str:
    """`2 RUNNING, 1 PENDING`: how many tasks are in each state."""
    return ", ".join(f"{n} {state}" for state, n in Counter(found.values()).most_common()) or "none listed"


def live(found: dict[str, str]) -> bool:
    return any(state in LIVE for state in found.values())


def cancel(job_ids: list[str]) -> None:
    """scancel the jobs (whole arrays); SLURM sends SIGTERM, then SIGKILL after its KillWait."""
    if job_ids:
        _run("scancel", *job_ids)


# --- a study's workers as a job array -----------------------------------------------------


def _folder(kind: str, name: str) -> Path:
    """A fresh folder for one submission's scripts and logs, beside the local store."""
    from pipelines.tracking import tracking

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    folder = tracking.files_dir(tracking.tracking_uri()) / "slurm" / f"{kind}-{safe}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def study_worker(handle: Study, tracking_uri: str) -> None:
    """One array task: `labbook worker`'s loop on the study, until its budget is spent.

    SIGTERM (scancel, preemption, the time limit) ends this process at once, leaving its trial
    RUNNING: its heartbeat stops, a live worker or the driver fails it, and the retry (same
    parameters, resuming its checkpoints with `ckpt_path: last`) runs on another worker.
    """
    from rich.console import Console

    from pipelines.study.tune import run_worker

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ["OMP_NUM_THREADS"] = os.environ.get("SLURM_CPUS_PER_TASK", "1")
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))
    run_worker(handle, console=Console(soft_wrap=True), wait=120)


def submit_workers(handle: Study, count: int, options: SlurmOptions) -> tuple[str, Path]:
    """Submit `count` workers of the study as one job array; its array job id and log folder."""
    import submitit

    from pipelines.tracking import tracking

    folder = _folder("study", handle.name)
    executor = submitit.SlurmExecutor(folder=folder / "%j", python=sys.executable)
    executor.update_parameters(
        job_name=f"labbook-study-{handle.name}"[:60],
        partition=options.partition,
        time=minutes(options.time) if options.time else None,
        cpus_per_task=options.cpus_per_task,
        gpus_per_task=options.gpus_per_task or None,
        array_parallelism=count,
        additional_parameters={"mem": options.mem} if options.mem else None,  # submitit's `mem` takes GB only
        stderr_to_stdout=True,
    )
    jobs = executor.map_array(study_worker, [handle] * count, [tracking.tracking_uri()] * count)
    return jobs[0].job_id.split("_")[0], folder


def run_study(handle: Study, parent: str, console: Console | None, count: int, options: SlurmOptions) -> None:
    """The driver's part of a SLURM study (a `tune.tune` launcher): submit, watch, cancel on stop."""
    from optuna.trial import TrialState

    from pipelines.study import study as studies
    from pipelines.study.tune import progress_line
    from pipelines.tracking import tracking

    mlflow = tracking.client()
    arrays: list[str] = []

    def submit(n: int) -> None:
        array, folder = submit_workers(handle, n, options)
        arrays.append(array)
        mlflow.set_tag(parent, JOB_TAG, ",".join(arrays))
        if console:
            console.print(f"submitted {n} workers as SLURM job array {array} (logs: {folder})")

    submit(count)
    resubmits, shown = 0, ""
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; labbook relies on them
        warnings.simplefilter("ignore")
        study = handle.load()
    try:
        while True:
            studies.fail_stale_trials(study)  # a cancelled task's trial, when no other worker is alive to
            found = states(arrays)
            line = f"{progress_line(study, handle)} · slurm {arrays[-1]}: {describe(found)}"
            if console and line != shown:
                console.print(line)
                shown = line
            if not live(found):
                trials = study.get_trials(deepcopy=False)
                running = [t for t in trials if t.state == TrialState.RUNNING]
                left = None if handle.n_trials is None else handle.n_trials - studies.budget_used(trials)
                if not running and (left is None or left <= 0):
                    return
                if not running:
                    if resubmits >= RESUBMITS:
                        raise LaunchFailed(
                            f"every SLURM worker ended with {left} trials of the budget left "
                            f"(after {resubmits} resubmissions); see the logs under mlruns/slurm"
                        )
                    resubmits += 1
                    submit(min(count, left))
            time.sleep(POLL_SECONDS)
    except BaseException:
        cancel(arrays)
        raise


# --- which runs are on which job ------------------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    job: str  # `12_3` (array task), `12` (a job or a study's whole array)
    state: str  # squeue's state, or "ENDED" once the controller has forgotten the job
    run_id: str
    what: str  # `trial 3 of study s`, `study s`, `run r`
    run_status: str  # MLflow's


def jobs(limit: int = 100) -> list[JobRow]:
    """The newest `limit` runs recorded inside (or submitting) a SLURM job, with the job's state."""
    from pipelines.tracking import tracking

    mlflow = tracking.client()
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    if not experiments:
        return []
    runs = mlflow.search_runs(
        experiments, f"tags.`{JOB_TAG}` LIKE '%'", max_results=limit, order_by=["attributes.start_time DESC"]
    )
    ids = sorted({job for run in runs for job in run.data.tags[JOB_TAG].split(",")})
    found = states(ids)
    rows = []
    for run in runs:
        tags = run.data.tags
        study = tags.get(Tag.STUDY_NAME)
        if tags.get(Tag.KIND) == "study":
            what = f"study {study}"
        elif study and Tag.TRIAL_NUMBER in tags:
            what = f"trial {tags[Tag.TRIAL_NUMBER]} of study {study}"
        else:
            what = f"run {run.info.run_name}"
        for job in tags[JOB_TAG].split(","):
            state = found.get(job) or describe({k: v for k, v in found.items() if k.startswith(f"{job}_")})
            rows.append(JobRow(job, "ENDED" if state == "none listed" else state, run.info.run_id, what,
                               run.info.status))  # fmt: skip
    return rows


# --- one training as one sbatch job of srun tasks -----------------------------------------

REQUEUE_SIGNAL = "SIGUSR1@90"  # Lightning's SLURM requeue signal, 90 s before the time limit


@dataclass(frozen=True)
class TrainingJob:
    job_id: str
    run_id: str
    folder: Path  # the job's working directory: script, log, Lightning's hpc_ckpt_*.ckpt
    state: str  # the job's last state (COMPLETED, FAILED, CANCELLED, ...)
    restarts: int  # how often SLURM requeued it


def training_script(folder: Path, options: SlurmOptions, nodes: int, devices: int, name: str) -> str:
    """The sbatch script: `srun` starts nodes × devices tasks of train.py, Lightning's ranks.

    `--signal` makes SLURM send SIGUSR1 to every task 90 s before the time limit (and
    `scancel --signal=USR1` does the same by hand): at the next training batch end all ranks
    agree on it, save `hpc_ckpt_N.ckpt` in the working directory and rank 0 runs `scontrol
    requeue` (`lightning_modules.requeue.RequeueOnSignal`, added by the notebook helper under
    SLURM, with Lightning's own in-handler requeue off); `--requeue` lets the job be queued
    again, and the requeued job's Lightning resumes from that checkpoint.
    """
    lines = ["#!/bin/bash", f"#SBATCH --job-name=labbook-run-{name}"[:80]]
    lines += [f"#SBATCH {flag}" for flag in _flags(options, nodes, devices)]
    lines += [
        f"#SBATCH --signal={REQUEUE_SIGNAL}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={folder}/slurm-%j.log",
        f"#SBATCH --chdir={folder}",
        f"export OMP_NUM_THREADS={options.cpus_per_task}",
        'echo "labbook: job $SLURM_JOB_ID starts (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
        # exec: SLURM's signals reach srun itself, which hands them to the tasks.
        f"exec srun --kill-on-bad-exit=1 {sys.executable} -u {folder / 'train.py'}",
    ]
    return "\n".join(lines) + "\n"


def submit_training(
    spec: Any,
    spec_path: Path | None,
    options: SlurmOptions,
    nodes: int,
    devices: int,
    run_name: str | None = None,
    console: Console | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> TrainingJob:
    """Train the spec as one SLURM job of `nodes` × `devices` DDP ranks; wait for it; one MLflow run.

    The run (nested under `parent_run_id` if given, a pipeline's step, with `tags` added) is made
    here, before the job (so a job that never starts still leaves a record), and
    every attempt of the job (requeues included) logs into it from rank 0. The script and the
    job's log are attached to it; it is closed FINISHED when the job completes, else FAILED.
    Ctrl-C or SIGTERM cancels the job and closes the run FAILED ("interrupted").
    """
    from pipelines.execution.script import notebook_script
    from pipelines.tracking import tracking

    spec = spec.with_overrides({"strategy": "ddp", "devices": devices, "num_nodes": nodes})
    uri = tracking.tracking_uri()
    mlflow = tracking.client(uri)
    name = run_name or spec.name
    run_id = tracking.start_run(
        mlflow,
        spec.experiment_name,
        run_name=name,
        parent_run_id=parent_run_id,
        tags={
            Tag.SPEC: spec.name,
            Tag.LAUNCHER: "slurm",
            **({Tag.SPEC_PATH: str(spec_path)} if spec_path else {}),
            **tracking.provenance_tags(spec.trainer.seed, spec.notebook),
            **(tags or {}),
        },
    )
    folder = _folder("run", name)
    try:
        script = notebook_script(
            spec, spec_path, folder / "train.py", str(tracking.output_dir(uri, run_id)),
            extra={"run_id": run_id, "tracking_uri": uri, "run_name": name},
        )  # fmt: skip
        batch = folder / "job.sbatch"
        batch.write_text(training_script(folder, options, nodes, devices, name), encoding="utf-8")
        submitted = _run("sbatch", "--parsable", str(batch), timeout=60)
        if submitted.returncode != 0:
            raise LaunchFailed(f"sbatch refused the job: {_one_line(submitted.stderr)}")
        job = submitted.stdout.strip().split(";")[0]
        mlflow.set_tag(run_id, JOB_TAG, job)
        if console:
            console.print(f"submitted SLURM job {job}: {nodes} node(s) × {devices} task(s); run {run_id}")
            console.print(f"log: {folder / f'slurm-{job}.log'}")
        state, restarts = _follow(job, mlflow, run_id, console)
    except BaseException as exc:
        if "job" in locals():
            cancel([job])
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        tracking.finish_run(mlflow, run_id, reason)
        raise
    mlflow.log_artifact(run_id, str(script), "script")
    log = folder / f"slurm-{job}.log"
    if log.exists():
        mlflow.log_artifact(run_id, str(log), "script")
    error = None if state == "COMPLETED" else f"SLURM job {job} ended {state}; its log: {log}"
    tracking.finish_run(mlflow, run_id, error)
    return TrainingJob(job, run_id, folder, state, restarts)


def _follow(job: str, mlflow: Any, run_id: str, console: Console | None) -> tuple[str, int]:
    """Wait for the job to end, printing each state change; its final state and restart count."""
    shown, restarts = "", 0
    while True:
        info = _job_info(job)
        state = info.get("JobState") or states([job]).get(job, "ENDED")
        restarts = max(restarts, int(info.get("Restarts", "0") or 0))
        if state != shown:
            if console:
                console.print(f"job {job}: {state}" + (f" (restart {restarts})" if restarts else ""))
            if state == "RUNNING" and shown:  # a requeued attempt: Lightning closed the run when it saved
                mlflow.update_run(run_id, status="RUNNING")
            shown = state
        if state not in LIVE:
            return state, restarts
        time.sleep(POLL_SECONDS)


def _job_info(job: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); empty once forgotten."""
    shown = _run("scontrol", "show", "job", "-o", job)
    if shown.returncode != 0:
        return {}
    return dict(item.split("=", 1) for item in shown.stdout.split() if "=" in item)
