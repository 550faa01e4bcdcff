"""A rich progress bar for training loops: step count, losses and it/s."""
from __future__ import annotations

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


class TrainingProgress:
    """``with TrainingProgress(total, start, "generator") as bar: bar.update(step, losses)``.

    ``step`` is the number of completed steps; the bar starts at ``start_step`` so a
    resumed run shows its true position in the schedule.
    """

    def __init__(self, total_steps: int, start_step: int = 0, description: str = "training",
                 disable: bool = False):
        self.total_steps = total_steps
        self.start_step = start_step
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[losses]}"), TextColumn("[bold red]{task.fields[warning]}"),
            TimeElapsedColumn(), TimeRemainingColumn(),
            disable=disable,
        )
        self._task = self._progress.add_task(description, total=total_steps, completed=start_step,
                                             losses="", rate="", warning="")

    def __enter__(self) -> "TrainingProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, losses: dict[str, float], warning: str = "") -> None:
        task = self._progress.tasks[0]
        speed = task.speed
        rate = f"{speed:.2f} it/s" if speed else ""
        text = " ".join(f"{name} {value:.4g}" for name, value in losses.items())
        self._progress.update(self._task, completed=step, losses=text, rate=rate, warning=warning)
