"""The Triton kernels against their PyTorch references, on small shapes with ragged edges (M, N, K not multiples
of the tiles): compiled on CUDA, interpreted on CPU (TRITON_INTERPRET, set by this folder's conftest).

The interpreter computes bf16 on raw bits (its casts truncate, its dots multiply the uint16 storage), so bf16
GEMMs are checked on CUDA only; the quantizer rounds bf16 by integer arithmetic and is checked everywhere.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from passforge.kernels import int8_gemm, weight_only_gemm  # noqa: E402 - after the conftest set TRITON_INTERPRET
from passforge.kernels.ops import (  # noqa: E402
    backend,
    int4_weight_linear_reference,
    int8_dynamic_linear_reference,
    int8_static_linear_reference,
    int8_weight_linear_reference,
    pack_int4,
)

COMPILED = torch.cuda.is_available()
FLOATS = [torch.float32, torch.float16, pytest.param(
    torch.bfloat16, marks=pytest.mark.skipif(not COMPILED, reason="the interpreter computes bf16 on raw bits"))]
ULP = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}  # spacing of values in [1, 2)


def _tile(block_m: int, block_n: int, block_k: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k})


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _close(out: torch.Tensor, expected: torch.Tensor, ulps: float) -> None:
    """Within ``ulps`` units of the output dtype's precision at the output's largest magnitude."""
    bound = ulps * ULP[out.dtype] * expected.abs().max().item()
    torch.testing.assert_close(out.double().cpu(), expected.double().cpu(), rtol=0, atol=bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_per_token_is_bit_exact(dtype, device):
    """Rows of every kind: mixed signs over six decades of scale, all zero (scale = eps), all positive, a
    constant, ties (range 127.5 gives scale 0.5; quarters then land halfway between two steps), and K = 300
    not a multiple of the 128-wide step."""
    g = _generator()
    x = torch.randn(9, 300, generator=g) * 10 ** torch.empty(9, 1).uniform_(-3, 3, generator=g)
    x[0], x[1], x[2] = 0.0, x[2].abs(), 1.5
    x[3] = torch.randint(-256, 255, (300,), generator=g) * 0.25
    x[3, :2] = torch.tensor([-64.0, 63.5])
    x = x.to(dtype=dtype, device=device)
    q, scales, zero_points = int8_gemm.quantize_per_token(x, block_k=128)
    expected = int8_gemm.quantize_per_token_reference(x)
    for got, want in zip((q, scales, zero_points), expected):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_quantize_per_token_follows_cuda_division_rule(device):
    """On CUDA torch divides the range by the Python float 255 as a multiply by its fp32 reciprocal, which is an
    ulp off true division for some rows: the kernel's CUDA rule, checked here under the interpreter too, and
    shown to differ from the CPU rule on some of these rows (else this test would not tell the rules apart).
    Both expectations are computed on the CPU, where tensor / 255 is a true division."""
    g = _generator()
    x = torch.randn(256, 64, generator=g) * 10 ** torch.empty(256, 1).uniform_(-3, 3, generator=g)
    _, scales, _ = int8_gemm.quantize_per_token(x.to(device), block_k=64, reciprocal_divide=True)
    spread = x.amax(-1).clamp_min(0) - x.amin(-1).clamp_max(0)
    eps = torch.finfo(torch.float32).eps
    cuda_rule = (spread * (torch.tensor(1.0) / 255)).clamp_min(eps)
    assert torch.equal(scales.cpu(), cuda_rule)
    assert not torch.equal(scales.cpu(), (spread / 255).clamp_min(eps))


@pytest.mark.parametrize("tile", [_tile(16, 32, 64), _tile(32, 64, 32)])
@pytest.mark.parametrize("rows", [1, 19])
@pytest.mark.parametrize("out_dtype", FLOATS)
def test_int8_gemm_matches_its_reference(tile, rows, out_dtype, device):
    """The int32 GEMM is exact and the epilogue does the reference's fp32 ops (a GPU may fuse the bias add
    into an FMA): one unit of the output dtype."""
    g = _generator()
    q_x = torch.randint(-128, 128, (rows, 96), generator=g, dtype=torch.int8).to(device)
    w = torch.randint(-128, 128, (40, 96), generator=g, dtype=torch.int8).to(device)
    x_scales, w_scales = torch.rand(rows, generator=g).to(device), (torch.rand(40, generator=g) / 100).to(device)
    x_zero_points = torch.randint(-128, 128, (rows,), generator=g, dtype=torch.int32).to(device)
    row_sums, bias = w.sum(dim=1, dtype=torch.int32), torch.randn(40, generator=g).to(device)
    args = (q_x, w, x_scales, x_zero_points, w_scales, row_sums, bias, out_dtype)
    out = int8_gemm.int8_gemm(*args, config=tile)
    assert out.shape == (rows, 40) and out.dtype == out_dtype
    _close(out, int8_gemm.int8_gemm_reference(*args), ulps=1)


def test_int8_gemm_rejects_mismatched_operands(device):
    q_x = torch.zeros(2, 64, dtype=torch.int8, device=device)
    w = torch.zeros(8, 32, dtype=torch.int8, device=device)
    vector = torch.zeros(8, device=device)
    with pytest.raises(ValueError, match=r"q_x \(M, K\) int8 and w \(N, K\) int8"):
        int8_gemm.int8_gemm(q_x, w, vector[:2], vector[:2].int(), vector, vector.int(), None, torch.float32)


@pytest.mark.parametrize("rows", [1, 19])
def test_int8_dynamic_linear_matches_the_fake_quant_graph(rows, device):
    """Autotuned path (the interpreter takes the first fitting tile). Exact quantization and integer GEMM; the
    fake-quant graph in float64 differs only in the fp32 epilogue (1e-5 of the output scale)."""
    g = _generator()
    x = torch.randn(1, rows, 96, generator=g).to(device)
    w = torch.randint(-127, 128, (40, 96), generator=g, dtype=torch.int8).to(device)
    scales, bias = (torch.rand(40, generator=g) / 50).to(device), torch.randn(40, generator=g).to(device)
    out = int8_gemm.int8_dynamic_linear(x, w, scales, bias)
    expected = int8_dynamic_linear_reference(x.double(), w, scales.double(), bias.double())
    assert out.shape == (1, rows, 40)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_per_tensor_is_bit_exact(dtype, device):
    """Against ``quantize_per_tensor`` itself: exact ties (k + 0.5 steps of a power-of-two scale: half to even),
    values far outside the range (clamped), a scale whose inverse is not exact in fp32, and 1000 elements (not
    a multiple of the 256-wide blocks)."""
    g = _generator()
    x = torch.randn(4, 250, generator=g) * 3
    x[0, :6] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5]) * 0.03125
    x[1, :2] = torch.tensor([6e4, -6e4])
    x = x.to(dtype=dtype, device=device)
    for scale, zero_point in ((0.03125, -3), (0.0247163, 1)):
        q = int8_gemm.quantize_per_tensor(x, scale, zero_point, block=256)
        expected = torch.ops.quantized_decomposed.quantize_per_tensor(x, scale, zero_point, -128, 127, torch.int8)
        assert q.dtype == torch.int8 and torch.equal(q, expected)


@pytest.mark.parametrize("tile", [_tile(16, 32, 64), None])  # None: autotuned
@pytest.mark.parametrize("rows", [1, 19])
@pytest.mark.parametrize("out_dtype", FLOATS)
def test_int8_gemm_with_one_scale_and_zero_point_matches_its_reference(tile, rows, out_dtype, device):
    """w8a8-static: the constants passed as kernel arguments instead of per-row vectors. Same bound as the
    per-token GEMM (one unit of the output dtype)."""
    g = _generator()
    q_x = torch.randint(-128, 128, (rows, 96), generator=g, dtype=torch.int8).to(device)
    w = torch.randint(-128, 128, (40, 96), generator=g, dtype=torch.int8).to(device)
    w_scales, bias = (torch.rand(40, generator=g) / 100).to(device), torch.randn(40, generator=g).to(device)
    args = (q_x, w, 0.037, -5, w_scales, w.sum(dim=1, dtype=torch.int32), bias, out_dtype)
    out = int8_gemm.int8_gemm(*args, config=tile)
    assert out.shape == (rows, 40) and out.dtype == out_dtype
    _close(out, int8_gemm.int8_gemm_reference(*args), ulps=1)


def test_int8_gemm_rejects_mixed_qparams(device):
    q_x, w = torch.zeros(2, 64, dtype=torch.int8, device=device), torch.zeros(8, 64, dtype=torch.int8, device=device)
    vector = torch.zeros(8, device=device)
    with pytest.raises(ValueError, match="both be"):
        int8_gemm.int8_gemm(q_x, w, 0.5, vector[:2].int(), vector, vector.int(), None, torch.float32)


@pytest.mark.parametrize("static_cpu_path", ["aten._int_mm"], indirect=True)  # same epilogue as the kernel
@pytest.mark.parametrize("rows", [1, 19])
def test_int8_static_linear_matches_the_fake_quant_graph(rows, device, static_cpu_path):
    """Bit-exact quantization and an exact integer GEMM: the fake-quant graph in float64 differs only in the
    fp32 epilogue (1e-5 of the output scale); and bit-identical to the CPU op (same fp32 epilogue)."""
    g = _generator()
    x = torch.randn(1, rows, 96, generator=g).to(device)
    w = torch.randint(-127, 128, (40, 96), generator=g, dtype=torch.int8).to(device)
    scales, bias = (torch.rand(40, generator=g) / 50).to(device), torch.randn(40, generator=g).to(device)
    out = int8_gemm.int8_static_linear(x, 0.02, 3, w, scales, bias)
    q_x = torch.ops.quantized_decomposed.quantize_per_tensor(x, 0.02, 3, -128, 127, torch.int8)
    expected = torch.nn.functional.linear((q_x.double() - 3) * 0.02, w.double() * scales.double()[:, None],
                                          bias.double())
    assert out.shape == (1, rows, 40)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    if not COMPILED:  # the interpreter runs on CPU tensors: compare with the op's torch._int_mm path
        assert torch.equal(out, torch.ops.passforge.int8_static_linear(x, 0.02, 3, w, scales, bias))


@pytest.mark.parametrize("tile", [_tile(16, 32, 64), _tile(32, 64, 32), None])  # None: autotuned
@pytest.mark.parametrize("rows", [1, 19])
@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_weight_only_gemm_matches_its_reference(tile, rows, dtype, device):
    """Against the float64 reference: fp32 sums of K = 96 terms (well under 2^7 units of fp32) in fp32; in
    f16/bf16 x is the reference's own input and int8 weights are exact, so only the output's rounding and
    the scales' (applied in fp32 here, rounded to the dtype in the reference) remain: 2 units."""
    g = _generator()
    x = torch.randn(rows, 96, generator=g).to(dtype=dtype, device=device)
    w = torch.randint(-128, 128, (40, 96), generator=g, dtype=torch.int8).to(device)
    scales, bias = (torch.rand(40, generator=g) / 50).to(device), torch.randn(40, generator=g).to(device)
    out = weight_only_gemm.int8_weight_only_gemm(x, w, scales, bias, config=tile)
    assert out.shape == (rows, 40) and out.dtype == dtype
    expected = int8_weight_linear_reference(x.double(), w, scales.to(dtype).double(), bias.double())
    _close(out, expected, ulps=2**7 if dtype == torch.float32 else 2)


