"""Execute a notebook with papermill and attach the executed copy (ipynb + HTML) to a run.

A failing cell still leaves a partly executed notebook: it is rendered and attached too,
and the failure comes back as one line (`ZeroDivisionError: division by zero (cell 7)`).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbformat
import papermill
from mlflow import MlflowClient
from nbconvert import HTMLExporter
from papermill.engines import NBClientEngine, NotebookExecutionManager, papermill_engines

from pipelines.errors import reason

if TYPE_CHECKING:
    from pipelines.kernels.kernel_pool import KernelPool

KERNEL_NAME = "labbook"
ENGINE_NAME = "labbook"


class _CodeCellSaves(NotebookExecutionManager):
    """papermill's execution manager, writing the output notebook once per code cell.

    papermill writes the whole notebook before and after every cell, markdown included: 40
    writes for the train notebook's 19 cells, each re-serializing and validating every output
    so far (~5 ms for a 140 kB notebook). Here the notebook is written when it starts, after
    each code cell, on a cell's long outputs (papermill's autosave, unchanged) and at the end
    (papermill's `notebook_complete`, also after an error or Ctrl-C). A driver killed with -9
    still leaves every finished cell's outputs on disk; what is lost is only the "running"
    mark of the cell it was in.
    """

    _holding = False

    def save(self, **kwargs: Any) -> None:
        if not self._holding:
            super().save(**kwargs)

    @contextlib.contextmanager
    def _unsaved(self) -> Any:
        self._holding = True
        try:
            yield
        finally:
            self._holding = False

    def cell_start(self, cell: Any, cell_index: int | None = None, **kwargs: Any) -> None:
        with self._unsaved():  # nothing new to keep: the cell has no outputs yet
            super().cell_start(cell, cell_index, **kwargs)

    def cell_complete(self, cell: Any, cell_index: int | None = None, **kwargs: Any) -> None:
        if cell.get("cell_type") == "code":
            super().cell_complete(cell, cell_index, **kwargs)
            return
        with self._unsaved():  # a markdown cell has no outputs
            super().cell_complete(cell, cell_index, **kwargs)


class _LabbookEngine(NBClientEngine):
    """papermill's nbclient engine with `_CodeCellSaves` as its execution manager.

    Papermill builds its manager inside `Engine.execute_notebook` and has no option for it;
    this is that method with the one class swapped (papermill 2.x; registered by name below).
    """

    @classmethod
    def execute_notebook(
        cls,
        nb: Any,
        kernel_name: str,
        output_path: str | None = None,
        progress_bar: bool = True,
        log_output: bool = False,
        autosave_cell_every: int = 30,
        **kwargs: Any,
    ) -> Any:
        nb_man = _CodeCellSaves(
            nb,
            output_path=output_path,
            progress_bar=progress_bar,
            log_output=log_output,
            autosave_cell_every=autosave_cell_every,
        )
        nb_man.notebook_start()
        try:
            cls.execute_managed_notebook(nb_man, kernel_name, log_output=log_output, **kwargs)
        finally:
            nb_man.cleanup_pbar()
            nb_man.notebook_complete()
        return nb_man.nb


papermill_engines.register(ENGINE_NAME, _LabbookEngine)


@dataclass(frozen=True)
class ExecutedNotebook:
    ipynb: Path
    html: Path | None
    error: str | None  # one line; None when every cell ran
    interrupted: KeyboardInterrupt | None = None  # Ctrl-C / SIGTERM reached us while it ran

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def pruned(self) -> bool:
        """The notebook stopped because an Optuna pruner said so: an outcome, not a failure."""
        return bool(self.error) and self.error.startswith("TrialPruned:")


def ensure_kernel(name: str = KERNEL_NAME) -> str:
    """Make sure kernel `name` runs *this* interpreter, so a notebook never runs in another Python.

    The kernel is installed into this environment's prefix (like `make` does), never user-wide.
    """
    from ipykernel.kernelspec import install
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
        if Path(spec.argv[0]).resolve() == Path(sys.executable).resolve():
            return name
    except NoSuchKernel:
        pass
    install(kernel_name=name, display_name=f"{name} ({sys.prefix})", prefix=sys.prefix)
    return name


def _one_line(exc: BaseException) -> str:
    """`ZeroDivisionError: division by zero (cell 7)`, `kernel died: …`: bounded, never a file's contents."""
    return reason(exc)


_exporter = threading.local()  # one HTMLExporter per thread: its templates load once (~0.1 s)


def render_html(ipynb: Path) -> Path:
    """The notebook as a standalone HTML page (plots embedded), beside the ipynb."""
    if not hasattr(_exporter, "html"):
        _exporter.html = HTMLExporter()
    body, _ = _exporter.html.from_notebook_node(nbformat.read(ipynb, as_version=4))
    html = ipynb.with_suffix(".html")
    html.write_text(body, encoding="utf-8")
    return html


def _write_parameterized(notebook: Path, ipynb: Path, parameters: dict[str, Any]) -> None:
    """The notebook as it was about to run (parameters injected, no outputs): a failed run's record."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    with contextlib.suppress(Exception):  # a missing record must not hide the run's own outcome
        nbformat.write(parameterize_notebook(load_notebook_node(str(notebook)), parameters), ipynb)


def execute(
    notebook: Path,
    output_dir: Path,
    parameters: dict[str, Any],
    cwd: Path | None = None,
    progress_bar: bool = True,
    kernels: KernelPool | None = None,
    render: bool = True,
) -> ExecutedNotebook:
    """Run `notebook` into `output_dir/<name>.ipynb` with `parameters` injected.

    With `kernels`, the notebook runs in a fresh kernel the pool started (and warmed) earlier;
    that kernel is shut down after this one notebook, whatever happened in it. `render=False`
    leaves the HTML page to the caller (`render_html`), who renders it off the critical path.
    A URL parameter's password is written as `***` (the executed notebook is kept and attached
    to its run); the kernel gets the URL from its environment (`tracking.notebook_parameter`).
    """
    from pipelines.tracking import tracking

    parameters = {name: tracking.notebook_parameter(value) for name, value in parameters.items()}
    if kernels is None and _kernel_server_on():
        # One notebook: its kernel is forked by the kernel server, with every core of its share
        # (nothing warms beside it), and shut down after it like any pool's kernel.
        from pipelines.kernels.kernel_pool import KernelPool, default_threads

        try:
            with KernelPool(1, ensure_kernel(), cwd=cwd, expected=1, threads=default_threads()) as one:
                return execute(notebook, output_dir, parameters, cwd, progress_bar, kernels=one, render=render)
        except KeyboardInterrupt as exc:  # while the kernel was being forked, before papermill ran a cell
            output_dir.mkdir(parents=True, exist_ok=True)
            ipynb = output_dir / notebook.name
            if not ipynb.exists():
                _write_parameterized(notebook, ipynb, parameters)
            return ExecutedNotebook(ipynb=ipynb, html=None, error="interrupted", interrupted=exc)
    output_dir.mkdir(parents=True, exist_ok=True)
    ipynb = output_dir / notebook.name
    error: str | None = None
    interrupted: KeyboardInterrupt | None = None
    km = None
    try:
        km = kernels.take() if kernels is not None else None  # inside: Ctrl-C while waiting is an interruption too
        papermill.execute_notebook(
            str(notebook),
            str(ipynb),
            parameters=parameters,
            kernel_name=ensure_kernel(),
            cwd=str(cwd or Path.cwd()),
            progress_bar=progress_bar,
            km=km,
            engine_name=ENGINE_NAME,
        )
    except KeyboardInterrupt as exc:
        # papermill writes the notebook after every cell: keep what ran, then let the caller stop.
        error, interrupted = "interrupted", exc
    except Exception as exc:  # the notebook's failure is the run's outcome, not ours
        error = _one_line(exc)
    finally:
        if kernels is not None:
            kernels.release(km)
    if error is not None and not ipynb.exists():
        _write_parameterized(notebook, ipynb, parameters)  # stopped before papermill wrote a cell
    html = None
    if render and ipynb.exists():
        try:
            html = render_html(ipynb)
        except Exception as exc:  # a rendering problem must not hide the run's own outcome
            error = error or f"rendering the executed notebook failed: {_one_line(exc)}"
    return ExecutedNotebook(ipynb=ipynb, html=html, error=error, interrupted=interrupted)


def _kernel_server_on() -> bool:
    from pipelines.kernels.kernel_pool import kernel_server

    return kernel_server() is not None


def attach(mlflow: MlflowClient, run_id: str, executed: ExecutedNotebook, artifact_path: str = "notebook") -> None:
    """Log the executed notebook and its HTML under the run's `notebook/` (or given) artifacts."""
    for path in (executed.ipynb, executed.html):
        if path is not None and path.exists():
            mlflow.log_artifact(run_id, str(path), artifact_path)


def warm_kernels(size: int | None = None, tracking_uri: str | None = None, expected: int | None = None) -> KernelPool:
    """A kernel pool for a series of notebooks (a worker's trials); size from the environment.

    `expected`: how many notebooks the series will run, where known (the pool warms no more).
    """
    from pipelines.kernels.kernel_pool import KernelPool, default_size

    size = default_size() if size is None else size
    return KernelPool(size, ensure_kernel(), tracking_uri=tracking_uri, expected=expected)
