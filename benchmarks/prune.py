"""What do pruning and distillation cost in accuracy, and what do they buy in speed and size? The bundled
trained LM (byte-level, 4 layers, dim 256, ffn 512, 8 query / 4 kv heads, 2.5M parameters).

Every row is a passforge pipeline run on the captured forward graph (calibration: the bundled calibration
text; held-out perplexity: ``--eval-windows`` windows of ``--prefill`` bytes of the bundled held-out text, which no
pass sees —
``distill`` early-stops on the calibration text's own held-out tail). Columns: held-out perplexity and its
change against dense; parameters; bytes of the weights as stored dense and, for sparse rows, as values + bitmask
(``sparse_format``: a size figure only — the graph still runs dense kernels); prefill latency of the graph at
batch 1 x ``--prefill`` tokens, all rows timed round-robin in one run (median), and the ratio to dense.

Structured rows remove 25% of every MLP's channels (``prune-channels``), with each importance score, with and
without ``distill``; a Torch-Pruning row (when ``torch-pruning`` is installed) prunes the same channels of the
eager model with its own dependency graph and magnitude importance. Unstructured rows remove 50% of the weights
of every linear but the LM head (``sparsify``). ``--plots DIR`` also sweeps the ratio per method and writes
``prune_ppl.png`` (perplexity vs sparsity) and ``prune_latency.png`` (latency vs sparsity) there.

    python benchmarks/prune.py [--prefill 256] [--eval-windows 64] [--distill-steps 200] [--plots docs]
    python benchmarks/prune.py --eval-windows 8 --distill-steps 5 --only 'dense|l2'  # smoke test
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from passforge.eval.perplexity import perplexity
from passforge.ir.capture import capture
from passforge.ir.graph import param_stats
from passforge.models import bundled
from passforge.models.tokenizer import encode
from passforge.passes.base import Context
from passforge.passes.manager import PassManager
from passforge.runtime.profile import interleaved_latency_ms

MLP25 = "prune-channels(ratio=0.25,importance={imp})"
DISTILL = ",distill(steps={steps},lr=3e-4)"
ROWS: dict[str, str] = {
    "dense": "",
    "mlp 25% l2": MLP25.format(imp="l2"),
    "mlp 25% wanda": MLP25.format(imp="wanda"),
    "mlp 25% taylor": MLP25.format(imp="taylor"),
    "mlp 25% taylor global": MLP25.format(imp="taylor,scope=global"),
    "mlp 25% taylor sensitivity": MLP25.format(imp="taylor,schedule=sensitivity"),
    "mlp 25% l2 + distill": MLP25.format(imp="l2") + DISTILL,
    "mlp 25% taylor sensitivity + distill": MLP25.format(imp="taylor,schedule=sensitivity") + DISTILL,
    "mlp 50% taylor sensitivity + distill": MLP25.replace("0.25", "0.5").format(imp="taylor,schedule=sensitivity")
    + DISTILL,
    "heads 25% taylor": "prune-channels(target=heads,ratio=0.25,importance=taylor)",
    "hidden 25% taylor": "prune-channels(target=hidden,ratio=0.25,importance=taylor)",
    "hidden 25% taylor + distill": "prune-channels(target=hidden,ratio=0.25,importance=taylor)" + DISTILL,
    "50% magnitude": "sparsify(ratio=0.5,method=magnitude)",
    "50% wanda": "sparsify(ratio=0.5,method=wanda)",
    "50% sparsegpt": "sparsify(ratio=0.5,method=sparsegpt)",
    "50% wanda + distill": "sparsify(ratio=0.5,method=wanda)" + DISTILL,
    "2:4 wanda": "sparsify(pattern=2:4,method=wanda)",
    "2:4 sparsegpt": "sparsify(pattern=2:4,method=sparsegpt)",
}
SWEEP = {  # method -> pipeline for a sparsity s (plots)
    "magnitude (unstructured)": "sparsify(ratio={s},method=magnitude)",
    "wanda (unstructured)": "sparsify(ratio={s},method=wanda)",
    "sparsegpt (unstructured)": "sparsify(ratio={s},method=sparsegpt)",
    "mlp channels, l2": "prune-channels(ratio={s},importance=l2)",
    "mlp channels, taylor global": "prune-channels(ratio={s},importance=taylor,scope=global)",
}
SPARSITIES = (0.125, 0.25, 0.375, 0.5, 0.625)


@dataclass
class Row:
    label: str
    graph: fx.GraphModule
    ppl: float
    params: int
    dense_mb: float
    stored_mb: float
    build_s: float
    note: str = ""
    ms: float = float("nan")


class Bench:
    def __init__(self, prefill: int, eval_windows: int) -> None:
        torch.manual_seed(0)
        self.model = bundled.load_tiny_lm()
        self.example = torch.zeros(1, prefill, dtype=torch.long)
        self.graph = capture(self.model, (self.example,))
        self.calib = torch.tensor(encode(bundled.calib_text()))
        self.eval = torch.tensor(encode(bundled.eval_text()))
        self.eval_windows = eval_windows

    def ppl(self, gm: fx.GraphModule) -> float:
        with torch.inference_mode():
            return perplexity(gm, self.eval, seq_len=self.example.shape[1], batch_size=1,
                              max_windows=self.eval_windows)

    def run(self, label: str, spec: str) -> Row:
        start = time.perf_counter()
        if spec:
            ctx = Context(example_inputs=(self.example,), calib_tokens=self.calib)
            result = PassManager.parse(spec).run(self.graph, ctx)
            gm, note = result.graph, "; ".join(n for r in result.records for n in r.notes[-1:])
        else:
            gm, note = self.graph, ""
        return self.measure(label, gm, time.perf_counter() - start, note)

    def measure(self, label: str, gm: fx.GraphModule, build_s: float, note: str = "") -> Row:
        from passforge.passes.prune.sparse_format import compressed_bytes

        params, nbytes = param_stats(gm)
        return Row(label, gm, self.ppl(gm), params, nbytes / 1e6, compressed_bytes(gm) / 1e6, build_s, note)

    def timed(self, rows: list[Row], repeats: int) -> None:
        """Prefill latency of every row's graph, round-robin."""
        fns = [lambda gm=row.graph: gm(self.example) for row in rows]
        for row, ms in zip(rows, interleaved_latency_ms(fns, device=torch.device("cpu"), repeats=repeats,
                                                          warmup=3), strict=True):
            row.ms = ms


