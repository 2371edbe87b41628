"""Weight quantization on the bundled trained LM: held-out perplexity against fp32."""

from __future__ import annotations

import pytest
import torch

from passforge.ir.capture import capture
from passforge.models.bundled import calib_text
from passforge.models.tokenizer import encode
from passforge.passes.base import Context
from passforge.passes.hooks import VerifyHook
from passforge.passes.manager import PassManager
from tests.conftest import held_out_ppl

RTN_W4 = "cleanup,quantize(scheme=w4,group_size=128),fold-quant"


def _ppl_after(model, ids, spec: str) -> float:
    example = (ids[:128][None],)
    gm = capture(model, example)
    calib = torch.tensor(encode(calib_text()))  # training text: never the held-out text measured below
    ctx = Context(example_inputs=example, calib_tokens=calib)
    out = PassManager.parse(spec, hooks=[VerifyHook()]).run(gm, ctx).graph
    return held_out_ppl(out, ids)


@pytest.fixture(scope="module")
def ppl_of(bundled_lm_and_text):
    """Held-out perplexity after a pipeline ("": the fp32 model), each computed once for both tests."""
    model, ids = bundled_lm_and_text
    cache: dict[str, float] = {}

    def ppl(spec: str) -> float:
        if spec not in cache:
            cache[spec] = _ppl_after(model, ids, spec) if spec else held_out_ppl(model, ids)
        return cache[spec]

    return ppl


def test_weight_only_quantization_bounds(ppl_of):
    """Bounds (held-out perplexity vs fp32, lm_head kept in float): w8 ≤ +0.5% — the project's target;
    measured +0.01%. w8a8 (dynamic per-token int8 activations) ≤ +1.5% — the project's target; measured
    +0.04%. w4 round-to-nearest, group 128 ≤ +2% — uint4 has 16 levels per group, a step of ~7% of the group's
    range; measured +0.51% on this small, easily-quantized model. Smaller groups must help."""
    fp32 = ppl_of("")
    # the fake-quant graphs: lower-quant is verified against them (tests/passes/quantize/test_lower*.py), and
    # fp32 activations through the CPU int8 kernels would make this test minutes long for nothing
    w8 = ppl_of("cleanup,quantize(scheme=w8),fold-quant")
    w8a8 = ppl_of("cleanup,quantize(scheme=w8a8),fold-quant")
    w4_g128 = ppl_of(RTN_W4)
    w4_g32 = ppl_of("cleanup,quantize(scheme=w4,group_size=32),fold-quant")
    assert w8 / fp32 - 1 < 0.005, (fp32, w8)
    assert w8a8 / fp32 - 1 < 0.015, (fp32, w8a8)
    assert w4_g128 / fp32 - 1 < 0.02, (fp32, w4_g128)
    assert fp32 < w4_g32 < w4_g128, (fp32, w4_g32, w4_g128)


def test_calibrated_quantization_bounds(ppl_of):
    """The project's targets, on 32 windows of the bundled calibration text: w8a8-static (per-tensor int8
    activations, min/max) after smooth-quant ≤ +2% — measured +0.17% (+0.54% without smoothing: the outliers
    are in down_proj's input, up to 78 against ~5 elsewhere, and smoothing moves them into up_proj's rows);
    w4 g128 with GPTQ ≤ +6% and clearly better than round-to-nearest:
    at most 0.6x RTN's increase (measured +0.18% vs +0.51%, 0.36x)."""
    fp32 = ppl_of("")
    static = ppl_of("cleanup,smooth-quant,quantize(scheme=w8a8-static),fold-quant")
    rtn = ppl_of(RTN_W4)
    gptq = ppl_of("cleanup,quantize(scheme=w4,group_size=128),gptq,fold-quant")
    assert static / fp32 - 1 < 0.02, (fp32, static)
    assert gptq / fp32 - 1 < 0.06, (fp32, gptq)
    assert gptq - fp32 < 0.6 * (rtn - fp32), (fp32, gptq, rtn)


def test_the_prefill_pipeline_through_the_int8_kernels_keeps_w8a8s_bound(ppl_of):
    """The pipeline of issue 3's prefill figure — bf16, smooth-quant, w8a8-static with the LM head in int8 too,
    lowered to the real int8 kernels (oneDNN's u8 × s8 linear on CPUs with VNNI, ``_int_mm`` elsewhere) — within
    w8a8's +1.5% of fp32. Measured +0.18% (the fake-quant graph in fp32: +0.15%; bf16 around the same integers)."""
    fp32 = ppl_of("")
    lowered = ppl_of("cleanup,fuse-attention,cast(dtype=bf16),smooth-quant,quantize(scheme=w8a8-static,skip=''),"
                     "fold-quant,lower-quant")
    assert lowered / fp32 - 1 < 0.015, (fp32, lowered)
