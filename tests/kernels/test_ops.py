from __future__ import annotations

import pytest
import torch

from passforge.kernels.ops import int8_weight_linear_reference, pack_int4
from tests.conftest import cpu_scaled_mm_takes_row_scales

INT_MM, ONEDNN = "aten._int_mm", "onednn.qlinear_pointwise"  # the static op's CPU paths (conftest: static_cpu_path)


def test_int4_pack_round_trip():
    values = torch.randint(0, 16, (6, 10), dtype=torch.uint8)
    packed = pack_int4(values)
    assert packed.shape == (6, 5) and packed.dtype == torch.uint8
    torch.testing.assert_close(torch.ops.passforge.unpack_int4(packed), values, rtol=0, atol=0)
    assert packed[0, 0] == values[0, 0] | (values[0, 1] << 4)  # low nibble first
    with pytest.raises(ValueError, match="even last dimension"):
        pack_int4(values[:, :3])


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_int8_weight_linear_matches_its_reference(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g).to(dtype)
    w = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8)
    scales = torch.rand(48, generator=g) / 50
    bias = torch.randn(48, generator=g).to(dtype)
    out = torch.ops.passforge.int8_weight_linear(x, w, scales, bias)
    expected = int8_weight_linear_reference(x.double(), w, scales.double(), bias.double())
    assert out.shape == (3, 5, 48) and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("tokens", [1, 40])  # below and above torch._int_mm's minimum M
def test_int8_dynamic_linear_matches_the_fake_quant_graph(tokens):
    from passforge.kernels.ops import int8_dynamic_linear_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, 64, generator=g)
    w = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8)
    scales = torch.rand(48, generator=g) / 50
    bias = torch.randn(48, generator=g)
    out = torch.ops.passforge.int8_dynamic_linear(x, w, scales, bias)
    expected = int8_dynamic_linear_reference(x.double(), w, scales.double(), bias.double())
    assert out.shape == (1, tokens, 48)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)  # exact integer GEMM, fp32 epilogue


def _tie_and_range_probe(dtype: torch.dtype, scale: float, tokens: int, g: torch.Generator) -> torch.Tensor:
    """(2, tokens, 64) random values, and on the grid of ``scale``: exact ties (k + 0.5 steps, which round to
    even), values far outside the int8 range (clamped) and zeros."""
    x = torch.randn(2, tokens, 64, generator=g) * 2
    x[0, 0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 200.0, -200.0, 0.0]) * scale
    x[1, 0] = 6e4  # far beyond the last int8 step: clamps to 127
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_per_tensor_int8_is_bit_exact(dtype):
    """The static op's in-place quantizer against ``quantize_per_tensor`` itself, on ties and clamped values."""
    from passforge.kernels.ops import quantize_per_tensor_int8

    scale, zero_point = 0.03125, -3  # a power of two: the ties above are exact in every dtype
    x = _tie_and_range_probe(dtype, scale, 5, torch.Generator().manual_seed(0))
    q = quantize_per_tensor_int8(x, scale, zero_point)
    expected = torch.ops.quantized_decomposed.quantize_per_tensor(x, scale, zero_point, -128, 127, torch.int8)
    assert q.dtype == torch.int8 and torch.equal(q, expected)
    assert q[0, 0, :3].tolist() == [0 + zero_point, 2 + zero_point, 2 + zero_point]  # half to even
    assert q[1, 0].unique().tolist() == [127]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_per_token_int8_is_bit_exact(dtype):
    """The dynamic op's fused quantizer against ``choose_qparams_per_token_asymmetric`` + ``quantize_per_token``
    themselves: random rows, an all-zero row (eps scale), a constant row, one-signed rows, clamped values."""
    from passforge.kernels.ops import quantize_per_token_int8

    qd = torch.ops.quantized_decomposed
    x = _tie_and_range_probe(dtype, 0.03125, 6, torch.Generator().manual_seed(1)).reshape(-1, 64)
    x[2] = 0
    x[3] = 7
    x[4] = x[4].abs()
    x[5] = -x[5].abs()
    q, scales, zero_points = quantize_per_token_int8(x)
    expected_scales, expected_zero_points = qd.choose_qparams_per_token_asymmetric(x, torch.int8)
    expected = qd.quantize_per_token(x, expected_scales, expected_zero_points, -128, 127, torch.int8)
    assert torch.equal(scales, expected_scales) and torch.equal(zero_points, expected_zero_points)
    assert q.dtype == torch.int8 and torch.equal(q, expected)


