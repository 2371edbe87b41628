"""``sparsify(pattern=unstructured|2:4, ratio=0.5, method=magnitude|wanda|sparsegpt, skip=lm_head*)``: zero a
fraction of every linear's weights, chosen so the layer's outputs change least.

Half the weights of an LLM's linears can be zero at a small cost in accuracy if the right half is chosen.
Which half: ``magnitude`` drops the smallest ``|W|`` of the whole layer (the baseline of the Wanda paper);
``wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models") scores each
weight by ``|W_ij| * ||X_j||_2`` — its size times the norm of the input channel it multiplies over the
calibration tokens — and drops the lowest scores of each output row (as the paper does), so the weights that
meet LLMs' few large-magnitude input channels survive; ``sparsegpt`` (Frantar & Alistarh 2023, "SparseGPT:
Massive Language Models Can Be Accurately Pruned in One-Shot") prunes one input column at a time like GPTQ
quantizes (OBS): the mask of each block of ``blocksize`` columns is chosen at the block's start by
``w^2 / [H^-1]_cc^2`` over the whole block (adaptive mask selection), and each pruned weight's error is spread
over the columns not yet reached, weighted by the inverse Hessian ``H = X^T X`` (+ ``damp * mean(diag H)``),
so the remaining weights absorb what was dropped — minimising ``||X W^T - X Ŵ^T||``, not ``||W - Ŵ||``.

``pattern=2:4``: in every group of 4 consecutive input columns of each row, 2 are zero (NVIDIA's
semi-structured sparsity; ``ratio`` must be 0.5); each method picks the 2 lowest of its score per group
(sparsegpt at the group's first column, from the error-compensated weights). Every 2:4 weight is verified
after the pass (:func:`is_2_4_sparse`).

The zeros are folded into the weights: the graph is unchanged, each weight tensor is replaced by a pruned one
of the same dtype. Before → after::

    %w = get_attr[layers.0.q_proj.weight]        %w = get_attr[layers.0.q_proj.weight]   # now half zeros
    %y = aten.linear(%x, %w)               →     %y = aten.linear(%x, %w)                # unchanged

What that buys: :func:`~passforge.passes.prune.sparse_format.save_compressed` stores the pruned weights as
values + bitmask (the report's notes give the size), and on CUDA :func:`to_semi_structured` swaps 2:4 fp16/bf16
weights to torch's ``SparseSemiStructuredTensor`` (sparse tensor-core kernels). Nothing here claims a speed-up:
dense kernels multiply the zeros like any other value, and the semi-structured kernels' gain is for a
benchmark to measure.

Targets: every ``aten.linear`` whose weight is a 2-D float parameter (``get_attr``) read by that linear only
— not a tied or shared weight, not a computed one (a dequantize: run ``sparsify`` before ``quantize``).
``skip``: ``;``-separated globs of weight names left dense, matched against the name or any trailing part
(default ``lm_head*``: the classic Wanda/SparseGPT setup keeps the output head dense, the layer most
sensitive to pruning; ``skip=''`` prunes it too). Calibration (wanda, sparsegpt: ``calib_windows`` windows of
``ctx.calib_tokens``) is one pass over the graph as given: every linear's input comes through the *dense*
layers before it, not layer by layer through the pruned ones as in the papers. A pruned linear is marked
(``node.meta["passforge.sparsified"]``, the pass's spec) and never pruned again (idempotent); the prefill and
decode graphs of a model reuse the forward graph's pruned weights (``ctx.memo``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import fx

from passforge.ir.graph import describe_val, get_attr, set_tensor_attr
from passforge.passes.base import Context, Pass, PassError, PassResult
from passforge.passes.prune.sparse_format import SPARSIFIED_META, packed_nbytes, sparsified_weights
from passforge.passes.quantize.calibrate import calibration_inputs, memo_get, memo_put, observe
from passforge.passes.quantize.gptq import inverse_hessian_factor
from passforge.passes.quantize.insert import linear_operands, name_matches
from passforge.passes.registry import register

aten = torch.ops.aten
Pattern = Literal["unstructured", "2:4"]
Method = Literal["magnitude", "wanda", "sparsegpt"]
GROUP, ZEROS_PER_GROUP = 4, 2  # 2:4


@register
@dataclass(frozen=True)
class Sparsify(Pass):
    """Prune linear weights to ``ratio`` zeros (``unstructured``) or 2 of every 4 (``2:4``) by ``magnitude``,
    ``wanda`` or ``sparsegpt``; the zeros are stored in the weights, the graph is unchanged."""

    name: ClassVar[str] = "sparsify"
    lossy: ClassVar[bool] = True
    max_rel_err: ClassVar[float | None] = 1.0  # collapse guard only; the profile measures the real cost
    pattern: Pattern = "unstructured"
    ratio: float = 0.5
    method: Method = "wanda"
    skip: str = "lm_head*"
    calib_windows: int = 16
    damp: float = 0.01
    blocksize: int = 128

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1) (the fraction of weights set to zero), got {self.ratio}")
        if self.pattern == "2:4" and self.ratio != 0.5:
            raise ValueError(f"pattern=2:4 zeroes exactly half of each group of 4, so ratio must be 0.5 (or left "
                             f"out), got {self.ratio}")
        if self.calib_windows < 1:
            raise ValueError(f"calib_windows must be >= 1, got {self.calib_windows}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.blocksize < GROUP or self.blocksize % GROUP:
            raise ValueError(f"blocksize must be a multiple of {GROUP}, got {self.blocksize}")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"

    @torch.no_grad()
    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        targets, skipped = self.targets(gm)
        if not targets:
            return PassResult(gm, modified=False, stats={"sparsified": 0})
        kind = f"{self.spec}:sparse"
        results: dict[str, torch.Tensor | None] = {}
        for _, weight in targets:
            found = memo_get(ctx.memo, kind, [weight.target])
            shape = get_attr(gm, weight.target).shape
            results[weight.target] = found if isinstance(found, torch.Tensor) and found.shape == shape else None
        todo = [(linear, weight) for linear, weight in targets if results[weight.target] is None]
        notes = []
        if todo:
            statistics = self._calibrate(gm, ctx, todo, notes) if self.needs_calibration else {}
            for linear, weight in todo:
                w = get_attr(gm, weight.target)
                pruned = self._prune(w.float(), statistics.get(linear_operands(linear)[0]), weight.target)
                results[weight.target] = pruned.to(w.dtype)
                memo_put(ctx.memo, kind, weight.target, results[weight.target])
        if len(todo) < len(targets):
            notes.append(f"{len(targets) - len(todo)} weights taken from the same model's forward graph (ctx.memo)")
        zeros = dense = packed = 0
        for linear, weight in targets:
            old = get_attr(gm, weight.target)
            new = results[weight.target].to(old.device, old.dtype)
            if self.pattern == "2:4" and not is_2_4_sparse(new):
                raise PassError(f"sparsify: weight '{weight.target}' of node '{linear.name}' is not 2:4 sparse after "
                                f"pruning (a group of 4 with fewer than 2 zeros); this is a bug in sparsify")
            set_tensor_attr(gm, weight.target, new)
            linear.meta[SPARSIFIED_META] = self.spec
            zeros += int((new == 0).sum())
            dense += new.numel() * new.element_size()
            packed += packed_nbytes(new)
        numel = sum(get_attr(gm, w.target).numel() for _, w in targets)
        notes.append(f"{self.method} {self.pattern}: {zeros / numel:.1%} of the {len(targets)} pruned weights' "
                     f"entries are zero; {skipped} linears left dense by skip={self.skip!r}")
        notes.append(f"stored as values + bitmask (sparse_format.save_compressed) they take {packed / 2**20:.2f} MiB "
                     f"against {dense / 2**20:.2f} MiB dense ({packed / dense:.2f}x): a size figure only; the graph "
                     "still multiplies the zeros, no speed-up is claimed")
        return PassResult(gm, modified=True, stats={"sparsified": len(targets)}, notes=notes)

    def targets(self, gm: fx.GraphModule) -> tuple[list[tuple[fx.Node, fx.Node]], int]:
        """The linears to prune with their weight nodes, and how many were skipped by name."""
        skips = [pattern for pattern in self.skip.split(";") if pattern]
        readers = _readers_per_storage(gm)
        targets, skipped = [], 0
        for node in gm.graph.nodes:
            if node.target is not aten.linear.default or node.meta.get(SPARSIFIED_META):
                continue
            weight = linear_operands(node)[1]
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and set(weight.users) == {node}):
                continue  # computed (a dequantize, a transpose) or read elsewhere too
            tensor = get_attr(gm, weight.target)
            if not (type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.is_floating_point()
                    and tensor.dim() == 2 and readers[_storage(tensor)] == 1):
                continue  # not a plain float matrix, or tied to another name (an embedding)
            if any(name_matches(weight.target, p) for p in skips):
                skipped += 1
                continue
            if not bool(torch.isfinite(tensor).all()):
                raise PassError(f"sparsify: weight '{weight.target}' of node '{node.name}' holds NaN/Inf values")
            if self.pattern == "2:4" and tensor.shape[1] % GROUP:
                raise PassError(
                    f"sparsify: weight '{weight.target}' has {tensor.shape[1]} input channels, not a multiple of 4, "
                    "so it has no 2:4 groups; skip it (skip='...') or use pattern=unstructured"
                )
            targets.append((node, weight))
        return targets, skipped

    def _calibrate(
        self, gm: fx.GraphModule, ctx: Context, targets: list[tuple[fx.Node, fx.Node]], notes: list[str]
    ) -> dict[fx.Node, torch.Tensor]:
        """Per distinct linear input: ``||X_j||_2`` per channel (wanda) or ``X^T X / tokens`` (sparsegpt), fp32."""
        sums: dict[fx.Node, torch.Tensor] = {}
        tokens: dict[fx.Node, int] = {}

        def accumulate(x: fx.Node):
            def add(value: torch.Tensor) -> None:
                rows = value.float().reshape(-1, value.shape[-1])  # (T, K)
                part = rows.pow(2).sum(dim=0) if self.method == "wanda" else rows.T @ rows
                sums[x] = sums[x] + part if x in sums else part
                tokens[x] = tokens.get(x, 0) + rows.shape[0]

            return add

        inputs = {linear_operands(linear)[0] for linear, _ in targets}
        windows = calibration_inputs(ctx, self.spec, self.calib_windows)
        observe(gm, windows, {x: accumulate(x) for x in inputs}, label=f"{self.name}: {self.method} statistics")
        notes.append(f"{self.method}: statistics of {len(inputs)} linear inputs, {len(windows)} calibration windows")
        if self.method == "wanda":
            return {x: sums[x].sqrt() for x in inputs}
        return {x: sums[x] / tokens[x] for x in inputs}

    def _prune(self, w: torch.Tensor, statistic: torch.Tensor | None, where: str) -> torch.Tensor:
        if self.method == "magnitude":
            return magnitude_prune(w, self.ratio, self.pattern)
        if self.method == "wanda":
            return wanda_prune(w, statistic, self.ratio, self.pattern)
        return sparsegpt_prune(w, statistic, self.ratio, self.pattern, self.damp, self.blocksize, where)


def magnitude_prune(w: torch.Tensor, ratio: float, pattern: Pattern = "unstructured") -> torch.Tensor:
    """``w`` with the ``ratio`` smallest ``|w|`` of the whole layer zeroed (2:4: the 2 smallest of each group)."""
    return w.masked_fill(_lowest(w.abs(), ratio, pattern, per_row=False), 0)


def wanda_prune(w: torch.Tensor, x_norm: torch.Tensor, ratio: float, pattern: Pattern = "unstructured") -> torch.Tensor:
    """``w`` (N, K) with the ``ratio`` lowest scores ``|w_ij| * x_norm_j`` of each row zeroed (2:4: the 2 lowest
    of each group); ``x_norm`` (K,): each input channel's L2 norm over the calibration tokens."""
    score = w.abs() * x_norm.to(w.device, w.dtype)[None, :]
    return w.masked_fill(_lowest(score, ratio, pattern, per_row=True), 0)


