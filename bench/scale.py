"""A study of 2,000 lightweight trials on SQLite vs PostgreSQL: what the stores cost per trial,
and how fast `search_runs` answers once they hold that many runs.

Each trial does what a labbook trial does to the stores, without a notebook: Optuna ask (two
suggestions), an MLflow child run under the study's parent run with its hyperparameters, five
epochs of metrics (one `log_batch` and one Optuna `report` each), tell, and the run closed.
Both backends hold the Optuna study and the MLflow tracking tables (one database each).
Trials are run in chunks, the backends interleaved chunk by chunk, so both see the same machine
load; per-trial overhead is reported per chunk (min and median). Then `search_runs` queries,
interleaved and repeated, against the full stores.

Run: `.venv/bin/python bench/scale.py [--trials 2000] [--postgres postgresql://postgres@127.0.0.1:5432]`
Writes bench/scale.json. PostgreSQL databases are created fresh and dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna
from mlflow import MlflowClient
from mlflow.entities import Metric

from pipelines.study import study as labbook_study
from pipelines.tracking import tracking

optuna.logging.set_verbosity(optuna.logging.ERROR)
logging.getLogger("alembic").setLevel(logging.WARNING)
logging.getLogger("mlflow").setLevel(logging.WARNING)
EPOCHS, CHUNK, QUERY_REPEATS = 5, 100, 7

QUERIES: dict[str, dict] = {  # what people ask the UI and `labbook compare` for
    "best 10 by val_loss": dict(order_by=["metrics.val_loss ASC"], max_results=10),
    "filter params + metric, top 100": dict(
        filter_string="params.optimizer = 'adamw' and metrics.val_loss < 0.5",
        order_by=["metrics.val_loss ASC"],
        max_results=100,
    ),
    "one child by trial tag": dict(filter_string="tags.`labbook.trial_number` = '1234'", max_results=5),
}


class Backend:
    """One backend's Optuna study and MLflow experiment, with the labbook glue on top."""

    def __init__(self, name: str, optuna_url: str, mlflow_url: str) -> None:
        self.name = name
        self.study = optuna.create_study(
            study_name="scale", storage=labbook_study.storage(optuna_url), pruner=optuna.pruners.NopPruner()
        )
        self.client = MlflowClient(mlflow_url)
        self.parent = tracking.start_run(self.client, "scale", run_name="scale-study")
        self.experiment_id = self.client.get_experiment_by_name("scale").experiment_id

    def trial(self) -> None:
        trial = self.study.ask()
        lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        optimizer = trial.suggest_categorical("optimizer", ["adam", "adamw", "sgd"])
        run_id = tracking.start_run(
            self.client, "scale", run_name=f"trial-{trial.number}", parent_run_id=self.parent,
            tags={"labbook.trial_number": str(trial.number)},
        )  # fmt: skip
        tracking.log_params(self.client, run_id, {"lr": lr, "optimizer": optimizer, "max_epochs": EPOCHS})
        loss = 1.0
        for epoch in range(EPOCHS):
            loss *= 0.5 + lr
            now = int(time.time() * 1000)
            self.client.log_batch(
                run_id, metrics=[Metric("val_loss", loss, now, epoch), Metric("train_loss", loss * 0.9, now, epoch)]
            )
            trial.report(loss, epoch)
        self.study.tell(trial, loss)
        tracking.finish_run(self.client, run_id)

    def search(self, query: dict) -> int:
        return len(self.client.search_runs([self.experiment_id], **query))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def postgres_databases(server: str) -> tuple[Callable[[str], str], Callable[[], None]]:
    import psycopg

    admin = psycopg.connect(f"{server}/postgres", autocommit=True)
    made: list[str] = []

    def make(role: str) -> str:
        name = f"labbook_bench_{role}_{uuid.uuid4().hex[:8]}"
        admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{server}/{name}"

    def drop() -> None:
        for name in made:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    return make, drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    args = parser.parse_args()

    make_db, drop_dbs = postgres_databases(args.postgres)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            backends = [
                Backend("SQLite", f"sqlite:///{tmp}/optuna.db", f"sqlite:///{tmp}/mlflow.db"),
                Backend("PostgreSQL", make_db("optuna"), make_db("mlflow")),
            ]
            per_trial: dict[str, list[float]] = {b.name: [] for b in backends}
            done = 0
            while done < args.trials:
                n = min(CHUNK, args.trials - done)
                for backend in backends:  # interleaved, chunk by chunk
                    seconds = timed(lambda b=backend, n=n: [b.trial() for _ in range(n)])
                    per_trial[backend.name].append(1000 * seconds / n)
                done += n
                print(f"{done}/{args.trials} trials: " + ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in per_trial.items()))
            latency: dict[str, dict[str, list[float]]] = {b.name: {q: [] for q in QUERIES} for b in backends}
            for _ in range(QUERY_REPEATS):
                for query_name, query in QUERIES.items():
                    for backend in backends:
                        latency[backend.name][query_name].append(1000 * timed(lambda b=backend, q=query: b.search(q)))
            for backend in backends:  # the stores hold what was asked, nothing less
                assert len(backend.study.trials) == args.trials
                assert backend.search(dict(max_results=1, filter_string="tags.`labbook.trial_number` = '0'")) == 1
        finally:
            drop_dbs()

    report = {
        "machine": f"{platform.processor() or platform.machine()}, {multiprocessing.cpu_count()} cores",
        "trials": args.trials,
        "epochs_per_trial": EPOCHS,
        "chunk": CHUNK,
        "per_trial_ms": {
            k: {"min": min(v), "median": statistics.median(v), "first_chunk": v[0], "last_chunk": v[-1]}
            for k, v in per_trial.items()
        },
        "search_runs_ms": {
            k: {q: {"min": min(t), "median": statistics.median(t), "repeats": len(t)} for q, t in v.items()}
            for k, v in latency.items()
        },
    }
    Path(__file__).with_name("scale.json").write_text(json.dumps(report, indent=2))
    names = list(per_trial)
    print(f"\n{args.trials} trials × {EPOCHS} epochs; {report['machine']}")
    print("| measure | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    row = report["per_trial_ms"]
    print("| store overhead per trial, ms (min / median of chunks) | " + " | ".join(
        f"{row[n]['min']:.1f} / {row[n]['median']:.1f}" for n in names) + " |")  # fmt: skip
    print("| ... first 100 trials → last 100, ms | " + " | ".join(
        f"{row[n]['first_chunk']:.1f} → {row[n]['last_chunk']:.1f}" for n in names) + " |")  # fmt: skip
    for q in QUERIES:
        cells = [report["search_runs_ms"][n][q] for n in names]
        print(f"| search_runs: {q}, ms (min / median) | " + " | ".join(
            f"{c['min']:.0f} / {c['median']:.0f}" for c in cells) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
