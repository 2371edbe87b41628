"""passforge::attention on the CPU (SDPA's flash kernel, blocked for windows) against the float64 reference.

fp32 against float64: softmax over at most a few hundred keys and a D=16 dot product lose ~1e-6 relative; 1e-5
leaves margin. Shapes are chosen so the windowed loop runs several query blocks and lengths are not multiples
of the block.
"""

from __future__ import annotations

import pytest
import torch

import passforge.kernels.ops  # noqa: F401 - registers passforge::attention
from passforge.kernels.attention import CAUSAL_BLOCK, QUERY_BLOCK, attention_cpu, attention_reference

TOL = {"rtol": 1e-5, "atol": 1e-5}
OP = torch.ops.passforge.attention.default


def operands(b: int, hq: int, hkv: int, tq: int, tk: int, d: int = 16, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(tq * 1000 + tk)
    q = torch.randn(b, hq, tq, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hkv, tk, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hkv, tk, d, generator=gen, dtype=dtype)
    return q, k, v


CASES = {  # name -> (b, hq, hkv, tq, tk, options)
    "full": (2, 4, 4, 37, 37, {}),
    "causal-gqa": (2, 4, 2, 37, 37, {"causal": True}),
    "causal-mqa-chunk": (1, 4, 1, 5, 37, {"causal": True}),  # Tq < Tk: bottom-right alignment
    "window-sinks": (1, 4, 2, QUERY_BLOCK + 77, QUERY_BLOCK + 77, {"causal": True, "window": 50, "sinks": 4}),
    "window-noncausal": (1, 2, 2, QUERY_BLOCK + 3, QUERY_BLOCK + 3, {"window": 20, "sinks": 2}),
    "window-chunk": (1, 4, 2, 130, 300, {"causal": True, "window": 64}),
    "more-queries-than-keys": (1, 2, 2, QUERY_BLOCK + 40, 100, {"causal": True, "window": 30, "sinks": 3}),
    "scale": (1, 2, 1, 9, 9, {"causal": True, "scale": 0.3}),
    # a long causal prompt runs in query blocks (the last one partial), each over the keys up to its end
    "causal-long-gqa": (2, 4, 2, 4 * CAUSAL_BLOCK + 37, 4 * CAUSAL_BLOCK + 37, {"causal": True}),
    "causal-long-scale": (1, 2, 1, 4 * CAUSAL_BLOCK, 4 * CAUSAL_BLOCK, {"causal": True, "scale": 0.3}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_matches_reference(name: str) -> None:
    b, hq, hkv, tq, tk, options = CASES[name]
    q, k, v = operands(b, hq, hkv, tq, tk)
    got = OP(q, k, v, None, **options)
    torch.testing.assert_close(got, attention_reference(q, k, v, **options), **TOL)
    assert got.transpose(1, 2).is_contiguous()  # (B, T, H, D) in memory, like SDPA's flash output


@pytest.mark.parametrize("options", [{}, {"causal": True, "window": 40, "sinks": 2}], ids=["full", "window"])
def test_decode_step_with_a_key_mask(options: dict) -> None:
    """One query against a static cache, valid up to ``pos`` (the decode graph's ``arange(S) <= pos``)."""
    q, k, v = operands(1, 6, 2, 1, 300)
    mask = (torch.arange(300) <= 170).view(1, 300)
    got = OP(q, k, v, mask, **options)
    torch.testing.assert_close(got, attention_reference(q, k, v, mask, **options), **TOL)


def test_masks_bool_additive_and_fully_masked_rows() -> None:
    q, k, v = operands(2, 4, 2, QUERY_BLOCK + 9, QUERY_BLOCK + 9)
    t = q.shape[2]
    gen = torch.Generator().manual_seed(1)
    keep = torch.rand(2, 1, t, t, generator=gen) > 0.3
    keep[0, 0, 5] = False  # a row with nothing to attend: zeros, not NaN
    bias = torch.randn(1, 4, t, t, generator=gen)
    for mask in (keep, bias):
        for options in ({}, {"causal": True}, {"causal": True, "window": 100, "sinks": 1}):
            want = attention_reference(q, k, v, mask, **options)
            torch.testing.assert_close(attention_cpu(q, k, v, mask, **options), want, **TOL)
    assert OP(q, k, v, keep)[0, :, 5].abs().max() == 0


def test_bf16_runs_in_bf16_within_its_rounding() -> None:
    q, k, v = operands(1, 4, 2, 70, 70, dtype=torch.bfloat16)
    got = OP(q, k, v, None, causal=True, window=16, sinks=2)
    assert got.dtype == torch.bfloat16
    want = attention_reference(q, k, v, causal=True, window=16, sinks=2)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=4 * 2**-8)  # outputs ~1: a few bf16 ulp


def test_a_long_causal_prompt_skips_the_masked_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Structure: a causal prompt of 4 blocks or more calls SDPA once per query block, block i over the keys up
    to its end (never a full-length causal call); a shorter one, or one with a mask, is one SDPA call."""
    import passforge.kernels.attention as attention

    calls: list[tuple[int, int, bool]] = []
    real = attention.F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[2], k.shape[2], bool(kwargs.get("is_causal"))))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    t = 4 * CAUSAL_BLOCK + 10
    q, k, v = operands(1, 2, 2, t, t)
    attention_cpu(q, k, v, causal=True)
    assert calls == [(CAUSAL_BLOCK, CAUSAL_BLOCK * (i + 1), False) for i in range(4)] + [(10, t, False)]
    calls.clear()
    short = operands(1, 2, 2, 4 * CAUSAL_BLOCK - 1, 4 * CAUSAL_BLOCK - 1)
    attention_cpu(*short, causal=True)
    attention_cpu(q, k, v, torch.ones(t, t, dtype=torch.bool), causal=True)
    assert [c[2] for c in calls] == [True, False] and len(calls) == 2


def test_opcheck_and_gradients() -> None:
    """Fake impl, schema and autograd registration agree with the kernel; gradients through the op are the
    reference's (the backward recomputes through it)."""
    q, k, v = operands(1, 4, 2, 9, 9)
    for options in ({"causal": True}, {"causal": True, "window": 3, "sinks": 1}, {}):
        torch.library.opcheck(OP, (q, k, v, None), options)
    q, k, v = (t.double().requires_grad_() for t in operands(1, 4, 2, 7, 7))
    assert torch.autograd.gradcheck(lambda q, k, v: OP(q, k, v, None, causal=True, window=3, sinks=1), (q, k, v))


def test_bad_operands_say_what_is_wrong() -> None:
    q, k, v = operands(1, 4, 3, 5, 5)
    with pytest.raises(ValueError, match="not a multiple of 3 kv heads"):
        attention_cpu(q, k, v)
    q, k, v = operands(1, 4, 2, 5, 5)
    with pytest.raises(ValueError, match="4-d"):
        attention_cpu(q[0], k, v)
    with pytest.raises(ValueError, match="window=-1"):
        attention_cpu(q, k, v, window=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the op's CUDA path (Triton kernels) needs a GPU")
@pytest.mark.parametrize("tq", [1, 70], ids=["decode", "prefill"])
def test_cuda_op_runs_the_triton_kernels(tq: int) -> None:
    from passforge.kernels.ops import attention_backend

    q, k, v = (t.cuda() for t in operands(1, 8, 2, tq, 70, d=64))
    mask = (torch.arange(70, device="cuda") <= 50).view(1, 70)
    assert attention_backend(q, k, v, mask) == "triton"
    for options in ({"causal": True}, {"causal": True, "window": 16, "sinks": 2}):
        got = OP(q, k, v, mask, **options)
        torch.testing.assert_close(got, attention_reference(q, k, v, mask, **options), **TOL)
        assert got.transpose(1, 2).is_contiguous()


def test_a_learned_additive_mask_gets_its_gradient() -> None:
    q, k, v = (t.double() for t in operands(1, 2, 2, 6, 6))
    bias = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    OP(q, k, v, bias, causal=True).sum().backward()
    reference = bias.detach().clone().requires_grad_()
    attention_reference(q, k, v, reference, causal=True).sum().backward()
    torch.testing.assert_close(bias.grad, reference.grad, **TOL)  # the backward recomputes in fp32


def test_a_float_mask_in_another_dtype_is_cast() -> None:
    q, k, v = operands(1, 2, 2, 9, 9)
    mask = torch.randn(9, 9).half()
    torch.testing.assert_close(OP(q, k, v, mask), attention_reference(q, k, v, mask), **TOL)


def test_a_decode_step_reads_only_the_slots_up_to_pos() -> None:
    from passforge.kernels.attention import _trim_unseen_keys

    q, k, v = operands(1, 6, 2, 1, 300)
    mask = (torch.arange(300) <= 170).view(1, 1, 1, 300)
    k_seen, v_seen, mask_seen = _trim_unseen_keys(k, v, mask)
    assert k_seen.shape[2] == v_seen.shape[2] == mask_seen.shape[-1] == 171
    assert k_seen.data_ptr() == k.data_ptr()  # a view, no copy
    nothing = torch.zeros(1, 300, dtype=torch.bool)
    assert OP(q, k, v, nothing).abs().max() == 0  # no key at all: zeros, as before trimming
