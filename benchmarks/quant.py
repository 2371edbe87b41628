"""Is passforge's quantization smaller and faster than what a user already has? The ~100M LLaMA preset, side by
side with eager PyTorch, torch.compile, torch.ao, torchao and ONNX Runtime.

``llama-100m`` (99.5M parameters, half of them in the 32k-vocab embedding and head; random weights), batch 1.
Each row reports:

- prefill: latency of the causal-LM forward on ``--prefill`` tokens (logits at every position, as passforge's
  forward graph computes them);
- decode: greedy tokens/s of the one-token KV-cache step (static cache of ``max_seq_len``, ``--new-tokens`` steps);
- weights MB in memory and on disk (``torch.save`` of the weights; the ``.onnx`` files for ONNX Runtime), and
  the weight MB one decode step reads: all of them but the embedding and RoPE tables, of which it reads a row;
- % of the bandwidth bound: at batch 1 decode streams every weight once per token, so
  (read bytes per token ÷ this machine's measured read bandwidth) ÷ measured time per token says how close a row
  comes to what the memory system allows. The KV cache traffic is left out, and it is not small here: the
  decode step attends all ``max_seq_len`` slots of its static cache, and copies the cache (and expands it for
  grouped-query attention) at every step, so no row reaches 100%;
- the relative error of the prefill logits against eager fp32, so a row that computes something else shows.

Times are medians, and all rows are timed round-robin (one call of each per round) so that noise on a shared
machine hits them alike; ratios are to eager fp32. Peers are optional: a peer that fails to import, build or run
prints one line why and the rest still run. ``pip install -e '.[bench]'`` installs the pinned peers (torchao,
onnx, onnxruntime, onnxscript).

    python benchmarks/quant.py [--prefill 512] [--new-tokens 32] [--repeats 5] [--threads N]
    python benchmarks/quant.py --model tiny --prefill 64 --new-tokens 8 --repeats 2 --skip-compile  # smoke test
    python benchmarks/quant.py --only 'bf16|quantize_dynamic'  # rows whose label matches (eager fp32 always runs)
"""

from __future__ import annotations

import argparse
import copy
import functools
import io
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from passforge.api import optimize
from passforge.ir.graph import example_inputs_of, param_stats, tensor_attrs
from passforge.models.llama import PRESETS, DecodeStep, Llama, LlamaConfig, build
from passforge.runtime import allocator
from passforge.runtime.compiled_decode import CompiledDecodeStep
from passforge.runtime.executor import direct_cpu_calls
from passforge.runtime.kv_cache import donate_kv_cache
from passforge.runtime.profile import interleaved_latency_ms

