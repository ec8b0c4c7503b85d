"""Showing a job's progress: a live bar on a terminal, one line per change of stage elsewhere (logs, CI)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from qaas_client.types import JobUpdate


def describe(update: JobUpdate) -> str:
    text = update.stage if update.status in ("queued", "running") else update.status
    if update.candidate is not None and update.candidates:
        text += f" (candidate {update.candidate}/{update.candidates}"
        text += f": {update.candidate_name})" if update.candidate_name else ")"
    return text


class ProgressView:
    def __init__(self, job_id: str, console: Console | None = None) -> None:
        self.job_id = job_id
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.last_line: str | None = None

    def __enter__(self) -> ProgressView:
        if self.live:
            self.bar = Progress(
                TextColumn(f"job {escape(self.job_id[:8])}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("{task.description}", markup=False),  # the service's names, shown as they are
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("queued", total=1.0)
        return self

    def update(self, update: JobUpdate) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=update.progress, description=describe(update))
            return
        line = f"job {self.job_id}: {describe(update)}"
        if line != self.last_line:  # progress within a stage is noise in a log
            self.console.print(f"{line} {update.progress:.0%}", highlight=False, markup=False)
            self.last_line = line

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.bar is not None:
            self.bar.stop()
