from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import fx

from passforge.ir.graph import PASS_META, count_calls, get_attr, set_tensor_attr
from passforge.passes.base import Context, InterfaceChange, Pass, PassResult, ResizedState
from passforge.passes.cleanup import Cleanup
from passforge.passes.hooks import DumpHook, VerifyHook
from passforge.passes.manager import Hook, PassFailure, PassManager, PipelineInterrupted
from passforge.passes.registry import register
from passforge.passes.repro import replay

aten = torch.ops.aten


@register
@dataclass(frozen=True)
class SwapAddForSub(Pass):
    """Test pass that silently corrupts the graph: every add becomes a sub, claiming to be lossless."""

    name: ClassVar[str] = "test-corrupt"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        for node in gm.graph.nodes:
            if node.target is aten.add.Tensor:
                node.target = aten.sub.Tensor
        gm.recompile()
        return PassResult(gm, modified=True)


@register
@dataclass(frozen=True)
class LieAboutShapes(Pass):
    """Test pass that leaves a wrong meta["val"] behind."""

    name: ClassVar[str] = "test-bad-meta"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        node = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
        node.meta["val"] = node.meta["val"].to(torch.float16)
        return PassResult(gm, modified=True)


@register
@dataclass(frozen=True)
class Explode(Pass):
    name: ClassVar[str] = "test-raise"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        raise ValueError("boom")


@register
@dataclass(frozen=True)
class RememberThenExplode(Pass):
    """Test pass that leaves something in ctx.memo for the model's other graphs, then fails."""

    name: ClassVar[str] = "test-memo-raise"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        ctx.memo["test:factors"] = 42
        raise ValueError("boom")


@register
@dataclass(frozen=True)
class CtrlC(Pass):
    """Test pass: the user presses Ctrl-C while it runs (after it started changing the graph and the memo)."""

    name: ClassVar[str] = "test-ctrl-c"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        ctx.memo["test:half-done"] = 1
        next(n for n in gm.graph.nodes if n.target is aten.add.Tensor).target = aten.sub.Tensor
        raise KeyboardInterrupt


@register
@dataclass(frozen=True)
class StopsItselfOnCtrlC(Pass):
    """Test pass with its own loop that, on Ctrl-C, stops early keeping its best result (as distill does)."""

    name: ClassVar[str] = "test-stops-on-ctrl-c"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        ctx.interrupted = True
        return PassResult(gm, modified=False, notes=["interrupted: kept the best so far"])


@register
@dataclass(frozen=True)
class BlowUpOneLayer(Pass):
    """Test lossy pass that breaks one layer (its down projection scaled 1000x), past its collapse guard."""

    name: ClassVar[str] = "test-lossy-blow-up"
    lossy: ClassVar[bool] = True
    max_rel_err: ClassVar[float | None] = 0.5

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        weight = "layers.1.feed_forward.down_proj.weight"
        set_tensor_attr(gm, weight, get_attr(gm, weight) * 1000)
        return PassResult(gm, modified=True)


@register
@dataclass(frozen=True)
class StopsThenFails(Pass):
    """Test pass that stops early on Ctrl-C and then fails: it is rolled back like any failing pass."""

    name: ClassVar[str] = "test-stops-then-fails"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        ctx.interrupted = True
        raise ValueError("boom")