PIPELINES = {
    "passforge fp32 (cleanup)": "cleanup",
    "passforge bf16": "cleanup,cast(dtype=bf16)",
    "passforge w8": "cleanup,quantize(scheme=w8),fold-quant,lower-quant",
    "passforge w8 (prefer=speed)": "cleanup,quantize(scheme=w8),fold-quant,lower-quant(prefer=speed)",
    "passforge w8 + bf16": "cleanup,cast(dtype=bf16),quantize(scheme=w8),fold-quant,lower-quant",
    "passforge w8a8": "cleanup,quantize(scheme=w8a8),fold-quant,lower-quant",
    "passforge w8a8 + bf16": "cleanup,cast(dtype=bf16),quantize(scheme=w8a8),fold-quant,lower-quant",
    "passforge w8a8 (decode w8) + bf16":
        "cleanup,cast(dtype=bf16),quantize(scheme=w8a8,decode_scheme=w8),fold-quant,lower-quant",
    "passforge w8 + bf16, lm_head too": "cleanup,cast(dtype=bf16),quantize(skip=''),fold-quant,lower-quant",
    "passforge w4 g128": "cleanup,quantize(scheme=w4),fold-quant,lower-quant",
    "passforge w4 g128 + bf16": "cleanup,cast(dtype=bf16),quantize(scheme=w4),fold-quant,lower-quant",
    "passforge w8a8 (decode w4) + bf16":
        "cleanup,cast(dtype=bf16),quantize(scheme=w8a8,decode_scheme=w4),fold-quant,lower-quant",
    "passforge smooth + w8a8-static (decode w4) + bf16":
        "cleanup,cast(dtype=bf16),smooth-quant,quantize(scheme=w8a8-static,decode_scheme=w4),fold-quant,lower-quant",
    "passforge smooth + fused + w8a8-static (decode w4) + bf16": "cleanup,cast(dtype=bf16),smooth-quant,fuse-linears,"
        "quantize(scheme=w8a8-static,decode_scheme=w4),fold-quant,lower-quant",
    "passforge w4 g128 + gptq + bf16, lm_head too":
        "cleanup,cast(dtype=bf16),quantize(scheme=w4,skip=''),gptq,fold-quant,lower-quant",
    "passforge fused + w4 g128 + bf16":
        "cleanup,cast(dtype=bf16),fuse-linears,quantize(scheme=w4),fold-quant,lower-quant",
    "passforge bf16 + fuse-attention": "cleanup,fuse-attention,cast(dtype=bf16)",
    "passforge w8 + bf16 + fuse-attention":
        "cleanup,fuse-attention,cast(dtype=bf16),quantize(scheme=w8),fold-quant,lower-quant",
    "passforge w8 + bf16 + fuse-attention, lm_head too":
        "cleanup,fuse-attention,cast(dtype=bf16),quantize(scheme=w8,skip=''),fold-quant,lower-quant",
    "passforge w4 g128 + bf16 + fuse-attention":
        "cleanup,fuse-attention,cast(dtype=bf16),quantize(scheme=w4),fold-quant,lower-quant",
    "passforge smooth + w8a8-static (decode w4) + bf16 + fuse-attention": "cleanup,fuse-attention,cast(dtype=bf16),"
        "smooth-quant,quantize(scheme=w8a8-static,decode_scheme=w4),fold-quant,lower-quant",
    # issue 5: kv heads pruned in all three graphs, the KV cache with them (random weights: a speed figure only)
    "passforge heads 25% + bf16 + fuse-attention":
        "cleanup,prune-channels(target=heads,ratio=0.25),fuse-attention,cast(dtype=bf16)",
    "passforge heads 50% + bf16 + fuse-attention":
        "cleanup,prune-channels(target=heads,ratio=0.5),fuse-attention,cast(dtype=bf16)",
}
BASELINE = "eager fp32"
R = TypeVar("R")  # a benchmark's row type (it has a prep_s)
BANDWIDTH_MIB = 256  # well above the last-level cache (32 MiB here), so the copy/sum stream from DRAM
GATHERS = (torch.ops.aten.embedding.default, torch.ops.aten.index.Tensor)  # ops that read one row of a table

DecodeStepFn = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, ...]]  # (token, pos, k, v) -> (logits, k, v)


@dataclass
class Variant:
    """One row: how to run its prefill and decode step, and what its weights cost."""

    prefill: Callable[[Tensor], object]  # tokens (1, T) -> logits (1, T, V), or a tuple that starts with them
    decode: DecodeStepFn
    cache: tuple[Tensor, Tensor]  # the zero (k, v) caches decode starts from
    weight_bytes: int
    disk_bytes: int
    read_bytes_per_token: int  # weight bytes one decode step reads
    notes: list[str] = field(default_factory=list)
    prep_s: float = 0.0  # building the row plus its first prefill and decode step (compiling, where there is one)


@dataclass
class Setup:
    """What the row builders share: the fp32 model, the prompt, a scratch folder, derived models built once."""

    model: Llama
    tokens: Tensor  # (1, prefill)
    workdir: Path
    threads: int

    @functools.cached_property
    def bf16(self) -> Llama:
        return copy.deepcopy(self.model).to(torch.bfloat16)

    @functools.cached_property
    def onnx_fp32(self) -> tuple[Path, Path, str]:
        """(forward.onnx, decode.onnx, exporter): exported once, quantized by the ORT int8 row."""
        return export_onnx(self.model, self.tokens, self.workdir)


# --- weight accounting -------------------------------------------------------------------------------------------


def tensor_bytes(value: object) -> int:
    """Bytes as stored: tensor subclasses (torchao) by their inner tensors, quantized tensors (torch.ao) by
    their integer data and per-channel parameters, tuples (torch.ao's packed params) summed."""
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    if not isinstance(value, Tensor):
        return 0
    if is_traceable_wrapper_subclass(value):
        names, _ = value.__tensor_flatten__()
        return sum(tensor_bytes(getattr(value, name)) for name in names)
    nbytes = value.numel() * value.element_size()
    if value.is_quantized and value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        nbytes += tensor_bytes(value.q_per_channel_scales()) + tensor_bytes(value.q_per_channel_zero_points())
    return nbytes


def saved_bytes(tensors: dict[str, object]) -> int:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.tell()


