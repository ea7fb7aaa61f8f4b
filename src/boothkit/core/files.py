"""Files and folders written so that nothing is ever half-written (atomic_write_bytes, atomic_folder, build_once),
their digests, the free-space check before writing, and boothkit's home folder."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import BoothkitError

# Temp names carry the writer's pid, so a later run removes only what a dead (killed) writer left behind and
# never a file that a live run sharing the folder is still writing.
# The pattern is that of mkstemp/mkdtemp names (8 random characters) with suffix .tmp, not a user's hidden file.
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")


def boothkit_home() -> Path:
    """Where boothkit caches models and weights (BOOTHKIT_HOME, else ~/.cache/boothkit)."""
    return Path(os.environ.get("BOOTHKIT_HOME") or Path.home() / ".cache" / "boothkit")


def slug(text: str, limit: int = 48, *, keep_case: bool = False, empty: str = "prompt") -> str:
    """A file-name-safe short form of `text` (a prompt, a token): each run of other characters one '-', at most
    `limit` characters, lower case unless `keep_case`; `empty` when nothing is left."""
    text = text if keep_case else text.lower()
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit].rstrip("-") or empty


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_prefix(name: str) -> str:
    """The prefix of a temp file or folder standing in for `name` while this process writes it."""
    return f".{name}.{os.getpid()}."


class DiskFull(BoothkitError):
    """A write failed for want of space (ENOSPC, a quota); what was there before is kept."""

    def __init__(self, path: str | os.PathLike, reason: str,
                 then: str = "what was written before is kept: free some space and run the command again"):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: could not be written ({reason}, {human_bytes(free_bytes(path))} free); {then}")


def _no_room(path: Path, exc: BaseException) -> DiskFull | None:
    """`exc` as a DiskFull naming `path` when it is a failed write for want of space (an OSError ENOSPC or EDQUOT,
    or the SafetensorError safetensors wraps one in), else None."""
    if isinstance(exc, DiskFull):
        return DiskFull(path, exc.reason)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(path, exc.strerror or "No space left on device")
    if type(exc).__name__ == "SafetensorError" and ("StorageFull" in str(exc) or "No space left" in str(exc)):
        return DiskFull(path, "No space left on device")
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file via a temp file in the same folder and rename, so readers never see half a file. A full disk
    is a DiskFull naming `path` (the old file, if any, untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        full = _no_room(path, exc)
        if full is not None:
            raise full from exc
        raise


def alive(pid: int) -> bool:
    """Whether another process `pid` runs. Our own pid counts as dead: in a fresh container a rerun often gets
    the killed run's pid, and this process is not writing what it is about to clean."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete temp files/folders in `folder` (for `name` only, if given) whose writer is no longer running."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _STALE.match(p.name)
        if not m or (name is not None and m["name"] != name) or alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds `path` (or would: its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(path: str | os.PathLike, need: int, what: str) -> None:
    """Refuse, before writing, when `what` (about `need` bytes, into `path`) does not fit on its disk."""
    free = free_bytes(path)
    if need > free:
        raise BoothkitError(f"{what}: needs about {human_bytes(need)} in {path}, but only {human_bytes(free)} "
                            f"is free there; free some space or choose another folder")


def png_upper_bound(width: int, height: int, channels: int = 3) -> int:
    """The most bytes an 8-bit PNG of this size takes: raw rows (+1 filter byte each) plus zlib's worst case
    (5 bytes per 16 KB stored block) plus headers; photos compress to less."""
    raw = height * (width * channels + 1)
    return raw + 5 * (raw // 16384 + 1) + 4096


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file and folder under `folder` to the disk, so a rename that publishes it cannot outrun its data."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE). False where the system or its file
    system cannot; then the caller swaps with two renames."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl)
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _aside(path: Path) -> Path:
    # not a temp name (_STALE): remove_stale_temps must never delete the only complete version
    return path.with_name(f".{path.name}.previous")


def restore_folder(path: str | os.PathLike) -> None:
    """Finish a two-rename swap of `path` (atomic_folder where no atomic exchange exists) that a killed process left
    half done: the old version back if the new one never arrived, else the old one deleted."""
    path = Path(path)
    aside = _aside(path)
    if aside.is_dir():
        if path.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, path)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A folder that appears at `path` whole or not at all. The block fills the yielded temp folder beside `path`;
    when it returns, every file is flushed to disk and the folder takes `path`'s place in one step, and only then is
    an old version deleted. A process killed at any moment leaves at `path` the old version or the new one, never
    neither and never a mix; its temp folder is a stale temp (remove_stale_temps). An exception in the block leaves
    `path` untouched (a full disk: a DiskFull naming `path`). `keep(path)` true at the swap: the existing folder stays (another process's identical build)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_folder(path)
    remove_stale_temps(path.parent, path.name)  # what a writer of `path` killed before its swap left
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        try:
            yield tmp
            fsync_tree(tmp)
        except BaseException as exc:  # the block's writes or their flush: a full disk is said as one line
            full = _no_room(path, exc)
            if full is not None:
                raise full from exc
            raise
        if not path.exists():
            try:
                os.rename(tmp, path)
            except OSError:  # another process got there first
                if not (keep and path.exists() and keep(path)):
                    raise
        elif keep and keep(path):
            pass
        elif not _exchange(tmp, path):
            # no atomic exchange here: two renames, the old version aside under a name the next swap restores
            aside = _aside(path)
            os.rename(path, aside)
            os.rename(tmp, path)
            tmp = aside
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the old version after a swap, or an unfinished new one


def build_once(folder: Path, build: Callable[[Path], None], marker: str = "BOOTHKIT_TINY.json") -> Path:
    """Build a cached folder on first use (atomic_folder), so a killed or concurrent builder never leaves a half-built
    folder. `build(tmp)` fills it, `marker` file included; concurrent builders make identical folders."""
    import torch  # lazily: the CLI imports this module, and `boothkit --help` must not load torch

    if (folder / marker).is_file():
        return folder
    with atomic_folder(folder, keep=lambda f: (f / marker).is_file()) as tmp, torch.random.fork_rng():
        build(tmp)
    return folder
