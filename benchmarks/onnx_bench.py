"""Does a passforge round trip give ONNX Runtime a faster file than ONNX Runtime's own tools? The ~100M LLaMA
preset (random weights), batch 1, prefill of ``--prefill`` tokens (logits at every position).

Every row runs in ONNX Runtime's CPU provider, on ``--threads`` threads, without spin-waiting (a spinning pool
would steal the cores from the row timed next), with the session's defaults otherwise:

- ORT fp32: ``torch.onnx.export(dynamo=True)`` of the PyTorch model — the file the next four kinds of rows start
  from, and the baseline of the ratios;
- ORT optimizer + quantize_dynamic: ``onnxruntime.transformers.optimizer.optimize_model`` with model_type
  ``qwen3`` (the LLaMA-family decoder it knows; the notes list what it fused), then
  ``onnxruntime.quantization.quantize_dynamic(weight_type=QInt8)``;
- ORT quantize_dynamic: the fp32 file, ``quantize_dynamic(weight_type=QInt8)`` only;
- passforge import → PIPELINE: ``import_onnx`` of the fp32 file (static shapes), the pipeline, ``export_onnx``
  (QDQ form). ``fuse-attention`` does not match torch.onnx's spelling of attention yet (docs/onnx.md), so these
  files keep the exporter's attention ops;
- passforge capture → PIPELINE, attention=onnx: the PyTorch model captured by passforge instead, where
  ``fuse-attention`` matches every layer, exported with fused attention as ONNX's ``Attention`` op (opset 23);
- PyTorch eager fp32, for scale (not ONNX Runtime).

Per row: the file's MB (model and external data), the prefill latency (median; all rows timed round-robin, one
call of each per round, so machine noise hits them alike), its ratio to ORT fp32, and the relative error
``‖logits − ref‖ / ‖ref‖`` against the PyTorch fp32 model. Weight-only int8 rows run in ONNX Runtime's
``MatMulNBits``, whose default ``accuracy_level`` 4 also quantizes the activations to int8 (ORT's speed choice;
it shows in the error). The decode step is left out: its cache update (ScatterND / index_copy) does not import.

    python benchmarks/onnx_bench.py [--model llama-100m] [--prefill 512] [--repeats 5] [--threads N] [--only REGEX]
    python benchmarks/onnx_bench.py --model tiny --prefill 64 --repeats 2  # smoke test

(Not ``benchmarks/onnx.py``: a script's folder comes first on ``sys.path``, so that name would shadow the onnx
package for every benchmark here.)
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import os
import re
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, fx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant
from quant import build_each

from passforge.ir.capture import capture
from passforge.ir.onnx_export import AttentionForm, export_onnx
from passforge.models.llama import PRESETS, build
from passforge.passes.base import Context
from passforge.passes.manager import PassManager
from passforge.runtime.profile import interleaved_latency_ms

BASELINE = "ORT fp32 (torch.onnx export)"
IMPORT_PIPELINES = {  # label: pipeline run on the imported fp32 file
    "passforge import → cleanup (fp32)": "cleanup",
    "passforge import → w8 weight-only": "cleanup,fuse-attention,quantize,fold-quant",
    "passforge import → w8a8 (per-token)": "cleanup,fuse-attention,quantize(scheme=w8a8),fold-quant",
    "passforge import → w8a8-static": "cleanup,fuse-attention,quantize(scheme=w8a8-static),fold-quant",
}
CAPTURE_PIPELINES = {  # label: pipeline run on passforge's own capture, exported with attention="onnx"
    "passforge capture → fuse-attention (fp32), attention=onnx": "cleanup,fuse-attention",
    "passforge capture → fuse-attention, w8 weight-only, attention=onnx": "cleanup,fuse-attention,quantize,fold-quant",
    "passforge capture → fuse-attention, w8a8-static, attention=onnx":
        "cleanup,fuse-attention,quantize(scheme=w8a8-static),fold-quant",
}  # fmt: skip
ORT_OPTIMIZER_MODEL_TYPE = "qwen3"


@dataclass
class Row:
    """One variant: how to run its prefill, and what its file costs."""

    prefill: Callable[[Tensor], Tensor]  # tokens (1, T) -> logits (1, T, V)
    file_bytes: int
    notes: list[str] = field(default_factory=list)
    prep_s: float = 0.0  # building the row plus its first prefill


@dataclass
class Setup(quant.Setup):
    """quant.py's setup (the fp32 model, the prompt, a scratch folder) plus the files and graphs built once."""

    @functools.cached_property
    def fp32_file(self) -> Path:
        path = self.folder("ort-fp32") / "model.onnx"
        torch.onnx.export(self.model, (self.tokens,), path, dynamo=True, verbose=False)
        return path

    @functools.cached_property
    def imported(self) -> fx.GraphModule:
        from passforge.ir.onnx_import import import_onnx

        return import_onnx(self.fp32_file, (self.tokens,), dynamic=False)

    @functools.cached_property
    def calib_tokens(self) -> Tensor:
        """The bundled calibration text as byte ids (valid in any vocabulary of 256 or more)."""
        from importlib.resources import files

        from passforge.models.tokenizer import encode

        return torch.tensor(encode((files("passforge.models") / "data" / "calib.txt").read_text()), dtype=torch.long)

    def folder(self, name: str) -> Path:
        path = self.workdir / re.sub(r"[^\w.-]+", "-", name)
        path.mkdir(exist_ok=True)
        return path


