"""Every MLflow tag and Optuna user attribute labbook writes or reads, named once.

A tag's name is part of the record: the MLflow UI, `labbook compare`/`diff`/`rerun`, searches
(`tags.labbook.study_name = ...`), the notebooks and other tools read them back, so a name is
spelled here and nowhere else. Standard library only: notebooks import it too
(`from pipelines.tracking.tags import Tag`).
"""

from __future__ import annotations


class Tag:
    """MLflow tag names (on runs, and on registered model versions)."""

    PREFIX = "labbook."
    GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own tag: the UI shows it on the run page

    # Provenance: what a run needs to be repeated (tracking.provenance_tags).
    GIT_DIRTY = PREFIX + "git_dirty"
    PYTHON_VERSION = PREFIX + "python_version"
    TORCH_VERSION = PREFIX + "torch_version"
    LIGHTNING_VERSION = PREFIX + "lightning_version"
    MLFLOW_VERSION = PREFIX + "mlflow_version"
    NOTEBOOK = PREFIX + "notebook"  # the source notebook a run executed, relative to the project when inside
    NOTEBOOK_SHA256 = PREFIX + "notebook_sha256"  # its content then: `labbook rerun` runs only that
    SEED = PREFIX + "seed"
    PYTHON_EXECUTABLE = PREFIX + "python_executable"
    DATA_FINGERPRINT = PREFIX + "data_fingerprint"

    # A run: where it came from and how it ended.
    SPEC = PREFIX + "spec"
    SPEC_PATH = PREFIX + "spec_path"
    KIND = PREFIX + "kind"  # study, confirm, pipeline
    LAUNCHER = PREFIX + "launcher"  # slurm: the run was launched on a cluster
    ERROR = PREFIX + "error"
    UPLOAD_ERROR = PREFIX + "upload_error"  # uploading a run's staged files failed (and so did attaching it)
    PRUNED = PREFIX + "pruned"
    MODEL_URI = PREFIX + "model_uri"
    MODEL_REQUESTED = PREFIX + "model_requested"  # "true": the kernel left its model for the driver to log
    RESUMED_FROM = PREFIX + "resumed_from"
    RESUMED_AT_EPOCH = PREFIX + "resumed_at_epoch"
    RERUN_OF = PREFIX + "rerun_of"
    RERUN_VERDICT = PREFIX + "rerun_verdict"
    RERUN_CHANGED = PREFIX + "rerun_changed"
    OUTPUT_PREFIX = PREFIX + "output."  # a notebook's outputs for later steps, as JSON: output.<key>
    SLURM_JOB_ID = PREFIX + "slurm_job_id"  # the SLURM job a run ran in: `12_3` for task 3 of array 12

    # A run's driver (tracking/driver.py): who drives it, and whether that driver still lives.
    DRIVER_PREFIX = PREFIX + "driver."
    DRIVER_HOST = DRIVER_PREFIX + "host"
    DRIVER_MACHINE = DRIVER_PREFIX + "machine"  # boot id and pid namespace: same host name, same process table?
    DRIVER_PROCESSES = DRIVER_PREFIX + "processes"  # "pid:start,pid:start": the user's process and this one
    DRIVER_HEARTBEAT = DRIVER_PREFIX + "heartbeat"  # unix seconds of the driver's last beat
    DRIVER_HEARTBEAT_SECONDS = DRIVER_PREFIX + "heartbeat_seconds"

    # Studies and their trials.
    STUDY_NAME = PREFIX + "study_name"
    STORAGE = PREFIX + "storage"
    TRIAL_NUMBER = PREFIX + "trial_number"
    TRIAL_STATE = PREFIX + "trial_state"  # a trial's run: RUNNING, then COMPLETE, PRUNED or FAIL as Optuna holds it
    BEST_TRIAL = PREFIX + "best_trial"
    BEST_RUN_ID = PREFIX + "best_run_id"
    BEST_BY_MEAN_TRIAL = PREFIX + "best_by_mean_trial"
    CONFIRMS_TRIAL = PREFIX + "confirms_trial"
    REPORT_ERROR = PREFIX + "report_error"
    REGISTER_ERROR = PREFIX + "register_error"  # a study's best trial was not registered, and why

    # Pipelines and schedules.
    PIPELINE = PREFIX + "pipeline"
    PIPELINE_RUN = PREFIX + "pipeline_run"
    TRIGGER = PREFIX + "trigger"
    SCHEDULE_ID = PREFIX + "schedule_id"
    STEP = PREFIX + "step"
    FAILED_STEP = PREFIX + "failed_step"
    RESUMED_FROM_STEP = PREFIX + "resumed_from_step"
    OUTPUTS_PREFIX = PREFIX + "outputs."  # on a pipeline run: outputs.<step>, a step's outputs as JSON
    STEP_STATE_PREFIX = PREFIX + "step_state."  # on a pipeline run: step_state.<step>

    # The Model Registry (tags of a model version) and compressed variants.
    RUN_ID = PREFIX + "run_id"
    VARIANT = PREFIX + "variant"
    SOURCE_RUN = PREFIX + "source_run"

    @classmethod
    def of(cls, key: str) -> str:
        """The tag `labbook.<key>` of a name chosen at run time (a metric, a notebook's own tag)."""
        return cls.PREFIX + key

    @classmethod
    def champion_before(cls, metric: str) -> str:
        """On a model version: the champion's `metric` when this version was registered."""
        return f"{cls.PREFIX}champion_{metric}_before"


class Attr:
    """Optuna user attributes of studies and trials."""

    # A study's.
    PARENT_RUN = "mlflow_parent_run_id"
    PRUNER = "pruner"
    PRUNING_STEP = "pruning_step"  # what a reported step counts: "epochs_trained" (absent: Lightning's 0-based epoch)
    METRIC = "metric"
    BEST_BY_MEAN = "best_by_mean"
    SETTINGS = "settings"  # the driver's settings of every trial, less the searched ones: workers must match
    # A trial's.
    RUN_ID = "mlflow_run_id"
    WORKER = "worker"
    ERROR = "error"
    INTERRUPTED = "interrupted"
    OVER_BUDGET = "over_budget"  # created after other workers' trials had taken the whole budget: never run
