"""A study's model, logged by the driver from the staged checkpoint the kernel requested (issue 26).

The kernel writes only a request (class, staged checkpoint, input example); the driver rebuilds
the module and logs it before it closes the run. A request is user-written data: these tests
write hostile ones by hand and check the driver runs nothing, reads nothing outside the run's
staging folder, and fails the run saying which field. Real checkpoints, a real SQLite store.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning
import mlflow
import numpy as np
import pytest
import torch

from lightning_modules import build_data, build_model
from pipelines.execution import closing
from pipelines.execution.notebook import ExecutedNotebook
from pipelines.nb import logged_model
from pipelines.tracking import staged, tracking

pytestmark = pytest.mark.fast

PARAMS = {"model": "mlp_regressor", "data": "regression", "n_samples": 64, "n_features": 4, "hidden_sizes": [8]}


def _run_with_request(store: str) -> tuple[str, Path, torch.nn.Module]:
    """A RUNNING run whose kernel staged a real checkpoint and requested its model."""
    client = tracking.client(store)
    run_id = tracking.start_run(client, "tiny", run_name="deferred")
    staging = staged.folder(tracking.output_dir(store, run_id))
    datamodule = build_data(PARAMS)
    datamodule.setup()
    module = build_model(PARAMS, datamodule)
    checkpoint = staged.path(staging, "checkpoints/best-epoch=0.ckpt")
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        checkpoint,
    )
    assert logged_model.request(staging, module, "checkpoints/best-epoch=0.ckpt", np.ones((4, 4), np.float32))
    return run_id, staging, module


def _close(store: str, run_id: str, staging: Path) -> mlflow.entities.Run:
    client = tracking.client(store)
    ipynb = staging.parent / "train.ipynb"
    closing.close(client, run_id, ExecutedNotebook(ipynb=ipynb, html=None, error=None), staging)
    return client.get_run(run_id)


def _rewrite(staging: Path, **changes: object) -> None:
    request = logged_model.folder(staging) / logged_model.REQUEST
    request.write_text(json.dumps({**json.loads(request.read_text()), **changes}))


def test_the_driver_logs_the_requested_model_with_the_checkpoints_weights(store: str) -> None:
    run_id, staging, module = _run_with_request(store)
    run = _close(store, run_id, staging)
    assert run.info.status == "FINISHED", run.data.tags.get("labbook.error")
    uri = run.data.tags["labbook.model_uri"]
    assert mlflow.get_logged_model(uri.removeprefix("models:/")).experiment_id == run.info.experiment_id
    loaded = mlflow.pytorch.load_model(uri)
    example = torch.ones(4, 4)
    assert torch.allclose(loaded(example), module.eval()(example), atol=1e-6)
    assert not logged_model.folder(staging).exists()  # the request is removed once honoured


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"class": "subprocess.Popen"}, "'class' must be lightning_modules"),
        ({"class": "lightning_modules.registry.build_model"}, "is not a LightningModule"),
        ({"class": "lightning_modules.no_such_module.Model"}, "is not a class of lightning_modules"),
        ({"class": ["lightning_modules.tasks"]}, "'class' must be lightning_modules"),
        ({"checkpoint": "../../../../etc/passwd.ckpt"}, "'checkpoint' leaves the run's staging folder"),
        ({"checkpoint": "/etc/passwd"}, "'checkpoint' must be a staged .ckpt path"),
        ({"checkpoint": "checkpoints/missing.ckpt"}, "the checkpoint file is missing"),
    ],
)
def test_a_hostile_request_fails_the_run_naming_the_field_and_runs_nothing(
    store: str, changes: dict[str, object], said: str
) -> None:
    run_id, staging, _ = _run_with_request(store)
    _rewrite(staging, **changes)
    run = _close(store, run_id, staging)
    assert run.info.status == "FAILED"
    error = run.data.tags["labbook.error"]
    assert error.startswith("logging the model from its staged checkpoint (kept at "), error
    assert said in error, error
    assert "\n" not in error and len(error) <= 500
    assert "labbook.model_uri" not in run.data.tags
    assert mlflow.search_logged_models(experiment_ids=[run.info.experiment_id]).empty


def test_a_linked_checkpoint_or_a_pickled_one_is_never_loaded(store: str, tmp_path: Path) -> None:
    run_id, staging, _ = _run_with_request(store)
    checkpoint = staging / "checkpoints" / "best-epoch=0.ckpt"
    outside = tmp_path / "someone_elses.ckpt"
    checkpoint.rename(outside)
    os.symlink(outside, checkpoint)  # a link to a file outside: not followed
    run = _close(store, run_id, staging)
    assert run.info.status == "FAILED"
    assert "leaves the run's staging folder" in run.data.tags["labbook.error"]  # resolved: it points out

    run_id, staging, _ = _run_with_request(store)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "hyper_parameters": Payload()}, staging / "checkpoints" / "best-epoch=0.ckpt")
    run = _close(store, run_id, staging)
    assert run.info.status == "FAILED"
    assert not marker.exists()  # weights_only: the unpickler refuses the code, nothing ran


def test_a_request_that_is_not_json_or_too_large_is_refused(store: str) -> None:
    run_id, staging, _ = _run_with_request(store)
    (logged_model.folder(staging) / logged_model.REQUEST).write_text("{" * 10)
    run = _close(store, run_id, staging)
    assert run.info.status == "FAILED" and "model request: not JSON" in run.data.tags["labbook.error"]

    run_id, staging, _ = _run_with_request(store)
    (logged_model.folder(staging) / logged_model.REQUEST).write_text(" " * (logged_model.MAX_REQUEST_BYTES + 10))
    run = _close(store, run_id, staging)
    assert run.info.status == "FAILED" and "larger than" in run.data.tags["labbook.error"]


def test_a_module_outside_lightning_modules_is_logged_by_the_kernel_not_requested(tmp_path: Path) -> None:
    staging = tmp_path / "staged"
    assert not logged_model.request(staging, torch.nn.Linear(2, 1), "checkpoints/x.ckpt", np.ones((1, 2)))
    assert not logged_model.requested(staging)


def _close_within(store: str, run_id: str, staging: Path, seconds: float = 60) -> mlflow.entities.Run:
    """`_close` in a thread that must end within `seconds`: a close that blocks fails the test."""
    import threading

    done: list[mlflow.entities.Run] = []
    worker = threading.Thread(target=lambda: done.append(_close(store, run_id, staging)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert done, f"closing the run blocked for {seconds} s"
    return done[0]


def test_a_fifo_in_place_of_a_file_fails_the_run_at_once_instead_of_blocking_the_driver(store: str) -> None:
    run_id, staging, _ = _run_with_request(store)
    checkpoint = staging / "checkpoints" / "best-epoch=0.ckpt"
    checkpoint.unlink()
    os.mkfifo(checkpoint)  # open(O_RDONLY) on a FIFO waits for a writer that never comes
    os.mkfifo(staging / "checkpoints" / "plots.png")  # and one among the files to upload
    run = _close_within(store, run_id, staging)
    assert run.info.status == "FAILED"
    assert "the checkpoint file is missing, a link or not a regular file" in run.data.tags["labbook.error"]

    run_id, staging, _ = _run_with_request(store)
    example = logged_model.folder(staging) / logged_model.EXAMPLE
    example.unlink()
    os.mkfifo(example)
    run = _close_within(store, run_id, staging)
    assert run.info.status == "FAILED" and "the example file is" in run.data.tags["labbook.error"]


def test_a_folder_named_as_the_checkpoint_is_refused_naming_the_field_without_leaking_a_descriptor(
    store: str,
) -> None:
    run_id, staging, _ = _run_with_request(store)
    (staging / "checkpoints" / "folder.ckpt").mkdir()
    _rewrite(staging, checkpoint="checkpoints/folder.ckpt")
    before = len(os.listdir("/proc/self/fd"))
    run = _close(store, run_id, staging)
    assert run.info.status == "FAILED"
    assert "the checkpoint file is missing, a link or not a regular file" in run.data.tags["labbook.error"]
    assert len(os.listdir("/proc/self/fd")) <= before


def test_a_request_the_notebook_removed_or_replaced_fails_the_run_instead_of_finishing_without_a_model(
    store: str,
) -> None:
    import shutil

    from pipelines.tracking.tags import Tag

    run_id, staging, _ = _run_with_request(store)
    tracking.client(store).set_tag(run_id, Tag.MODEL_REQUESTED, "true")  # what the kernel tags first
    shutil.rmtree(logged_model.folder(staging))
    run = _close(store, run_id, staging)
    assert run.info.status == "FAILED" and "the request folder is missing" in run.data.tags["labbook.error"]

    run_id, staging, _ = _run_with_request(store)
    request = logged_model.folder(staging) / logged_model.REQUEST
    request.unlink()
    os.mkfifo(request)
    run = _close_within(store, run_id, staging)
    assert run.info.status == "FAILED" and "the request file is" in run.data.tags["labbook.error"]


def test_reap_logs_the_model_a_dead_driver_owed_and_keeps_the_trial_state_optuna_holds(store: str) -> None:
    import subprocess

    from pipelines.tracking import driver
    from pipelines.tracking.tags import Tag
    from tests.conftest import labbook

    run_id, staging, _ = _run_with_request(store)
    dead = subprocess.Popen(["sleep", "30"])
    started = driver.start_time(dead.pid)
    dead.kill()
    dead.wait()  # a real process that lived and died: the run's driver
    client = tracking.client(store)
    for key, value in {**driver.tags(), driver.PROCESSES_TAG: f"{dead.pid}:{started}"}.items():
        client.set_tag(run_id, key, value)
    client.set_tag(run_id, Tag.TRIAL_STATE, "COMPLETE")  # told to Optuna before the driver died
    done = labbook("reap")
    assert done.returncode == 0, done.stderr[-2000:]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["labbook.error"].startswith("driver died")
    assert run.data.tags[Tag.TRIAL_STATE] == "COMPLETE"  # the record agrees with Optuna
    assert mlflow.pytorch.load_model(run.data.tags[Tag.MODEL_URI]) is not None  # the owed model, logged
