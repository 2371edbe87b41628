from __future__ import annotations

import pytest
import torch

from passforge.kernels.ops import int8_weight_linear_reference, pack_int4


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
    assert torch.ops.passforge.int4_weight_linear(x, packed, group_scales, zero_points, 32, None).shape == (2, 32)


def test_backend_names_the_implementation():
    from passforge.kernels.ops import backend

    x = torch.randn(1, 64)
    assert backend("int8_weight_linear", x, (32, 64)) == "aten._weight_int8pack_mm"
    assert backend("int8_weight_linear", x.long(), (32, 64)) == "reference"
    assert backend("int8_dynamic_linear", x, (32, 64)) == "aten._int_mm"
    with pytest.raises(ValueError, match="unknown op 'int3_linear'"):
        backend("int3_linear", x, (32, 64))
