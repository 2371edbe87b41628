"""The decode step compiled by inductor over per-layer cache inputs: the graph it compiles (structure, and the
graphs it refuses with why), what it computes against the op-by-op donated step (fp32 and bf16, int8 weights),
its in-place cache writes, and generate(compiled_decode=True) end to end."""

from __future__ import annotations

import pytest
import torch

import passforge
import passforge.runtime.compiled_decode
from passforge.ir.capture import capture
from passforge.ir.graph import count_calls, get_attr
from passforge.kernels.ops import int4pack_linear
from passforge.models import llama
from passforge.passes.base import Context
from passforge.passes.manager import PassManager
from passforge.runtime.compiled_decode import CompiledDecodeStep, per_layer_cache_graph
from passforge.runtime.executor import direct_cpu_calls
from passforge.runtime.inductor import int4_in_cpu_layout, scales_in_activation_dtype
from passforge.runtime.kv_cache import donate_kv_cache

aten = torch.ops.aten
W8 = "cleanup,quantize(scheme=w8),fold-quant,lower-quant"


def _decode_graph(spec: str) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...], int]:
    """The tiny preset's decode step after ``spec``, and a step's inputs after a 20-token prefill."""
    model = llama.build("tiny").eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    _, k_cache, v_cache = model.prefill(tokens)
    step = (tokens[:, -1:], torch.tensor([20]), k_cache, v_cache)
    graph = PassManager.parse(spec).run(capture(llama.DecodeStep(model), step), Context(example_inputs=step)).graph
    return graph, step, model.config.n_layers


def test_the_compiled_graph_takes_each_layers_cache_and_writes_it_in_place():
    graph, _, layers = _decode_graph("cleanup")
    donated, _ = donate_kv_cache(graph)
    per_layer, reason = per_layer_cache_graph(donated)
    assert reason is None
    names = [n.name for n in per_layer.graph.nodes if n.op == "placeholder"]
    assert len(names) == 2 + 2 * layers and names[2:4] == ["k_cache_0", "k_cache_1"]
    assert count_calls(per_layer, aten.select.int) == count_calls(donated, aten.select.int) - 2 * layers
    assert count_calls(per_layer, aten.index_copy_.default) == 2 * layers  # still in place, into the inputs
    output = next(n for n in per_layer.graph.nodes if n.op == "output")
    assert len(output.args[0]) == 1  # the logits; the caches are the caller's
    assert per_layer_cache_graph(graph)[1] == "the step returns no cache input (it is not a donated decode step)"


def test_a_cache_read_other_than_by_its_layers_is_refused():
    graph, _, _ = _decode_graph("cleanup")
    donated, _ = donate_kv_cache(graph)
    cache = next(n for n in donated.graph.nodes if n.op == "placeholder" and n.name == "k_cache")
    output = next(n for n in donated.graph.nodes if n.op == "output")
    with donated.graph.inserting_before(output):
        total = donated.graph.call_function(aten.sum.default, (cache,))
    output.args = ((*output.args[0], total),)
    donated.recompile()
    assert per_layer_cache_graph(donated) == (None, "cache input 'k_cache': read by something other than one "
                                                    "layer's slice")


@pytest.mark.parametrize(("dtype", "ulps", "int8_code"),
                         [(torch.float32, 0, "int8_t"), (torch.bfloat16, 4, "_weight_int8pack_mm")])
def test_compiled_step_matches_the_op_by_op_step(dtype, ulps, int8_code):
    """Eight steps from the same caches. fp32: within 1e-5 of the logits' scale (float reassociation in the
    fused kernels; measured 7e-7). bf16: inductor keeps fp32 between fused elementwise ops where the
    op-by-op graph rounds each to bf16 — within ``ulps`` bf16 units of the scale, compounding over the two
    layers and the steps (measured 1.9). fp32 also checks the decomposition of dequantize_per_channel without
    zero points (a layer the lowering kept), which inductor cannot lower itself. The caches are the caller's
    tensors, updated in place. And the weights stay int8 in what inductor builds: bf16 layers call
    ``_weight_int8pack_mm``; fp32 layers kept as dequantize + linear dequantize int8 in the generated C++ (an
    fp32 copy folded at compile time would read 4× the bytes every step and has no int8 in its code)."""
    from torch._inductor.utils import run_and_get_code

    cast = ",cast(dtype=bf16)" if dtype == torch.bfloat16 else ""
    graph, (token, _, k_cache, v_cache), _ = _decode_graph(f"cleanup{cast},quantize(scheme=w8),fold-quant,lower-quant")
    donated, _ = donate_kv_cache(graph)
    reference = direct_cpu_calls(donated)
    compiled, code = run_and_get_code(CompiledDecodeStep, donated)
    assert int8_code in "\n".join(code)
    cache_dtype = next(n for n in graph.graph.nodes if n.name == "k_cache").meta["val"].dtype  # what cast left
    k1, v1, k2, v2 = (c.to(cache_dtype).clone() for c in (k_cache, v_cache, k_cache, v_cache))
    with torch.inference_mode():
        for pos in range(20, 28):
            want, k1, v1 = reference(token, torch.tensor([pos]), k1, v1)
            got, k_out, v_out = compiled(token, torch.tensor([pos]), k2, v2)
            assert k_out is k2 and v_out is v2 and got.dtype == want.dtype
            for actual, expected in ((got, want), (k2, k1), (v2, v1)):
                scale = expected.abs().max().item()
                bound = 1e-5 * scale if dtype == torch.float32 else ulps * 2**-8 * scale
                torch.testing.assert_close(actual, expected, rtol=0, atol=bound)
            token = want[:, -1:].argmax(-1)
    assert not torch.equal(k2, k_cache.to(cache_dtype)) and not torch.equal(v2, v_cache.to(cache_dtype))  # written


