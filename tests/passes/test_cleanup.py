from __future__ import annotations

import torch

from passforge.ir.capture import capture
from passforge.ir.graph import count_calls, op_counts
from passforge.models import nanogpt
from passforge.passes.base import Context
from passforge.passes.cleanup import Cleanup
from passforge.passes.hooks import VerifyHook
from passforge.passes.manager import PassManager

aten = torch.ops.aten


def _cleanup(module: torch.nn.Module, *inputs: torch.Tensor, **options: bool):
    gm = capture(module, inputs)
    expected = gm(*inputs)
    result = PassManager([Cleanup(**options)], hooks=[VerifyHook()]).run(gm, Context(example_inputs=inputs))
    out = result.graph
    torch.testing.assert_close(out(*inputs), expected, rtol=0, atol=0)  # lossless: bit-identical here
    return out, result.records[0].stats


def test_nanogpt_mask_and_positions_fold_into_buffers():
    model = nanogpt.build("tiny").eval()
    tokens = torch.randint(0, 256, (1, 16))
    gm, stats = _cleanup(model, tokens)
    counts = op_counts(gm)
    assert stats["folded"] == 3  # position embedding + one causal mask per layer
    for op in ("aten.slice.Tensor", "aten.eq.Scalar", "aten.arange.default"):
        assert counts[op] == 0, op
    assert counts["aten.embedding.default"] == 1  # token embedding reads the input: not foldable
    assert count_calls(gm, aten.clone.default) == 2  # .contiguous() after transpose: needed, kept
    folded = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_folded")]
    assert {tuple(n.meta["val"].shape) for n in folded} == {(16, 128), (1, 1, 16, 16)}
    assert not [name for name, _ in gm.named_buffers() if name.endswith("attn.bias")]  # 128x128 masks are gone


def test_second_run_changes_nothing(llama_graph, tokens):
    once = PassManager([Cleanup()]).run(llama_graph, Context(example_inputs=(tokens,))).graph
    code = once.code
    again = PassManager([Cleanup()]).run(once, Context(example_inputs=(tokens,)))
    assert again.records[0].modified is False
    assert again.graph.code == code


class _Redundant(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3))
        self.unused = torch.nn.Parameter(torch.randn(1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _ = self.unused * 2  # dead
        a = x.exp() + x.exp()  # common subexpression
        b = a.clone(memory_format=torch.contiguous_format)  # a copy of a contiguous tensor
        c = b.view(2, 3) * self.w.expand(2, 3)  # a view to the same shape; expand of a parameter
        return c


def test_identities_cse_and_dead_code():
    gm, stats = _cleanup(_Redundant(), torch.randn(2, 3))
    assert stats["contiguous-of-contiguous"] == 1
    assert stats["view-to-same-shape"] == 1
    assert stats["cse"] == 1
    counts = op_counts(gm)
    assert counts["aten.exp.default"] == 1
    assert counts["aten.clone.default"] == 0 and counts["aten.view.default"] == 0
    assert counts["aten.expand.default"] == 1  # folding would store a larger tensor than it reads: kept
    assert not any("unused" in name for name, _ in gm.named_parameters())


class _Random(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rand_like(x) + torch.rand_like(x)


def test_random_ops_are_never_merged():
    x = torch.randn(4)
    gm = capture(_Random(), (x,))
    Cleanup().run(gm, Context())
    assert count_calls(gm, aten.rand_like.default) == 2


def test_options_switch_parts_off(llama_graph):
    slices = count_calls(llama_graph, aten.slice.Tensor)
    folded = PassManager([Cleanup()]).run(llama_graph).graph
    assert count_calls(folded, aten.slice.Tensor) == slices - 2  # RoPE cos/sin tables cut to T once, offline
    kept = PassManager([Cleanup(fold=False)]).run(llama_graph).graph
    assert count_calls(kept, aten.slice.Tensor) == slices


class _UnusedBuffer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _ = self.table * 2  # dead, and the only reader of the buffer
        return x + torch.ones(3) + torch.ones(3)  # two equal constant subgraphs


def test_dead_buffers_are_counted_and_equal_constants_fold_once():
    gm, stats = _cleanup(_UnusedBuffer(), torch.randn(3))
    assert stats["dead"] >= 2 and stats["cse"] == 1 and stats["folded"] == 1
    assert [name for name, _ in gm.named_buffers()] == ["_folded"]
