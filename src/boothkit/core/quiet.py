"""Quieting libraries' chatter for a while: their loggers raised to a level and some of their warnings ignored,
both put back afterwards (the one mechanism; the command line's permanent settings are in cli.quiet_libraries)."""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator, Sequence


@contextlib.contextmanager
def quieted(loggers: Sequence[str], level: int, messages: Sequence[str] = ()) -> Iterator[None]:
    """Within the block, `loggers` log only at `level` and above, and warnings matching `messages` are ignored."""
    found = [logging.getLogger(n) for n in loggers]
    levels = [lg.level for lg in found]
    for lg in found:
        lg.setLevel(level)
    try:
        with warnings.catch_warnings():
            for message in messages:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for lg, old in zip(found, levels):
            lg.setLevel(old)
