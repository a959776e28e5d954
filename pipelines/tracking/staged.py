"""Artifacts a notebook kernel leaves on disk for its driver to upload after the kernel is released.

Under a driver (`labbook run`, a study's trial, a pipeline step), the train notebook does not
upload its plots, tables, texts and checkpoints itself: it writes them under the run's
`<output dir>/staged/<artifact path>`, and the driver uploads that folder, with the executed
notebook, before it closes the run (`upload`). In a study the driver does this in a background
thread while the next trial runs, so uploads are off the trial's critical path (issue 26). The
run is closed only after the upload; a failed upload closes it FAILED, saying what failed. A
driver that died first leaves the folder behind: `labbook reap` uploads it when it closes the run.

Written by hand: MLflow has no "stage now, upload later" for run artifacts (its asynchronous
artifact logging runs inside the logging process, which here is the kernel that must be released).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from mlflow import MlflowClient

FOLDER = "staged"


def folder(output_dir: str | os.PathLike) -> Path:
    """The run's staging folder, `<output_dir>/staged` (not made here)."""
    return Path(output_dir) / FOLDER


def path(staging: str | os.PathLike, artifact_path: str) -> Path:
    """Where the artifact `artifact_path` (`plots/learning_curves.png`) waits: its folder is made.

    Raises `ValueError` for a path that leaves the staging folder (`..`, absolute).
    """
    target = inside(staging, artifact_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def inside(staging: str | os.PathLike, artifact_path: str) -> Path:
    """`artifact_path` resolved under the staging folder (nothing made); `ValueError` if it leaves it."""
    root = Path(staging).resolve()
    target = (root / artifact_path).resolve()
    if root not in target.parents:
        raise ValueError(f"artifact path {artifact_path!r} leaves the run's staging folder")
    return target


def stage_file(staging: str | os.PathLike, source: str | os.PathLike, artifact_dir: str) -> Path:
    """`source` staged under `artifact_dir/<its name>`: a hard link where the file system allows
    (a checkpoint is not copied twice), else a copy."""
    target = path(staging, f"{artifact_dir}/{Path(source).name}")
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def open_regular(path: str | os.PathLike) -> BinaryIO | None:
    """`path` opened for reading as bytes if it is a regular file reached without a link, else None.

    Opened with `O_NOFOLLOW | O_NONBLOCK` (a FIFO opens at once instead of waiting for a writer,
    then is refused by `fstat`), so whoever reads what a notebook left (a driver, `labbook reap`)
    neither follows a link nor hangs.
    """
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # a link (ELOOP), gone, or unreadable
        return None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def upload(client: MlflowClient, run_id: str, staging: str | os.PathLike) -> int:
    """Upload every staged regular file to the run's artifacts (same relative paths), then remove them.

    Returns the number of files uploaded (0 when nothing was staged). A symbolic link (to a file
    or a folder) is never followed nor uploaded, only reported on stderr: whoever uploads (the
    driver, or `labbook reap` run by someone else) would otherwise copy what the link points to,
    a file of theirs, into the artifact store. Each file is opened with `O_NOFOLLOW` and copied
    from that descriptor into a private folder, which is what is uploaded, so a link swapped in
    after the check is not followed either. Raises whatever the artifact store raised (a full
    disk, a refusing server): the caller fails the run with it.
    """
    import sys
    import tempfile

    root = Path(staging)
    if root.is_symlink():
        print(f"not uploaded: {root} is a symbolic link", file=sys.stderr)
        return 0
    if not root.is_dir():
        return 0
    uploaded = 0
    with tempfile.TemporaryDirectory(prefix="labbook-upload-") as private:
        for folder, dirs, names in os.walk(root):  # os.walk does not descend into linked folders
            here = Path(folder)
            for name in sorted(names + [d for d in dirs if (here / d).is_symlink()]):
                path = here / name
                source = open_regular(path)
                if source is None:  # a link, a FIFO, a device, or gone
                    print(f"not uploaded: {path} is a symbolic link or not a regular file", file=sys.stderr)
                    continue
                with source:
                    target = Path(private) / path.relative_to(root)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(target, "wb") as copy:
                        shutil.copyfileobj(source, copy)
                uploaded += 1
        if uploaded:
            client.log_artifacts(run_id, private)
    shutil.rmtree(root, ignore_errors=True)
    return uploaded
