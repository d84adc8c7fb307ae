"""An advisory lock on a folder being written (a run directory, a ``sample --out`` folder).

``FOLDER/.lock`` is locked with ``fcntl.flock(LOCK_EX | LOCK_NB)`` and, once locked, holds one line naming the
holder (``pid 1234 on host gpu7 since 2024-05-01T12:00:00``).  The lock belongs to the open file: it lasts as long
as the holder keeps it (:meth:`FolderLock.release`, or the process's end) and the kernel drops it on any death,
SIGKILL included, so a stale ``.lock`` file never blocks anyone: only a live holder does.  The file itself is
left in place (deleting it would let two processes lock two different files of the same name).

A second process, or a second lock in the same process (each ``open`` is its own lock), is refused with
:class:`FolderLocked`, a one-line :class:`~iddpm.config.ConfigError`.  Where ``fcntl`` does not exist (Windows) the
lock is a no-op.  Forked children (data-loader workers) share the holder's lock until they exit.
"""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import datetime
from pathlib import Path

from iddpm.config import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["LOCK_NAME", "FolderLock", "FolderLocked", "lock_folder", "check_unlocked"]

LOCK_NAME = ".lock"


class FolderLocked(ConfigError):
    """Another process (or another lock of this one) holds the folder's lock."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 400, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "another process (it has not written its pid yet)"


def _refusal(folder: Path, flag: str, holder: str) -> FolderLocked:
    return FolderLocked(f"{flag} {folder}: in use by {holder}; wait for it to finish (or stop it), "
                        f"or choose another {flag}")


class FolderLock:
    """A held lock (see the module docstring); a context manager that releases it on exit."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock (closing the file drops the lock); idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a lost reference must not keep the folder locked
        with contextlib.suppress(Exception):
            self.release()


def lock_folder(folder: str | os.PathLike, *, flag: str = "--run_dir") -> FolderLock:
    """Create ``folder`` (and parents) if needed and lock ``folder/.lock`` for this process.

    Raises :class:`FolderLocked` naming the holder's pid and host when it is held, and a one-line
    :class:`~iddpm.config.ConfigError` (naming ``flag``) when the folder cannot be written.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except PermissionError:
        raise ConfigError(f"{flag} {folder}: not writable (permission denied); fix its permissions or choose "
                          f"another {flag}") from None
    except (NotADirectoryError, FileExistsError):
        raise ConfigError(f"{flag} {folder}: a file is in the way (not a folder); choose another {flag}") from None
    if fcntl is None:  # pragma: no cover
        return FolderLock(path, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise _refusal(folder, flag, holder) from None
    stamp = datetime.now().isoformat(timespec="seconds")
    line = f"pid {os.getpid()} on host {socket.gethostname()} since {stamp}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, line, 0)
    return FolderLock(path, fd)


def check_unlocked(folder: str | os.PathLike, *, flag: str = "--run_dir") -> None:
    """Raise :class:`FolderLocked` when a live process holds ``folder``'s lock; writes nothing (a probe with a
    shared lock on a read-only descriptor, dropped at once).  A folder without ``.lock`` is unlocked."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refusal(Path(folder), flag, _holder(fd)) from None
    finally:
        os.close(fd)