def module_variant(model: Llama, **overrides: object) -> Variant:
    """A row for an eager (possibly quantized) ``Llama``; the embedding table is the one gathered weight."""
    weights = model.state_dict()  # the RoPE tables are non-persistent buffers: not in here
    total = sum(tensor_bytes(v) for v in weights.values())
    table = model.tok_embeddings.weight
    fields: dict[str, object] = dict(
        prefill=model, decode=model.decode, cache=zero_cache(model.config, table.dtype), weight_bytes=total,
        disk_bytes=saved_bytes(weights), read_bytes_per_token=total - tensor_bytes(table) + tensor_bytes(table[0]),
    )
    return Variant(**{**fields, **overrides})


def zero_cache(cfg: LlamaConfig, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    shape = (cfg.n_layers, 1, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)  # (L, B, nkv, S, hs)
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


def graph_read_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the tensors one run of ``gm`` reads; a table used only by embedding/index counts one row."""
    read_whole: dict[str, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            whole = any(user.target not in GATHERS or user.args[0] is not node for user in node.users)
            read_whole[node.target] = read_whole.get(node.target, False) or whole
    return sum(tensor_bytes(tensor if read_whole[name] else tensor[0]) for name, tensor in tensor_attrs(gm))


def onnx_weight_bytes(path: Path) -> tuple[int, int]:
    """(initializer bytes, bytes one run reads): an initializer only Gather reads counts one row."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    total = read = 0
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        users = readers.get(init.name, [])
        gathered = bool(users) and all(n.op_type == "Gather" and n.input[0] == init.name for n in users)
        total += array.nbytes
        read += array.nbytes // (array.shape[0] if gathered else 1)
    return total, read


# --- row builders ------------------------------------------------------------------------------------------------


def eager_fp32(setup: Setup) -> Variant:
    return module_variant(setup.model)


BF16_NOTE = "attention and the KV cache run in bf16 too (passforge's cast keeps them in fp32)"


def eager_bf16(setup: Setup) -> Variant:
    return module_variant(setup.bf16, notes=[BF16_NOTE])


def compiled(model: Llama, notes: list[str]) -> Variant:
    """Inductor with ``freezing`` (weights folded in as constants and prepacked for MKL / oneDNN): PyTorch's
    recommended CPU inference setting. Prefill and the decode step are compiled separately."""
    options = {"freezing": True}
    return module_variant(
        model, prefill=torch.compile(model, options=options), decode=torch.compile(model.decode, options=options),
        notes=["inductor, freezing=True; prefill and decode step compiled, prep s is mostly compiling", *notes],
    )


def ao_dynamic(setup: Setup) -> Variant:
    """torch.ao's eager dynamic quantization on every Linear, lm_head included: fbgemm's u8 × s8 GEMM, activations
    quantized per tensor at run time (7-bit, ``reduce_range``), weights per tensor (the default qconfig)."""
    model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(setup.model), {torch.nn.Linear}, torch.qint8)
    return module_variant(model, notes=["per-tensor uint8 activations (7-bit) and per-tensor int8 weights, fbgemm"])


def torchao(config_name: str) -> Callable[[Setup], Variant]:
    """torchao ``quantize_`` on every Linear (lm_head included), run eagerly: that is what ``quantize_`` alone
    gives, and torchao's int8 layouts count on torch.compile to fuse their dequantization."""

    def build_row(setup: Setup) -> Variant:
        from torchao import quantization

        model = copy.deepcopy(setup.model)
        quantization.quantize_(model, getattr(quantization, config_name)())
        return module_variant(model, notes=[f"{config_name}(), eager (not compiled)"])

    return build_row


def torchao_compiled(setup: Setup) -> Variant:
    """torchao's int8 weight-only as its docs run it: a bf16 model, ``quantize_``, then torch.compile (inductor,
    freezing) of prefill and of the decode step."""
    from torchao import quantization

    model = copy.deepcopy(setup.bf16)
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    return compiled(model, [BF16_NOTE])


