"""The one progress bar every long stage shows (class images, training, sampling, pretraining, evaluation)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, *, completed: int = 0,
                 show_loss: bool = False) -> Iterator[Callable[..., None]]:
    """A rich progress bar with count and ETA (and the loss, for training); yields advance(n=1, **fields)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    if show_loss:
        columns.insert(3, TextColumn("loss {task.fields[loss]:.4f}"))
    with Progress(*columns, disable=not enabled) as bar:
        task = bar.add_task(description, total=total, completed=completed, loss=math.nan)
        yield lambda n=1, **fields: bar.update(task, advance=n, **fields)
