"""Rich progress for long steps: tensors done / total, bytes, throughput and ETA.

Quiet when stderr is not a terminal and ``GGMERGE_PROGRESS`` is unset, so logs and tests stay clean.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

console = Console(stderr=True)


def _enabled() -> bool:
    flag = os.environ.get("GGMERGE_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false", "no")
    return sys.stderr.isatty()


class Tracker:
    """Advance by tensors and bytes; ``note`` changes the line shown under the bar."""

    def __init__(self, progress: Progress | None, task, count_task):
        self._p, self._task, self._count = progress, task, count_task

    def advance(self, nbytes: int, tensors: int = 1, name: str | None = None) -> None:
        if self._p is None:
            return
        self._p.advance(self._task, nbytes)
        self._p.advance(self._count, tensors)
        if name is not None:
            self._p.update(self._count, description=f"  {name}")


@contextlib.contextmanager
def track(description: str, total_bytes: int, total_tensors: int, *, enabled: bool = True) -> Iterator[Tracker]:
    if not enabled or not _enabled():
        yield Tracker(None, None, None)
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=False,
    ) as p:
        task = p.add_task(description, total=max(total_bytes, 1))
        count = p.add_task("  tensors", total=max(total_tensors, 1))
        yield Tracker(p, task, count)


class StepTracker:
    """Advance by steps (chunks through a layer, …); ``note`` names the current step."""

    def __init__(self, progress: Progress | None, task):
        self._p, self._task = progress, task

    def advance(self, n: int = 1, note: str | None = None) -> None:
        if self._p is None:
            return
        self._p.advance(self._task, n)
        if note is not None:
            self._p.update(self._task, note=note)


@contextlib.contextmanager
def steps(description: str, total: int, *, enabled: bool = True) -> Iterator[StepTracker]:
    """A bar counting ``total`` steps, with elapsed time and ETA (forward passes, scoring chunks)."""
    if not enabled or not _enabled():
        yield StepTracker(None, None)
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
        console=console, transient=False,
    ) as p:
        yield StepTracker(p, p.add_task(description, total=max(total, 1), note=""))
