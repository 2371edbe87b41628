"""Profiling: per-pass figures (as a pass-manager hook) and per-node time, by op and by creating pass.

Per pass (:class:`ProfileHook`) the row holds: nodes; parameter count and bytes; latency on the example
inputs (medians; every graph version timed round-robin at the end of the pipeline); peak memory; max abs
error and cosine similarity of the first output against the original graph's, and KL for language models;
perplexity on held-out tokens for language models. Peak memory is measured on CUDA
(``torch.cuda.max_memory_allocated``); on CPU it is the planned peak: parameter bytes plus the largest sum
of live activations over the graph's execution order, from ``meta["val"]`` (views cost nothing, a tensor
is freed after its last user) — deterministic, and what a caching allocator needs at least.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from passforge.eval.compare import cosine_similarity, logits_kl, max_abs_err
from passforge.eval.perplexity import perplexity
from passforge.ir.graph import COMPUTE_OPS, PASS_META, num_compute_nodes, op_name, param_stats, to_device
from passforge.passes.base import Context, Pass
from passforge.passes.hooks import run_graph
from passforge.passes.manager import Hook, PassRecord, PipelineResult

METRIC_FIELDS = (
    "nodes", "params", "param_bytes", "latency_ms", "peak_mem_bytes", "max_abs_err", "cos", "kl", "ppl",
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_latency_ms(
    fns: Sequence[Callable[[], object]], *, device: torch.device, repeats: int, warmup: int,
    min_total_s: float = 0.25,
) -> list[float]:
    """Median wall time (ms) of each ``fn`` measured round-robin, so machine noise and drift hit all alike.

    After ``warmup`` untimed rounds, rounds continue until each fn has ``repeats`` samples and ``min_total_s``
    has been sampled per fn (at most ``10 * repeats`` rounds), so millisecond graphs get stable medians too.
    """
    samples: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns:
                fn()
        _sync(device)
        rounds = 0
        while rounds < repeats or (min(sum(t) for t in samples) < min_total_s * 1e3 and rounds < 10 * repeats):
            for fn, times in zip(fns, samples):
                start = time.perf_counter()
                fn()
                _sync(device)
                times.append((time.perf_counter() - start) * 1e3)
            rounds += 1
    return [statistics.median(times) for times in samples]


def _is_view(node: fx.Node) -> bool:
    target = node.target
    if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
        returns = target._schema.returns
        return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
    return node.op == "call_function" and op_name(node) == "getitem"


def _bytes_of(val: object) -> int:
    if isinstance(val, torch.Tensor):
        numel = 1
        for d in val.shape:
            numel *= int(d) if isinstance(d, int) else int(d.node.hint or 1)
        return numel * val.element_size()
    if isinstance(val, (list, tuple)):
        return sum(_bytes_of(v) for v in val)
    return 0


def planned_peak_bytes(gm: fx.GraphModule) -> int:
    """Parameter bytes + peak of live activation bytes in execution order (see module docstring)."""
    nodes = list(gm.graph.nodes)
    owner: dict[fx.Node, fx.Node] = {}  # node -> the node whose storage it uses
    for node in nodes:
        inputs = node.all_input_nodes
        owner[node] = owner[inputs[0]] if _is_view(node) and inputs else node
    end: dict[fx.Node, int] = {}  # storage owner -> index of the last node reading it (through any view)
    for i, node in enumerate(nodes):
        end[owner[node]] = max(end.get(owner[node], i), i)
        for arg in node.all_input_nodes:
            end[owner[arg]] = max(end[owner[arg]], i)
    live = peak = 0
    release: dict[int, int] = defaultdict(int)
    for i, node in enumerate(nodes):
        if owner[node] is node and node.op in ("call_function", "placeholder"):
            size = _bytes_of(node.meta.get("val"))
            live += size
            release[end[node]] += size
        peak = max(peak, live)
        live -= release.pop(i, 0)
    return param_stats(gm)[1] + peak


def _logits(out: object) -> torch.Tensor | None:
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return next((t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()), None)


@dataclass
class ProfileHook(Hook):
    """Fills ``record.metrics`` (and the baseline row) with the figures in :data:`METRIC_FIELDS`.

    Latency is measured at the end, every graph version round-robin (see :func:`interleaved_latency_ms`):
    on a shared machine, timing each pass's graph right after the pass would compare different moments'
    noise. This keeps each version alive until the pipeline ends (versions share unchanged tensors).
    """

    repeats: int = 10
    warmup: int = 3
    latency: bool = True
    lm: bool = False
    ppl_windows: int = 32

    def start(self, gm: fx.GraphModule, ctx: Context, baseline: dict[str, object]) -> None:
        self._reference = _logits(run_graph(gm, ctx.example_inputs)) if ctx.example_inputs else None
        self._pending: list[tuple[dict[str, object], fx.GraphModule, tuple[object, ...]]] = []
        self.measure(gm, ctx, baseline)

    def after_pass(
        self, pass_: Pass, before: fx.GraphModule, after: fx.GraphModule, ctx: Context, record: PassRecord
    ) -> None:
        self.measure(after, ctx, record.metrics)

    def finish(self, result: PipelineResult, ctx: Context) -> None:
        if not self._pending:
            return
        rows, graphs, inputs = zip(*self._pending)
        fns = [functools.partial(gm, *args) for gm, args in zip(graphs, inputs)]
        for row, ms in zip(rows, interleaved_latency_ms(fns, device=ctx.device, repeats=self.repeats,
                                                         warmup=self.warmup)):
            row["latency_ms"] = ms
        self._pending = []

    def measure(self, gm: fx.GraphModule, ctx: Context, row: dict[str, object]) -> None:
        """Fill ``row`` with the figures for ``gm`` (latency later, in :meth:`finish`)."""
        params, param_bytes = param_stats(gm)
        row.update(dict.fromkeys(METRIC_FIELDS))
        row.update(nodes=num_compute_nodes(gm), params=params, param_bytes=param_bytes)
        if not ctx.example_inputs:
            return
        device = ctx.device
        gm = to_device(gm, device)
        inputs = _on_device(ctx)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        outputs = run_graph(gm, inputs)
        if device.type == "cuda":
            row["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(device))
        else:
            row["peak_mem_bytes"] = planned_peak_bytes(gm)
        if self.latency:
            self._pending.append((row, gm, inputs))  # timed in finish(), side by side with the other versions
            # (each on its own inputs: a pass that pruned a KV cache's heads changed them)
        logits = _logits(outputs)
        if self._reference is not None and logits is not None and logits.shape == self._reference.shape:
            reference = self._reference.to(logits.device)
            row["max_abs_err"] = max_abs_err(reference, logits)
            row["cos"] = cosine_similarity(reference, logits)
            if self.lm:
                row["kl"] = logits_kl(reference, logits)
        if self.lm and ctx.eval_tokens is not None:
            row["ppl"] = _graph_perplexity(gm, inputs[0], ctx, self.ppl_windows)


def _on_device(ctx: Context) -> tuple[object, ...]:
    return tuple(x.to(ctx.device) if isinstance(x, torch.Tensor) else x for x in ctx.example_inputs)


def _graph_perplexity(gm: fx.GraphModule, example_tokens: torch.Tensor, ctx: Context, windows: int) -> float:
    """Perplexity with windows of the graph's own input shape (static graphs take one shape)."""
    batch, seq_len = example_tokens.shape
    device = example_tokens.device

    def model_fn(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[0] != batch:  # the last batch may be short; pad it to the graph's batch
            pad = tokens.new_zeros(batch - tokens.shape[0], tokens.shape[1])
            return _logits(gm(torch.cat([tokens, pad]).to(device)))[: tokens.shape[0]]
        return _logits(gm(tokens.to(device)))

    with torch.inference_mode():
        return perplexity(model_fn, ctx.eval_tokens, seq_len=int(seq_len), batch_size=int(batch), max_windows=windows)


@dataclass
class NodeProfile:
    """Per-node wall time (median of repeats, ms) and bytes allocated (a node's output unless it is a view),
    each aggregated by op and by the pass that created the node."""

    by_node: dict[str, float]
    by_op: dict[str, float]
    by_pass: dict[str, float]
    total_ms: float
    bytes_by_node: dict[str, int]
    bytes_by_op: dict[str, int]


class _TimingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, device: torch.device) -> None:
        super().__init__(gm)
        self.device = device
        self.times: dict[fx.Node, float] = {}

    def run_node(self, n: fx.Node) -> object:
        _sync(self.device)
        start = time.perf_counter()
        result = super().run_node(n)
        _sync(self.device)
        self.times[n] = (time.perf_counter() - start) * 1e3
        return result


