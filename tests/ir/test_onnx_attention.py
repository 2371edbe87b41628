"""``export_onnx(attention=...)``: fused attention as ONNX's ``Attention`` op (opset 23) or ONNX Runtime's
``com.microsoft.GroupQueryAttention``, checked by structure (one fused node per call, no Softmax left, the
attributes that carry the rules), by numerics against passforge's own op in ONNX Runtime (fp32: measured
<= 5e-7 on outputs of scale ~1, so 1e-5 is float reassociation with room) and in onnx's reference evaluator,
and by the fallback: a call a form cannot express is decomposed, exactly, with a warning saying why.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import passforge.kernels.ops  # noqa: F401 - registers passforge::attention
from passforge.ir.capture import capture
from passforge.ir.onnx_export import OnnxExportError, export_onnx
from passforge.models import llama
from passforge.passes.base import Context
from passforge.passes.manager import PassManager
from tests.conftest import SMALL

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install 'passforge[onnx]')")
reference = pytest.importorskip("onnx.reference", reason="the reference checks run onnx's reference evaluator")
ort = pytest.importorskip("onnxruntime", reason="the ONNX tests run models in onnxruntime")
pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install 'passforge[onnx]')")

FUSED = {"onnx": "Attention", "ort-gqa": "GroupQueryAttention"}
ATOL = 1e-5


class _Attend(torch.nn.Module):
    """One ``passforge::attention`` call on (q, k, v[, mask]) inputs, followed by the usual head merge."""

    def __init__(self, **options: object) -> None:
        super().__init__()
        self.options = options

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *mask: torch.Tensor) -> torch.Tensor:
        y = torch.ops.passforge.attention(q, k, v, *mask, **self.options)  # (B, Hq, Tq, Dv)
        return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)  # (B, Tq, Hq·Dv)


def _operands(tq: int = 6, tk: int = 6, dv: int = 8, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """q (2, 4, Tq, 8), k (2, 2, Tk, 8), v (2, 2, Tk, Dv): two query heads per kv head."""
    g = torch.Generator().manual_seed(0)
    shapes = ((2, 4, tq, 8), (2, 2, tk, 8), (2, 2, tk, dv))
    return tuple(torch.randn(*shape, generator=g).to(dtype) for shape in shapes)


def _bool_mask() -> torch.Tensor:
    keep = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(3)) > 0.4
    keep[0, 0, 2] = False  # a query with no key: zeros, in passforge and in both forms
    return keep


def _additive_mask() -> torch.Tensor:
    bias = torch.where(torch.rand(1, 1, 1, 6, generator=torch.Generator().manual_seed(4)) > 0.3, 0.5, -math.inf)
    bias[..., 0] = 0.1
    return bias  # broadcast along queries: ONNX Runtime wants that dim spelled out (an Expand)


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def _attributes(model: onnx.ModelProto, op_type: str) -> dict[str, object]:
    node = next(node for node in model.graph.node if node.op_type == op_type)
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _run_ort(path: object, *inputs: torch.Tensor) -> torch.Tensor:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [arg.name for arg in session.get_inputs()]
    return torch.from_numpy(session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})[0])


CASES = {  # id: (form, options, operands, mask, attributes the fused node must carry)
    "onnx-causal": ("onnx", {"causal": True}, {}, None, {"is_causal": 1}),
    "onnx-causal-3x6": ("onnx", {"causal": True}, {"tq": 3}, None, {"is_causal": 0}),  # bottom-right: a mask
    "onnx-bidirectional-window": ("onnx", {"window": 2, "scale": 0.25}, {"dv": 16}, None, {"scale": 0.25}),
    "onnx-bool-mask-window": ("onnx", {"causal": True, "window": 3}, {}, _bool_mask, {"is_causal": 0}),
    "onnx-additive-mask": ("onnx", {"causal": True}, {}, _additive_mask, {"is_causal": 1}),
    "gqa-causal": ("ort-gqa", {"causal": True}, {}, None, {"num_heads": 4, "kv_num_heads": 2}),
    "gqa-window": ("ort-gqa", {"causal": True, "window": 3}, {}, None, {"local_window_size": 3}),
    "gqa-window-sinks": ("ort-gqa", {"causal": True, "window": 3, "sinks": 1}, {}, None, {}),
    "gqa-bool-mask": ("ort-gqa", {}, {}, _bool_mask, {"causal": 0}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_call_becomes_one_fused_node_and_matches(tmp_path, case):
    form, options, operands, mask, attributes = CASES[case]
    inputs = _operands(**operands) + (() if mask is None else (mask(),))
    gm = capture(_Attend(**options), inputs)
    model = onnx.load(str(export_onnx(gm, tmp_path / "a.onnx", inputs, attention=form)))
    ops = _ops(model)
    assert ops[FUSED[form]] == 1 and ops["Softmax"] == 0
    assert attributes.items() <= _attributes(model, FUSED[form]).items()
    if form == "onnx":
        assert model.opset_import[0].version == 23
    torch.testing.assert_close(_run_ort(tmp_path / "a.onnx", *inputs), gm(*inputs), rtol=0, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_op_in_the_reference_evaluator(tmp_path, dtype):
    """The spec's own reading of the node (ORT's CPU build has no bf16 kernels). Bound for bf16: 2 bf16 ulps
    at the output's scale (passforge's CPU op and the evaluator round in a different order; measured 1 ulp)."""
    inputs = (*_operands(dtype=dtype), _bool_mask())
    gm = capture(_Attend(causal=True, window=3, sinks=1), inputs)
    model = onnx.load(str(export_onnx(gm, tmp_path / "a.onnx", inputs, attention="onnx")))
    import ml_dtypes  # onnx's own dependency: numpy's bfloat16

    numpy_inputs = [t.float().numpy().astype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
                    for t in inputs]  # fmt: skip
    feeds = {i.name: array for i, array in zip(model.graph.input, numpy_inputs)}
    out = torch.from_numpy(reference.ReferenceEvaluator(model).run(None, feeds)[0].astype("float32"))
    expected = gm(*inputs).float()
    ulp = torch.finfo(torch.bfloat16).eps * 2 ** math.floor(math.log2(expected.abs().max().item()))
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL if dtype == torch.float32 else 2 * ulp)


def test_llama_prefill_fuses_every_layer(small_llama, tokens, tmp_path):
    gm = PassManager.parse("fuse-attention").run(capture(small_llama, (tokens,)), Context((tokens,))).graph
    model = onnx.load(str(export_onnx(gm, tmp_path / "m.onnx", (tokens,), attention="onnx")))
    ops = _ops(model)
    assert ops["Attention"] == SMALL.n_layers and ops["Softmax"] == 0
    with torch.inference_mode():
        torch.testing.assert_close(_run_ort(tmp_path / "m.onnx", tokens), gm(tokens), rtol=0, atol=ATOL)


def test_decode_step_falls_back_with_a_warning(small_llama, tokens, tmp_path):
    """One query against the whole static cache, windowed by the runtime mask ``arange(S) <= pos``:
    GroupQueryAttention, without a past cache, takes as many keys as queries, so each call is decomposed —
    exact, and said so. (``Attention`` takes such a call: onnx-bool-mask-window, a mask Expanded to its
    query rows.)"""
    with torch.inference_mode():
        _, k_cache, v_cache = small_llama.prefill(tokens)
    step = (tokens[:, -1:], torch.tensor([tokens.shape[1]]), k_cache.clone(), v_cache.clone())
    gm = PassManager.parse("fuse-attention").run(capture(llama.DecodeStep(small_llama), step), Context(step)).graph
    with pytest.warns(UserWarning, match=r"2 passforge::attention call\(s\) could not be written as "
                                         r"attention='ort-gqa'(.|\n)*1 query against 64 keys"):  # fmt: skip
        model = onnx.load(str(export_onnx(gm, tmp_path / "d.onnx", step, attention="ort-gqa")))
    assert _ops(model)["GroupQueryAttention"] == 0 and _ops(model)["Softmax"] == SMALL.n_layers
    with torch.inference_mode():
        torch.testing.assert_close(_run_ort(tmp_path / "d.onnx", *step), gm(*step)[0], rtol=0, atol=ATOL)


class _SelfAttend(torch.nn.Module):
    """q, k, v projected from one input, so a dynamic sequence is one dim of the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([32, 16, 16], dim=-1)
        q = q.view(b, t, 4, 8).transpose(1, 2)  # (B, 4, T, 8)
        k, v = (y.view(b, t, 2, 8).transpose(1, 2) for y in (k, v))  # (B, 2, T, 8)
        return torch.ops.passforge.attention(q, k, v, causal=True).transpose(1, 2).reshape(b, t, 32)


def test_attention_op_keeps_a_causal_sequence_dynamic(tmp_path):
    """Plain causal attention needs no rule matrix, so the file keeps T symbolic (the decomposition cannot)."""
    gm = capture(_SelfAttend().eval(), (torch.randn(1, 8, 32),), dynamic_shapes=({1: torch.export.Dim("T", max=64)},))
    path = export_onnx(gm, tmp_path / "dyn.onnx", attention="onnx")
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[1].dim_param
    for length in (5, 13):
        x = torch.randn(1, length, 32)
        torch.testing.assert_close(_run_ort(path, x), gm(x), rtol=0, atol=ATOL)


def test_attention_form_and_opset_are_checked_before_any_work(tmp_path):
    inputs = _operands()
    gm = capture(_Attend(causal=True), inputs)
    with pytest.raises(OnnxExportError, match=r"attention='onnx' writes ONNX's Attention op, which needs opset >= 23"):
        export_onnx(gm, tmp_path / "a.onnx", inputs, attention="onnx", opset=21)
    with pytest.raises(OnnxExportError, match=r"attention='flash' is not a form; choose one of 'decompose'"):
        export_onnx(gm, tmp_path / "a.onnx", inputs, attention="flash")
    assert not (tmp_path / "a.onnx").exists()