@pytest.mark.parametrize(("group_size", "tile"), [(32, _tile(16, 32, 32)), (64, _tile(32, 64, 64)),
                                                  (64, _tile(16, 64, 32)), (64, None)])
@pytest.mark.parametrize("rows", [1, 19])
@pytest.mark.parametrize("dtype", FLOATS)
def test_int4_weight_only_gemm_dequantizes_as_the_graph_does(group_size, tile, rows, dtype, device):
    """Against the graph's own dequantized weight (dequantize_per_channel_group to x's dtype) multiplied in
    float64: the kernel builds that same weight, so only fp32 summation (2^7 units in fp32) and the output's
    rounding (1 unit in f16/bf16) differ. Odd zero points and scales per group, so a nibble or group mix-up
    shows."""
    g = _generator()
    rows_n, cols = 40, 128
    values = torch.randint(0, 16, (rows_n, cols), generator=g, dtype=torch.uint8)
    scales = torch.rand(rows_n, cols // group_size, generator=g) / 20 + 1e-3
    zero_points = torch.randint(0, 16, scales.shape, generator=g, dtype=torch.int32)
    packed, scales, zero_points = pack_int4(values).to(device), scales.to(device), zero_points.to(device)
    x = torch.randn(rows, cols, generator=g).to(dtype=dtype, device=device)
    bias = torch.randn(rows_n, generator=g).to(device)
    out = weight_only_gemm.int4_weight_only_gemm(x, packed, scales, zero_points, group_size, bias, config=tile)
    assert out.shape == (rows, rows_n) and out.dtype == dtype
    weight = torch.ops.quantized_decomposed.dequantize_per_channel_group(
        torch.ops.passforge.unpack_int4(packed), scales, zero_points, 0, 15, torch.uint8, group_size, dtype
    )
    expected = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    _close(out, expected, ulps=2**7 if dtype == torch.float32 else 2)


def test_int4_weight_only_gemm_explains_unsupported_groups(device):
    x = torch.zeros(1, 96, device=device)
    packed = torch.zeros(16, 48, dtype=torch.uint8, device=device)
    scales, zero_points = torch.ones(16, 2, device=device), torch.zeros(16, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"group_size=48 must be a multiple of 32.*falls back to PyTorch"):
        weight_only_gemm.int4_weight_only_gemm(x, packed, scales, zero_points, 48, None)
    packed, scales, zero_points = packed[:, :32], scales[:, :2], zero_points[:, :2]  # K = 64, groups of 32
    with pytest.raises(ValueError, match="BLOCK_K=64 must divide group_size=32"):
        weight_only_gemm.int4_weight_only_gemm(x[:, :64], packed, scales, zero_points, 32, None,
                                               config=_tile(16, 32, 64))


@pytest.mark.skipif(not COMPILED, reason="ops dispatch to Triton for CUDA tensors only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ops_run_triton_on_cuda(dtype):
    """The registered CUDA kernels of the four integer ops: Triton, same results as the PyTorch references within
    the graph's own rounding (the references round dequantized weights and activations to the dtype)."""
    g = _generator()
    x = torch.randn(2, 3, 256, generator=g).to(dtype=dtype, device="cuda")
    w = torch.randint(-127, 128, (96, 256), generator=g, dtype=torch.int8).cuda()
    scales = (torch.rand(96, generator=g) / 50).cuda()
    packed = torch.randint(0, 256, (96, 128), generator=g, dtype=torch.uint8).cuda()
    group_scales = (torch.rand(96, 2, generator=g) / 20).cuda()
    zero_points = torch.randint(0, 16, (96, 2), generator=g, dtype=torch.int32).cuda()
    cases = [
        ("int8_weight_linear", (x, w, scales, None), int8_weight_linear_reference, 0),
        ("int8_dynamic_linear", (x, w, scales, None), int8_dynamic_linear_reference, 0),
        ("int8_static_linear", (x, 0.02, 3, w, scales, None), int8_static_linear_reference, 0),
        ("int4_weight_linear", (x, packed, group_scales, zero_points, 128, None), int4_weight_linear_reference, 128),
    ]
    for name, args, reference, group_size in cases:
        assert backend(name, x, (96, 256), group_size) == "triton"
        out = getattr(torch.ops.passforge, name)(*args)
        assert out.shape == (2, 3, 96) and out.dtype == dtype
        expected = reference(*args)
        torch.testing.assert_close(out.float(), expected.float(), rtol=0,
                                   atol=0.02 * expected.abs().max().item())