def profile_nodes(
    gm: fx.GraphModule, inputs: Sequence[object], *, device: torch.device | None = None, repeats: int = 5
) -> NodeProfile:
    """Time every compute node (interpreted, so absolute totals exceed compiled-code latency)."""
    device = device or torch.device("cpu")
    interp = _TimingInterpreter(gm, device)
    samples: dict[fx.Node, list[float]] = defaultdict(list)
    with torch.inference_mode():
        interp.run(*inputs)  # warm-up
        for _ in range(repeats):
            interp.times.clear()
            interp.run(*inputs)
            for node, ms in interp.times.items():
                samples[node].append(ms)
    by_node: dict[str, float] = {}
    by_op: dict[str, float] = defaultdict(float)
    by_pass: dict[str, float] = defaultdict(float)
    bytes_by_node: dict[str, int] = {}
    bytes_by_op: dict[str, int] = defaultdict(int)
    for node, values in samples.items():
        if node.op not in COMPUTE_OPS:
            continue
        ms = statistics.median(values)
        by_node[node.name] = ms
        by_op[op_name(node)] += ms
        by_pass[str(node.meta.get(PASS_META, "?"))] += ms
        allocated = 0 if _is_view(node) else _bytes_of(node.meta.get("val"))
        bytes_by_node[node.name] = allocated
        bytes_by_op[op_name(node)] += allocated
    return NodeProfile(
        _descending(by_node), _descending(by_op), _descending(by_pass), sum(by_node.values()),
        _descending(bytes_by_node), _descending(bytes_by_op),
    )


def _descending(table: dict[str, float]) -> dict[str, float]:
    return dict(sorted(table.items(), key=lambda kv: -kv[1]))