def export_onnx(model: Llama, tokens: Tensor, workdir: Path) -> tuple[Path, Path, str]:
    """Export forward and the decode step; the dynamo exporter first (it needs onnxscript), else the legacy one."""
    decode_inputs = (torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]), *zero_cache(model.config, torch.float32))
    errors = []
    for dynamo in (True, False):
        folder = workdir / f"onnx-{'dynamo' if dynamo else 'legacy'}"
        folder.mkdir()
        try:
            torch.onnx.export(model, (tokens,), folder / "forward.onnx", dynamo=dynamo, verbose=False)
            torch.onnx.export(DecodeStep(model), decode_inputs, folder / "decode.onnx", dynamo=dynamo, verbose=False)
        except Exception as exc:  # noqa: BLE001 - either exporter may fail on this model; the other may not
            errors.append(f"{folder.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        return folder / "forward.onnx", folder / "decode.onnx", folder.name
    raise RuntimeError("; ".join(errors))


def ort_variant(forward: Path, decode: Path, setup: Setup, note: str) -> Variant:
    """ONNX Runtime CPU sessions on as many threads as torch, without spin-waiting (spinning threads would steal
    the cores from the row timed next)."""
    import onnxruntime

    def session(path: Path) -> Callable[..., tuple[Tensor, ...]]:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = setup.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]

        def run(*inputs: Tensor) -> tuple[Tensor, ...]:
            outputs = sess.run(None, {name: x.numpy() for name, x in zip(names, inputs)})
            return tuple(torch.from_numpy(o) for o in outputs)

        return run

    total, _ = onnx_weight_bytes(forward)
    _, read = onnx_weight_bytes(decode)
    files = [p for p in forward.parent.iterdir() if p.name.startswith(forward.name)]  # model + external data
    return Variant(
        prefill=session(forward), decode=session(decode), cache=zero_cache(setup.model.config, torch.float32),
        weight_bytes=total,
        disk_bytes=sum(p.stat().st_size for p in files), read_bytes_per_token=read, notes=[note],
    )


def ort_fp32(setup: Setup) -> Variant:
    forward, decode, exporter = setup.onnx_fp32
    return ort_variant(forward, decode, setup, f"exported with torch.onnx.export ({exporter})")