def ort_session(path: Path, threads: int) -> Callable[[Tensor], Tensor]:
    """An ONNX Runtime CPU session on ``threads`` threads, without spin-waiting; returns the first output."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(tokens: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {name: tokens.numpy()})[0])

    return run


def file_bytes(path: Path) -> int:
    """The model and any data files beside it that carry its name."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def op_summary(path: Path, op_types: tuple[str, ...]) -> str:
    import onnx

    ops = Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    return ", ".join(f"{op} ×{ops[op]}" for op in op_types if ops[op]) or "none of " + "/".join(op_types)


def ort_row(path: Path, setup: Setup, *notes: str) -> Row:
    return Row(prefill=ort_session(path, setup.threads), file_bytes=file_bytes(path), notes=list(notes))


# --- row builders ------------------------------------------------------------------------------------------------


def eager_fp32(setup: Setup) -> Row:
    return Row(prefill=setup.model, file_bytes=0, notes=["PyTorch, not ONNX Runtime; no file"])


def ort_fp32(setup: Setup) -> Row:
    import onnx

    opset = next(o.version for o in onnx.load(str(setup.fp32_file), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx"))  # fmt: skip
    return ort_row(setup.fp32_file, setup, f"torch.onnx.export(dynamo=True), opset {opset}, static shapes")


def ort_optimized_int8(setup: Setup) -> Row:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    folder = setup.folder("ort-optimized-int8")
    cfg = setup.model.config
    optimized = optimize_model(
        str(setup.fp32_file), model_type=ORT_OPTIMIZER_MODEL_TYPE, num_heads=cfg.n_heads, hidden_size=cfg.dim
    )
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    optimized.save_model_to_file(str(folder / "optimized.onnx"))
    quantize_dynamic(folder / "optimized.onnx", folder / "model.onnx", weight_type=QuantType.QInt8)
    fusions = ", ".join(f"{op} ×{n}" for op, n in fused.items()) or "nothing"
    return ort_row(
        folder / "model.onnx", setup,
        f"optimize_model(model_type={ORT_OPTIMIZER_MODEL_TYPE!r}) fused {fusions} (no attention, no rotary); "
        "then quantize_dynamic(weight_type=QInt8)",
    )  # fmt: skip


def ort_int8(setup: Setup) -> Row:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = setup.folder("ort-int8") / "model.onnx"
    quantize_dynamic(setup.fp32_file, path, weight_type=QuantType.QInt8)
    return ort_row(path, setup, "quantize_dynamic(weight_type=QInt8): MatMulInteger / DynamicQuantizeLinear")


def passforge_row(gm: fx.GraphModule, spec: str, setup: Setup, label: str, attention: AttentionForm) -> Row:
    ctx = Context(example_inputs=(setup.tokens,), calib_tokens=setup.calib_tokens)
    result = PassManager.parse(spec).run(gm, ctx)
    fused = sum(node.target is torch.ops.passforge.attention.default for node in result.graph.graph.nodes)
    path = export_onnx(result.graph, setup.folder(label) / "model.onnx", (setup.tokens,), attention=attention)
    ops = op_summary(path, ("Attention", "Softmax", "DequantizeLinear", "QuantizeLinear"))
    return ort_row(path, setup, f"{spec}; fuse-attention fused {fused} call(s); export_onnx(attention={attention!r}): "
                   f"{ops}")  # fmt: skip


def passforge_import(spec: str, label: str) -> Callable[[Setup], Row]:
    return lambda setup: passforge_row(copy.deepcopy(setup.imported), spec, setup, label, "decompose")


def passforge_capture(spec: str, label: str) -> Callable[[Setup], Row]:
    return lambda setup: passforge_row(capture(setup.model, (setup.tokens,)), spec, setup, label, "onnx")


ROWS: dict[str, Callable[[Setup], Row]] = {
    BASELINE: ort_fp32,
    "ORT optimizer + quantize_dynamic int8": ort_optimized_int8,
    "ORT quantize_dynamic int8": ort_int8,
    **{label: passforge_import(spec, label) for label, spec in IMPORT_PIPELINES.items()},
    **{label: passforge_capture(spec, label) for label, spec in CAPTURE_PIPELINES.items()},
    "PyTorch eager fp32": eager_fp32,
}


# --- measurement -------------------------------------------------------------------------------------------------


def build_rows(setup: Setup, labels: list[str]) -> tuple[dict[str, Row], dict[str, Tensor]]:
    """Build each row and run its prefill once (the warm-up; the logits for the error)."""
    return build_each(labels, lambda label: ROWS[label](setup), lambda row: row.prefill(setup.tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-100m", choices=[p for p in PRESETS if p != "llama-7b"])
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill latency")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (medians over them)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and ORT threads")
    parser.add_argument("--only", default="", help=f"regex on row labels; {BASELINE!r} (the baseline) always runs")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # the ONNX exporter and ORT's tools log at export / optimize time
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    model = build(args.model).eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, args.prefill))
    labels = [label for label in ROWS if label == BASELINE or re.search(args.only, label, re.IGNORECASE)]
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="passforge-onnx-") as workdir:
        setup = Setup(model, tokens, Path(workdir), args.threads)
        with torch.inference_mode():
            reference = model(tokens).float()
        rows, logits = build_rows(setup, labels)
        prefill_ms = interleaved_latency_ms(
            [functools.partial(row.prefill, tokens) for row in rows.values()], device=torch.device("cpu"),
            repeats=args.repeats, warmup=1, min_total_s=0.0,
        )  # fmt: skip
    prefill = dict(zip(rows, prefill_ms))
    mb = 2**20
    print(f"\n{args.model}, batch 1, prefill {args.prefill} tokens, {args.threads} threads, medians of "
          f"{args.repeats} round-robin rounds; started {started}\n")  # fmt: skip
    print(f"| variant | file MB | prep s | prefill {args.prefill} ms | × ORT fp32 | rel err |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, row in rows.items():
        error = float((logits[label] - reference).norm() / reference.norm())
        speedup = prefill[BASELINE] / prefill[label] if BASELINE in prefill else float("nan")
        size = f"{row.file_bytes / mb:.0f}" if row.file_bytes else "–"
        print(f"| {label} | {size} | {row.prep_s:.1f} | {prefill[label]:.1f} | {speedup:.2f} | {error:.1e} |")
    import onnxruntime

    print(f"\nLoad average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after. torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}.")  # fmt: skip
    for label, row in rows.items():
        for note in row.notes:
            print(f"- {label}: {note}")


if __name__ == "__main__":
    main()
