"""fuse-linears: q/k/v and gate/up become one linear each; exact; negatives; composes with quantization."""

from __future__ import annotations

import torch

import passforge.kernels.ops  # noqa: F401 - registers the ops counted below
from passforge.ir.capture import capture
from passforge.ir.graph import count_calls
from passforge.ir.serialize import load_graph, save_graph
from passforge.passes.base import Context
from passforge.passes.hooks import VerifyHook
from passforge.passes.manager import PassManager
from tests.conftest import SMALL, TiedEmbeddingHead

aten = torch.ops.aten
LAYERS = SMALL.n_layers


def _run(gm, spec, inputs):
    return PassManager.parse(spec, hooks=[VerifyHook()]).run(gm, Context(example_inputs=inputs))


def test_qkv_and_gate_up_fuse_exactly(small_llama, llama_graph, tokens, tmp_path):
    """Verified against the graph before it (fp32 reassociation, 1e-4); 7 linears per block become 4
    (qkv, o, gate_up, down) and the fused weight is the parts stacked."""
    result = _run(llama_graph, "fuse-linears", (tokens,))
    gm = result.graph
    assert result.records[0].stats == {"fused": 5 * LAYERS}
    assert count_calls(gm, aten.linear.default) == 4 * LAYERS + 1
    assert count_calls(gm, aten.slice.Tensor) - count_calls(llama_graph, aten.slice.Tensor) == 5 * LAYERS
    qkv = gm.get_parameter("layers.0.attention.fused_q_proj_k_proj_v_proj.weight")
    attention = small_llama.layers[0].attention
    parts = [attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]
    assert torch.equal(qkv, torch.cat(parts))
    assert not any(name.endswith("q_proj.weight") for name, _ in gm.named_parameters())  # the parts left
    torch.testing.assert_close(gm(tokens), small_llama(tokens), rtol=1e-4, atol=1e-4)
    assert _run(gm, "fuse-linears", (tokens,)).records[0].modified is False
    save_graph(gm, tmp_path / "fused.pt2", (tokens,))
    torch.testing.assert_close(load_graph(tmp_path / "fused.pt2")(tokens), gm(tokens), rtol=0, atol=0)


def test_fused_graph_quantizes_and_lowers_like_the_parts(small_llama, llama_graph, tokens):
    """Per-channel scales are per row, so quantizing the fused weight is quantizing each part: the w8a8
    logits of the fused and unfused graphs agree to float reassociation (1e-4 of their scale, plus a rare
    activation rounding flip: 1%)."""
    spec = "quantize(scheme=w8a8),fold-quant,lower-quant(guard=false)"
    fused = _run(llama_graph, f"fuse-linears,{spec}", (tokens,))
    plain = _run(llama_graph, spec, (tokens,))
    assert fused.records[1].stats["quantized"] == 4 * LAYERS
    assert count_calls(fused.graph, torch.ops.passforge.int8_dynamic_linear.default) == 4 * LAYERS
    ref = plain.graph(tokens)
    torch.testing.assert_close(fused.graph(tokens), ref, rtol=0, atol=0.01 * ref.abs().max().item())


def test_bf16_graphs_fuse_within_bf16_rounding(small_llama, llama_graph, tokens):
    result = _run(llama_graph, "cast(dtype=bf16),fuse-linears", (tokens,))  # verified: 2 bf16 ulp of scale
    assert result.records[1].stats == {"fused": 5 * LAYERS}
    assert result.graph.get_parameter("layers.1.feed_forward.fused_gate_proj_up_proj.weight").dtype == torch.bfloat16


class MixedLinears(torch.nn.Module):
    """Three linears on one input: two with a bias, one without; and a tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.c = torch.nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + self.c(x)


def test_mixed_biases_and_tied_weights_are_left_alone():
    x = torch.randn(2, 8)
    result = _run(capture(MixedLinears().eval(), (x,)), "fuse-linears", (x,))
    assert result.records[0].modified is False  # bias on a and b, none on c: not all alike
    ids = torch.randint(0, 32, (1, 4))
    tied = TiedEmbeddingHead()
    assert _run(capture(tied, (ids,)), "fuse-linears", (ids,)).records[0].modified is False  # one linear
