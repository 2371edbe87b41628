"""Hostile and malformed inputs (issue 7): each gets a clear error — through the CLI one ``passforge: error:``
(exit 2) or ``passforge: failed:`` (exit 1) line, never a traceback — and no user file changes. Items already
covered elsewhere are listed in docs/reliability.md with their tests; this file adds the rest.

Small on purpose: tiny modules, the 2-linear ONNX MLP of ``test_convert``, no bundled-LM runs.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

import passforge
from passforge.ir.capture import CaptureError, capture
from passforge.ir.serialize import load_graph, save_graph
from passforge.models.registry import ModelError
from passforge.passes.manager import PassFailure
from passforge.passes.spec import MAX_SPEC_CHARS, parse_pipeline
from passforge.tools.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main

onnx = pytest.importorskip("onnx", reason="the file tests read and write ONNX (pip install 'passforge[onnx]')")
pytest.importorskip("onnxruntime", reason="ONNX import folds constants with onnxruntime")
pytest.importorskip("onnx_graphsurgeon", reason="ONNX import needs onnx-graphsurgeon")

from onnx import TensorProto, helper  # noqa: E402

from tests.conftest import Tripwire  # noqa: E402
from tests.tools.test_convert import _mlp  # noqa: E402 - the 2-linear ONNX model convert's tests use


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.l(x))


def _quick(model: torch.nn.Module, inputs: tuple[object, ...], pipeline: str = "cleanup,cast(dtype=bf16)"):
    return passforge.optimize(model, inputs, pipeline=pipeline, profile=False, generation=False)


def _one_error_line(err: str, kind: str) -> str:
    """The CLI's message: one ``passforge: <kind>:`` line (the spec's caret lines may follow), no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("passforge:")]
    assert len(lines) == 1 and lines[0].startswith(f"passforge: {kind}:"), err
    return err


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------- pipeline specs

HUGE = "cleanup," * 131_072  # 1 MiB


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cleanup,cast(dtpe=bf16)", "no option 'dtpe'; did you mean 'dtype'?"),
        ("cast(dtype=int3)", "'int3' is not one of bf16, fp16"),
        ("", "empty pipeline"),
        (HUGE, f"the limit is {MAX_SPEC_CHARS}"),
        ("cleanup," * 10_000 + "cleanup", f"the limit is {MAX_SPEC_CHARS}"),  # 10k passes
        ("cast" + "(" * 5_000, "expected an option name, found '('"),  # nesting: no recursion to exhaust
    ],
    ids=["bad-option", "bad-value", "empty", "1MiB", "10k-passes", "5k-parens"],
)
def test_bad_specs_exit_2_before_reading_the_model(tmp_path, capsys, monkeypatch, spec, message):
    model = _mlp(tmp_path / "mlp.onnx")
    before = _tree(tmp_path)
    monkeypatch.setattr("passforge.api.optimize", lambda *a, **k: pytest.fail("the model was read"))
    assert main(["convert", str(model), "--pipeline", spec, "-o", str(tmp_path / "out.onnx")]) == EXIT_USAGE
    err = _one_error_line(capsys.readouterr().err, "error")
    assert message in err and len(err) < 1_000  # a huge spec is shown cut short
    assert _tree(tmp_path) == before


def test_the_longest_spec_under_the_limit_parses_without_recursion():
    spec = ",".join(["cast"] * 2_000)  # 9,999 characters
    assert len(spec) <= MAX_SPEC_CHARS and len(parse_pipeline(spec)) == 2_000


# -------------------------------------------------------------------------------------------------------- models


