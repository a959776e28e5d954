"""Embedded Optuna storage: SQLite (RDBStorage) vs the journal file, side by side.

What a study does to its storage per trial: ask, one `report` + `should_prune` per epoch
(from the kernel, through a freshly loaded study, as the pruning callback does), and tell.
Also two processes sharing one study. Variants are interleaved, each repeated; min and median
are reported. Run: `.venv/bin/python bench/storage.py` (writes bench/storage.json).
"""

from __future__ import annotations

import json
import multiprocessing
import platform
import statistics
import tempfile
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

optuna.logging.set_verbosity(optuna.logging.ERROR)
TRIALS, EPOCHS, REPEATS = 20, 15, 3


def make_storage(kind: str, folder: Path):
    if kind == "sqlite":
        return RDBStorage(f"sqlite:///{folder / 'optuna.db'}", engine_kwargs={"connect_args": {"timeout": 60}})
    return JournalStorage(JournalFileBackend(str(folder / "optuna.log")))


def trials(kind: str, folder: Path, name: str, n: int) -> None:
    study = optuna.load_study(study_name=name, storage=make_storage(kind, folder), pruner=optuna.pruners.MedianPruner())
    for _ in range(n):
        trial = study.ask()
        x = trial.suggest_float("lr", 1e-5, 1, log=True)
        # The kernel's side: a fresh storage object, one report per epoch.
        kernel_study = optuna.load_study(study_name=name, storage=make_storage(kind, folder))
        kernel_trial = optuna.trial.Trial(kernel_study, trial._trial_id)
        for epoch in range(EPOCHS):
            kernel_trial.report(x * epoch, epoch)
            kernel_trial.should_prune()
        study.tell(trial, x)


def one_run(kind: str, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        optuna.create_study(study_name="bench", storage=make_storage(kind, folder))
        start = time.perf_counter()
        if workers == 1:
            trials(kind, folder, "bench", TRIALS)
        else:
            procs = [
                multiprocessing.Process(target=trials, args=(kind, folder, "bench", TRIALS // workers))
                for _ in range(workers)
            ]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            assert all(p.exitcode == 0 for p in procs), "a worker crashed"
        elapsed = time.perf_counter() - start
        done = optuna.load_study(study_name="bench", storage=make_storage(kind, folder)).trials
        assert len(done) == TRIALS and len({t.number for t in done}) == TRIALS
        return elapsed


def main() -> None:
    results: dict[str, list[float]] = {}
    for _ in range(REPEATS):
        for workers in (1, 2):
            for kind in ("sqlite", "journal"):  # interleaved
                results.setdefault(f"{kind}, {workers} worker(s)", []).append(one_run(kind, workers))
    rows = {
        k: {"min_s": min(v), "median_s": statistics.median(v), "per_trial_ms": 1000 * min(v) / TRIALS}
        for k, v in results.items()
    }
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {multiprocessing.cpu_count()} cores",
        "trials": TRIALS,
        "epochs_reported_per_trial": EPOCHS,
        "repeats": REPEATS,
        "results": rows,
    }
    Path(__file__).with_name("storage.json").write_text(json.dumps(report, indent=2))
    print(f"{TRIALS} trials × {EPOCHS} epoch reports, min / median of {REPEATS}")
    print("| storage | min s | median s | ms per trial |")
    print("| --- | --- | --- | --- |")
    for k, r in rows.items():
        print(f"| {k} | {r['min_s']:.2f} | {r['median_s']:.2f} | {r['per_trial_ms']:.0f} |")


if __name__ == "__main__":
    main()