def sparsegpt_prune(
    w: torch.Tensor, hessian: torch.Tensor, ratio: float, pattern: Pattern = "unstructured", damp: float = 0.01,
    blocksize: int = 128, where: str = "weight",
) -> torch.Tensor:
    """``w`` (N, K, float) pruned by SparseGPT with the layer Hessian ``X^T X / tokens`` (K, K): column by
    column, each pruned weight's error compensated on the columns to its right (lazy updates per block of
    ``blocksize``); the mask of a block chosen at its start by ``w^2 / [H^-1]_cc^2`` over the block (2:4: per
    group of 4, at the group's first column). Input channels that are never non-zero get weight 0."""
    w = w.clone()
    hinv = inverse_hessian_factor(  # upper Cholesky factor of H^-1
        hessian, w, damp, where, pass_name="sparsify", fix="sparsify(method=sparsegpt,damp=0.1)")
    cols = w.shape[1]
    pruned = torch.zeros_like(w)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()  # (N, B): updated as the columns before it are pruned
        h1 = hinv[i1:i2, i1:i2]
        d = torch.diagonal(h1)
        errors = torch.zeros_like(w1)
        mask = _lowest(w1.pow(2) / d.pow(2), ratio, "unstructured", per_row=False) if pattern != "2:4" else None
        for i in range(i2 - i1):
            if pattern == "2:4" and i % GROUP == 0:
                group = w1[:, i:i + GROUP].pow(2) / d[i:i + GROUP].pow(2)
                group_mask = _lowest(group, 0.5, "2:4", per_row=True)
            drop = mask[:, i] if mask is not None else group_mask[:, i % GROUP]
            column = w1[:, i]
            kept = column.masked_fill(drop, 0)
            pruned[:, i1 + i] = kept
            error = (column - kept) / d[i]
            w1[:, i:] -= error[:, None] * h1[i, i:][None, :]
            errors[:, i] = error
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return pruned


