"""``passforge convert``: ONNX in, pipeline under the verifier, ONNX out (written atomically, the input never
touched); usage errors exit 2 with a pointed message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from passforge.tools.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main

onnx = pytest.importorskip("onnx", reason="convert needs onnx (pip install 'passforge[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="the output is checked in onnxruntime")
pytest.importorskip("onnx_graphsurgeon", reason="ONNX import needs onnx-graphsurgeon")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _mlp(path: Path, *, op: str = "Relu") -> Path:
    """``relu(x @ w1 + b1) @ w2`` with a symbolic batch: a graph as exporters write it."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((16, 32)), "b1": rng.standard_normal(32), "w2": rng.standard_normal((32, 8))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node(op, ["hb"], ["a"]), helper.make_node("MatMul", ["a", "w2"], ["y"])]  # fmt: skip
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)  # onnx's default
    path.write_bytes(model.SerializeToString())  # IR version may be newer than an installed ORT reads (1.30: 13)
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_convert_quantizes_and_writes_onnx(tmp_path, capsys):
    model = _mlp(tmp_path / "mlp.onnx")
    before = model.read_bytes()
    out = tmp_path / "out" / "mlp-w8.onnx"
    out.parent.mkdir()
    assert main(["convert", str(model), "--pipeline", "cleanup,quantize(skip='')", "-o", str(out)]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "quantize" in printed and f"wrote {out}" in printed
    assert model.read_bytes() == before
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert ops.count("DequantizeLinear") == 2  # both linears, weight-only int8
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)  # another batch size: still dynamic
    expected, actual = _run(model, x), _run(out, x)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=0.02 * np.abs(expected).max())  # int8 weights


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pipeline", "cleanup,cats", "-o", "{dir}/out.onnx"], "did you mean 'cast'?"),
        (["--pipeline", "cleanup", "-o", "{model}"], "is the input model; the input is never overwritten"),
        (["--pipeline", "cleanup", "-o", "{dir}"], "is a folder"),
        (["--pipeline", "cleanup", "-o", "{dir}/out.onnx", "--attention", "onnx", "--opset", "21"],
         "needs --opset 23 or newer"),
    ],
)
def test_convert_usage_errors_exit_2(tmp_path, capsys, args, message):
    model = _mlp(tmp_path / "mlp.onnx")
    argv = ["convert", str(model), *(a.format(dir=tmp_path, model=model) for a in args)]
    assert main(argv) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_convert_with_the_attention_op_writes_opset_23(tmp_path):
    """``--attention onnx`` raises the default opset to 23, where ONNX's Attention op lives (the model has no
    attention to fuse: tests/ir/test_onnx_attention.py checks the op itself)."""
    model, out = _mlp(tmp_path / "mlp.onnx"), tmp_path / "mlp-23.onnx"
    assert main(["convert", str(model), "--pipeline", "cleanup", "-o", str(out), "--attention", "onnx"]) == EXIT_OK
    assert [(o.domain, o.version) for o in onnx.load(str(out)).opset_import] == [("", 23)]
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(model, x), rtol=0, atol=1e-5)


def test_an_opset_the_exporter_cannot_write_fails_and_writes_nothing(tmp_path, capsys):
    model, out = _mlp(tmp_path / "mlp.onnx"), tmp_path / "mlp-30.onnx"
    assert main(["convert", str(model), "--pipeline", "cleanup", "-o", str(out), "--opset", "30"]) == EXIT_FAILURE
    assert "asked for opset 30, but the exporter can only write opset" in capsys.readouterr().err
    assert not out.exists()


def test_convert_unknown_op_is_a_usage_error(tmp_path, capsys):
    model = _mlp(tmp_path / "odd.onnx", op="Hardmax")
    assert main(["convert", str(model), "--pipeline", "cleanup", "-o", str(tmp_path / "out.onnx")]) == EXIT_USAGE
    assert "cannot import: Hardmax ×1" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_optimize_reads_onnx(tmp_path):
    """``passforge.optimize`` takes an .onnx path (the registry resolves it; the graph keeps the batch dynamic)."""
    from passforge.api import optimize

    optimized = optimize(_mlp(tmp_path / "mlp.onnx"), pipeline="cleanup", profile=False, generation=False)
    assert optimized.source.onnx_path == tmp_path / "mlp.onnx" and not optimized.source.is_lm
    x = torch.randn(3, 16)
    expected = torch.from_numpy(_run(tmp_path / "mlp.onnx", x.numpy()))
    torch.testing.assert_close(optimized(x), expected, rtol=1e-5, atol=1e-5)


def test_optimize_takes_the_callers_example_inputs_for_a_file(tmp_path):
    from passforge.api import optimize

    x = torch.randn(7, 16)
    optimized = optimize(_mlp(tmp_path / "mlp.onnx"), (x,), pipeline="cleanup", profile=False, generation=False)
    assert optimized.example_inputs[0] is x
