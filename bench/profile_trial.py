"""Where one notebook trial's seconds go, cold and warm: the profile of issue 8, part 3.

One trial of bench/trial.yaml runs the way `labbook tune` runs it, split into phases:

- MLflow run: creating the trial's run (provenance tags) before the notebook starts;
- kernel start: a fresh kernel until it answers (cold), or taking a warm one from the pool;
- each notebook cell, from papermill's own per-cell timing (`metadata.papermill.duration`):
  parameters, imports + logger (the MLflow store is opened here), data, model, fit, test,
  learning curves, predictions, model save;
- notebook writes and kernel messaging: papermill's wall time less its cells' time (labbook's
  engine: the output notebook written once per code cell);
- after the kernel is released, off the trial's path (`labbook tune` does these in its closer
  thread while the next trial runs): the HTML render, and uploading what the kernel staged
  (plots, tables, checkpoints), attaching the executed ipynb and HTML, closing the run.

The same trial run in this process with MLflow and Optuna instrumented (bench/overhead.py's
CallTimer) says how much of it is tracking calls. Median of `--repeats` runs of each.

Run: `.venv/bin/python bench/profile_trial.py` (part of `make bench`); writes bench/profile.json
and bench/profile.md (the table in README).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nbformat  # noqa: E402
import overhead  # noqa: E402 - the bench's shared helpers: spec, trial parameters, CallTimer
import papermill  # noqa: E402
from jupyter_client import KernelManager  # noqa: E402

from pipelines.execution import closing, notebook  # noqa: E402
from pipelines.kernels.kernel_pool import KernelPool  # noqa: E402
from pipelines.tracking import staged, tracking  # noqa: E402

OFF_PATH = "off the path: "  # phases a study's closer thread runs while the next trial runs

BENCH = overhead.BENCH
# A short label per train-notebook code cell, by what the cell starts with.
CELL_LABELS = (
    ("# What to train", "cell: parameters"),
    ("# Parameters", "cell: injected parameters"),
    ("import lightning", "cell: imports, MLflow logger (opens the store)"),
    ("datamodule = build_data", "cell: data"),
    ("net = build_model", "cell: model"),
    ("callbacks = nb.callbacks", "cell: fit (Lightning, per-epoch logging, checkpoints)"),
    ("test_metrics = trainer.test", "cell: test"),
    ("curves = nb.metrics_frame", "cell: learning-curve figure"),
    ("best = type(net)", "cell: predictions figure"),
    ("model_uri = nb.log_model", "cell: model save (mlflow.pytorch)"),
)


def label(source: str) -> str:
    for start, name in CELL_LABELS:
        if source.lstrip().startswith(start):
            return name
    return "cell: " + source.strip().splitlines()[0][:40]


def cold_kernel() -> tuple[KernelManager, float]:
    """A fresh kernel, started and answering, and how long that took."""
    start = time.perf_counter()
    km = KernelManager(kernel_name=notebook.ensure_kernel())
    km.client_class = "jupyter_client.asynchronous.AsyncKernelClient"
    km.start_kernel(cwd=os.getcwd())
    client = km.blocking_client()
    client.start_channels()
    client.wait_for_ready(timeout=120)
    client.stop_channels()
    return km, time.perf_counter() - start


def one_trial(p: dict[str, Any], kernels: Any | None) -> dict[str, float]:
    """One notebook trial, timed phase by phase (what `run_notebook` does, opened up)."""
    phases: dict[str, float] = {}
    uri = tracking.tracking_uri()
    mlflow = tracking.client(uri)
    start = time.perf_counter()
    run_id = tracking.start_run(mlflow, "profile", run_name="profile", tags=tracking.provenance_tags(0, "train"))
    phases["MLflow run create"] = time.perf_counter() - start

    start = time.perf_counter()
    if kernels is None:
        km, phases["kernel start"] = cold_kernel()
    else:
        km = kernels.take()
        phases["kernel start"] = time.perf_counter() - start
    output_dir = tracking.output_dir(uri, run_id)
    output_dir.mkdir(parents=True, exist_ok=True)
    ipynb = output_dir / overhead.TRAIN.name
    staging = staged.folder(output_dir)
    injected = {
        **p,
        "tracking_uri": uri,
        "experiment_name": "profile",
        "run_id": run_id,
        "output_dir": str(output_dir),
        "artifacts_dir": str(staging),
        "defer_model": True,  # a study's driver logs the model after the kernel (off the path)
    }
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(overhead.TRAIN),
            str(ipynb),
            parameters=injected,
            kernel_name=notebook.ensure_kernel(),
            progress_bar=False,
            km=km,
            engine_name=notebook.ENGINE_NAME,
        )
    finally:
        KernelPool.release(km)
    executed_seconds = time.perf_counter() - start
    cells = 0.0
    for cell in nbformat.read(ipynb, as_version=4).cells:
        if cell.cell_type == "code":
            seconds = float(cell.metadata.get("papermill", {}).get("duration") or 0.0)
            name = label(cell.source)
            phases[name] = phases.get(name, 0.0) + seconds
            cells += seconds
    phases["notebook writes, kernel messaging (papermill)"] = executed_seconds - cells

    start = time.perf_counter()
    html = notebook.render_html(ipynb)
    phases[OFF_PATH + "HTML render"] = time.perf_counter() - start
    start = time.perf_counter()
    error, _ = closing.close(mlflow, run_id, notebook.ExecutedNotebook(ipynb=ipynb, html=html, error=None), staging)
    assert error is None, error
    phases[OFF_PATH + "uploads (plots, tables, checkpoints), attach notebook, close run"] = time.perf_counter() - start
    return phases


def table(result: dict[str, Any]) -> str:
    cold, warm = result["cold"], result["warm"]
    lines = [
        f"Machine: {result['machine']}; one trial of bench/trial.yaml ({result['epochs']} epochs), "
        f"median of {result['repeats']} runs each; seconds.",
        "",
        "| phase | cold kernel | warm pool |",
        "|---|---|---|",
    ]
    on_path = [name for name in cold if not name.startswith(OFF_PATH)]
    for name in on_path:
        lines.append(f"| {name} | {cold[name]:.2f} | {warm.get(name, 0.0):.2f} |")
    lines.append(
        f"| **on the trial's path** | **{sum(cold[n] for n in on_path):.2f}** "
        f"| **{sum(warm.get(n, 0.0) for n in on_path):.2f}** |"
    )
    for name in cold:
        if name.startswith(OFF_PATH):
            lines.append(f"| {name} | {cold[name]:.2f} | {warm.get(name, 0.0):.2f} |")
    lines.append(f"| **total** | **{sum(cold.values()):.2f}** | **{sum(warm.values()):.2f}** |")
    tracked = result["in_process"]
    lines += [
        "",
        f"The same trial in-process: {tracked['seconds']:.2f} s, of which {tracked['tracking_seconds']:.2f} s "
        f"({tracked['tracking_seconds'] / tracked['seconds']:.1%}) inside {tracked['calls']} MLflow and Optuna calls "
        "on its path (its run closed in a closer thread, as in a study).",
    ]
    return "\n".join(lines) + "\n"


def median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(run.get(name, 0.0) for run in runs) for name in runs[0]}


def main() -> None:
    from pipelines.execution.closing import RunCloser

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    p = overhead.params(max_epochs=overhead.R2_EPOCHS)
    runs: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    in_process: list[tuple[float, float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "mlruns").mkdir()
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlruns' / 'mlflow.db'}"
        os.chdir(tmp)
        one_trial(p, None)  # the store's creation and this process's first-call caches, untimed
        overhead.in_process_trial(p)
        with notebook.warm_kernels(1, tracking_uri=tracking.tracking_uri()) as kernels:
            for r in range(args.repeats):  # interleaved: both variants see the same machine load
                runs["cold"].append(one_trial(p, None))
                runs["warm"].append(one_trial(p, kernels))
                timer = overhead.CallTimer()
                with timer.installed(), RunCloser() as closer:
                    seconds = overhead.in_process_trial(p, closer)
                in_process.append((seconds, timer.seconds, timer.calls))
                overhead.say(
                    f"  profile repeat {r + 1}/{args.repeats}: cold {sum(runs['cold'][-1].values()):.1f}s, "
                    f"warm {sum(runs['warm'][-1].values()):.1f}s, in-process {seconds:.1f}s"
                )
    result = {
        "machine": overhead.machine(),
        "epochs": overhead.R2_EPOCHS,
        "repeats": args.repeats,
        "cold": median_phases(runs["cold"]),
        "warm": median_phases(runs["warm"]),
        "in_process": {
            "seconds": statistics.median(s for s, _, _ in in_process),
            "tracking_seconds": statistics.median(t for _, t, _ in in_process),
            "calls": int(statistics.median(c for _, _, c in in_process)),
        },
        "runs": runs,
    }
    (BENCH / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    (BENCH / "profile.md").write_text(table(result))
    overhead.say(table(result))


if __name__ == "__main__":
    main()
