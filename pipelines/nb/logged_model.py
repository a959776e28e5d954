"""A run's trained model logged to MLflow: by its kernel, or after the kernel by the run's driver.

`log_pytorch_model` is the one MLflow call (used by both). In a study the driver closes a trial's
run in a background thread while the next trial trains (`pipelines/execution/closing.py`); there
the kernel only *requests* the model (`request`: the class, the staged best checkpoint and the
input example, a few KB written in ~1 ms) and the driver rebuilds it from the checkpoint and logs
it (`log_requested`), so the model's export and upload (~0.1-0.2 s for the bench trial's MLP, 2.5%
of its 5 s, R4 of issue 26) leave the trial's critical path. Only a module the notebook loaded with
`load_from_checkpoint` is requested (the notebook says so: `log_model(from_checkpoint=True)`); the
model logged is the same either way, and the run is closed only after it was logged.

Written by hand: MLflow logs a model from the live object in the logging process only; nothing
in MLflow or Lightning hands "log this checkpoint as a model" to another process.

What the driver trusts of a request, which a notebook (user code) wrote: nothing but data. The
class must be a LightningModule defined in `lightning_modules` (the installed package's code,
which the driver may import); the checkpoint must be a regular file in the run's staging folder
and is read with `weights_only=True` (torch's restricted unpickler: tensors and plain values,
never code); the example is a `.npy` read with `allow_pickle=False`. A request that breaks any of
these fails the run, saying which field, and runs nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pipelines.tracking import staged

FOLDER = "staged-model"  # beside the run's `staged/` folder: never uploaded as artifacts itself
REQUEST = "request.json"
EXAMPLE = "example.npy"
MAX_REQUEST_BYTES = 64 * 1024
_CLASS = re.compile(r"lightning_modules(\.[A-Za-z_][A-Za-z0-9_]*)+")


def folder(staging: str | os.PathLike) -> Path:
    """Where a run's model request waits: `<output dir>/staged-model`, beside `staging`."""
    return Path(staging).parent / FOLDER


def log_pytorch_model(tracking_uri: str, run_id: str, experiment_id: str, module: Any, example: Any) -> str:
    """Log `module` (a torch module, on CPU, in eval mode) as the run's MLflow PyTorch model `model`.

    `example` is an input batch (numpy, e.g. shape (4, n_features)) saved as the model's input
    example. Returns MLflow 3's model URI (`models:/m-...`), also tagged `labbook.model_uri`.
    Uses MLflow's fluent API (`mlflow.pytorch.log_model`, https://mlflow.org/docs/latest/api_reference/
    python_api/mlflow.pytorch.html): it sets the process's tracking URI and current experiment.
    Raises what MLflow raises (a store that takes no writes).
    """
    import mlflow
    import mlflow.pytorch
    import torch

    from pipelines.tracking.tags import Tag

    mlflow.set_tracking_uri(tracking_uri)
    # The requirements, stated: MLflow would otherwise infer them by loading the model again
    # in a subprocess (about 9 s of every 10 s of logging); a pt2 model needs torch alone.
    torch_version = torch.__version__.split("+")[0]
    # By run id, not inside `mlflow.start_run(run_id=...)`: leaving that block ends the run
    # (FINISHED) while the notebook still runs; only the run's driver may close it. With no active
    # run, MLflow 3 creates the logged model in the *current* experiment, and `runs:/<id>/model`
    # finds a run's model only in the run's own experiment: make that the current one.
    mlflow.set_experiment(experiment_id=experiment_id)
    # `validate_serving_input=False`: MLflow would load the saved model back and predict on the
    # example to check it serves (a fifth of log_model's time); the tests load every kind of
    # model back with `mlflow.pytorch.load_model` instead.
    info = mlflow.pytorch.log_model(
        module,
        name="model",
        input_example=example,
        pip_requirements=[f"torch=={torch_version}"],
        run_id=run_id,
        validate_serving_input=False,
    )
    # MLflow 3 keeps the model apart from run artifacts; its own URI is what the registry takes.
    mlflow.MlflowClient(tracking_uri).set_tag(run_id, Tag.MODEL_URI, info.model_uri)
    return info.model_uri


def can_request(module: Any, example: Any) -> bool:
    """Whether the driver could honour a request for `module`: a class defined in
    `lightning_modules`, and an example that is a plain numpy array (no object dtype)."""
    import numpy as np

    cls = type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    return bool(_CLASS.fullmatch(name)) and isinstance(example, np.ndarray) and example.dtype != object


