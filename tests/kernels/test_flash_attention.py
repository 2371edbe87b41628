"""flash_attention's Triton kernels against ``attention_reference`` in float64, on small shapes with ragged edges
(lengths not multiples of the 16-wide tiles the tests pick, head dims padded to a power of two): compiled on
CUDA, interpreted on CPU (TRITON_INTERPRET, set by this folder's conftest).

Bound, relative to max|v| (each output row is a convex combination of v's rows): 2^7 units of fp32 for fp32
inputs (fp32 scores, exponentials and sums over at most a few hundred keys); 2 units of the dtype for f16/bf16
(the probabilities are rounded to it for the P·V dot, the output once more). The interpreter computes bf16 on raw
bits, so bf16 runs on CUDA only.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from passforge.kernels import flash_attention as fa  # noqa: E402 - after the conftest set TRITON_INTERPRET
from passforge.kernels.attention import attention_reference  # noqa: E402

COMPILED = torch.cuda.is_available()
FLOATS = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16, marks=pytest.mark.skipif(not COMPILED, reason="the interpreter computes bf16 on raw bits")
    ),
]
ULP = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}  # spacing of values in [1, 2)
UNITS = {torch.float32: 2**7, torch.float16: 2, torch.bfloat16: 2}
TILES = {"block_m": 16, "block_n": 16}  # the smallest tiles: several blocks, ragged last ones
RULES = [
    {},
    {"causal": True},
    {"causal": True, "window": 40},  # a window wider than a block: blocks inside it skip the per-element rules
    {"causal": True, "window": 7, "sinks": 3},
    {"window": 9, "sinks": 2},  # not causal: the window reaches both ways
]


def _operands(
    b: int, hq: int, hkv: int, tq: int, tk: int, d: int, dtype: torch.dtype, device: torch.device, dv: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, tq, d, generator=g)
    k = torch.randn(b, hkv, tk, d, generator=g)
    v = torch.randn(b, hkv, tk, dv or d, generator=g)
    return tuple(t.to(dtype=dtype, device=device) for t in (q, k, v))


def _check(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    **options: object,
) -> None:
    """out against the float64 reference of the same (already rounded) inputs, within the module's bound."""
    expected = attention_reference(q.double(), k.double(), v.double(), mask, **options)
    assert out.shape == expected.shape and out.dtype == q.dtype
    assert out.transpose(1, 2).is_contiguous()  # the op's layout: (B, Tq, Hq, Dv) in memory
    bound = UNITS[q.dtype] * ULP[q.dtype] * v.double().abs().max().item()
    torch.testing.assert_close(out.double().cpu(), expected.cpu(), rtol=0, atol=bound)


