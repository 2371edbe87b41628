from __future__ import annotations

import pytest
import torch

from passforge.eval.compare import logits_kl
from passforge.ir.capture import capture
from passforge.models.llama import DecodeStep, example_decode_inputs
from passforge.passes.base import Context
from passforge.passes.hooks import VerifyHook
from passforge.passes.manager import PassManager
from passforge.passes.precision import Cast
from tests.conftest import TiedEmbeddingHead

aten = torch.ops.aten


def _cast(gm, inputs, dtype="bf16"):
    return PassManager([Cast(dtype=dtype)], hooks=[VerifyHook()]).run(gm, Context(example_inputs=inputs))


def _input_dtypes(gm, packet):
    return {
        arg.meta["val"].dtype
        for node in gm.graph.nodes
        if getattr(node.target, "overloadpacket", None) is packet
        for arg in node.all_input_nodes
    }


@pytest.mark.parametrize(("name", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_structure_weights_low_reductions_fp32(llama_graph, tokens, name, dtype):
    result = _cast(llama_graph, (tokens,), name)
    gm = result.graph
    float_params = [t for _, t in gm.named_parameters() if t.is_floating_point()]
    assert float_params and all(t.dtype == dtype for t in float_params)
    assert _input_dtypes(gm, aten.linear) == {dtype}
    assert _input_dtypes(gm, aten.mean) == {torch.float32}  # RMSNorm statistics
    assert _input_dtypes(gm, aten.rsqrt) == {torch.float32}
    assert gm(tokens).dtype == torch.float32  # callers see the captured output dtype
    float_buffers = [t for _, t in gm.named_buffers() if t.is_floating_point()]  # RoPE tables
    assert float_buffers and all(t.dtype == torch.float32 for t in float_buffers)
    assert result.records[0].stats["params"] == len(float_params)


def test_numerics_within_bf16_bound(small_llama, llama_graph, tokens):
    """bf16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 0.2%); through two blocks the logits of this
    random model (|logit| ≲ 1.5) may move by a few roundoffs of their scale. Bound: 2% of the largest logit,
    and the next-token distributions nearly identical (KL < 1e-4 nats)."""
    reference = small_llama(tokens)
    out = _cast(llama_graph, (tokens,)).graph(tokens)
    scale = reference.abs().max().item()
    torch.testing.assert_close(out, reference, rtol=0, atol=0.02 * scale)
    assert logits_kl(reference, out) < 1e-4
    assert not torch.equal(out, reference)  # it is a lossy pass: something did change


def test_second_run_changes_nothing(llama_graph, tokens):
    once = _cast(llama_graph, (tokens,)).graph
    code = once.code
    again = _cast(once, (tokens,))
    assert again.records[0].modified is False
    assert again.graph.code == code


def test_decode_graph_keeps_cache_dtype(small_llama):
    inputs = example_decode_inputs(small_llama)
    gm = capture(DecodeStep(small_llama), inputs)
    out = _cast(gm, inputs).graph
    logits, k_cache, v_cache = out(*inputs)
    assert k_cache.dtype == v_cache.dtype == torch.float32  # index_copy into the fp32 cache input
    ref_logits, _, _ = small_llama.decode(*inputs)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0.02 * ref_logits.abs().max().item())


def test_integer_only_graph_is_left_alone():
    class Count(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * 3).sum(-1)

    x = torch.arange(6).view(2, 3)
    result = _cast(capture(Count(), (x,)), (x,))
    assert result.records[0].modified is False
    torch.testing.assert_close(result.graph(x), Count()(x))


class _HFRope(torch.nn.Module):
    """Hugging Face computes RoPE angles at run time: inv_freq (a buffer) @ positions.float()."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16), persistent=False)
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = self.inv_freq[:, None].float() @ positions[None, :].float()  # (8, T)
        return self.proj(x) * angles.cos().T.repeat(1, 2)


def test_position_arithmetic_stays_fp32():
    x, positions = torch.randn(2048, 16), torch.arange(2048)
    model = _HFRope()
    gm = _cast(capture(model, (x, positions)), (x, positions)).graph
    out, ref = gm(x, positions), model(x, positions)
    assert _input_dtypes(gm, aten.matmul) == {torch.float32}  # no bf16 operand: nothing to gain, much to lose
    torch.testing.assert_close(out, ref, rtol=0, atol=0.02 * ref.abs().max().item())


def test_tied_weights_stay_tied_and_outputs_keep_their_dtype():
    ids = torch.randint(0, 32, (1, 4))
    result = _cast(capture(TiedEmbeddingHead(), (ids,)), (ids,))
    gm = result.graph
    assert result.records[0].status == "ok" and result.records[0].stats["params"] == 1
    logits, weight = gm(ids)
    assert logits.dtype == weight.dtype == torch.float32
    from passforge.ir.graph import param_stats

    assert param_stats(gm)[1] == 32 * 8 * 2  # one bf16 copy shared by both names


class _MoEScatter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expert = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x).index_add(0, index, self.expert(x))  # fp32 buffer += bf16 expert output


def test_ops_that_need_one_dtype_get_fp32():
    x, index = torch.randn(4, 8), torch.tensor([3, 2, 1, 0])
    model = _MoEScatter()
    result = _cast(capture(model, (x, index)), (x, index))
    assert result.records[0].status == "ok"
    torch.testing.assert_close(result.graph(x, index), model(x, index), rtol=0.02, atol=0.02)


def test_cast_of_a_bf16_model_keeps_its_bf16_outputs():
    """Found by the fuzzer (passforge.tools.fuzz): in a model already in bf16, a LayerNorm output now computed
    in fp32 left the graph as fp32 — the interface changed and the verifier rolled cast back. Outputs keep the
    dtype they had, whichever it was."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)).to(torch.bfloat16).eval()
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ctx = Context(example_inputs=(x,))
    result = PassManager.parse("cast", hooks=[VerifyHook()]).run(capture(model, (x,)), ctx)
    assert result.records[0].status == "ok" and result.records[0].modified
    assert result.graph(x).dtype == torch.bfloat16
    again = PassManager.parse("cast", hooks=[VerifyHook()]).run(result.graph, Context(example_inputs=(x,)))
    assert again.records[0].modified is False
