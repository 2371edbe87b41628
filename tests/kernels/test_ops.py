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