def _static_reference_float64(x, x_scale, x_zero_point, w, w_scales, bias):
    """The fake-quant graph with the same int8 activations, dequantized and multiplied in float64."""
    qx = torch.ops.quantized_decomposed.quantize_per_tensor(x, x_scale, x_zero_point, -128, 127, torch.int8)
    weight = w.double() * w_scales.double()[:, None]
    return torch.nn.functional.linear((qx.double() - x_zero_point) * x_scale, weight, bias.double())


@pytest.mark.parametrize(("dtype", "ulps"), [(torch.float32, 2**-17), (torch.bfloat16, 2**-7)])
@pytest.mark.parametrize("tokens", [1, 40])
@pytest.mark.parametrize("zero_point", [0, -3])
def test_int8_static_linear_matches_the_fake_quant_graph(dtype, ulps, tokens, zero_point, static_cpu_path):
    """Same int8 activations (bit-exact quantizer), an exact int32 GEMM and an fp32 epilogue, against the
    graph in float64, on both CPU paths (oneDNN's u8 linear with the zero point shifted by 128; ``_int_mm``).
    fp32: a few roundings of the epilogue and the bias add (units of 2^-24; bound 2^-17 of the output scale,
    measured 2^-24). bf16: the cast of the fp32 result and the bias add, half a unit each (bound 1 unit of
    bf16). A missed zero point or scale is off by whole steps."""
    from passforge.kernels.ops import backend, int8_static_linear_reference

    g = torch.Generator().manual_seed(0)
    x_scale = 0.03125
    x = _tie_and_range_probe(dtype, x_scale, tokens, g)
    w = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8)
    w_scales, bias = torch.rand(48, generator=g) / 50, torch.randn(48, generator=g).to(dtype)
    assert backend("int8_static_linear", x, (48, 64)) == static_cpu_path
    out = torch.ops.passforge.int8_static_linear(x, x_scale, zero_point, w, w_scales, bias)
    assert out.shape == (*x.shape[:-1], 48) and out.dtype == dtype
    expected = _static_reference_float64(x, x_scale, zero_point, w, w_scales, bias)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=ulps * expected.abs().max().item())
    graph = int8_static_linear_reference(x, x_scale, zero_point, w, w_scales, bias)  # what it replaces
    assert graph.dtype == dtype and graph.shape == out.shape


def test_fp8_linear_on_cpu_runs_exactly_the_fake_quant_graph():
    """The ops quantize(scheme=fp8) + fold-quant leave in the graph, written out here: bit-identical."""
    from passforge.kernels.fp8 import dequantize_fp8, fp8_scale, quantize_fp8
    from passforge.kernels.ops import backend

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, generator=g)
    x[0, 1] = 0  # an all-zero token: its scale is the 2^-24 floor and it stays 0
    weight = torch.randn(48, 64, generator=g)
    w_scale = fp8_scale(weight)  # (48, 1)
    w, bias = quantize_fp8(weight, w_scale), torch.randn(48, generator=g)
    assert backend("fp8_linear", x, (48, 64)) == "reference"
    out = torch.ops.passforge.fp8_linear(x, w, w_scale, bias)
    x_scale = torch.clamp_min(torch.amax(torch.abs(x), [-1], True) / 448.0, 2.0**-24)
    dqx = dequantize_fp8(quantize_fp8(x, x_scale), x_scale, x.dtype)
    expected = torch.nn.functional.linear(dqx, dequantize_fp8(w, w_scale, x.dtype), bias)
    assert out.shape == (2, 5, 48) and torch.equal(out, expected)
    assert torch.equal(out[0, 1], bias)


def _fp8_operands(tokens: int, device: str = "cpu"):
    from passforge.kernels.fp8 import fp8_scale, quantize_fp8

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, 64, generator=g).to(device=device, dtype=torch.bfloat16)
    weight = torch.randn(32, 64, generator=g).to(device)
    w_scale = fp8_scale(weight)
    return x, quantize_fp8(weight, w_scale), w_scale, torch.randn(32, generator=g).to(device=device,
                                                                                  dtype=torch.bfloat16)


