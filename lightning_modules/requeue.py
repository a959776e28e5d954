"""Save and requeue on SLURM's requeue signal at a batch end that every rank agrees on.

Lightning's own SLURM handling (`_SignalConnector._slurm_sigusr_handler_fn`, with
`SLURMEnvironment(auto_requeue=True)`, its default) saves the checkpoint *inside* the SIGUSR1
handler. Python runs a handler between two bytecodes of the main thread, wherever training is:
under DDP a rank signalled in the middle of a gradient all-reduce enters `save_checkpoint`'s
barrier while the other ranks are still in the all-reduce, and the collectives no longer match:
the save hangs (seen with 2 gloo ranks under srun). Its SIGTERM handler also broadcasts from
inside the handler.

`RequeueOnSignal` only sets a flag in the handler. At each training batch end the ranks agree
whether any of them was signalled (`strategy.reduce_boolean_decision`: one all-reduce of a bool,
the only collective, always at the same point on every rank); if so every rank saves
`hpc_ckpt_N.ckpt` in the trainer's root folder (where Lightning's SLURM resume looks), rank 0
runs the requeue command, and on success every process ends (exit 0) without running what
follows the fit. Use it with Lightning's auto-requeue off: `Trainer(plugins=[SLURMEnvironment(
auto_requeue=False)], callbacks=[RequeueOnSignal()])`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def slurm_requeue_command() -> list[str]:
    """`scontrol requeue JOB` for this job (`ARRAY_TASK` inside a job array), as Lightning words it.

    Raises RuntimeError outside a SLURM job (no SLURM_JOB_ID).
    """
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
    if not job or not re.fullmatch(r"[0-9_]+", job):
        raise RuntimeError(f"requeue: not inside a SLURM job (SLURM_JOB_ID={job!r})")
    return ["scontrol", "requeue", job]


def next_hpc_checkpoint(folder: str | Path) -> Path:
    """`folder/hpc_ckpt_N.ckpt` with N one more than the highest there (1 for none): Lightning's
    naming, so its SLURM resume (`ckpt_path=None` under SLURM) picks the newest up."""
    found = [int(m.group(1)) for p in Path(folder).glob("hpc_ckpt_*.ckpt") if (m := HPC_CHECKPOINT.fullmatch(p.name))]
    return Path(folder) / f"hpc_ckpt_{max(found, default=0) + 1}.ckpt"


class RequeueOnSignal(Callback):
    """On `signum` (SLURM's `--signal=USR1@90`, `scancel --signal=USR1`): save, requeue, exit 0.

    `command`: the requeue command (argv), run by rank 0 once the checkpoint is written; default
    `scontrol requeue $SLURM_JOB_ID`. If it fails (non-zero exit or not found), training goes on
    and a later signal tries again. The signal is acted on at the next training batch end; one
    that arrives after the last training batch (in the final validation) is not acted on: the
    fit is ending anyway.
    """

    def __init__(self, signum: int = signal.SIGUSR1, command: Sequence[str] | None = None) -> None:
        self.signum = signum
        self.command = list(command) if command is not None else None
        self.signalled = False
        self.saved: Path | None = None  # the last checkpoint this callback wrote
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.signalled = True  # nothing else here: see the module docstring

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handler)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        strategy = trainer.strategy
        if not strategy.reduce_boolean_decision(self.signalled, all=False):  # any rank signalled: all act
            return
        self.signalled = False
        path = strategy.broadcast(str(next_hpc_checkpoint(trainer.default_root_dir)), src=0)
        for logger in trainer.loggers:
            # A logger that holds metrics between writes (labbook's) writes them before the file
            # exists: the process ends below without Lightning's finalize, and the requeued job
            # resumes mid-epoch (it never logs that epoch's start again).
            flush = getattr(logger, "flush", None)
            if callable(flush):
                flush()
        trainer.save_checkpoint(path)  # rank 0 writes; every rank meets at its barrier
        self.saved = Path(path)
        for logger in trainer.loggers:
            logger.save()
        # The requeue makes SLURM send SIGTERM to the tasks; this process ends itself instead
        # (Lightning's SIGTERM handler broadcasts from inside the handler, too).
        previous_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code = self._requeue(trainer, path) if trainer.is_global_zero else 0
        code = strategy.broadcast(code, src=0)
        if code == 0:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # not SystemExit: Lightning would close the loggers' runs as failed
        signal.signal(signal.SIGTERM, previous_term)

    def _requeue(self, trainer: Any, path: str) -> int:
        """Run the requeue command; its exit code (127 if it cannot be started)."""
        try:
            command = self.command or slurm_requeue_command()
            code = subprocess.run(command, timeout=60).returncode
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"requeue signal: saved {path}; requeue failed: {exc}; training goes on", flush=True)
            return 127
        where = " ".join(command[2:]) if command[:2] == ["scontrol", "requeue"] else " ".join(command)
        if code == 0:
            print(f"requeue signal: saved {path} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
                  f"Requeued SLURM job {where}", flush=True)  # fmt: skip
        else:
            print(f"requeue signal: saved {path}; `{' '.join(command)}` exited {code}; training goes on", flush=True)
        return code
