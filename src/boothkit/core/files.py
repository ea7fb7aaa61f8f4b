"""Files written so that nothing is ever half-written, their digests, and the free-space check before writing."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import BoothkitError

# Temp names carry the writer's pid, so a later run removes only what a dead (killed) writer left behind and
# never a file that a live run sharing the folder is still writing.
# The pattern is that of mkstemp/mkdtemp names (8 random characters) with suffix .tmp, not a user's hidden file.
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")


def boothkit_home() -> Path:
    """Where boothkit caches models and weights (BOOTHKIT_HOME, else ~/.cache/boothkit)."""
    return Path(os.environ.get("BOOTHKIT_HOME") or Path.home() / ".cache" / "boothkit")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_prefix(name: str) -> str:
    """The prefix of a temp file or folder standing in for `name` while this process writes it."""
    return f".{name}.{os.getpid()}."


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file via a temp file in the same folder and rename, so readers never see half a file."""
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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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


def build_once(folder: Path, build: Callable[[Path], None], marker: str = "BOOTHKIT_TINY.json") -> Path:
    """Build a cached folder on first use: into a temp folder beside it, then one rename, so a killed or
    concurrent builder never leaves a half-built folder. `build(tmp)` fills it, `marker` file included."""
    import torch  # lazily: the CLI imports this module, and `boothkit --help` must not load torch

    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        with torch.random.fork_rng():
            build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first; its folder is identical
            if not (folder / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