def ort_int8(setup: Setup) -> Variant:
    """onnxruntime.quantization.quantize_dynamic with its defaults: per-tensor int8 weights, uint8 dynamic
    activations (MatMulInteger / DynamicQuantizeLinear)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    forward, decode, exporter = setup.onnx_fp32
    folder = setup.workdir / "onnx-int8"
    folder.mkdir(exist_ok=True)
    quantized = []
    for path in (forward, decode):
        quantize_dynamic(path, folder / path.name, weight_type=QuantType.QInt8)
        quantized.append(folder / path.name)
    return ort_variant(*quantized, setup, f"quantize_dynamic(weight_type=QInt8) of the {exporter} export")


def bundled_calib_path() -> str:
    from importlib.resources import files

    return str(files("passforge.models") / "data" / "calib.txt")


def passforge_pipeline(spec: str, *, compiled_decode: bool = False) -> Callable[[Setup], Variant]:
    def build_row(setup: Setup) -> Variant:
        # random weights, but calibration-driven passes need text: the bundled calibration text (byte ids,
        # valid in any vocabulary of 256 or more)
        opt = optimize(setup.model, (setup.tokens,), pipeline=spec, profile=False, calib_data=bundled_calib_path())
        weights = dict(tensor_attrs(opt.graph))
        decode, _ = donate_kv_cache(opt.decode)  # as generate() runs it: the cache updated in place,
        step = CompiledDecodeStep(decode) if compiled_decode else direct_cpu_calls(decode)  # ops called directly
        return Variant(
            prefill=direct_cpu_calls(opt.graph), decode=step, cache=tuple(example_inputs_of(opt.decode)[2:]),
            weight_bytes=param_stats(opt.graph)[1], disk_bytes=saved_bytes(weights),
            read_bytes_per_token=graph_read_bytes(opt.decode),
            notes=["decode step compiled by inductor (generate(compiled_decode=True)); prep s includes it"]
            if compiled_decode else [],
        )

    return build_row


ROWS: dict[str, Callable[[Setup], Variant]] = {
    BASELINE: eager_fp32,
    "eager bf16": eager_bf16,
    "torch.compile fp32": lambda setup: compiled(setup.model, []),
    "torch.compile bf16": lambda setup: compiled(setup.bf16, [BF16_NOTE]),
    "torch.ao quantize_dynamic int8": ao_dynamic,
    "torchao int8 weight-only": torchao("Int8WeightOnlyConfig"),
    "torchao int8 dyn-act int8 weight": torchao("Int8DynamicActivationInt8WeightConfig"),
    "torchao int8 weight-only + bf16, torch.compile": torchao_compiled,
    "ORT fp32": ort_fp32,
    "ORT int8 quantize_dynamic": ort_int8,
    **{label: passforge_pipeline(spec) for label, spec in PIPELINES.items()},
    **{f"{label}, compiled decode": passforge_pipeline(PIPELINES[label], compiled_decode=True) for label in (
        "passforge w8 + bf16 + fuse-attention, lm_head too", "passforge w4 g128 + bf16 + fuse-attention",
        "passforge bf16 + fuse-attention", "passforge heads 50% + bf16 + fuse-attention")},
}


# --- measurement -------------------------------------------------------------------------------------------------


def first_tensor(out: object) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def decode_loop(step: DecodeStepFn, cache: tuple[Tensor, Tensor], new_tokens: int) -> Callable[[], None]:
    """Greedy decoding of ``new_tokens`` tokens from position 0 (the static cache makes every step cost alike)."""

    def run() -> None:
        k, v = cache
        token = torch.zeros(1, 1, dtype=torch.long)
        for pos in range(new_tokens):
            logits, k, v = step(token, torch.tensor([pos]), k, v)[:3]
            token = logits[:, -1].argmax(-1, keepdim=True)

    return run


def memory_bandwidth_gbs() -> dict[str, float]:
    """GB/s of streaming reductions and a copy over BANDWIDTH_MIB MiB fp32 tensors (medians of 10). Reductions
    only read, like decode reads weights; the fastest of them is the bound (a single one may be compute-limited:
    a plain sum is, on one core here). The copy counts read + write bytes and is shown for reference."""
    src = torch.ones(BANDWIDTH_MIB * 2**18)
    dst = torch.ones_like(src)
    nbytes = src.numel() * src.element_size()
    kernels = {  # name -> (run, bytes moved)
        "sum": (src.sum, nbytes), "max": (src.amax, nbytes), "dot": (lambda: torch.dot(src, dst), 2 * nbytes),
        "copy": (lambda: dst.copy_(src), 2 * nbytes),
    }
    medians = interleaved_latency_ms(
        [run for run, _ in kernels.values()], device=torch.device("cpu"), repeats=10, warmup=2, min_total_s=0.0
    )
    return {name: moved / ms / 1e6 for (name, (_, moved)), ms in zip(kernels.items(), medians)}


def time_rows(
    variants: dict[str, Variant], tokens: Tensor, new_tokens: int, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Prefill ms and decode tokens/s per row, every row timed round-robin (medians of ``repeats`` rounds)."""
    cpu = torch.device("cpu")
    prefill_ms = interleaved_latency_ms(
        [functools.partial(v.prefill, tokens) for v in variants.values()], device=cpu,
        repeats=repeats, warmup=1, min_total_s=0.0,
    )
    decode_ms = interleaved_latency_ms(
        [decode_loop(v.decode, v.cache, new_tokens) for v in variants.values()], device=cpu,
        repeats=repeats, warmup=1, min_total_s=0.0,
    )
    tok_s = {label: new_tokens / ms * 1e3 for label, ms in zip(variants, decode_ms)}
    return dict(zip(variants, prefill_ms)), tok_s


def build_each(
    labels: list[str], build: Callable[[str], R], warm_up: Callable[[R], Tensor]
) -> tuple[dict[str, R], dict[str, Tensor]]:
    """``build(label)`` for each label, then ``warm_up(row)`` once (compilation where there is one; it returns
    the row's logits, for the error column); the time both took is the row's ``prep_s``. A row that fails
    prints one line why and is left out: one peer failing must not stop the others."""
    built: dict[str, R] = {}
    logits: dict[str, Tensor] = {}
    for label in labels:
        start = time.perf_counter()
        try:
            row = build(label)
            with torch.inference_mode():
                logits[label] = warm_up(row).float()
        except Exception as exc:  # noqa: BLE001 - one peer failing in any way must not stop the others
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"skipped {label}: {type(exc).__name__}: {message[:300]}", flush=True)
            continue
        row.prep_s = time.perf_counter() - start
        built[label] = row
        print(f"built {label} in {row.prep_s:.1f} s", flush=True)
    return built, logits


def build_rows(
    setup: Setup, labels: list[str], rows: dict[str, Callable[[Setup], Variant]]
) -> tuple[dict[str, Variant], dict[str, Tensor]]:
    """Each row of ``rows`` built and run once: its prefill and one decode step."""

    def warm_up(variant: Variant) -> Tensor:
        decode_loop(variant.decode, variant.cache, 1)()
        return first_tensor(variant.prefill(setup.tokens))

    return build_each(labels, lambda label: rows[label](setup), warm_up)


