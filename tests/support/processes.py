"""Helpers for tests that kill processes mid-run."""
from __future__ import annotations

from pathlib import Path


def kill_at(cmd: list, marker: Path, env: dict, timeout: float = 180) -> None:
    """Start `cmd`, SIGKILL it as soon as `marker` exists (e.g. a checkpoint folder), and wait for it to die."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, f"run ended before {marker.name} appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
