"""Progress on stderr while ``passforge optimize`` works: one bar over its stages (capture, each pass, the
latency round, the generation graphs), with the stage running and the time elapsed. Transient: it leaves
nothing behind in the terminal, and prints nothing when stderr is not a terminal."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from torch import fx

from passforge.passes.base import Context, Pass
from passforge.passes.manager import Hook, PassRecord, PipelineResult


class OptimizeProgress(Hook):
    """A pass-manager hook (one step per pass) and a stage callback (``progress.stage("capturing")``)."""

    def __init__(self, total_steps: int) -> None:
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
            console=Console(stderr=True), transient=True,
        )
        self._task = self._progress.add_task("starting", total=total_steps)
        self._stages = 0

    def __enter__(self) -> OptimizeProgress:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def stage(self, label: str) -> None:
        """A new stage begins: show it and count the previous one (if any) done."""
        self._progress.update(self._task, description=label, advance=1 if self._stages else 0)
        self._stages += 1

    def before_pass(self, pass_: Pass, gm: fx.GraphModule, ctx: Context) -> None:
        self._progress.update(self._task, description=f"pass {pass_.spec}")

    def after_pass(
        self, pass_: Pass, before: fx.GraphModule, after: fx.GraphModule, ctx: Context, record: PassRecord
    ) -> None:
        self._progress.update(self._task, advance=1)

    def finish(self, result: PipelineResult, ctx: Context) -> None:
        self._progress.update(self._task, description="timing every graph version")