class _DataDependent(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


class _NumpyRoundTrip(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy() * 2)


@pytest.mark.parametrize(
    ("model", "inputs", "message"),
    [
        (_DataDependent(), (torch.randn(3),), "data-dependent control flow"),
        (_NumpyRoundTrip(), (torch.randn(3),), "an operation the exporter does not support"),
        (_Linear(), (torch.randn(2, 5),), "the example inputs do not fit the model"),  # wrong shape
        (_Linear(), (torch.randn(2, 8), torch.randn(2, 8)), "the example inputs do not fit the model"),  # count
        (_Linear(), (torch.arange(16).view(2, 8),), "does not run on its example inputs"),  # int64 into a linear
    ],
    ids=["data-dependent", "numpy", "wrong-shape", "wrong-count", "wrong-dtype"],
)
def test_untraceable_models_and_mismatched_inputs_are_capture_errors(capfd, model, inputs, message):
    with pytest.raises(CaptureError, match=message) as info:
        _quick(model, inputs)
    assert "try:" in str(info.value)  # what to do
    err = capfd.readouterr().err
    assert "Traceback" not in err and "def forward" not in err  # torch's partial graph and logged tracebacks


@pytest.mark.parametrize(
    "error",
    [MemoryError(), torch.OutOfMemoryError("CUDA out of memory"),
     RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes")],
    ids=["MemoryError", "cuda-oom", "cpu-allocator"],
)
def test_running_out_of_memory_on_the_example_inputs_is_not_blamed_on_them(error):
    """The reference run before any pass: an allocation failure says memory and what to shrink, not that the
    inputs do not fit the model (the message every other failure there gets)."""
    from passforge.ir.capture import check_reference_run

    class Allocates(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise error

    with pytest.raises(CaptureError, match="ran out of memory") as info:
        check_reference_run(Allocates(), (torch.randn(2),), "model")
    assert "try: shorter example inputs" in str(info.value) and "dtypes and shapes" not in str(info.value)


def test_data_dependent_output_shapes_are_not_blamed_on_a_pass():
    """``nonzero`` has an output size known only at run time (an unbacked symbol)."""

    class NonZero(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nonzero(x)

    x = torch.tensor([0.0, 1.0, 0.0, 2.0])
    optimized = _quick(NonZero(), (x,), pipeline="cleanup")
    assert optimized.report["passes"][0]["status"] == "ok"
    torch.testing.assert_close(optimized(x), torch.nonzero(x))


class _IntegerOnly(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.arange(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 3 + self.offset) // 2


@pytest.mark.parametrize("pipeline", ["cleanup,cast(dtype=bf16)", "quantize(skip=''),fold-quant"])
def test_integer_only_graphs_pass_through_float_passes_unchanged(pipeline):
    x = torch.arange(4)
    optimized = _quick(_IntegerOnly(), (x,), pipeline=pipeline)
    assert {row["status"] for row in optimized.report["passes"]} == {"ok"}
    assert torch.equal(optimized(x), (x * 3 + torch.arange(4)) // 2)


def test_zero_size_inputs_optimize_save_and_load(tmp_path):
    model, empty = _Linear(), torch.randn(0, 8)
    optimized = _quick(model, (empty,), pipeline="cleanup,quantize(skip=''),fold-quant")
    assert {row["status"] for row in optimized.report["passes"]} == {"ok"}
    assert optimized(empty).shape == (0, 8)
    assert passforge.load(optimized.save(tmp_path / "out"))(empty).shape == (0, 8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_named_not_blamed_on_a_pass(bad):
    model = _Linear()
    with torch.no_grad():
        model.l.weight[0, 0] = bad  # one +inf alone gives an inf output, not a NaN: the parameter check names it
    before = model.l.weight.clone()
    with pytest.raises(ModelError, match=r"parameters holding NaN/Inf: l\.weight; fix the checkpoint"):
        _quick(model, (torch.ones(2, 8),))
    assert torch.equal(model.l.weight.isnan(), before.isnan()) and model.l.weight.isinf().sum() == before.isinf().sum()


def test_a_nan_output_from_a_buffer_is_named_before_any_pass():
    """Buffers may hold -inf on purpose (masks): a NaN they cause is caught on the outputs instead."""
    model = _Linear()
    model.register_buffer("shift", torch.tensor(float("nan")))
    model.forward = lambda x: model.l(x) + model.shift  # type: ignore[method-assign]
    with pytest.raises(ModelError, match=r"output 0 is NaN on the example inputs before any pass \(weights holding "
                                         r"NaN/Inf: shift\)"):
        _quick(model, (torch.ones(2, 8),))


# --------------------------------------------------------------------------------------------- pickles disguised


def _saved_linear(path: Path) -> Path:
    model = _Linear()
    x = torch.randn(2, 8)
    save_graph(capture(model, (x,)), path, (x,))
    return path


def _with_entry(src: Path, dst: Path, suffix: str, data: bytes) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, data if name.endswith(suffix) else zin.read(name))
    return dst


def _pickled(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "payload": Tripwire(marker)}, buffer)
    return buffer.getvalue()


def test_a_torch_save_checkpoint_named_pt2_is_refused_unread(tmp_path, capsys):
    marker = tmp_path / "unpickled"
    (tmp_path / "model.pt2").write_bytes(_pickled(marker))
    code = main(["optimize", str(tmp_path / "model.pt2"), "--pipeline", "cleanup", "--out", str(tmp_path / "out")])
    assert code == EXIT_FAILURE
    assert "is a torch.save checkpoint (a pickle" in _one_error_line(capsys.readouterr().err, "failed")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_pickled_sample_input_inside_a_real_archive_is_refused_unread(tmp_path):
    """torch.export.load retries a sample-inputs entry that fails ``weights_only`` loading with the full
    unpickler; passforge refuses the archive first."""
    marker = tmp_path / "unpickled"
    good = _saved_linear(tmp_path / "good.pt2")
    evil = _with_entry(good, tmp_path / "evil.pt2", "sample_inputs/model.pt", _pickled(marker))
    with pytest.raises(CaptureError, match=r"sample_inputs/model\.pt' is a pickled object"):
        load_graph(evil)
    assert not marker.exists()
    load_graph(good)  # the untouched archive loads


def _gpt2_folder(folder: Path) -> Path:
    """A Hugging Face folder with a one-layer GPT-2 config and no weights yet."""
    folder.mkdir()
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 1, "n_embd": 8, "n_head": 2,
              "vocab_size": 32, "n_positions": 16}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("content", ["pickle", "truncated", "empty"])
def test_bad_safetensors_in_a_hugging_face_folder_are_a_clear_failure(tmp_path, capsys, content):
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    folder = _gpt2_folder(tmp_path / "hf")
    marker = tmp_path / "unpickled"
    weights = folder / "model.safetensors"
    if content == "pickle":
        weights.write_bytes(pickle.dumps(Tripwire(marker)))
    else:
        save_file({"transformer.wte.weight": torch.zeros(32, 8)}, weights)
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2] if content == "truncated" else b"")
    before = _tree(folder)
    code = main(["optimize", str(folder), "--pipeline", "cleanup", "--out", str(tmp_path / "out"), "--seq-len", "8"])
    assert code == EXIT_FAILURE
    assert "a *.safetensors weights file is not readable" in _one_error_line(capsys.readouterr().err, "failed")
    assert not marker.exists() and _tree(folder) == before


@pytest.mark.parametrize("escape", ["index-dotdot", "index-absolute", "link"])
def test_hugging_face_weights_outside_the_folder_are_refused_unread(tmp_path, capsys, escape):
    """A crafted shard index (or a linked weights file) must not make loading read a file elsewhere."""
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.safetensors"
    save_file({"transformer.wte.weight": torch.full((32, 8), 7.0)}, secret)
    folder = _gpt2_folder(tmp_path / "hf")
    if escape == "link":
        (folder / "model.safetensors").symlink_to(secret)
    else:
        save_file({"unused": torch.zeros(1)}, folder / "model-00001-of-00001.safetensors")
        shard = "../outside/secret.safetensors" if escape == "index-dotdot" else str(secret)
        index = {"metadata": {}, "weight_map": {"transformer.wte.weight": shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code = main(["optimize", str(folder), "--pipeline", "cleanup", "--out", str(tmp_path / "out"), "--seq-len", "8"])
    assert code == EXIT_FAILURE
    assert "outside the model folder" in _one_error_line(capsys.readouterr().err, "failed")
    assert not (tmp_path / "out").exists()


def test_replay_refuses_pickled_inputs_unread(tmp_path, capsys):
    repro = tmp_path / "repro"
    repro.mkdir()
    (repro / "spec.txt").write_text("cleanup\n")
    _saved_linear(repro / "graph.pt2")
    marker = tmp_path / "unpickled"
    (repro / "inputs.safetensors").write_bytes(pickle.dumps(Tripwire(marker)))
    assert main(["replay", str(repro)]) == EXIT_FAILURE
    assert "inputs.safetensors: not a readable safetensors file" in _one_error_line(capsys.readouterr().err, "failed")
    assert not marker.exists()
    assert main(["replay", str(tmp_path / "nowhere")]) == EXIT_FAILURE
    assert "not a reproducer folder (no spec.txt)" in _one_error_line(capsys.readouterr().err, "failed")


# ------------------------------------------------------------------------------------------------- ONNX files


@pytest.mark.parametrize("damage", ["truncated", "empty", "junk"])
def test_truncated_or_corrupt_onnx_is_a_usage_error(tmp_path, capsys, damage):
    data = _mlp(tmp_path / "mlp.onnx").read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "empty": b"", "junk": bytes(range(256)) * 8}[damage]
    path = tmp_path / "bad.onnx"
    path.write_bytes(damaged)
    assert main(["convert", str(path), "--pipeline", "cleanup", "-o", str(tmp_path / "out.onnx")]) == EXIT_USAGE
    assert "not an ONNX model" in _one_error_line(capsys.readouterr().err, "error")
    assert path.read_bytes() == damaged and not (tmp_path / "out.onnx").exists()


def _external(folder: Path, location: str) -> Path:
    """``y = x @ w``, ``w`` (4×3 float) in external data at ``location``."""
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 3], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "48")):
        tensor.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [tensor],
    )  # fmt: skip
    path = folder / "model.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)  # onnx's default
    path.write_bytes(model.SerializeToString())  # IR version may be newer than an installed ORT reads (1.30: 13)
    return path