@register
@dataclass(frozen=True)
class HalveState(Pass):
    """Test pass that resizes the graph's state the way pruning a KV cache does: each of the state's two slots
    (input 1, and output 1, its update) keeps its first half. ``poison`` also makes the update divide by zero."""

    name: ClassVar[str] = "test-halve-state"
    lossy: ClassVar[bool] = True
    poison: bool = False

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        state = [n for n in gm.graph.nodes if n.op == "placeholder"][1]
        slots, width = state.meta["val"].shape
        state.meta["val"] = state.meta["val"][:, :width // 2].clone()
        for node in gm.graph.nodes:
            if node.op == "call_function":
                node.meta.pop("val", None)  # the manager fills the shapes in again
                if self.poison and node.target is aten.add.Tensor and node.args[0] is state:
                    node.target, node.args = aten.div.Tensor, (state, 0.0)
        gm.recompile()
        kept = ResizedState(dim=1, kept=(torch.arange(width // 2),) * slots)
        return PassResult(gm, modified=True, interface=InterfaceChange(inputs={1: kept}, outputs={1: kept}))


class StateStep(torch.nn.Module):
    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + state.mean(), state + 1


class CtrlCAfterThePass(Hook):
    def after_pass(self, pass_, before, after, ctx, record) -> None:
        raise KeyboardInterrupt


def test_a_step_graph_may_resize_its_state_when_the_pass_says_so():
    """The interface exception (INVARIANTS rule 9): the manager derives the new example state (each slot's kept
    part), the verifier runs the graph before on the old inputs and the graph after on the new ones and
    compares every output, the resized one by its kept part; later passes get the new inputs. Refused: NaN/Inf
    in the resized output, and any resizing of a forward graph; a rollback (failure or Ctrl-C) restores the
    context's inputs."""
    from passforge.ir.capture import capture

    inputs = (torch.randn(3), torch.ones(2, 8))
    gm = capture(StateStep(), inputs)
    ctx = Context(example_inputs=inputs, role="decode")
    result = PassManager.parse("test-halve-state,cleanup", hooks=[VerifyHook()]).run(gm, ctx)
    assert [r.status for r in result.records] == ["ok", "ok"]
    assert ctx.example_inputs[1].shape == (2, 4) and ctx.interface_change is None
    out, state = result.graph(*ctx.example_inputs)
    torch.testing.assert_close(out, gm(*inputs)[0])
    torch.testing.assert_close(state, torch.full((2, 4), 2.0))

    for spec, hooks, error, match in (
        ("test-halve-state(poison=true)", [VerifyHook()], PassFailure, "output 1 has 8 new NaN/Inf"),
        ("test-halve-state", [VerifyHook(), CtrlCAfterThePass()], PipelineInterrupted, "rolled back"),
    ):
        ctx = Context(example_inputs=inputs, role="decode")
        with pytest.raises(error, match=match):
            PassManager.parse(spec, hooks=hooks).run(gm, ctx)
        assert ctx.example_inputs is inputs and ctx.interface_change is None
    forward = Context(example_inputs=inputs)
    with pytest.raises(PassFailure, match="only a generation step graph"):
        PassManager.parse("test-halve-state", hooks=[VerifyHook()]).run(gm, forward)
    assert forward.example_inputs is inputs


def _ctx(tokens: torch.Tensor, **kw: object) -> Context:
    return Context(example_inputs=(tokens,), **kw)


def test_corrupting_pass_is_rolled_back_with_a_reproducer(llama_graph, tokens, tmp_path):
    adds = count_calls(llama_graph, aten.add.Tensor)
    expected = llama_graph(tokens)
    pm = PassManager.parse("cleanup,test-corrupt,cleanup", hooks=[VerifyHook()])
    with pytest.raises(PassFailure) as info:
        pm.run(llama_graph, _ctx(tokens, repro_dir=tmp_path))
    failure = info.value
    assert failure.pass_spec == "test-corrupt" and failure.before == ("cleanup",)
    message = str(failure)
    assert "pass 'test-corrupt' failed and was rolled back" in message
    assert "passes before it: cleanup" in message and "output 0 changed" in message
    assert "first moved: node 'add" in message  # where: the first add the pass turned into a sub
    partial = failure.partial
    assert [r.status for r in partial.records] == ["ok", "rolled_back"]
    assert count_calls(partial.graph, aten.add.Tensor) == adds  # the graph before the pass is kept
    torch.testing.assert_close(partial.graph(tokens), expected)
    repro = tmp_path / "test-corrupt-0"
    assert partial.records[1].reproducer == str(repro)
    assert {"graph.pt2", "inputs.safetensors", "spec.txt", "error.txt"} <= {p.name for p in repro.iterdir()}
    assert (repro / "spec.txt").read_text().strip() == "test-corrupt"
    with pytest.raises(PassFailure, match="output 0 changed"):  # the failure replays in one call
        replay(repro)


def test_a_rolled_back_pass_leaves_nothing_in_the_memo(llama_graph, tokens):
    """What a pass remembers for the prefill/decode graphs goes with its rollback: otherwise those graphs
    would apply a transformation the forward graph no longer has."""
    ctx = _ctx(tokens, memo={"kept": 1})
    result = PassManager.parse("test-memo-raise,cleanup", on_error="skip").run(llama_graph, ctx)
    assert [r.status for r in result.records] == ["skipped", "ok"]
    assert ctx.memo == {"kept": 1}


def test_skip_policy_carries_on_without_the_failing_pass(llama_graph, tokens):
    pm = PassManager.parse("test-raise,cleanup", hooks=[VerifyHook()], on_error="skip")
    result = pm.run(llama_graph, _ctx(tokens))
    assert [r.status for r in result.records] == ["skipped", "ok"]
    assert result.records[0].error == "ValueError: boom"
    torch.testing.assert_close(result.graph(tokens), llama_graph(tokens))


def test_wrong_meta_val_from_a_pass_is_caught_and_rolled_back(llama_graph, tokens):
    pm = PassManager.parse("test-bad-meta", hooks=[VerifyHook()], on_error="skip")
    result = pm.run(llama_graph, _ctx(tokens))
    assert result.records[0].status == "skipped"
    assert "claims meta['val']" in result.records[0].error
    first_linear = next(n for n in result.graph.graph.nodes if n.target is aten.linear.default)
    assert first_linear.meta["val"].dtype == torch.float32


def test_the_callers_graph_is_not_changed(llama_graph, tokens):
    before = llama_graph.code
    PassManager.parse("cleanup,cast", hooks=[VerifyHook()]).run(llama_graph, _ctx(tokens))
    assert llama_graph.code == before
    assert all(n.meta.get("val").dtype == torch.float32 for n in llama_graph.graph.nodes if n.op == "get_attr")


def test_hooks_see_every_pass_in_order_and_new_nodes_are_stamped(llama_graph, tokens, tmp_path):
    calls: list[str] = []

    class Recorder(Hook):
        def start(self, gm, ctx, baseline):
            calls.append("start")

        def before_pass(self, pass_, gm, ctx):
            calls.append(f"before {pass_.spec}")

        def after_pass(self, pass_, before, after, ctx, record):
            calls.append(f"after {pass_.spec} {record.status}")

    result = PassManager([Cleanup(), Cleanup(fold=False)], hooks=[Recorder(), DumpHook(tmp_path)]).run(
        llama_graph, _ctx(tokens)
    )
    assert calls == ["start", "before cleanup", "after cleanup ok", "before cleanup(fold=false)",
                     "after cleanup(fold=false) ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_capture.txt", "01_cleanup.txt", "02_cleanup.txt"]
    assert {n.meta[PASS_META] for n in result.graph.graph.nodes} <= {"capture", "cleanup"}
    assert any(n.meta[PASS_META] == "cleanup" for n in result.graph.graph.nodes)  # the folded RoPE tables


def test_on_error_must_be_known():
    with pytest.raises(ValueError, match="on_error"):
        PassManager([], on_error="retry")  # type: ignore[arg-type]


def test_ctrl_c_rolls_the_running_pass_back_and_hands_over_what_completed(llama_graph, tokens):
    ctx = _ctx(tokens, memo={"kept": 1})
    with pytest.raises(PipelineInterrupted) as info:
        PassManager.parse("cleanup,test-ctrl-c,cast", hooks=[VerifyHook()]).run(llama_graph, ctx)
    partial = info.value.partial
    assert [r.status for r in partial.records] == ["ok", "interrupted"]  # cast never ran
    assert "after 1 of the pipeline's passes (cleanup); 'test-ctrl-c' was rolled back" in str(info.value)
    assert ctx.memo == {"kept": 1}
    torch.testing.assert_close(partial.graph(tokens), llama_graph(tokens))  # the half-done rewrite is gone


def test_a_pass_that_stops_itself_on_ctrl_c_is_kept_and_ends_the_pipeline(llama_graph, tokens):
    ctx = _ctx(tokens)
    with pytest.raises(PipelineInterrupted, match="'test-stops-on-ctrl-c' stopped early and kept its best") as info:
        PassManager.parse("test-stops-on-ctrl-c,cast", hooks=[VerifyHook()]).run(llama_graph, ctx)
    assert [r.status for r in info.value.partial.records] == ["ok"]
    assert not ctx.interrupted  # consumed: the model's next graph runs its pipeline normally


def test_a_lossy_collapse_is_rolled_back_naming_the_layer(llama_graph, tokens):
    pm = PassManager.parse("test-lossy-blow-up,cleanup", hooks=[VerifyHook()], on_error="skip")
    result = pm.run(llama_graph, _ctx(tokens))
    assert [r.status for r in result.records] == ["skipped", "ok"]
    error = result.records[0].error
    assert "the pass allows at most 50%" in error and "layer 'layers.1.feed_forward.down_proj'" in error, error
    assert not result.records[0].modified  # what the pass reported went with it


def test_a_pass_that_stops_then_fails_is_rolled_back_not_kept(llama_graph, tokens):
    ctx = _ctx(tokens)
    result = PassManager.parse("test-stops-then-fails,cleanup", on_error="skip").run(llama_graph, ctx)
    assert [r.status for r in result.records] == ["skipped", "ok"]  # no PipelineInterrupted claiming it was kept
    assert not ctx.interrupted


def test_ctrl_c_in_the_closing_measurements_keeps_every_pass(llama_graph, tokens):
    class SlowFinish(Hook):
        def finish(self, result, ctx):
            raise KeyboardInterrupt

    with pytest.raises(PipelineInterrupted, match="every pass completed, the closing measurements") as info:
        PassManager.parse("cleanup,cast", hooks=[SlowFinish()]).run(llama_graph, _ctx(tokens))
    assert [r.status for r in info.value.partial.records] == ["ok", "ok"]


def test_output_scale_reads_float8_outputs():
    """Tolerances are fractions of the largest output magnitude; a float8 output (an fp8 Q/DQ graph's
    quantized activations) has no abs / max in torch, so it is read in fp32 — the largest magnitude over all
    floating outputs, integers ignored."""
    from passforge.passes.base import output_scale

    fp8 = torch.tensor([0.5, -3.0, 2.0]).to(torch.float8_e4m3fn)
    assert output_scale([fp8, torch.tensor([1.0, -2.5]), torch.tensor([100])]) == 3.0
    assert output_scale([torch.tensor([7])]) == 1.0
