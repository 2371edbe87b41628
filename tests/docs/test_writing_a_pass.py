"""The pass in docs/writing-a-pass.md works as printed: structure, numerics, counts and negatives."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from passforge.ir.capture import capture
from passforge.ir.graph import count_calls
from passforge.passes.base import Context
from passforge.passes.hooks import VerifyHook
from passforge.passes.manager import PassManager
from passforge.passes.spec import SpecError, parse_pipeline

DOC = Path(__file__).resolve().parents[2] / "docs" / "writing-a-pass.md"
aten = torch.ops.aten


@pytest.fixture(scope="module")
def doc_pass() -> type:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S).group(1)
    assert 25 <= len(code.strip().splitlines()) <= 45  # "a complete ~30-line pass"
    module = types.ModuleType("writing_a_pass_doc")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    return module.DivToMul


class _Scaled(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x / 8.0 + x / 0.5 + x / y  # two constant divisors, one tensor divisor


def test_doc_pass_rewrites_constant_divisions(doc_pass):
    x, y = torch.randn(4, 4), torch.rand(4, 4) + 1
    gm = capture(_Scaled(), (x, y))
    result = PassManager(parse_pipeline("div-to-mul"), hooks=[VerifyHook()]).run(gm, Context(example_inputs=(x, y)))
    out = result.graph
    assert result.records[0].stats == {"rewritten": 2}
    assert count_calls(out, aten.div.Tensor) == 1  # x / y: a tensor divisor is not a constant, left alone
    assert count_calls(out, aten.mul.Tensor) == 2
    torch.testing.assert_close(out(x, y), _Scaled()(x, y), rtol=1e-6, atol=1e-7)
    again = PassManager(parse_pipeline("div-to-mul")).run(out, Context())
    assert again.records[0].modified is False


def test_doc_pass_option_and_spec_errors(doc_pass):
    x, y = torch.randn(4), torch.rand(4) + 1
    gm = capture(_Scaled(), (x, y))
    out = PassManager(parse_pipeline("div-to-mul(min_abs=2)")).run(gm, Context()).graph
    assert count_calls(out, aten.div.Tensor) == 2  # 0.5 is below min_abs: kept
    with pytest.raises(SpecError, match="did you mean 'min_abs'"):
        parse_pipeline("div-to-mul(min_ab=2)")