def is_2_4_sparse(w: torch.Tensor) -> bool:
    """True when every group of 4 consecutive entries along the last dim holds at least 2 zeros."""
    if w.dim() < 1 or w.shape[-1] % GROUP:
        return False
    return bool(((w.reshape(-1, GROUP) == 0).sum(dim=1) >= ZEROS_PER_GROUP).all())


def to_semi_structured(gm: fx.GraphModule) -> tuple[int, str]:
    """Swap ``gm``'s 2:4 sparse weights (those ``sparsify`` pruned) for torch's ``SparseSemiStructuredTensor``
    where that can run: CUDA, fp16/bf16, a torch with ``torch.sparse.to_sparse_semi_structured`` and a shape its
    kernels take. Returns how many were swapped and a note saying why the others were not. For running only:
    the swapped graph is not saved or verified as IR (save it with ``save_compressed`` first); no speed-up is
    implied — measure it."""
    convert = getattr(torch.sparse, "to_sparse_semi_structured", None)
    names = [n for n in sparsified_weights(gm)
             if type(get_attr(gm, n)) in (torch.Tensor, torch.nn.Parameter) and is_2_4_sparse(get_attr(gm, n))]
    if not names:
        return 0, "to_semi_structured: no 2:4 sparse weights (run sparsify(pattern=2:4) first); nothing changed"
    if convert is None:
        return 0, "to_semi_structured: this torch has no torch.sparse.to_sparse_semi_structured; weights stay dense"
    swapped, refused = 0, []
    for name in names:
        w = get_attr(gm, name)
        if w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16):
            refused.append(f"'{name}' is {describe_val(w)} on {w.device.type} (needs fp16/bf16 on CUDA)")
            continue
        try:
            set_tensor_attr(gm, name, convert(w.detach()))
        except (RuntimeError, ValueError) as exc:  # a shape or GPU the sparse kernels do not support
            refused.append(f"'{name}': {str(exc).splitlines()[0]}")
            continue
        swapped += 1
    if swapped:
        views_as_reshapes(gm)
    note = f"to_semi_structured: {swapped} of {len(names)} 2:4 weights now SparseSemiStructuredTensor"
    if refused:
        note += f"; kept dense ({len(refused)}), e.g. {refused[0]}"
    return swapped, note


