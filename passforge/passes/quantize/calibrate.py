"""Calibration: run a graph on windows of calibration tokens and hand chosen nodes' values to observers.

Calibration-driven passes (``quantize(scheme=w8a8-static)``, ``smooth-quant``, ``gptq``) need the values
that reach some nodes on real data. :func:`observe` runs the graph node by node (``torch.fx.Interpreter``,
which frees every value after its last use, so peak memory is one window's working set plus what the
observers keep) on ``windows`` windows of ``ctx.calib_tokens``, shaped like the graph's token input, and
calls each watched node's callback with its value. A tqdm bar shows progress on a terminal.

Which input takes the tokens: the first ``(batch, seq)`` int64 example input (token ids); the others keep
their example values (positions, an empty KV cache). A graph without one cannot be calibrated with tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx

from passforge.passes.base import Context, PreconditionError

Watch = Mapping[fx.Node, Callable[[torch.Tensor], None]]


class _Observing(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: Watch) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.watch = watch

    def run_node(self, n: fx.Node) -> object:
        value = super().run_node(n)
        callback = self.watch.get(n)
        if callback is not None:
            callback(value.detach())
        return value


def token_slot(inputs: Sequence[object]) -> int | None:
    """Index of the first ``(batch, seq)`` int64 input — the token ids calibration windows replace — or None."""
    return next(
        (i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.dtype == torch.long and x.dim() == 2),
        None,
    )


def next_token_loss(output: object, tokens: torch.Tensor, pass_spec: str) -> torch.Tensor:
    """Mean cross-entropy of a graph's ``(batch, seq, vocab)`` logits (its first such output) against the
    next tokens; the loss that loss-aware passes (Taylor importance, the sensitivity scan) differentiate or
    compare."""
    flat, _ = torch.utils._pytree.tree_flatten(output)
    logits = next((t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 3), None)
    if logits is None:
        raise PreconditionError(f"{pass_spec}: needs the graph to return (batch, seq, vocab) logits for the loss")
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def calibration_inputs(ctx: Context, pass_spec: str, windows: int) -> list[tuple[object, ...]]:
    """Up to ``windows`` input tuples: ``ctx.calib_inputs`` when set, else the example inputs with the token
    input replaced by consecutive, non-overlapping windows of ``ctx.calib_tokens``."""
    if ctx.calib_inputs:
        return list(ctx.calib_inputs[:windows])
    example = tuple(ctx.example_inputs)
    slot = token_slot(example)
    if slot is None:
        raise PreconditionError(
            f"{pass_spec}: calibration feeds token windows to the graph, but none of its example inputs is a "
            "(batch, seq) int64 token tensor; calibrate a language model's graph, or use a scheme that needs "
            "no calibration (w8, w4, w8a8)"
        )
    if ctx.calib_tokens is None or ctx.calib_tokens.numel() == 0:
        raise PreconditionError(
            f"{pass_spec}: needs calibration data and there is none: pass --calib-data FILE (CLI) or "
            "calib_data=... (optimize), or use a model with bundled calibration text (tiny-lm)"
        )
    batch, seq = example[slot].shape
    per_window = batch * seq
    stream = ctx.calib_tokens.reshape(-1)
    count = min(windows, stream.numel() // per_window)
    if count == 0:
        raise PreconditionError(
            f"{pass_spec}: {stream.numel()} calibration tokens are fewer than one window of {per_window} "
            f"(batch {batch} x seq {seq}); give more calibration text"
        )
    device = example[slot].device
    return [
        (*example[:slot], stream[i * per_window:(i + 1) * per_window].view(batch, seq).to(device), *example[slot + 1:])
        for i in range(count)
    ]


def observe(gm: fx.GraphModule, inputs: list[tuple[object, ...]], watch: Watch, *, label: str) -> None:
    """Run ``gm`` on each input tuple, calling ``watch[node](value)`` for every watched node it computes."""
    from tqdm.auto import tqdm

    interpreter = _Observing(gm, watch)
    with torch.no_grad():
        for args in tqdm(inputs, desc=label, unit="window", leave=False, disable=None):
            interpreter.run(*args)


def memo_put(memo: dict[str, object], kind: str, name: str, value: object) -> None:
    """Remember ``value`` for weight ``name`` (see ``Context.memo``)."""
    memo[f"{kind}:{name}"] = value


def memo_get(memo: dict[str, object], kind: str, names: list[str]) -> object | None:
    """What was remembered for any of ``names``, or for one with its first component dropped: the prefill
    graph's ``model.layers.0.wq.weight`` is the forward graph's ``layers.0.wq.weight`` seen through one
    wrapper. (Never shorter: ``model.layers.0.norm.weight`` must not find the final ``norm.weight``.)"""
    for name in names:
        parts = name.split(".")
        for i in range(min(2, len(parts))):
            found = memo.get(f"{kind}:{'.'.join(parts[i:])}")
            if found is not None:
                return found
    return None