def set_allocator(default_allocator: bool) -> str:
    """Every row runs under the allocator passforge's CPU runtime sets (``passforge.runtime.allocator``: glibc
    keeps freed memory, as jemalloc / tcmalloc do), so rows compare like for like; ``--default-allocator``
    leaves glibc as it is and tells passforge not to change it either. Returns the line the table's notes print."""
    if default_allocator:
        os.environ[allocator.ENV_SWITCH] = "0"
        return "glibc's default malloc (--default-allocator): blocks over 32 MiB are fresh mmaps on every call."
    if not allocator.keep_freed_memory():
        return "glibc's default malloc: keeping freed memory is not available here."
    return "glibc kept freed memory for every row, as passforge's CPU runtime sets it (passforge.runtime.allocator)."


def main(rows: dict[str, Callable[[Setup], Variant]] | None = None, description: str | None = None) -> None:
    """Build, time and print ``rows`` (default: this script's); ``benchmarks/compile.py`` runs its own rows here."""
    rows = ROWS if rows is None else rows
    parser = argparse.ArgumentParser(description=(description or __doc__).splitlines()[0])
    parser.add_argument("--model", default="llama-100m", choices=[p for p in PRESETS if p != "llama-7b"])
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill latency")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per decode run")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (medians over them)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and ORT threads")
    parser.add_argument("--only", default="", help="regex on row labels; eager fp32 (the baseline) always runs")
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile (minutes of compiling)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc as it is (by default it keeps freed memory for every row alike, "
                             "as passforge's CPU runtime sets it)")
    args = parser.parse_args()
    allocator_note = set_allocator(args.default_allocator)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # torchao and the ONNX exporter log at import / export time
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    model = build(args.model).eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, args.prefill))
    labels = [label for label in rows if label == BASELINE or re.search(args.only, label, re.IGNORECASE)]
    if args.skip_compile:
        labels = [label for label in labels if "torch.compile" not in label]
        print("skipped torch.compile rows: --skip-compile")
    load_before = os.getloadavg()[0]
    bandwidth = memory_bandwidth_gbs()
    read_gbs = max(gbs for name, gbs in bandwidth.items() if name != "copy")
    with tempfile.TemporaryDirectory(prefix="passforge-bench-") as workdir:
        setup = Setup(model, tokens, Path(workdir), args.threads)
        variants, logits = build_rows(setup, labels, rows)
        prefill, tok_s = time_rows(variants, tokens, args.new_tokens, args.repeats)
    print_table(variants, logits, prefill, tok_s, read_gbs, args)
    figures = ", ".join(f"{name} {gbs:.1f}" for name, gbs in bandwidth.items())
    print(f"\nmemory bandwidth GB/s ({BANDWIDTH_MIB} MiB fp32, {args.threads} threads): {figures}; the bound uses "
          f"the fastest read, {read_gbs:.1f}. {allocator_note} Load average {load_before:.2f} "
          f"before, {os.getloadavg()[0]:.2f} after. "
          f"torch {torch.__version__}.")
    for label, variant in variants.items():
        for note in variant.notes:
            print(f"- {label}: {note}")


def print_table(
    variants: dict[str, Variant], logits: dict[str, Tensor], prefill_ms: dict[str, float], tok_s: dict[str, float],
    read_gbs: float, args: argparse.Namespace,
) -> None:
    """One markdown row per variant; ratios to eager fp32."""
    mb = 2**20
    reference = logits[BASELINE]
    print(f"\n{args.model}, batch 1, prefill {args.prefill} tokens, decode {args.new_tokens} greedy tokens, "
          f"{args.threads} threads, medians of {args.repeats} round-robin rounds\n")
    print(f"| variant | weights MB | disk MB | prep s | prefill {args.prefill} ms | × eager | decode tok/s | × eager "
          "| read MB/tok | % of bw bound | rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, variant in variants.items():
        error = float((logits[label] - reference).norm() / reference.norm())
        bound = read_gbs * 1e9 / variant.read_bytes_per_token  # tokens/s if the weights streamed at full bandwidth
        cells = [
            label, f"{variant.weight_bytes / mb:.0f}", f"{variant.disk_bytes / mb:.0f}", f"{variant.prep_s:.1f}",
            f"{prefill_ms[label]:.1f}", f"{prefill_ms[BASELINE] / prefill_ms[label]:.2f}",
            f"{tok_s[label]:.1f}", f"{tok_s[label] / tok_s[BASELINE]:.2f}",
            f"{variant.read_bytes_per_token / mb:.0f}", f"{100 * tok_s[label] / bound:.0f}%", f"{error:.1e}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
