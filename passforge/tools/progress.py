"""Progress on stderr while a pipeline runs: one tqdm bar over the passes, named by the pass running."""

from __future__ import annotations

from torch import fx
from tqdm import tqdm

from passforge.passes.base import Context, Pass
from passforge.passes.manager import Hook, PassRecord


class PassProgress(Hook):
    """A pass-manager hook; the bar appears after a second, so fast pipelines stay quiet."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None

    def start(self, gm: fx.GraphModule, ctx: Context, baseline: dict[str, object]) -> None:
        self._bar = tqdm(desc="passes", unit="pass", delay=1.0, leave=False)

    def before_pass(self, pass_: Pass, gm: fx.GraphModule, ctx: Context) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(pass_.spec)

    def after_pass(
        self, pass_: Pass, before: fx.GraphModule, after: fx.GraphModule, ctx: Context, record: PassRecord
    ) -> None:
        if self._bar is not None:
            self._bar.update()