def _fp8_float64(x, w, w_scale, bias):
    """The graph's quantized activations and weights, multiplied and scaled in float64 (no bf16 rounding)."""
    from passforge.kernels.fp8 import quantize_fp8
    from passforge.kernels.ops import fp8_token_scale

    x_scale = fp8_token_scale(x)
    dqx = quantize_fp8(x, x_scale).double() * x_scale.double()
    return torch.nn.functional.linear(dqx, w.double() * w_scale.double(), bias.double())


@pytest.mark.skipif(not cpu_scaled_mm_takes_row_scales(), reason="this PyTorch's CPU _scaled_mm has no row scales")
@pytest.mark.parametrize("tokens", [1, 24])
def test_fp8_scaled_mm_call_on_cpu(tokens):
    """The ``torch._scaled_mm`` call itself — operand layouts, (M, 1) and (1, N) fp32 scales, fused bias, bf16
    out — run by PyTorch's CPU implementation: the graph's e4m3 operands, fp32 sums, one rounding to bf16 and
    the bias add (bound 1 unit of bf16 at the output's scale; measured 0.3%)."""
    from passforge.kernels.ops import fp8_scaled_mm

    x, w, w_scale, bias = _fp8_operands(tokens)
    out = fp8_scaled_mm(x, w, w_scale, bias)
    assert out.shape == (1, tokens, 32) and out.dtype == torch.bfloat16
    expected = _fp8_float64(x, w, w_scale, bias)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2**-7 * expected.abs().max().item())


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="row-wise torch._scaled_mm needs CUDA compute capability 8.9+")
@pytest.mark.parametrize("tokens", [1, 24])
def test_fp8_linear_runs_scaled_mm_on_cuda(tokens):
    """On fp8 tensor cores: the same bound as the CPU call (fp32 accumulation, one rounding to bf16)."""
    from passforge.kernels.ops import backend

    x, w, w_scale, bias = _fp8_operands(tokens, "cuda")
    assert backend("fp8_linear", x, (32, 64)) == "aten._scaled_mm"
    out = torch.ops.passforge.fp8_linear(x, w, w_scale, bias)
    assert out.shape == (1, tokens, 32) and out.dtype == torch.bfloat16
    expected = _fp8_float64(x, w, w_scale, bias)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2**-7 * expected.abs().max().item())


def test_int8_weight_linear_accepts_a_non_contiguous_weight():
    w = torch.randint(-127, 128, (64, 48), dtype=torch.int8).t()  # (48, 64), strided
    x, scales = torch.randn(3, 64), torch.rand(48) / 50
    torch.testing.assert_close(torch.ops.passforge.int8_weight_linear(x, w, scales, None),
                               int8_weight_linear_reference(x, w, scales, None), rtol=1e-4, atol=1e-4)


def _int4_weight(rows: int, cols: int, group_size: int, g: torch.Generator):
    values = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    scales = torch.rand(rows, cols // group_size, generator=g) / 20 + 1e-3
    zero_points = torch.randint(0, 16, scales.shape, generator=g, dtype=torch.int32)
    return pack_int4(values), scales, zero_points


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize(("rows", "cols", "group_size"), [(64, 128, 32), (48, 256, 128), (80, 256, 256)])
def test_int4_weight_linear_on_cpu_matches_the_fake_quant_graph(dtype, bound, rows, cols, group_size):
    """PyTorch's CPU int4 kernel, with the zero points rewritten for its signed-nibble convention, against the
    folded w4 graph's ops in float64. fp32: summation order only. bf16/fp16: the kernel takes the scales and
    (8 - zp) * s rounded to the dtype (so a weight is off by up to ~2^-8 of its group's range in bf16, and
    the error is systematic per group) — 1% of the output scale for bf16 (measured <= 0.55%, vs 0.4% for the
    graph's own bf16 weights), 0.2% for fp16 (measured <= 0.07%)."""
    from passforge.kernels.ops import backend, int4_weight_linear_reference

    g = torch.Generator().manual_seed(0)
    packed, scales, zero_points = _int4_weight(rows, cols, group_size, g)
    x = torch.randn(2, 7, cols, generator=g).to(dtype)  # 14 tokens: full and partial 4-row blocks
    bias = torch.randn(rows, generator=g).to(dtype)
    assert backend("int4_weight_linear", x, (rows, cols), group_size) == "aten._weight_int4pack_mm_for_cpu"
    out = torch.ops.passforge.int4_weight_linear(x, packed, scales, zero_points, group_size, bias)
    expected = int4_weight_linear_reference(x.double(), packed, scales.double(), zero_points, group_size,
                                            bias.double())
    assert out.shape == (2, 7, rows) and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=bound * expected.abs().max().item())


