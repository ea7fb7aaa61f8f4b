"""Helpers for tests that kill or interrupt processes mid-run, at a point the run has reached, never after a sleep.

`paused(...)` runs the boothkit CLI with one of its functions wrapped: once that function has returned N times, the
process writes a marker file and holds still there until a signal it handles arrives (SIGINT, SIGTERM: the run then
goes on and stops the way it would) or until it is killed. The test sends its signal once the marker exists, so the
signal lands at that exact point on a fast machine, a slow one or a loaded one.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

# Runs `boothkit <argv>` with BOOTHKIT_TEST_PAUSE = "module:function:N" wrapped; BOOTHKIT_TEST_MARKER is the file it
# writes when it holds. A StopRequest (boothkit.core.interrupts) tells whether a deferred signal has been handled.
RUNNER = """
import importlib, os, signal, sys, time
import boothkit.core.interrupts as interrupts

# Ctrl-C as a terminal delivers it: a harness that starts the suite in the background or under nohup passes SIGINT
# on ignored, and boothkit rightly keeps an ignored signal ignored, so the test's SIGINT would never arrive.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)

requests = []

class Recorded(interrupts.StopRequest):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        requests.append(self)

interrupts.StopRequest = Recorded
where, name, count = os.environ["BOOTHKIT_TEST_PAUSE"].rsplit(":", 2)
module = importlib.import_module(where)
real, calls = getattr(module, name), []

def held(*args, **kwargs):
    result = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == int(count):
        open(os.environ["BOOTHKIT_TEST_MARKER"], "w").close()
        deadline = time.monotonic() + 300
        while not any(r.requested for r in requests):  # a handled signal, or a SIGKILL ends this
            if time.monotonic() > deadline:
                os._exit(99)
            time.sleep(0.005)
    return result

setattr(module, name, held)
"""
CLI = """
from boothkit.cli import main
main(sys.argv[1:])
"""


def paused(argv: list, at: str, marker: Path) -> tuple[list, dict]:
    """The command and environment additions that run `boothkit <argv>` held after `at` ("module:function:N")."""
    return paused_python(CLI, argv, at, marker)


def paused_python(code: str, argv: list, at: str, marker: Path) -> tuple[list, dict]:
    """`paused` for Python `code` (sys.argv[1:] = `argv`) in place of the CLI: a call site outside the CLI."""
    return [sys.executable, "-c", RUNNER + code, *map(str, argv)], {"BOOTHKIT_TEST_PAUSE": at,
                                                                    "BOOTHKIT_TEST_MARKER": str(marker)}


def kill_at(cmd: list, marker: Path, env: dict, timeout: float = 300) -> None:
    """Start `cmd`, SIGKILL it once `marker` exists, and wait for it to die (`cmd` holds there: see `paused`).
    Its output goes to a file beside the marker, quoted where the run ends on its own."""
    rc = signal_at(cmd, marker, env, signal.SIGKILL, log=marker.with_name(marker.name + ".log"), timeout=timeout)
    assert rc == -signal.SIGKILL, rc


def signal_at(cmd: list, marker: Path | Callable[[], bool], env: dict, sig: int, *, log: Path | None = None,
              timeout: float = 300) -> int:
    """Start `cmd`, send it `sig` as soon as `marker` exists (a path, or a test that returns True), wait for it
    to end and return its exit status. Its stdout and stderr go to `log` (a file: a pipe nobody reads while
    we wait could fill and stall the run). Race-free only where `cmd` holds at the marker (see `paused`)."""
    ready = marker if callable(marker) else marker.exists
    sink = open(log, "wb") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=sink)
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                said = log.read_text(errors="replace")[-2000:] if log else ""
                raise AssertionError(f"run ended (exit {proc.poll()}) before {marker} was seen:\n{said}")
            time.sleep(0.01)
        proc.send_signal(sig)
        return proc.wait(timeout=timeout)
    finally:
        if log:
            sink.close()


def kill_if_reached(cmd: list, marker: Path, env: dict, log: Path, timeout: float = 300) -> int | None:
    """Start `cmd` (held at a point: see `paused`) and SIGKILL it if it reaches the point; None when killed,
    else the exit status of a run that ended without reaching it."""
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=sink)
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if proc.poll() is not None:
                return proc.returncode
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"{cmd} neither reached {marker} nor ended in {timeout} s")
            time.sleep(0.01)
        proc.kill()
        proc.wait(timeout=timeout)
        marker.unlink()
        return None
