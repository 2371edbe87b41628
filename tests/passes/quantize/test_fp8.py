"""``quantize(scheme=fp8)``: e4m3 fake-quant of weights (per channel) and activations (per token), folded to
one byte per weight, saved and loaded."""

from __future__ import annotations

import torch

from passforge.ir.graph import count_calls, param_stats
from passforge.ir.serialize import load_graph, save_graph
from passforge.kernels.fp8 import FP8, FP8_MAX, dequantize_fp8, fp8_scale, quantize_fp8
from passforge.passes.base import Context
from passforge.passes.hooks import VerifyHook
from passforge.passes.manager import PassManager

LINEARS = 2 * 7 + 1


def _run(gm, spec, tokens):
    return PassManager.parse(spec, hooks=[VerifyHook()]).run(gm, Context(example_inputs=(tokens,)))


def test_fp8_round_trip_error_is_e4m3s_half_step():
    """e4m3 has 3 mantissa bits: a normal value rounds by at most 2^-4 of its magnitude; the scale puts each
    row's maximum at 448, so values within 2^9 of the max stay normal (bound: 2^-4 relative + a tiny
    absolute floor for the subnormal tail)."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    w[3] = 0  # an all-zero row stays exactly zero
    scale = fp8_scale(w)
    q = quantize_fp8(w, scale)
    assert q.dtype == FP8 and float(q.float().abs().max()) == FP8_MAX
    back = dequantize_fp8(q, scale, torch.float32)
    torch.testing.assert_close(back, w, rtol=2**-4, atol=float(scale.max()) * 2**-6)
    assert not back[3].any()
    assert not torch.equal(back, w)


def test_fp8_scheme_structure_numerics_fold_and_save(small_llama, llama_graph, tokens, tmp_path):
    """Bound: 2^-4 relative error per weight and per activation; through two random blocks the logits move
    by a few % of their scale (measured ~2%): allow 10%."""
    result = _run(llama_graph, "quantize(scheme=fp8)", tokens)
    gm = result.graph
    quantize = torch.ops.passforge.quantize_fp8.default
    assert count_calls(gm, quantize) == 2 * (LINEARS - 1)  # weight and activation of each linear
    ref = small_llama(tokens)
    torch.testing.assert_close(gm(tokens), ref, rtol=0, atol=0.10 * ref.abs().max().item())
    assert _run(gm, "quantize(scheme=fp8)", tokens).records[0].modified is False

    folded = _run(gm, "fold-quant", tokens)  # verified bit-exact against gm
    assert folded.records[0].stats == {"folded": LINEARS - 1}
    assert count_calls(folded.graph, quantize) == LINEARS - 1  # the activations' stay: computed at run time
    stored = [t for name, t in folded.graph.named_buffers() if name.endswith("_fp8")]
    assert len(stored) == LINEARS - 1 and {t.dtype for t in stored} == {FP8}
    proj_bytes = sum(t.numel() * 4 for name, t in llama_graph.named_parameters() if name.endswith("proj.weight"))
    saved = param_stats(llama_graph)[1] - param_stats(folded.graph)[1]
    assert saved > 0.70 * proj_bytes  # 3 of every 4 bytes, less one fp32 scale per row
    save_graph(folded.graph, tmp_path / "fp8.pt2", (tokens,))
    torch.testing.assert_close(load_graph(tmp_path / "fp8.pt2")(tokens), folded.graph(tokens), rtol=0, atol=0)