@pytest.mark.parametrize(("rows", "group_size"), [(40, 32), (64, 16)])  # N % 16, a group the CPU kernel lacks
def test_int4_weight_linear_falls_back_to_the_reference(rows, group_size):
    from passforge.kernels.ops import backend, int4_weight_linear_reference

    g = torch.Generator().manual_seed(0)
    packed, scales, zero_points = _int4_weight(rows, 64, group_size, g)
    x = torch.randn(3, 64, generator=g)
    assert backend("int4_weight_linear", x, (rows, 64), group_size) == "reference"
    torch.testing.assert_close(torch.ops.passforge.int4_weight_linear(x, packed, scales, zero_points, group_size, None),
                               int4_weight_linear_reference(x, packed, scales, zero_points, group_size, None),
                               rtol=0, atol=0)


def test_cpu_int4_layout_is_made_once_per_weight_and_again_after_a_write():
    """The CPU tile layout depends on the CPU, so it is derived per process — once, not per call."""
    from passforge.kernels.prepack import cpu_int4_layout

    packed, scales, zero_points = _int4_weight(32, 64, 32, torch.Generator().manual_seed(0))
    first = cpu_int4_layout(packed, scales, zero_points, torch.float32)
    assert cpu_int4_layout(packed, scales, zero_points, torch.float32) is first
    assert cpu_int4_layout(packed, scales, zero_points, torch.bfloat16) is not first  # other dtype, other layout
    assert cpu_int4_layout(packed.clone(), scales, zero_points, torch.float32) is not first  # another weight
    assert cpu_int4_layout(packed, scales.clone(), zero_points, torch.float32) is not first  # other scales
    scales.mul_(2)  # a write: the cached scales-and-zeros are stale
    again = cpu_int4_layout(packed, scales, zero_points, torch.float32)
    torch.testing.assert_close(again[1], first[1] * 2, rtol=0, atol=0)


def test_cpu_paths_work_without_triton(monkeypatch):
    """Where triton is not installed every op runs on CPU, and nothing imports the Triton modules."""
    import sys

    for name in ("triton", "passforge.kernels.int8_gemm", "passforge.kernels.weight_only_gemm"):
        monkeypatch.setitem(sys.modules, name, None)  # importing any of them now raises ImportError
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, generator=g)
    w, scales = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8), torch.rand(32, generator=g)
    packed, group_scales, zero_points = _int4_weight(32, 64, 32, g)
    assert torch.ops.passforge.int8_weight_linear(x, w, scales, None).shape == (2, 32)
    assert torch.ops.passforge.int8_dynamic_linear(x, w, scales, None).shape == (2, 32)
    assert torch.ops.passforge.int8_static_linear(x, 0.02, 1, w, scales, None).shape == (2, 32)
    assert torch.ops.passforge.int4_weight_linear(x, packed, group_scales, zero_points, 32, None).shape == (2, 32)


def test_backend_names_the_implementation():
    from passforge.kernels.ops import backend, onednn_int8_exact

    x = torch.randn(1, 64)
    assert backend("int8_weight_linear", x, (32, 64)) == "aten._weight_int8pack_mm"
    assert backend("int8_weight_linear", x.long(), (32, 64)) == "reference"
    assert backend("int8_dynamic_linear", x, (32, 64)) == "aten._int_mm"
    assert backend("int8_static_linear", x, (32, 64)) == (
        "onednn.qlinear_pointwise" if onednn_int8_exact() else "aten._int_mm"
    )
    assert backend("int8_static_linear", x.half(), (32, 64)) == "aten._int_mm"  # oneDNN writes fp32 / bf16
    assert backend("fp8_linear", x.bfloat16(), (32, 64)) == "reference"
    with pytest.raises(ValueError, match="unknown op 'int3_linear'"):
        backend("int3_linear", x, (32, 64))


