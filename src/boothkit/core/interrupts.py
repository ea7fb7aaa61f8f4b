"""Stopping a run between steps: Ctrl-C, SIGTERM (a scheduler preempting the job) or a caller's stop event let
the current optimizer step finish; the loop then checkpoints and stops cleanly instead of dying mid-update."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Whether a stop was asked for: by a signal to this process or by the caller's event (the UI's Cancel)."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.signalled, self.event = False, event

    @property
    def requested(self) -> bool:
        return self.signalled or (self.event is not None and self.event.is_set())


@contextlib.contextmanager
def deferred_stop(event: threading.Event | None = None) -> Iterator[StopRequest]:
    """The first Ctrl-C or SIGTERM is deferred to the end of the step; a second acts as before, at once.
    Signals reach only the main thread (the UI trains in another): there only `event` stops the run."""
    flag = StopRequest(event)
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {}
    for sig in SIGNALS:
        handler = signal.getsignal(sig)
        if handler != signal.SIG_IGN:  # an ignored signal stays ignored (e.g. nohup)
            previous[sig] = signal.default_int_handler if handler is None and sig == signal.SIGINT else \
                (signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    def handler(signum, frame):
        flag.signalled = True
        for sig, prev in previous.items():
            signal.signal(sig, prev)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)
