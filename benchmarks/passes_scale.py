"""Does capture + ``cleanup`` cost grow linearly with model depth?

LLaMA-7B-width models (``PRESETS["llama-7b"]`` with ``n_layers`` replaced) are built on the meta device, so no
weights are allocated and depth is the only variable. Each depth is captured and cleaned up ``--repeats`` times
and the median of every column is reported, because the machine may be shared. Verification runs without
example inputs (meta tensors have no values): lint plus the ``meta["val"]`` fake-tensor re-propagation.
The first cleanup in a process also traces the rewrite-rule patterns (cached afterwards), so one warm-up run at
the smallest depth goes first and its cleanup time is printed on its own instead of polluting the table.

    python benchmarks/passes_scale.py --layers 2,8,32 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from torch import fx

from passforge.ir.capture import capture
from passforge.models.llama import PRESETS, build
from passforge.passes.base import Context, Pass
from passforge.passes.hooks import VerifyHook
from passforge.passes.manager import PassManager, PassRecord

SEQ_LEN = 128


class TimedVerifyHook(VerifyHook):
    """VerifyHook that also records its own wall time, which PassRecord.time_s deliberately leaves out."""

    def after_pass(
        self, pass_: Pass, before: fx.GraphModule, after: fx.GraphModule, ctx: Context, record: PassRecord
    ) -> None:
        start = time.perf_counter()
        super().after_pass(pass_, before, after, ctx, record)
        record.metrics["verify_s"] = time.perf_counter() - start


@dataclasses.dataclass
class Row:
    layers: int
    nodes: int
    capture_s: float
    cleanup_s: float
    verify_s: float

    @property
    def cleanup_us_per_node(self) -> float:
        return self.cleanup_s / self.nodes * 1e6


def measure(layers: int, repeats: int) -> Row:
    """Median capture / cleanup / verify wall time over ``repeats`` fresh captures of one depth."""
    model = build(dataclasses.replace(PRESETS["llama-7b"], n_layers=layers), device="meta")
    tokens = torch.zeros(1, SEQ_LEN, dtype=torch.long, device="meta")
    manager = PassManager.parse("cleanup", hooks=[TimedVerifyHook()])
    captures, cleanups, verifies, nodes = [], [], [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        gm = capture(model, (tokens,))
        captures.append(time.perf_counter() - start)
        nodes = len(gm.graph.nodes)
        (record,) = manager.run(gm, Context()).records
        cleanups.append(record.time_s)
        verifies.append(record.metrics["verify_s"])
    return Row(
        layers=layers,
        nodes=nodes,
        capture_s=statistics.median(captures),
        cleanup_s=statistics.median(cleanups),
        verify_s=statistics.median(verifies),
    )


def format_table(rows: list[Row]) -> str:
    """A Markdown table, so the output can be pasted into docs/benchmarks.md as is."""
    lines = [
        "| layers | nodes | capture s | cleanup s | verify s | cleanup µs/node |",
        "|-------:|------:|----------:|----------:|---------:|----------------:|",
    ]
    lines += [
        f"| {r.layers} | {r.nodes} | {r.capture_s:.2f} | {r.cleanup_s:.2f} | {r.verify_s:.2f} "
        f"| {r.cleanup_us_per_node:.0f} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,8,32", help="comma-separated depths (default: 2,8,32)")
    parser.add_argument("--repeats", type=int, default=3, help="captures per depth; medians are reported")
    args = parser.parse_args(argv)
    depths = sorted(int(x) for x in args.layers.split(","))
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    warmup = measure(depths[0], repeats=1)
    print(
        f"warm-up at {depths[0]} layers: first cleanup in process {warmup.cleanup_s:.2f} s "
        "(includes one-time tracing of the rewrite-rule patterns)",
        flush=True,
    )
    rows = []
    for layers in depths:
        rows.append(measure(layers, args.repeats))
        print(f"measured {layers} layers", flush=True)
    print(format_table(rows))
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        ratio = last.cleanup_us_per_node / first.cleanup_us_per_node
        print(
            f"linearity: cleanup µs/node at {last.layers} layers / at {first.layers} layers = {ratio:.2f} "
            "(1.0 = linear in nodes; > 1 = superlinear)"
        )


if __name__ == "__main__":
    main()