def test_scaled_mm_unsupported_says_why():
    from passforge.kernels.ops import scaled_mm_unsupported

    assert "no fp8 GEMM on cpu" in scaled_mm_unsupported(torch.zeros(1, 64, dtype=torch.bfloat16), (32, 64))
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        x = torch.zeros(1, 64, dtype=torch.bfloat16, device="cuda")
        assert scaled_mm_unsupported(x, (32, 64)) is None
        assert "multiples of 16" in scaled_mm_unsupported(x, (40, 64))
        assert "cast(dtype=bf16)" in scaled_mm_unsupported(x.float(), (32, 64))


def _int8_activation_call(op: str, dtype: torch.dtype, zero_point: int, bias: bool) -> tuple[object, tuple]:
    """(op, args) for one int8-activation linear with a bias or not; static: a calibrated range's scale and
    the given zero point."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 24, 64, generator=g) * 3 + 0.5).to(dtype)
    w = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8)
    scales = torch.rand(48, generator=g) / 50
    b = torch.randn(48, generator=g).to(dtype) if bias else None
    if op == "dynamic":
        return torch.ops.passforge.int8_dynamic_linear.default, (x, w, scales, b)
    return torch.ops.passforge.int8_static_linear.default, (x, 0.07, zero_point, w, scales, b)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("op", "zero_point", "static_cpu_path"),
    [("dynamic", 0, INT_MM), ("static", 0, INT_MM), ("static", -9, INT_MM), ("static", 0, ONEDNN),
     ("static", -9, ONEDNN)],
    indirect=["static_cpu_path"],
)
def test_inductor_decompositions_compute_what_the_ops_compute(op, zero_point, dtype, bias, static_cpu_path):
    """The ATen form inductor compiles on CPU equals the op up to fp32 rounding of the scale product: the same
    int8 operands and int32 sums, then ``acc * (s_x * s_w)`` instead of ``acc * s_x * s_w`` — at most one fp32
    ulp apart before the cast, so at most one ulp of the output dtype after it (plus the bias add's rounding)."""
    from passforge.kernels.ops import INDUCTOR_DECOMPOSITIONS

    target, args = _int8_activation_call(op, dtype, zero_point, bias)
    want = target(*args)
    got = INDUCTOR_DECOMPOSITIONS[target](*args)
    assert got.shape == want.shape == (2, 24, 48) and got.dtype == want.dtype == dtype
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=2 * ulp, atol=2 * ulp * want.abs().max().item())


@pytest.mark.parametrize(
    ("op", "zero_point", "static_cpu_path"), [("dynamic", 0, INT_MM), ("static", -9, INT_MM)],
    indirect=["static_cpu_path"],
)
def test_a_wide_layer_runs_its_int8_gemm_in_column_blocks(op, zero_point, monkeypatch, static_cpu_path):
    """A layer wider than ``WIDE_BLOCK`` (an LM head) decomposes into one ``_int_mm`` and epilogue per block of
    output columns, joined by one ``cat``: the same result as the op within the same rounding as one block."""
    from torch.fx.experimental.proxy_tensor import make_fx

    import passforge.kernels.ops as ops

    monkeypatch.setattr(ops, "WIDE_BLOCK", 20)  # 48 columns: blocks of 20, 20 and 8
    target, args = _int8_activation_call(op, torch.float32, zero_point, bias=True)
    want, got = target(*args), ops.INDUCTOR_DECOMPOSITIONS[target](*args)
    torch.testing.assert_close(got, want, rtol=2e-7, atol=2e-7 * want.abs().max().item())
    traced = make_fx(lambda *a: target(*a), decomposition_table=ops.INDUCTOR_DECOMPOSITIONS)(*args)
    names = [str(n.target) for n in traced.graph.nodes if n.op == "call_function"]
    joins = [n for n in traced.graph.nodes if n.target is torch.ops.aten.cat.default and len(n.args[0]) == 3]
    assert names.count("aten._int_mm.default") == 3 and len(joins) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("op", "zero_point", "static_cpu_path"), [("dynamic", 0, INT_MM), ("static", -9, INT_MM)],
    indirect=["static_cpu_path"],
)
def test_the_eager_op_runs_a_wide_layer_in_column_blocks_bit_for_bit(op, zero_point, dtype, monkeypatch,
                                                                        static_cpu_path):
    """Eager too (what the lowering's speed guard times), a layer wider than ``WIDE_BLOCK`` runs one
    ``_int_mm`` per block of output columns, each dequantized into its columns of one output: the same
    elementwise arithmetic as one block, so the same bits."""
    import passforge.kernels.ops as ops

    target, args = _int8_activation_call(op, dtype, zero_point, bias=True)
    whole = target(*args)
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(b.shape[1]) or int_mm(a, b))
    monkeypatch.setattr(ops, "WIDE_BLOCK", 20)  # 48 columns: blocks of 20, 20 and 8
    blocked = target(*args)
    assert calls == [20, 20, 8]
    assert blocked.dtype == dtype and torch.equal(blocked, whole)


