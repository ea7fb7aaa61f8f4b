"""Helpers for tests that kill or interrupt processes mid-run."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable


def kill_at(cmd: list, marker: Path, env: dict, timeout: float = 180) -> None:
    """Start `cmd`, SIGKILL it as soon as `marker` exists (e.g. a checkpoint folder), and wait for it to die."""
    rc = signal_at(cmd, marker, env, signal.SIGKILL, timeout=timeout)
    assert rc == -signal.SIGKILL


def signal_at(cmd: list, marker: Path | Callable[[], bool], env: dict, sig: int, *, log: Path | None = None,
              timeout: float = 180) -> int:
    """Start `cmd`, send it `sig` as soon as `marker` exists (a path, or a test that returns True), wait for it
    to end and return its exit status. Its stdout and stderr go to `log` (a file: a pipe nobody reads while
    we wait could fill and stall the run)."""
    import subprocess
    import time

    ready = marker if callable(marker) else marker.exists
    sink = open(log, "wb") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=sink)
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None and time.time() < deadline, f"run ended before {marker} was seen"
            time.sleep(0.01)
        proc.send_signal(sig)
        return proc.wait(timeout=timeout)
    finally:
        if log:
            sink.close()
