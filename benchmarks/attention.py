"""Does fuse-attention pay on this machine? Hand-written causal attention vs the same graph after the pass.

The workload is the issue's: batch 1, 8 heads, head dim 64, nanoGPT's spelling (``q @ kᵀ * scale →
masked_fill(tril == 0, -inf) → softmax → @ v`` with a float ``tril`` buffer), captured with torch.export, at
T = 512, 2048, 8192. Rows:

- ``explicit``: the captured graph as written (materialises (8, T, T) scores, masked scores and probabilities);
- ``fuse-attention``: after the pass (one ``passforge::attention``, causal, SDPA's flash CPU kernel);
- ``+ local-attention(window=W)``: the same with a sliding window of W keys (and 4 sinks).

Latency is the median of round-robin runs (``interleaved_latency_ms``). Peak memory is measured in a fresh
subprocess per cell (Linux): the peak RSS mark is reset after inputs and weights exist, and its growth over one
call (``VmHWM`` − ``VmRSS``) is what the attention itself allocates. ``ratio`` is explicit ÷ row, side by side
in one run.

    python benchmarks/attention.py [--lengths 512,2048,8192] [--window 256] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import warnings

import torch
from torch import nn

from passforge.ir.capture import capture
from passforge.passes.base import Context
from passforge.passes.manager import PassManager
from passforge.runtime.profile import interleaved_latency_ms

HEADS, HEAD_DIM = 8, 64


class HandWrittenAttention(nn.Module):
    """nanoGPT's causal attention over given q, k, v (B, H, T, D); ``tril`` is a float buffer as nanoGPT has."""

    def __init__(self, max_len: int) -> None:
        super().__init__()
        self.register_buffer("tril", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[2]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
        att = att.masked_fill(self.tril[:, :, :t, :t] == 0, float("-inf"))
        return att.softmax(dim=-1) @ v


PIPELINES = {"explicit": "", "fuse-attention": "fuse-attention"}


def build(length: int, row: str, window: int) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(1, HEADS, length, HEAD_DIM, generator=gen) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = capture(HandWrittenAttention(length), inputs)
    spec = PIPELINES.get(row, f"fuse-attention,local-attention(window={window},sinks=4)")
    if spec:
        gm = PassManager.parse(spec, hooks=[]).run(gm, Context(example_inputs=inputs)).graph
    return gm, inputs


def peak_mib(length: int, row: str, window: int) -> float:
    """Run in a fresh process (``--peak``): peak RSS growth over one call, MiB."""
    out = subprocess.run(
        [sys.executable, __file__, "--peak", row, "--lengths", str(length), "--window", str(window)],
        check=True, capture_output=True, text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _measure_peak(length: int, row: str, window: int) -> None:
    gm, inputs = build(length, row, window)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (exec keeps the parent's ru_maxrss)
        f.write("5")
    before = _status_kib("VmRSS")
    with torch.inference_mode():
        gm(*inputs)
    print((_status_kib("VmHWM") - before) / 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--peak", help=argparse.SUPPRESS)  # internal: measure one cell's peak memory
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(t) for t in args.lengths.split(",")]
    if args.peak:
        _measure_peak(lengths[0], args.peak, args.window)
        return
    rows = [*PIPELINES, f"+ local-attention(window={args.window})"]
    print(f"# attention, B=1, H={HEADS}, D={HEAD_DIM}, fp32, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| T | row | latency ms (median) | ratio vs explicit | peak MiB |")
    print("|---:|---|---:|---:|---:|")
    results = []
    for length in lengths:
        graphs = [build(length, row, args.window) for row in rows]
        latencies = interleaved_latency_ms(
            [lambda gm=gm, x=x: gm(*x) for gm, x in graphs], device=torch.device("cpu"), repeats=args.repeats,
            warmup=1, min_total_s=0.0,
        )
        ref = graphs[0][0](*graphs[0][1])
        for row, (gm, x), ms in zip(rows, graphs, latencies):
            err = (gm(*x) - ref).abs().max().item() if row in PIPELINES else float("nan")
            if row in PIPELINES and err > 1e-4:
                raise SystemExit(f"{row} at T={length} differs from the explicit graph by {err:.2e}")
            peak = peak_mib(length, row, args.window)
            results.append({"T": length, "row": row, "ms": ms, "ratio": latencies[0] / ms, "peak_mib": peak})
            print(f"| {length} | {row} | {ms:.2f} | {latencies[0] / ms:.2f}× | {peak:.0f} |", flush=True)
        del graphs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