@pytest.mark.parametrize(
    ("op", "zero_point", "static_cpu_path"),
    [("dynamic", 0, INT_MM), ("static", 0, INT_MM), ("static", -9, INT_MM)],
    indirect=["static_cpu_path"],
)
def test_inductor_decompositions_trace_to_functional_aten_around_one_int_mm(op, zero_point, static_cpu_path):
    """What inductor receives: one ``_int_mm``, no passforge op left, nothing in place (AOT autograd rejects
    mutations at this stage), and a single multiply on the GEMM's result — two (``acc * s_x * s_w``) is the
    pattern inductor's freezing turns into oneDNN's int8-activation linear, thousands of times slower on CPUs
    without int8 × int8 kernels."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from passforge.kernels.ops import INDUCTOR_DECOMPOSITIONS

    target, args = _int8_activation_call(op, torch.bfloat16, zero_point, bias=False)
    traced = make_fx(lambda *a: target(*a), decomposition_table=INDUCTOR_DECOMPOSITIONS)(*args)
    calls = [n for n in traced.graph.nodes if n.op == "call_function"]
    names = [str(n.target) for n in calls]
    assert names.count("aten._int_mm.default") == 1
    assert not [name for name in names if "passforge" in name]
    # the per-token ranges stay torch's op (bit-exact in every dtype); the rest is plain ATen
    assert [name for name in names if "quantized_decomposed" in name] == (
        ["quantized_decomposed.choose_qparams_per_token_asymmetric.default"] if op == "dynamic" else []
    )
    assert not [n for n in calls if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
    (int_mm,) = [n for n in calls if n.target is torch.ops.aten._int_mm.default]
    epilogue, multiplies = int_mm, 0
    while len(epilogue.users) == 1 and multiplies < 3:  # follow the int32 result to the output's dtype cast
        (epilogue,) = epilogue.users
        multiplies += epilogue.target is torch.ops.aten.mul.Tensor
        if epilogue.target is torch.ops.aten._to_copy.default and epilogue.kwargs.get("dtype") == torch.bfloat16:
            break
    assert multiplies == 1


@pytest.mark.parametrize("static_cpu_path", [ONEDNN], indirect=True)
@pytest.mark.parametrize("zero_point", [0, -9])
def test_the_static_op_reaches_inductor_as_a_uint8_quantizer_and_onednn_linear(zero_point, static_cpu_path):
    """Where oneDNN's int8 linear runs the static op, inductor receives the uint8 quantizer in plain ATen ops
    (fused into the op before it) and one ``passforge::onednn_int8_linear`` (the GEMM with its epilogue, called
    as an extern kernel): no ``_int_mm``, nothing in place, the same bits as the op."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from passforge.kernels.ops import INDUCTOR_DECOMPOSITIONS

    target, args = _int8_activation_call("static", torch.bfloat16, zero_point, bias=True)
    traced = make_fx(lambda *a: target(*a), decomposition_table=INDUCTOR_DECOMPOSITIONS)(*args)
    calls = [n for n in traced.graph.nodes if n.op == "call_function"]
    names = [str(n.target) for n in calls]
    assert names.count("passforge.onednn_int8_linear.default") == 1 and len([n for n in names if "passforge" in n]) == 1
    assert "aten._int_mm.default" not in names
    assert not [n for n in calls if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
    (linear,) = [n for n in calls if n.target is torch.ops.passforge.onednn_int8_linear.default]
    assert linear.args[0].meta["val"].dtype == torch.uint8
    assert torch.equal(traced(*args), target(*args))


@pytest.mark.parametrize("static_cpu_path", [ONEDNN], indirect=True)
def test_the_onednn_path_quantizes_x_to_the_int8_integers_plus_128(static_cpu_path):
    """oneDNN's int8 linear takes uint8 activations: the op's quantizer gives exactly ``quantize_per_tensor``'s
    int8 values plus 128 (ties to even, clamped at both ends), so the integer sums are the ``_int_mm`` path's."""
    from passforge.kernels.ops import quantize_per_tensor_uint8

    scale, zero_point = 0.03125, -3
    for dtype in (torch.float32, torch.bfloat16):
        x = _tie_and_range_probe(dtype, scale, 5, torch.Generator().manual_seed(0))
        x[1, 1] = -6e4  # clamps to -128, i.e. 0
        expected = torch.ops.quantized_decomposed.quantize_per_tensor(x, scale, zero_point, -128, 127, torch.int8)
        q = quantize_per_tensor_uint8(x, scale, zero_point)
        assert q.dtype == torch.uint8 and torch.equal(q.int() - 128, expected.int())
        assert q[1, 0].unique().tolist() == [255] and q[1, 1].unique().tolist() == [0]


@pytest.mark.parametrize("static_cpu_path", [ONEDNN], indirect=True)
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_the_onednn_path_takes_any_rows_and_odd_shapes(rows, static_cpu_path):
    """Decode (one token), no tokens, and K, N that are not multiples of anything: the same result as the
    ``_int_mm`` path (exact sums; the fp32 epilogue may round the scale product differently: 2 ulps)."""
    import passforge.kernels.ops as ops

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, rows, 63, generator=g)
    w = torch.randint(-127, 128, (37, 63), generator=g, dtype=torch.int8)
    scales = torch.rand(37, generator=g) / 50
    out = torch.ops.passforge.int8_static_linear(x, 0.02, 5, w, scales, None)
    qx = ops.quantize_per_tensor_int8(x.reshape(-1, 63), 0.02, 5)
    acc = (qx.int() - 5) @ w.int().t()  # exact int32 sums
    want = (acc.float() * (0.02 * scales)).reshape(1, rows, 37)
    assert out.shape == (1, rows, 37)
    torch.testing.assert_close(out, want, rtol=2 * 2**-23, atol=0)


