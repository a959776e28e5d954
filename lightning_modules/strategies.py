"""Plain Lightning strategies: no MLflow, Optuna or papermill here."""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher


class NotebookFSDP(FSDPStrategy):
    """FSDP whose processes are forked from this one, as `ddp_notebook`'s are: what runs in a Jupyter kernel.

    A kernel cannot re-run itself as a script (what `fsdp`'s launcher does) nor pickle
    notebook-defined objects into new interpreters; Lightning ships no fork-launched FSDP, so this
    is `ddp_notebook`'s launcher on FSDP.
    """

    def _configure_launcher(self) -> None:
        self._launcher = _MultiProcessingLauncher(self, start_method="fork")
