"""Progress bars for the long steps of ``nightlab prepare`` (rich), or silence when turned off."""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol


class Bar(Protocol):
    def advance(self, amount: float = 1) -> None: ...

    def set_total(self, total: float | None) -> None: ...


class _Task:
    def __init__(self, progress, task_id) -> None:
        self._progress, self._id = progress, task_id

    def advance(self, amount: float = 1) -> None:
        self._progress.advance(self._id, amount)

    def set_total(self, total: float | None) -> None:
        self._progress.update(self._id, total=total)


class _Silent:
    def advance(self, amount: float = 1) -> None:
        pass

    def set_total(self, total: float | None) -> None:
        pass


@contextlib.contextmanager
def bar(description: str, total: float | None = None, *, enabled: bool = True, unit: str = "") -> Iterator[Bar]:
    """A progress bar for one step; ``unit="B"`` shows bytes and transfer speed."""
    if not enabled:
        yield _Silent()
        return
    # deferred: rich is heavy, and a silent step never needs it
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

    amount = (DownloadColumn(), TransferSpeedColumn()) if unit == "B" else (MofNCompleteColumn(),)
    columns = (TextColumn("{task.description}"), BarColumn(), *amount, TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        yield _Task(progress, progress.add_task(description, total=total))