@pytest.mark.parametrize("static_cpu_path", [INT_MM, ONEDNN], indirect=True)
def test_the_static_op_reads_a_strided_weight_by_its_strides(static_cpu_path):
    """A column-major weight (a transposed copy's transpose) and a column-strided view give the values of their
    contiguous copies: oneDNN's prepack reads storage as row-major, so the weight goes in contiguous."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 32, generator=g)
    w = torch.randint(-127, 128, (24, 32), generator=g, dtype=torch.int8)
    wide = torch.randint(-127, 128, (24, 64), generator=g, dtype=torch.int8)
    scales = torch.rand(24, generator=g) / 50
    for strided in (w.t().contiguous().t(), wide[:, ::2]):
        assert not strided.is_contiguous()
        got = torch.ops.passforge.int8_static_linear(x, 0.02, -3, strided, scales, None)
        want = torch.ops.passforge.int8_static_linear(x, 0.02, -3, strided.contiguous(), scales, None)
        assert torch.equal(got, want)


def test_derived_weights_follow_in_place_writes_and_new_data_and_keep_one_entry():
    """The prepack cache derives again when a weight is written in place or given new ``.data`` (which does not
    bump its version counter), and a new value replaces the old one instead of piling up beside it."""
    from passforge.kernels import prepack

    w = torch.randint(-100, 100, (6, 8), dtype=torch.int8)
    assert torch.equal(prepack.int8_row_sums(w), w.sum(1, dtype=torch.int32))
    w.add_(1)  # in place: a new version
    assert torch.equal(prepack.int8_row_sums(w), w.sum(1, dtype=torch.int32))
    w.data = torch.randint(-100, 100, (6, 8), dtype=torch.int8)  # same tensor, same version, new storage
    assert torch.equal(prepack.int8_row_sums(w), w.sum(1, dtype=torch.int32))
    assert list(prepack._DERIVED[w]) == [("row_sums",)]  # one entry: the stale ones were replaced
