"""A disk that fills up at a chosen file: for tests of what every save site does when the disk is full.

Every boothkit save ends by flushing what it wrote (core.files: atomic_write_bytes fsyncs its file, atomic_folder
every file of its folder), so making `os.fsync` fail with ENOSPC for the files whose path matches a pattern puts
the failure where a full disk puts it: after the bytes were handed over, before the new version is published.
"""
from __future__ import annotations

import errno
import os
import re


def disk_full_at(monkeypatch, pattern: str) -> list[str]:
    """From now on, flushing a file whose path matches `pattern` (re.search) fails with ENOSPC, as on a full
    disk; the list returned fills with the paths refused."""
    real, refused = os.fsync, []

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if re.search(pattern, path):
            refused.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return refused