def views_as_reshapes(gm: fx.GraphModule) -> int:
    """Turn ``gm``'s ``aten.view`` calls into ``aten.reshape`` (which copies only where a view cannot be taken);
    returns how many. Export writes ``view`` where its trace saw contiguous tensors, but a linear on a
    SparseSemiStructuredTensor returns its output transposed in memory, and a later view of it fails (seen on
    an H100: "view size is not compatible with input tensor's size and stride")."""
    views = [node for node in gm.graph.nodes if node.op == "call_function" and node.target is aten.view.default]
    for node in views:
        node.target = aten.reshape.default
    if views:
        gm.recompile()
    return len(views)


def _lowest(score: torch.Tensor, ratio: float, pattern: Pattern, *, per_row: bool) -> torch.Tensor:
    """Boolean mask of the entries to zero: the 2 lowest scores of each group of 4 (``2:4``), else the
    ``round(ratio * n)`` lowest of each row (``per_row``) or of the whole tensor."""
    if pattern == "2:4":
        groups = score.reshape(score.shape[0], -1, GROUP)  # (N, K/4, 4)
        drop = groups.topk(ZEROS_PER_GROUP, dim=-1, largest=False).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True).view(score.shape)
    flat = score if per_row else score.reshape(1, -1)
    count = round(ratio * flat.shape[1])
    drop = flat.topk(count, dim=1, largest=False).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, drop, True).view(score.shape)


def _readers_per_storage(gm: fx.GraphModule) -> dict[int, int]:
    """How many nodes read each tensor storage through any ``get_attr`` (tied weights: one storage, two names)."""
    readers: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = get_attr(gm, node.target)
            if isinstance(value, torch.Tensor) and type(value) in (torch.Tensor, torch.nn.Parameter):
                readers[_storage(value)] = readers.get(_storage(value), 0) + len(node.users)
    return readers


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