@pytest.mark.parametrize("link", ["file", "folder"])
def test_external_data_through_a_symlink_out_of_the_folder_is_refused(tmp_path, capsys, link):
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(bytes(range(48)))
    folder = tmp_path / "model"
    folder.mkdir()
    if link == "file":
        (folder / "weights.bin").symlink_to(secret)
        path = _external(folder, "weights.bin")
    else:
        (folder / "data").symlink_to(secret.parent, target_is_directory=True)
        path = _external(folder, "data/secret.bin")
    assert main(["convert", str(path), "--pipeline", "cleanup", "-o", str(tmp_path / "out.onnx")]) == EXIT_USAGE
    assert "leads outside the model's folder" in _one_error_line(capsys.readouterr().err, "error")
    assert secret.read_bytes() == bytes(range(48)) and not (tmp_path / "out.onnx").exists()


def test_output_over_the_input_models_external_data_is_refused(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(torch.randn(4, 3).numpy().tobytes())
    path = _external(tmp_path, "weights.bin")
    before = _tree(tmp_path)
    code = main(["convert", str(path), "--pipeline", "cleanup", "-o", str(tmp_path / "weights.bin")])
    assert code == EXIT_USAGE
    assert "holds the input model's weights" in _one_error_line(capsys.readouterr().err, "error")
    assert _tree(tmp_path) == before


def test_large_model_path_writes_external_data_that_imports_back(tmp_path, monkeypatch):
    """The >2 GiB path, without 2 GiB: the size thresholds of export (weights to a data file) and import
    (skip ONNX shape inference, which serializes the model) are lowered to a few bytes."""
    import passforge.ir.onnx_export as onnx_export
    import passforge.ir.onnx_import as onnx_import

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 64)
    monkeypatch.setattr(onnx_import, "SHAPE_INFERENCE_LIMIT_BYTES", 64)
    inferred = []
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", lambda *a, **k: inferred.append(1) or a[0])
    model, x = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU()).eval(), torch.randn(2, 8)
    gm = capture(model, (x,))
    path = onnx_export.export_onnx(gm, tmp_path / "big.onnx", (x,))  # external_data=None: decided by size
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[0] == "big.onnx" and len(files) == 2 and files[1].startswith("big.onnx.")
    stored = onnx.load(str(path), load_external_data=False)
    external = {t.name for t in stored.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert len(external) == 1 and (tmp_path / files[1]).stat().st_size == 32 * 8 * 4  # the weight (bias: inline)
    before = _tree(tmp_path)
    imported = onnx_import.import_onnx(path, (x,), dynamic=False)
    torch.testing.assert_close(imported(x), model(x), rtol=1e-6, atol=1e-6)
    assert not inferred and _tree(tmp_path) == before  # shape inference skipped; nothing written


# ------------------------------------------------------------------------------------------------- output paths


def test_out_folder_holding_the_input_model_is_refused_before_work(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "out"
    optimized = _quick(_Linear(), (torch.randn(2, 8),), pipeline="cleanup")
    optimized.save(folder)
    before = _tree(folder)
    monkeypatch.setattr(passforge.api, "optimize", lambda *a, **k: pytest.fail("work started"))
    for out in (folder, folder / "model.pt2"):  # the folder holding the input, and the input file itself
        assert main(["optimize", str(folder / "model.pt2"), "--pipeline", "cleanup", "--out", str(out)]) == EXIT_USAGE
        err = _one_error_line(capsys.readouterr().err, "error")
        assert "contains the input model" in err or "exists and is not a folder" in err
    assert _tree(folder) == before


def test_output_under_a_regular_file_is_refused_before_work(tmp_path, capsys, monkeypatch):
    model = _mlp(tmp_path / "mlp.onnx")
    monkeypatch.setattr(passforge.api, "optimize", lambda *a, **k: pytest.fail("work started"))
    argv = ["convert", str(model), "--pipeline", "cleanup", "-o", str(tmp_path / "mlp.onnx" / "out.onnx")]
    assert main(argv) == EXIT_USAGE
    assert "is a file, not a folder" in _one_error_line(capsys.readouterr().err, "error")
    assert main(["optimize", str(model), "--pipeline", "cleanup", "--out", str(tmp_path / "mlp.onnx" / "o")]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys.readouterr().err, "error")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only folders, so chmod cannot make one unwritable; "
                           "test_output_under_a_regular_file_is_refused_before_work covers the check")
def test_read_only_output_folder_is_refused_before_work(tmp_path, capsys):
    model = _mlp(tmp_path / "mlp.onnx")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        argv = ["convert", str(model), "--pipeline", "cleanup", "-o", str(locked / "out.onnx")]
        assert main(argv) == EXIT_USAGE
        assert "cannot write into" in _one_error_line(capsys.readouterr().err, "error")
    finally:
        locked.chmod(0o755)


def _half_then_enospc(real):
    """Wrap a writer ``real(obj, path, ...)``: it writes, the file is cut to half, then the disk is 'full'."""

    def write(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return write


def test_disk_full_mid_onnx_write_keeps_the_old_output(tmp_path, capsys, monkeypatch):
    from onnxscript import ir

    model, out = _mlp(tmp_path / "mlp.onnx"), tmp_path / "out.onnx"
    argv = ["convert", str(model), "--pipeline", "cleanup", "-o", str(out)]
    assert main(argv) == EXIT_OK
    capsys.readouterr()
    before = _tree(tmp_path)
    monkeypatch.setattr(ir, "save", _half_then_enospc(ir.save))
    assert main(argv) == EXIT_FAILURE
    assert "No space left on device" in _one_error_line(capsys.readouterr().err, "failed")
    assert _tree(tmp_path) == before  # the old output intact, no partial or staging file


def test_disk_full_mid_save_keeps_the_old_folder(tmp_path, monkeypatch):
    x = torch.randn(2, 8)
    folder = _quick(_Linear(), (x,), pipeline="cleanup").save(tmp_path / "out")
    before = _tree(tmp_path)
    again = _quick(_Linear(), (x,), pipeline="cleanup,cast(dtype=bf16)")
    monkeypatch.setattr(torch.export, "save", _half_then_enospc(torch.export.save))
    with pytest.raises(OSError, match="No space left on device") as info:
        again.save(folder)
    assert info.value.errno == errno.ENOSPC
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------------------------- calibration data


@pytest.mark.parametrize(
    ("name", "content", "error", "message"),
    [
        ("empty.txt", b"", ModelError, "holds 0 tokens"),
        ("empty.json", b"[]", ModelError, "JSON list of non-negative integers"),
        ("floats.json", b"[1.5, 2.5]", ModelError, "JSON list of non-negative integers"),
        ("short.txt", b"def f(): pass\n", PassFailure, "calibration tokens are fewer than one window of 16"),
        ("vocab.json", json.dumps([300] * 64).encode(), ModelError, "token id 300 is outside the model's vocabulary"),
    ],
    ids=["empty-text", "empty-ids", "float-ids", "too-short", "beyond-vocab"],
)
def test_bad_calibration_data_is_a_clear_error(small_llama, tokens, tmp_path, name, content, error, message):
    data = tmp_path / name
    data.write_bytes(content)
    with pytest.raises(error, match=message):
        passforge.optimize(small_llama, (tokens,), pipeline="quantize(scheme=w8a8-static)", calib_data=data,
                           profile=False, generation=False)
    assert data.read_bytes() == content
