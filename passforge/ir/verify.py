"""Post-pass checks: the graph lints, every ``meta["val"]`` tells the truth, quantization scales are usable,
and lossless means lossless.

Run by the pass manager's verification hook after every pass; a failure rolls the pass back. When outputs
moved too far, :func:`first_divergence` names the first value (and its layer) that moved, so the error says
where in the model the pass went wrong, not only that it did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import fx

from passforge.ir.graph import describe_val, get_attr, propagate_meta


class VerificationError(RuntimeError):
    """The graph after a pass is malformed or computes something else than it claims."""


def lint(gm: fx.GraphModule) -> None:
    """torch.fx's structural lint plus: every ``get_attr`` target exists on the module."""
    try:
        gm.graph.lint()
    except Exception as exc:
        raise VerificationError(f"graph lint failed: {exc}") from exc
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                get_attr(gm, str(node.target))
            except AttributeError:
                raise VerificationError(
                    f"node '{node.name}' reads attribute '{node.target}', which is missing"
                ) from None


def check_meta(gm: fx.GraphModule) -> None:
    """Every node's ``meta["val"]`` must agree (shape, dtype, device) with a fresh fake-tensor propagation."""
    try:
        fresh = propagate_meta(gm)
    except Exception as exc:
        raise VerificationError(f"graph no longer propagates shapes: {type(exc).__name__}: {exc}") from exc
    for node, val in fresh.items():
        if "val" not in node.meta:
            raise VerificationError(f"node '{node.name}' has no meta['val'] (should be {describe_val(val)})")
        recorded = node.meta["val"]
        if not _same_value(recorded, val):
            raise VerificationError(
                f"node '{node.name}' ({node.target}) claims meta['val'] = {describe_val(recorded)} "
                f"but computes {describe_val(val)}"
            )


def _same_dims(recorded: Sequence[object], actual: Sequence[object]) -> bool:
    """Dims equal by expression; a data-dependent size (an unbacked symbol, ``nonzero``'s ``u0``) matches any:
    every propagation names it afresh (``u3``), so the names say nothing about a pass."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return len(recorded) == len(actual) and all(
        str(r) == str(a) or bool(free_unbacked_symbols(r)) or bool(free_unbacked_symbols(a))
        for r, a in zip(recorded, actual)
    )


def _same_value(recorded: object, actual: object) -> bool:
    if isinstance(actual, torch.Tensor):
        return (
            isinstance(recorded, torch.Tensor)
            and recorded.dtype == actual.dtype
            and recorded.device.type == actual.device.type
            and _same_dims(recorded.shape, actual.shape)
        )
    if isinstance(actual, (list, tuple)):
        return (
            isinstance(recorded, (list, tuple))
            and len(recorded) == len(actual)
            and all(_same_value(r, a) for r, a in zip(recorded, actual))
        )
    return True  # symbolic ints and Python scalars: nothing further to compare


def check_quant_params(gm: fx.GraphModule) -> None:
    """Every scale a quantize/dequantize node or quantized kernel reads — an argument its schema names
    ``*scale*``, stored or constant — is finite and positive: a NaN, Inf or zero scale turns a layer's
    outputs into NaN or zeros, and saved it would ship a broken model that still loads."""
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not _reads_quant_scales(schema.name):
            continue
        for argument, value in zip(schema.arguments, node.args):
            if "scale" not in argument.name:
                continue
            tensor = get_attr(gm, str(value.target)) if isinstance(value, fx.Node) and value.op == "get_attr" else value
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                bad = ~torch.isfinite(tensor) | (tensor <= 0)
                if bool(bad.any()):
                    raise VerificationError(
                        f"node '{node.name}' ({node.target}) reads {argument.name} '{_label(value)}' with "
                        f"{int(bad.sum())} of {tensor.numel()} values NaN, Inf or <= 0 ({_layer(node)})"
                    )
            elif isinstance(tensor, float) and not (math.isfinite(tensor) and tensor > 0):
                raise VerificationError(
                    f"node '{node.name}' ({node.target}) has {argument.name} = {tensor} ({_layer(node)})"
                )


RECORD_BYTES = 4 << 30
"""What :func:`first_divergence` may hold of the graph before's values (a 7B model's every activation at
2k tokens would be tens of GB): past it, only the first values are compared."""


def _reads_quant_scales(op: str) -> bool:
    """Q/DQ ops and passforge's quantized kernels; not ``passforge::attention``, whose ``scale`` is softmax's."""
    return op.startswith("quantized_decomposed::") or (op.startswith("passforge::") and op != "passforge::attention")


def first_divergence(
    before: fx.GraphModule, after: fx.GraphModule, inputs: Sequence[object], bound: float
) -> str | None:
    """The first value (in ``after``'s order) that both graphs compute under one name and that moved by more
    than ``bound`` of its own scale or became NaN/Inf — where a pass that broke the outputs went wrong — as
    ``"first moved: node 'x' (layer ...) ..."``; None when no shared value moved (the change is in new nodes).
    Weights are not compared (smoothing rescales them legitimately), the ops that read them are. Keeps up to
    ``RECORD_BYTES`` of ``before``'s values in memory: meant for the failure path only."""
    computed = ("call_function", "call_method", "call_module")  # not weights: a pass may rescale them (smoothing)
    shared = {n.name for n in after.graph.nodes if n.op in computed} & {n.name for n in before.graph.nodes}
    recorded: dict[str, torch.Tensor] = {}
    budget = RECORD_BYTES

    class Record(fx.Interpreter):
        def run_node(self, node: fx.Node) -> object:
            nonlocal budget
            value = super().run_node(node)
            if node.name in shared and isinstance(value, torch.Tensor) and value.is_floating_point():
                budget -= value.numel() * value.element_size()
                if budget >= 0:  # past the budget the search covers the graph's first values only
                    recorded[node.name] = value
            return value

    class Compare(fx.Interpreter):
        def run_node(self, node: fx.Node) -> object:
            value = super().run_node(node)
            want = recorded.get(node.name)
            if (want is not None and isinstance(value, torch.Tensor) and value.shape == want.shape
                    and value.is_floating_point()):
                moved = _moved(want, value)
                if math.isinf(moved) or moved > bound:
                    what = "became NaN/Inf" if math.isinf(moved) else f"moved by {moved:.1%} of its scale"
                    raise _Found(f"first moved: node '{node.name}' ({node.target}, {_layer(node)}) {what}")
            return value

    try:
        with torch.inference_mode():
            for interpreter in (Record(before), Compare(after)):
                interpreter.extra_traceback = False  # the message stays one line, with no user source in it
                interpreter.run(*inputs)
    except _Found as found:
        return str(found)
    except Exception:  # noqa: BLE001 - localisation is a courtesy on a failure path: never mask the real error
        return None
    return None


class _Found(Exception):
    pass


def _moved(want: torch.Tensor, got: torch.Tensor) -> float:
    """Largest change relative to ``want``'s largest finite magnitude; inf where NaN/Inf appeared."""
    want, got = want.float(), got.float()
    if bool((~torch.isfinite(got) & torch.isfinite(want)).any()):
        return math.inf
    finite = torch.isfinite(want) & torch.isfinite(got)
    if not bool(finite.any()):
        return 0.0
    scale = want[finite].abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return ((got[finite] - want[finite]).abs().max() / scale).item()


def _layer(node: fx.Node) -> str:
    """The module a node came from (``layers.3.mlp.down_proj``), for error messages. Nodes a pass added
    (a weight's quantize → dequantize) have no module: the nearest consumer that has one (the linear) names it."""
    frontier, seen = [node], {node}
    for _ in range(4):
        for candidate in frontier:
            stack = candidate.meta.get("nn_module_stack")
            if stack:
                path = list(stack.values())[-1][0]
                return f"layer '{path}'" if path else "top-level module"
        frontier = [user for n in frontier for user in n.users if user not in seen]
        seen.update(frontier)
    return "no layer recorded"


def _label(value: object) -> str:
    return str(value.target) if isinstance(value, fx.Node) and value.op == "get_attr" else str(value)


def check_outputs_close(
    expected: Sequence[torch.Tensor],
    actual: Sequence[torch.Tensor],
    *,
    rtol: float,
    atol: float,
) -> None:
    """Outputs of the graph after a lossless pass must match the graph before it."""
    _check_count(expected, actual)
    for i, (want, got) in enumerate(zip(expected, actual)):
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, check_dtype=True)
        except AssertionError as exc:
            summary = " ".join(str(exc).split())[:400]
            raise VerificationError(f"output {i} changed (rtol={rtol}, atol={atol}): {summary}") from exc