def torch_pruning_row(bench: Bench, ratio: float) -> Row | str:
    try:
        from benchmarks.torch_pruning_ref import prune_with_torch_pruning
    except ImportError as exc:
        return f"Torch-Pruning row skipped: {exc}"
    start = time.perf_counter()
    try:
        pruned = prune_with_torch_pruning(bench.model, ratio=ratio, target="mlp")
    except ImportError as exc:
        return f"Torch-Pruning row skipped: {exc}"
    gm = capture(pruned.eval(), (bench.example,))
    return bench.measure("Torch-Pruning mlp 25% (l2)", gm, time.perf_counter() - start)


def sweep(bench: Bench, out: Path, repeats: int) -> dict[str, list[tuple[float, float, float]]]:
    """(sparsity, ppl, ms) per method; writes the two plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = bench.run("dense", "")
    results: dict[str, list[tuple[float, Row]]] = {}
    for method, spec in SWEEP.items():
        results[method] = [(s, bench.run(f"{method} {s}", spec.format(s=s))) for s in SPARSITIES]
    rows = [dense, *(row for points in results.values() for _, row in points)]
    bench.timed(rows, repeats)
    table = {m: [(0.0, dense.ppl, dense.ms), *((s, r.ppl, r.ms) for s, r in pts)] for m, pts in results.items()}
    for key, ylabel, name in ((1, "held-out perplexity", "prune_ppl.png"), (2, "prefill ms (batch 1)",
                                                                            "prune_latency.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for method, points in table.items():
            ax.plot([p[0] for p in points], [p[key] for p in points], marker="o", label=method)
        ax.set_xlabel("sparsity (fraction of weights / MLP channels removed)")
        ax.set_ylabel(ylabel)
        if key == 1:
            ax.set_yscale("log")
        ax.set_title(f"bundled tiny LM: {ylabel} vs sparsity")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--only", default="", help="regex: rows whose label matches (dense always runs)")
    parser.add_argument("--plots", type=Path, default=None, help="folder for the sweep plots (skipped if unset)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args.prefill, args.eval_windows)
    rows, notes = [], []
    builders: dict[str, Callable[[], Row | str]] = {
        label: (lambda label=label, spec=spec: bench.run(label, spec.format(steps=args.distill_steps)))
        for label, spec in ROWS.items()
    }
    builders["Torch-Pruning mlp 25% (l2)"] = lambda: torch_pruning_row(bench, 0.25)
    for label, build in builders.items():
        if label != "dense" and args.only and not re.search(args.only, label):
            continue
        try:
            row = build()
        except Exception as exc:  # noqa: BLE001 - one failing row must not hide the others
            row = f"{label}: failed: {type(exc).__name__}: {exc}"
        (rows if isinstance(row, Row) else notes).append(row)
        print(f"built {label}" if isinstance(row, Row) else row, flush=True)
    bench.timed(rows, args.repeats)
    print_table(rows, args.prefill)
    for note in notes:
        print(note)
    record = {"rows": [{k: v for k, v in vars(r).items() if k != "graph"} for r in rows]}
    if args.plots:
        record["sweep"] = sweep(bench, args.plots, max(5, args.repeats // 2))
        print(f"plots: {args.plots / 'prune_ppl.png'}, {args.plots / 'prune_latency.png'}")
        for method, points in record["sweep"].items():
            print(f"  {method}: " + ", ".join(f"{s:.3f}: ppl {p:.3f} {ms:.2f} ms" for s, p, ms in points))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))


def print_table(rows: list[Row], prefill: int) -> None:
    dense = rows[0]
    print(f"\nbundled tiny LM, prefill batch 1 x {prefill} tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| row | held-out ppl | vs dense | params | MB dense | MB stored | prefill ms | speed-up | build s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.label} | {r.ppl:.3f} | {r.ppl / dense.ppl - 1:+.1%} | {r.params / 1e6:.2f}M | {r.dense_mb:.2f} "
              f"| {r.stored_mb:.2f} | {r.ms:.2f} | {dense.ms / r.ms:.2f}x | {r.build_s:.1f} |")


if __name__ == "__main__":
    main()