def test_int8_scales_follow_the_activation_dtype_for_inductor():
    """inductor's ``_weight_int8pack_mm`` lowering takes the scales only as a stored tensor: each distinct
    fp32 scale read by bf16 activations gets one bf16 copy; the op casts them so anyway, so the step computes
    the same; fp32 graphs and the original graph are left alone."""
    graph, step, layers = _decode_graph("cleanup,cast(dtype=bf16),quantize(scheme=w8),fold-quant,lower-quant")
    linears = [n for n in graph.graph.nodes if n.target is torch.ops.passforge.int8_weight_linear.default]
    assert linears and all(get_attr(graph, n.args[2].target).dtype == torch.float32 for n in linears)
    moved = scales_in_activation_dtype(graph)
    moved_linears = [n for n in moved.graph.nodes if n.target is torch.ops.passforge.int8_weight_linear.default]
    assert all(get_attr(moved, n.args[2].target).dtype == torch.bfloat16 for n in moved_linears)
    assert len({n.args[2].target for n in moved_linears}) == len({n.args[2].target for n in linears}) == 7 * layers
    assert all(get_attr(graph, n.args[2].target).dtype == torch.float32 for n in linears)  # untouched
    assert scales_in_activation_dtype(moved) is moved
    torch.testing.assert_close(moved(*step), graph(*step), rtol=0, atol=0)
    fp32_graph, _, _ = _decode_graph(W8)
    assert scales_in_activation_dtype(fp32_graph) is fp32_graph


def test_int4_weights_go_to_inductor_in_this_cpus_layout():
    """Each CPU ``int4_weight_linear`` becomes the ``_weight_int4pack_mm_for_cpu`` call the op makes, on weights
    repacked once: bit-identical outputs, no custom op left, the original graph untouched, a second call a
    no-op; and inductor's build calls the kernel from its generated code."""
    from torch._inductor.utils import run_and_get_code

    spec = "cleanup,cast(dtype=bf16),quantize(scheme=w4,group_size=32),fold-quant,lower-quant(guard=false)"
    graph, step, layers = _decode_graph(spec)
    int4 = torch.ops.passforge.int4_weight_linear.default
    assert count_calls(graph, int4) == 7 * layers  # q, k, v, o, gate, up, down; lm_head stays float
    lowered = int4_in_cpu_layout(graph)
    assert count_calls(lowered, int4) == 0 and count_calls(graph, int4) == 7 * layers
    assert count_calls(lowered, int4pack_linear) == 7 * layers
    assert int4_in_cpu_layout(lowered) is lowered
    with torch.inference_mode():
        torch.testing.assert_close(lowered(*step), graph(*step), rtol=0, atol=0)
        _, code = run_and_get_code(CompiledDecodeStep, donate_kv_cache(graph)[0])
    assert "_weight_int4pack_mm_for_cpu" in "\n".join(code) and "int4_weight_linear" not in "\n".join(code)


def test_generate_with_the_compiled_step_gives_the_same_tokens(small_llama, tokens):
    opt = passforge.optimize(small_llama, (tokens,), pipeline=W8, profile=False)
    prompt = tokens[:, :5]
    want, _ = opt.generate(prompt, 12)
    got, stats = opt.generate(prompt, 12, compiled_decode=True)
    assert torch.equal(got, want) and stats.new_tokens == 12
    assert isinstance(opt._compiled_generator.decode.gm, CompiledDecodeStep)


def test_a_step_inductor_fails_on_runs_as_is_with_a_warning(small_llama, tokens, monkeypatch):
    def fail(gm):
        raise RuntimeError("no C++ compiler\nmore detail")

    monkeypatch.setattr(passforge.api, "CompiledDecodeStep", fail)
    opt = passforge.optimize(small_llama, (tokens,), pipeline="cleanup", profile=False)
    with pytest.warns(UserWarning, match="uncompiled: inductor could not compile it: RuntimeError: no C.. compiler$"):
        got, _ = opt.generate(tokens[:, :5], 6, compiled_decode=True)
    assert torch.equal(got, opt.generate(tokens[:, :5], 6)[0])


def test_a_step_that_cannot_be_compiled_runs_as_is_with_a_warning(small_llama, tokens, monkeypatch):
    monkeypatch.setattr(passforge.runtime.compiled_decode, "per_layer_cache_graph", lambda gm: (None, "a reason"))
    opt = passforge.optimize(small_llama, (tokens,), pipeline="cleanup", profile=False)
    with pytest.warns(UserWarning, match="running the decode step uncompiled: a reason"):
        got, _ = opt.generate(tokens[:, :5], 6, compiled_decode=True)
    assert torch.equal(got, opt.generate(tokens[:, :5], 6)[0])