def check_lossy_outputs(
    expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor], *, max_rel_err: float | None
) -> None:
    """After a lossy pass: same outputs (count, shapes, dtypes), no NaN/Inf where the graph before had none,
    and — when the pass declares ``max_rel_err`` — no output moved by more than that fraction of its scale."""
    _check_count(expected, actual)
    for i, (want, got) in enumerate(zip(expected, actual)):
        if want.shape != got.shape or want.dtype != got.dtype:
            raise VerificationError(
                f"output {i} changed from {describe_val(want)} to {describe_val(got)}; passes keep the interface"
            )
        if not got.is_floating_point():
            continue
        new_bad = ~torch.isfinite(got) & torch.isfinite(want)
        if bool(new_bad.any()):
            raise VerificationError(f"output {i} has {int(new_bad.sum())} new NaN/Inf values")
        if max_rel_err is not None:
            moved = _moved(want, got)
            if moved > max_rel_err:
                raise VerificationError(
                    f"output {i} moved by {moved:.1%} of its scale; the pass allows at most {max_rel_err:.0%}"
                )


def restrict_resized_outputs(expected: Sequence[torch.Tensor], resized: dict[int, object]) -> list[torch.Tensor]:
    """The graph before's outputs with each one a pass resized (``{index: ResizedState}``: a KV cache with fewer
    heads) replaced by its kept part, so they compare with the graph after's outputs one to one."""
    restricted = list(expected)
    for i, state in resized.items():
        if not 0 <= i < len(expected):
            raise VerificationError(f"the pass declared output {i} resized; the graph returns {len(expected)}")
        try:
            restricted[i] = state.restrict(expected[i])
        except ValueError as exc:
            raise VerificationError(f"resized output {i}: {exc}") from None
    return restricted


def _check_count(expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> None:
    if len(expected) != len(actual):
        raise VerificationError(f"graph now returns {len(actual)} outputs, it returned {len(expected)}")
