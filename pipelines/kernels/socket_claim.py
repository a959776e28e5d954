"""A Unix socket path a server may listen on: never a user's file, never a live server's socket.

A listening server binds a path, and bind fails on any existing file, so servers used to unlink
the path first: `labbook kernel-server --socket f.txt` deleted a regular file, and a second
server on a live socket took the path from the first (which ran on, unreachable) and lost it
again when the first stopped and removed "its" socket. Here a path is claimed only when it is
free or a stale socket (nothing accepts on it), under an flock of its folder so two servers
starting at once cannot both take it; and a server removes the path at exit only while it is
still its own socket (same device and inode as the one it bound).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass


class SocketPathTaken(ValueError):
    """The path holds something that is not a stale socket: a file, a folder, a live server."""


@dataclass(frozen=True)
class Claim:
    """The socket file a server bound: what it may remove at exit, and nothing else."""

    path: str
    device: int
    inode: int


def check_free(path: str, timeout: float = 2.0) -> None:
    """Return if `path` is free or a stale socket; raise `SocketPathTaken` (one line) otherwise.

    A socket counts as live when a connection to it succeeds (or does not fail at once: a server
    busy with its backlog is still a server). Connection refused or a vanished file: stale.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a file that is not a socket"
        raise SocketPathTaken(f"--socket {path}: {kind} is there; labbook never removes it: choose another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return  # nobody listens: the socket of a server that died
        except OSError as exc:  # a timeout (a busy server), no permission (another user's)
            raise SocketPathTaken(
                f"--socket {path}: a socket that may be in use is there ({type(exc).__name__}); choose another path"
            ) from None
    raise SocketPathTaken(f"--socket {path}: a server is already listening there; stop it or choose another path")


@contextlib.contextmanager
def _folder_locked(path: str) -> Iterator[None]:
    """An exclusive flock of the path's folder: claims and releases in one folder take turns."""
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)  # releases the lock


def claim(path: str, mode: int = 0o600) -> tuple[socket.socket, Claim]:
    """A Unix stream socket bound at `path` (permissions `mode`), not yet listening.

    Raises `SocketPathTaken` when the path is taken (see `check_free`); a stale socket there is
    replaced. Pass the `Claim` to `release` when the server stops.
    """
    with _folder_locked(path):
        check_free(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket: check_free raised for anything else
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_mask = os.umask(0o777 & ~mode)  # made with `mode` at once: no moment with wider permissions
        try:
            server.bind(path)
        except BaseException:
            server.close()
            raise
        finally:
            os.umask(old_mask)
        info = os.lstat(path)
    return server, Claim(path, info.st_dev, info.st_ino)


def release(claimed: Claim) -> bool:
    """Remove the claimed socket file if the path still holds it; True if it was removed."""
    with _folder_locked(claimed.path):
        try:
            info = os.lstat(claimed.path)
        except FileNotFoundError:
            return False
        if (info.st_dev, info.st_ino) != (claimed.device, claimed.inode):
            return False  # someone else's file now: not ours to remove
        os.unlink(claimed.path)
        return True
