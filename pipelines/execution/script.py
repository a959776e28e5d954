"""`labbook script`: a spec's notebook as one Python script, for launchers that start processes.

torchrun and SLURM start the same program once per GPU on every node; a kernel cannot be
that program. The script is the notebook's own code with the spec's parameters filled in by
papermill (so it is the same code path as `labbook run`), converted by nbconvert. Every rank
runs it; Lightning wires the ranks together from the launcher's environment, and only rank 0
creates the MLflow run and reports (see `in_notebook.is_rank_zero`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.specs.spec import Spec


def notebook_script(
    spec: Spec,
    spec_path: Path | None,
    output: Path,
    output_dir: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the spec's notebook, parameters injected, as a Python script at `output`.

    `output_dir` is where rank 0 writes checkpoints; every rank scores the test split from the
    best one, so across nodes it must be a folder all of them read. `extra`: more notebook
    parameters (e.g. the `run_id` and `tracking_uri` of a run made before the job starts).
    """
    import papermill
    from nbconvert import PythonExporter

    from pipelines.execution.notebook import ensure_kernel
    from pipelines.tracking import tracking

    notebook = spec.notebook_path(spec_path.parent if spec_path else None)
    parameters = {**spec.parameters(), "experiment_name": spec.experiment_name, "run_name": spec.name}
    if output_dir:
        parameters["output_dir"] = output_dir
    parameters |= extra or {}
    # The script is attached to a SLURM run: a URL's password is written `***`, and the job gets it
    # from its environment (sbatch exports the submitter's, `LABBOOK_SECRET_URLS` included).
    parameters = {name: tracking.notebook_parameter(value) for name, value in parameters.items()}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / notebook.name
        papermill.execute_notebook(
            str(notebook), str(prepared), parameters=parameters, prepare_only=True, kernel_name=ensure_kernel()
        )
        source, _ = PythonExporter().from_filename(str(prepared))
    header = f"# {notebook.name} with the parameters of spec {spec.name!r}, written by `labbook script`.\n"
    output.write_text(header + source, encoding="utf-8")
    return output