@pytest.mark.parametrize("rules", RULES, ids=lambda r: "-".join(f"{k}{v}" for k, v in r.items()) or "plain")
@pytest.mark.parametrize(("tq", "tk", "hkv"), [(70, 70, 2), (33, 70, 1), (33, 7, 4)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_forward_matches_the_reference(rules, tq, tk, hkv, dtype, device):
    """GQA (2 query heads per kv head), MQA and plain heads; Tq < Tk (queries are the last positions: bottom-right
    causality) and Tq > Tk (the first causal queries see no key and return zeros)."""
    torch.manual_seed(0)
    q, k, v = _operands(2, 4, hkv, tq, tk, 64, dtype, device)
    _check(fa.flash_attention_forward(q, k, v, **rules, **TILES), q, k, v, **rules)


@pytest.mark.parametrize(("d", "dv"), [(64, 64), (128, 128), (40, 40), (80, 24)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_forward_head_dims(d, dv, dtype, device):
    """64 and 128 natively, 40 and 80 padded to 64 and 128 with masked loads, Dv != D; the default tiles."""
    torch.manual_seed(0)
    q, k, v = _operands(1, 4, 2, 33, 50, d, dtype, device, dv=dv)
    _check(fa.flash_attention_forward(q, k, v, causal=True, scale=0.3), q, k, v, causal=True, scale=0.3)


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_with_a_mask(kind, dtype, device):
    """A bool mask (B, 1, Tq, Tk) or an additive one (Hq, Tq, Tk), read through broadcast strides, on top of
    causality and a window with sinks; a row the mask hides entirely returns exact zeros, one it lowers by
    ``finfo.min`` averages its visible keys (the mask must not overflow on the way)."""
    torch.manual_seed(0)
    q, k, v = _operands(2, 4, 2, 33, 70, 64, dtype, device)
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        mask = torch.rand(2, 1, 33, 70, generator=g) > 0.3
        mask[1, 0, 5] = False
    else:
        mask = torch.randn(4, 33, 70, generator=g) * 2
        mask[mask < -2] = float("-inf")
        mask[2, 5] = float("-inf")
        mask[3, 6] = torch.finfo(torch.float32).min  # a padding row as transformers writes it: uniform, not zeros
    mask = mask.to(device)
    options = {"causal": True, "window": 30, "sinks": 2}
    out = fa.flash_attention_forward(q, k, v, mask, **options, **TILES)
    _check(out, q, k, v, mask, **options)
    hidden = out[1, :, 5] if kind == "bool" else out[:, 2, 5]
    assert torch.equal(hidden, torch.zeros_like(hidden))


@pytest.mark.parametrize("kernel", ["forward", "decode"])
def test_kernels_take_strided_operands(kernel, device):
    """q, k, v as the head slices of one fused (B, T, Hq + 2 Hkv, D) projection, transposed to (B, H, T, D)
    (nothing contiguous), and a transposed mask."""
    torch.manual_seed(0)
    tq = 33 if kernel == "forward" else 2
    qkv = torch.randn(2, 70, 8, 64, device=device)
    q, k, v = qkv[:, -tq:, :4].transpose(1, 2), qkv[:, :, 4:6].transpose(1, 2), qkv[:, :, 6:].transpose(1, 2)
    mask = (torch.rand(70, tq, device=device) > 0.2).t()
    if kernel == "forward":
        out = fa.flash_attention_forward(q, k, v, mask, causal=True, **TILES)
    else:
        out = fa.flash_decode(q, k, v, mask, causal=True, n_splits=3, block_n=16)
    _check(out, q, k, v, mask, causal=True)


@pytest.mark.parametrize("rules", RULES, ids=lambda r: "-".join(f"{k}{v}" for k, v in r.items()) or "plain")
@pytest.mark.parametrize(("tq", "hkv", "n_splits"), [(1, 1, 3), (1, 4, 8), (3, 2, 2)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_decode_matches_the_reference(rules, tq, hkv, n_splits, dtype, device):
    """A cache of 70 keys in blocks of 16 (the last one ragged), a view into a longer buffer; n_rep 4, 1, 2;
    splits over fewer blocks than there are splits too (empty splits weigh nothing)."""
    torch.manual_seed(0)
    q, k, v = _operands(2, 4, hkv, tq, 96, 64, dtype, device)
    k, v = k[:, :, :70], v[:, :, :70]
    out = fa.flash_decode(q, k, v, **rules, n_splits=n_splits, block_n=16)
    _check(out, q, k, v, **rules)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_with_a_key_mask(dtype, device):
    """A preallocated cache of 80 slots filled up to position 57, its other slots large garbage: the key mask
    ``arange(80) <= 57`` (1, 80) gives the attention over the first 58 keys; a batch whose (B, 1, 1, S) mask hides
    every key returns zeros."""
    torch.manual_seed(0)
    q, k, v = _operands(2, 4, 2, 1, 80, 64, dtype, device)
    k[:, :, 58:], v[:, :, 58:] = 30.0, -30.0
    position = torch.arange(80, device=device)
    mask = (position <= 57).view(1, 80)
    out = fa.flash_decode(q, k, v, mask, causal=True, n_splits=4, block_n=16)
    _check(out, q, k, v, mask, causal=True)
    _check(out, q, k[:, :, :58], v[:, :, :58], causal=True)
    batch_mask = (position <= 57).repeat(2, 1, 1, 1)
    batch_mask[1] = False
    out = fa.flash_decode(q, k, v, batch_mask, n_splits=4, block_n=16)
    _check(out, q, k, v, batch_mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_dispatcher_picks_decode_for_few_query_rows(device):
    """Tq <= 16 with at most 64 rows per kv-head group (fewer for fp32 with head dim 256): flash_decode; more
    queries, or more rows: the forward."""
    torch.manual_seed(0)
    q, k, v = _operands(1, 4, 2, 17, 40, 64, torch.float32, device)
    few = q[:, :, -2:]
    assert torch.equal(fa.flash_attention(few, k, v, causal=True), fa.flash_decode(few, k, v, causal=True))
    assert torch.equal(fa.flash_attention(q, k, v, causal=True), fa.flash_attention_forward(q, k, v, causal=True))
    grouped = torch.randn(1, 16, 16, 64, device=device)  # n_rep 8 × Tq 16 = 128 rows per kv-head group
    assert torch.equal(fa.flash_attention(grouped, k, v), fa.flash_attention_forward(grouped, k, v))
    with pytest.raises(ValueError, match="128 query rows per kv head"):
        fa.flash_decode(grouped, k, v)
    q, k, v = _operands(1, 8, 1, 5, 40, 256, torch.float32, device)  # 40 rows of fp32 D 256: over 32 KiB
    assert torch.equal(fa.flash_attention(q, k, v), fa.flash_attention_forward(q, k, v))


def test_decode_splits():
    """One split per 256 visible keys, at most 64: the whole cache without a window, the sinks and the window
    with one."""
    assert fa.decode_splits(1, 70, window=0, sinks=0) == 1
    assert fa.decode_splits(1, 4096, window=0, sinks=0) == 16
    assert fa.decode_splits(1, 100_000, window=0, sinks=0) == 64
    assert fa.decode_splits(1, 100_000, window=512, sinks=4) == 3
    assert fa.decode_splits(4, 300, window=512, sinks=4) == 2


def test_empty_sequences(device):
    """No keys: zeros (no row has a key); no queries: an empty output."""
    q, k, v = _operands(1, 4, 2, 5, 0, 64, torch.float32, device)
    for kernel in (fa.flash_attention_forward, fa.flash_decode):
        assert torch.equal(kernel(q, k, v), torch.zeros(1, 4, 5, 64, device=device))
    q, k, v = _operands(1, 4, 2, 0, 9, 64, torch.float32, device)
    assert fa.flash_attention(q, k, v).shape == (1, 4, 0, 64)


def test_unsupported_operands_are_named(device):
    q, k, v = _operands(1, 4, 2, 3, 9, 64, torch.float32, device)
    assert fa.unsupported(q, k, v, None) is None
    assert fa.unsupported(q, k, v, torch.zeros(9, device=device)) is None
    assert "dtype" in fa.unsupported(q.half(), k, v, None)
    assert "dtype" in fa.unsupported(q.double(), k.double(), v.double(), None)
    wide = torch.zeros(1, 2, 9, 320, device=device)
    assert "at most 256" in fa.unsupported(torch.zeros(1, 4, 3, 320, device=device), wide, wide, None)
    assert "bool or float" in fa.unsupported(q, k, v, torch.zeros(9, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=r"flash_attention_forward: .*falls back to PyTorch"):
        fa.flash_attention_forward(q.half(), k, v)
    with pytest.raises(ValueError, match="does not broadcast"):
        fa.flash_decode(q, k, v, torch.ones(2, 9, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="not a multiple"):
        fa.flash_attention(q[:, :3], k, v)


@pytest.mark.skipif(not COMPILED, reason="model-sized shapes: too slow for the interpreter")
@pytest.mark.parametrize("rules", RULES[1:4], ids=["causal", "window", "sinks"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_at_model_shapes_on_cuda(rules, dtype):
    """The default tiles and splits: a 1000-token prefill (D 128, 4 query heads per kv head) and a decode step
    against a 3000-key cache (12 splits without a window, 1 with one); causal, with a window of 40, or of 7 and 3
    sinks."""
    q, k, v = _operands(1, 8, 2, 1000, 1000, 128, dtype, torch.device("cuda"))
    _check(fa.flash_attention(q, k, v, **rules), q, k, v, **rules)
    q, k, v = _operands(2, 8, 2, 1, 3000, 128, dtype, torch.device("cuda"))
    _check(fa.flash_attention(q, k, v, **rules), q, k, v, **rules)