def request(staging: str | os.PathLike, module: Any, checkpoint_artifact: str, example: Any) -> bool:
    """Ask the run's driver to log `module` rebuilt from the staged checkpoint `checkpoint_artifact`.

    `checkpoint_artifact` is the checkpoint's path under the staging folder (`checkpoints/best-
    epoch=7.ckpt`), which `module`'s class reloads (`load_from_checkpoint`); `example` a numpy
    array. Returns False, writing nothing, where the driver could not honour it (a class outside
    `lightning_modules`, an example that is not a plain numpy array): the caller logs the model
    itself. The request file is written last and renamed into place: a kernel killed while
    writing leaves no request.
    """
    import numpy as np

    if not can_request(module, example):
        return False
    cls = type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    target = folder(staging)
    target.mkdir(parents=True, exist_ok=True)  # from here on the driver requires a valid request
    np.save(target / EXAMPLE, example, allow_pickle=False)
    body = {"class": name, "checkpoint": checkpoint_artifact}
    (target / f"{REQUEST}.tmp").write_text(json.dumps(body))
    os.replace(target / f"{REQUEST}.tmp", target / REQUEST)
    return True


def requested(staging: str | os.PathLike, tags: dict[str, str] | None = None) -> bool:
    """Whether the run's kernel asked its driver to log the model: its request folder exists (a
    file, a link or a FIFO in its place included), or the run is tagged `labbook.model_requested`
    (the kernel tags it first, so a request removed afterwards is still known to be missing)."""
    from pipelines.tracking.tags import Tag

    return os.path.lexists(folder(staging)) or (tags or {}).get(Tag.MODEL_REQUESTED) == "true"


def log_requested(
    tracking_uri: str,
    run_id: str,
    experiment_id: str,
    staging: str | os.PathLike,
    tags: dict[str, str] | None = None,
) -> str | None:
    """The driver's half: log the model the kernel requested, then remove the request.

    `tags`: the run's tags (`labbook.model_requested` says a request was made).
    Returns the model URI, or None when nothing was requested. Call before `staged.upload`, which
    removes the staged checkpoint. Raises `ValueError` naming the field for a request that breaks
    the rules in this module's docstring (the run then fails, saying so), and what loading or
    MLflow raised.
    """
    where = folder(staging)
    if not requested(staging, tags):
        return None
    import numpy as np

    if where.is_symlink() or not where.is_dir():
        raise ValueError("model request: the request folder is missing, a link or not a folder")
    body = _read_request(where / REQUEST)
    cls = _module_class(body.get("class"))
    with _open_regular(_checkpoint_path(staging, body.get("checkpoint")), "checkpoint") as source:
        module = cls.load_from_checkpoint(source, map_location="cpu", weights_only=True)
    with _open_regular(where / EXAMPLE, "example") as source:
        example = np.load(source, allow_pickle=False)
    uri = log_pytorch_model(tracking_uri, run_id, experiment_id, module.cpu().eval(), example)
    shutil.rmtree(where, ignore_errors=True)
    return uri


def _read_request(path: Path) -> dict[str, Any]:
    with _open_regular(path, "request") as source:
        text = source.read(MAX_REQUEST_BYTES + 1)
    if len(text) > MAX_REQUEST_BYTES:
        raise ValueError(f"model request: larger than {MAX_REQUEST_BYTES} bytes")
    try:
        body = json.loads(text)
    except ValueError:
        raise ValueError("model request: not JSON") from None
    if not isinstance(body, dict):
        raise ValueError("model request: not a JSON object with 'class' and 'checkpoint'")
    return body


def _module_class(name: Any) -> type:
    """The LightningModule class `name` names, imported only from `lightning_modules`."""
    import importlib

    from lightning.pytorch import LightningModule

    if not isinstance(name, str) or not _CLASS.fullmatch(name):
        raise ValueError("model request: 'class' must be lightning_modules.<module>.<Class>")
    module_name, _, class_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise ValueError(f"model request: 'class' {name[:120]} is not a class of lightning_modules") from None
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise ValueError(f"model request: 'class' {name[:120]} is not a LightningModule")
    return cls


def _checkpoint_path(staging: str | os.PathLike, artifact: Any) -> Path:
    """The staged checkpoint `artifact` names; never a path outside the staging folder."""
    if not isinstance(artifact, str) or not artifact.endswith(".ckpt"):
        raise ValueError("model request: 'checkpoint' must be a staged .ckpt path (checkpoints/<name>.ckpt)")
    try:
        return staged.inside(staging, artifact)
    except ValueError:
        raise ValueError("model request: 'checkpoint' leaves the run's staging folder") from None


class _open_regular:  # noqa: N801 - used as a context manager, like open()
    """A regular file opened read-only as bytes, never through a link (`O_NOFOLLOW`) and never
    blocking (`O_NONBLOCK`: a FIFO put in a file's place would block `open` until a writer came);
    the descriptor is checked with `fstat` before it is wrapped, and closed if refused."""

    def __init__(self, path: Path, field: str) -> None:
        self._path, self._field, self._file = path, field, None

    def __enter__(self) -> Any:
        self._file = staged.open_regular(self._path)
        if self._file is None:
            raise ValueError(f"model request: the {self._field} file is missing, a link or not a regular file")
        return self._file

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


__all__ = ["can_request", "folder", "log_pytorch_model", "log_requested", "request", "requested"]
