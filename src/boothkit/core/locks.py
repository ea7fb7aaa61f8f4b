"""Advisory locks: one training per output folder, one class-image writer per class folder, one UI server per
runs root at a time.

The lock is an flock on FOLDER/.boothkit.lock: the kernel drops it when its holder exits, killed or not, so a
crashed run never leaves a folder stuck. The holder deletes the file when it is done; a waiter that locked the
deleted file notices (its inode is no longer the path's) and tries again.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

from .errors import BoothkitError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

log = logging.getLogger("boothkit")
LOCK_NAME = ".boothkit.lock"


class LockHeld(BoothkitError):
    """Another process holds the lock."""


def lock_file(path: str | os.PathLike) -> int | None:
    """Hold an exclusive flock on `path` (created if missing) until the returned descriptor is closed; the kernel
    drops it when the holder dies. LockHeld when another process holds it; None where there is no flock (Windows)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockHeld(f"{path}: held by another process") from None
    return fd


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return f"pid {text}" if text.isdigit() else "another process"


def _acquire(path: Path, flag: str, what: str, wait: bool) -> int:
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)  # a holder that made the folder removes it if left empty
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                if not wait:
                    raise BoothkitError(f"{flag} {path.parent}: another boothkit run ({holder}) is {what} in this "
                                        f"folder; wait for it to end or choose another folder") from None
                log.info("waiting for another boothkit run (%s) %s in %s", holder, what, path.parent)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder deleted the file we locked as it finished: lock the new one


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, flag: str, what: str, *, wait: bool = False) -> Iterator[None]:
    """Hold `folder`'s lock while the block runs (creating the folder; removed again if the block leaves it
    empty). Held elsewhere: a one-line refusal naming `flag`, or with `wait`, wait for it (said once)."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    path = folder / LOCK_NAME
    fd = _acquire(path, flag, what, wait)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: a waiter then sees the inode change
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                folder.rmdir()
