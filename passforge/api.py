"""The Python API: ``passforge.optimize(model, ...) -> Optimized`` and ``passforge.load(dir)``.

    opt = passforge.optimize("tiny-lm", pipeline="cleanup,cast(dtype=bf16)")
    opt.report["passes"][-1]["ppl"]; opt(tokens); opt.generate("def main(", 32); opt.save("out/")
    again = passforge.load("out/")

``model`` is an ``nn.Module`` (with ``example_inputs``), a preset name, a Hugging Face folder, a ``.pt2`` or an
``.onnx`` file (imported by ``passforge.ir.onnx_import``).
The user's model object is never mutated: capture shares its tensors read-only and passes never write
tensors in place.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx

from passforge.ir.capture import CaptureError, capture, check_reference_run
from passforge.ir.graph import dynamic_shapes_of, example_inputs_of
from passforge.ir.serialize import (
    load_graph,
    save_graph,
    staging_folder,
    swap_in_folder,
    unwritable_reason,
    write_text_atomic,
)
from passforge.models.registry import ModelError, ModelSource, check_token_ids, read_tokens, resolve
from passforge.passes.base import Context, PreconditionError
from passforge.passes.hooks import DumpHook, VerifyHook
from passforge.passes.manager import Hook, OnError, PassFailure, PassManager, PipelineInterrupted, PipelineResult
from passforge.runtime.compiled_decode import CompiledDecodeStep, NotCompilable
from passforge.runtime.executor import Executor, GenerationStats, InputError, KVGenerator, resolve_device
from passforge.runtime.kv_cache import donate_kv_cache, ring_kv_cache
from passforge.runtime.profile import ProfileHook
from passforge.tools.report import build_report

DEFAULT_PIPELINE = "cleanup,cast(dtype=bf16)"
FORMAT = "passforge-optimized/1"
PREFILL_LEN = 64
BYTE_TOKENIZER = "bytes"
HF_TOKENIZER_DIR = "tokenizer"


@dataclass
class Optimized:
    """An optimized model: the forward graph, its report, and (for LMs with a KV cache) generation graphs."""

    graph: fx.GraphModule
    report: dict[str, object]
    example_inputs: tuple[torch.Tensor, ...]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prefill: fx.GraphModule | None = None
    decode: fx.GraphModule | None = None
    max_seq_len: int = 0
    source: ModelSource | None = None

    def __post_init__(self) -> None:
        self._executor = Executor(self.graph, self.device)

    def __call__(self, *inputs: torch.Tensor) -> object:
        return self._executor(*inputs)

    @property
    def has_tokenizer(self) -> bool:
        """Whether :meth:`generate` takes text (else token ids only)."""
        return self.source is not None and self.source.encode is not None and self.source.decode is not None

    def generate(
        self, prompt: str | torch.Tensor, max_new_tokens: int = 32, *, temperature: float = 0.0,
        compiled_decode: bool = False,
    ) -> tuple[str | torch.Tensor, GenerationStats]:
        """Continue ``prompt`` (text, or int64 ids (1, T)) with the KV-cache graphs; returns (same kind, stats).
        Text goes through the model's tokenizer: byte-level for passforge's LMs, the folder's for Hugging Face.

        ``compiled_decode``: run the decode step compiled by inductor (``runtime.compiled_decode``): seconds of
        compiling at the first call, then fewer, fused kernels per token; bf16 results differ from the
        op-by-op step by rounding. Where the step cannot be compiled so, a warning says why and it runs as is."""
        if isinstance(prompt, str) and not self.has_tokenizer:
            raise InputError("this model has no tokenizer; pass the prompt as token ids, int64 (1, T)")
        ids = torch.tensor([self.source.encode(prompt)]) if isinstance(prompt, str) else prompt
        generator = self._compiled_generator if compiled_decode else self._generator
        tokens, stats = generator.generate(ids, max_new_tokens, temperature=temperature)
        return (self.source.decode(tokens[0].tolist()) if isinstance(prompt, str) else tokens), stats

    @functools.cached_property
    def _generator(self) -> KVGenerator:
        return self._build_generator(compiled_decode=False)

    @functools.cached_property
    def _compiled_generator(self) -> KVGenerator:
        return self._build_generator(compiled_decode=True)

    def _build_generator(self, *, compiled_decode: bool) -> KVGenerator:
        """Built once per kind: the graphs are placed on the device once, not per generate() call. The
        generator owns its caches, so decode updates them in place where the graph allows, and keeps only
        sinks + window slots when all attention is sliding-window (``runtime.kv_cache``)."""
        if self.prefill is None or self.decode is None:
            raise RuntimeError(
                "this model has no prefill/decode graphs; generate() needs a passforge LLaMA model or a Hugging Face "
                "causal LM, optimized with generation=True"
            )
        decode, ring, _ = ring_kv_cache(self.decode)  # local-attention: a cache of sinks + window slots
        decode, not_donated = donate_kv_cache(decode)
        step = None
        if compiled_decode:
            reason = not_donated
            if reason is None:
                try:
                    step = Executor(decode, self.device, runner=CompiledDecodeStep)
                except NotCompilable as exc:
                    reason = str(exc)
                except Exception as exc:  # noqa: BLE001 - inductor's failures have many types (a lowering it
                    # lacks, no C++ compiler, ...); the step still runs uncompiled, and the warning says why
                    reason = f"inductor could not compile it: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            if step is None:
                warnings.warn(f"generate(compiled_decode=True): running the decode step uncompiled: {reason}",
                              stacklevel=3)
        return KVGenerator(
            Executor(self.prefill, self.device), step or Executor(decode, self.device), ring=ring,
            max_seq_len=self.max_seq_len, prefill_len=int(example_inputs_of(self.prefill)[0].shape[1]),
        )

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``model.pt2`` (+ ``prefill.pt2``/``decode.pt2``, a Hugging Face model's ``tokenizer/``),
        ``manifest.json`` and ``report.json``.

        The folder is built beside the target and swapped in by rename: a failure leaves any previous
        contents intact.
        """
        target = Path(directory).resolve()
        check_output_folder(target, self.source)
        staging = staging_folder(target)
        try:
            dynamic = dynamic_shapes_of(self.graph)
            save_graph(self.graph, staging / "model.pt2", self.example_inputs, dynamic_shapes=dynamic)
            graphs = {"forward": "model.pt2"}
            if self.prefill is not None and self.decode is not None:
                save_graph(self.prefill, staging / "prefill.pt2", example_inputs_of(self.prefill))
                save_graph(self.decode, staging / "decode.pt2", example_inputs_of(self.decode))
                graphs.update(prefill="prefill.pt2", decode="decode.pt2")
            manifest = {
                "format": FORMAT,
                "model": self.report.get("model"),
                "pipeline": self.report.get("pipeline"),
                "graphs": graphs,
                "max_seq_len": self.max_seq_len,
                "tokenizer": _save_tokenizer(self.source, staging),
            }
            write_text_atomic(staging / "manifest.json", json.dumps(manifest, indent=2) + "\n")
            write_text_atomic(staging / "report.json", json.dumps(self.report, indent=2) + "\n")
            swap_in_folder(staging, target, keep=("reproducers",))  # reproducers this run wrote there
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def save_hf(self, directory: str | os.PathLike[str]) -> Path:
        """Write the forward graph as a Hugging Face folder of the source model's architecture, its config
        rewritten to the pruned sizes (``models.hf_save``); raises ``HFSaveError`` saying why when the
        architecture cannot express the graph (per-layer sizes, quantized weights) — :meth:`save` can."""
        from passforge.models.hf import LogitsOnly
        from passforge.models.hf_save import HFSaveError, save_hf

        if self.source is None or not isinstance(self.source.module, LogitsOnly):
            raise HFSaveError("a Hugging Face folder can be written only for a model optimized from one")
        source_folder = self.source.extra.get("hf_folder")
        target = Path(directory).resolve()
        if source_folder is not None:
            source_folder = Path(source_folder).resolve()
            if target == source_folder or target in source_folder.parents or source_folder in target.parents:
                raise HFSaveError(f"{directory} holds or is inside the input model's folder {source_folder}; the "
                                  "input is never overwritten: choose a folder outside it")
        provenance = {"source": self.report.get("model"), "pipeline": self.report.get("pipeline")}
        return save_hf(self.graph, self.source.module.model, directory, self.example_inputs,
                       tokenizer=self.source.extra.get("hf_tokenizer"), provenance=provenance)


OUTPUT_FILES = frozenset(
    {"manifest.json", "model.pt2", "prefill.pt2", "decode.pt2", "report.json", "report.html", "reproducers",
     HF_TOKENIZER_DIR}
)


def _save_tokenizer(source: ModelSource | None, folder: Path) -> str | None:
    """The manifest's ``tokenizer``: ``"bytes"`` (passforge's byte-level tokenizer), the folder a Hugging Face
    tokenizer was saved to, or None (token ids only)."""
    from passforge.models import tokenizer

    if source is None or source.encode is None:
        return None
    hf_tokenizer = source.extra.get("hf_tokenizer")
    if hf_tokenizer is not None:
        hf_tokenizer.save_pretrained(folder / HF_TOKENIZER_DIR)
        return HF_TOKENIZER_DIR
    return BYTE_TOKENIZER if source.encode is tokenizer.encode else None


def _load_tokenizer(folder: Path, manifest: dict[str, object]) -> dict[str, object]:
    """``ModelSource`` fields for the manifest's ``tokenizer`` (absent: a folder from before it was recorded, which
    only passforge's byte-level LMs wrote)."""
    from passforge.models import tokenizer

    kind = manifest.get("tokenizer", BYTE_TOKENIZER)
    if kind == BYTE_TOKENIZER:
        return {"encode": tokenizer.encode, "decode": tokenizer.decode}
    saved = (folder / HF_TOKENIZER_DIR).resolve()
    if kind == HF_TOKENIZER_DIR and saved.is_dir() and saved.parent == folder.resolve():  # no symlink out
        from passforge.models import hf

        hf_tokenizer = hf.load_tokenizer(folder / HF_TOKENIZER_DIR)
        if hf_tokenizer is not None:
            encode, decode = hf.tokenizer_codec(hf_tokenizer)
            return {"encode": encode, "decode": decode, "extra": {"hf_tokenizer": hf_tokenizer}}
    return {}


def check_output_folder(
    target: Path, source: ModelSource | None = None, *, model: str | os.PathLike[str] | None = None
) -> None:
    """Refuse an output folder that holds the input model (``source``'s file, or ``model`` when it names an
    existing file), anything passforge did not write there, or that cannot be created.

    Called before the work starts (by the CLI) and again when saving, so a long run never ends by deleting a
    user's files (``--out .`` in a project folder is an error, not a wipe) or on a path it cannot write.
    """
    target = target.resolve()
    model_file = (source.pt2_path or source.onnx_path) if source is not None else None
    if model_file is None and model is not None and Path(model).is_file():
        model_file = Path(model)
    if model_file is not None:
        model_path = model_file.resolve()
        if model_path == target or target in model_path.parents:
            raise ModelError(f"output folder {target} contains the input model {model_path}; choose another --out")
    if target.exists():
        if not target.is_dir():
            raise ModelError(f"{target} exists and is not a folder; choose another --out")
        ours = OUTPUT_FILES if (target / "manifest.json").is_file() else OUTPUT_FILES - {HF_TOKENIZER_DIR}
        foreign = sorted(p.name for p in target.iterdir() if p.name not in ours)  # a lone tokenizer/ is the user's
        if foreign:
            raise ModelError(
                f"output folder {target} holds files passforge did not write ({', '.join(foreign[:5])}); "
                "choose a new or empty --out"
            )
    problem = unwritable_reason(target)
    if problem is not None:
        raise ModelError(f"output folder {target}: {problem}; choose another --out")


def load(directory: str | os.PathLike[str], *, device: str | torch.device | None = None) -> Optimized:
    """Load what :meth:`Optimized.save` wrote."""
    folder = Path(directory)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ModelError(f"{folder}: no manifest.json; not a folder written by passforge optimize / Optimized.save")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ModelError(f"{folder}: format {manifest.get('format')!r}, this passforge reads {FORMAT!r}")
    graphs = {}
    for name, file in manifest["graphs"].items():
        if Path(file).name != file or file.startswith("."):  # plain names only: never outside the folder
            raise ModelError(f"{folder}/manifest.json: graph file {file!r} is not a plain file name")
        graphs[name] = load_graph(folder / file)
    report_path = folder / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    forward = graphs["forward"]
    source = ModelSource(
        str(manifest.get("model")), None, example_inputs_of(forward), is_lm="prefill" in graphs,
        **_load_tokenizer(folder, manifest),
    )
    return Optimized(
        graph=forward, report=report, example_inputs=source.example_inputs, device=resolve_device(device),
        prefill=graphs.get("prefill"), decode=graphs.get("decode"), max_seq_len=int(manifest.get("max_seq_len", 0)),
        source=source,
    )


def optimize(
    model: torch.nn.Module | str | os.PathLike[str] | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    pipeline: str = DEFAULT_PIPELINE,
    device: str | torch.device | None = None,
    calib_data: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    dump_dir: str | os.PathLike[str] | None = None,
    repro_dir: str | os.PathLike[str] | None = None,
    on_error: OnError = "stop",
    profile: bool = True,
    generation: bool = True,
    seq_len: int = 128,
    dynamic_shapes: object = None,
    hooks: Sequence[Hook] = (),
    on_stage: Callable[[str], None] = lambda label: None,
) -> Optimized:
    """Capture ``model``, run ``pipeline`` with verification (and profiling), return the result.

    ``dynamic_shapes`` (for an ``nn.Module``) is passed to ``torch.export``; the saved graph keeps it. For an
    ``.onnx`` file the file's symbolic dims stay dynamic; ``dynamic_shapes=False`` fixes them at the example's size.
    ``hooks`` are added to the forward graph's pass manager; ``on_stage`` is told each stage as it begins.
    Raises :class:`passforge.passes.manager.PassFailure` (with the partial result) when a pass fails under
    ``on_error="stop"``, and :class:`~passforge.passes.manager.PipelineInterrupted` on Ctrl-C, its ``optimized``
    holding the graph after the passes that completed (``.save()`` it to keep it).
    """
    manager = PassManager.parse(pipeline, on_error=on_error)  # parse first: a bad spec fails before any work
    dev = resolve_device(device)
    on_stage(f"loading {model if isinstance(model, (str, os.PathLike)) else type(model).__name__}")
    source = _source_for(model, example_inputs, seq_len)
    on_stage(f"capturing {source.name}")
    if source.pt2_path:
        gm = load_graph(source.pt2_path)
    elif source.onnx_path:
        from passforge.ir.onnx_import import import_onnx

        gm = import_onnx(source.onnx_path, source.example_inputs, dynamic=dynamic_shapes is not False)
    else:
        gm = capture(source.module, source.example_inputs, dynamic_shapes=dynamic_shapes, name=source.name)
    example = source.example_inputs or example_inputs_of(gm)
    check_reference_run(gm, example, source.name)  # bad inputs or NaN weights: said so, not blamed on a pass
    ctx = Context(
        example_inputs=example,
        device=dev,
        calib_tokens=data_tokens(source, calib_data, source.calib_text),
        eval_tokens=data_tokens(source, eval_data, source.eval_text),
        repro_dir=Path(repro_dir) if repro_dir else None,
    )
    check_token_ids(ctx.calib_tokens, gm, calib_data)  # data tokenized for another model: said so, before any pass
    check_token_ids(ctx.eval_tokens, gm, eval_data)
    all_hooks: list[Hook] = [VerifyHook()]
    if dump_dir:
        all_hooks.append(DumpHook(dump_dir))
    if profile:
        all_hooks.append(ProfileHook(lm=source.is_lm))
    all_hooks.extend(hooks)
    manager.hooks = all_hooks
    try:
        result = manager.run(gm, ctx)
    except PipelineInterrupted as interrupted:  # Ctrl-C: hand the caller what completed, ready to save
        report = build_report(interrupted.partial, model=source.name, device=dev)
        report["interrupted"] = str(interrupted)
        interrupted.optimized = Optimized(interrupted.partial.graph, report, example, device=dev, source=source)
        raise
    report = build_report(result, model=source.name, device=dev)
    optimized = Optimized(result.graph, report, example, device=dev, source=source)
    if generation and source.kv_model is not None:
        on_stage("capturing and optimizing the prefill and decode graphs")
        try:
            forward_status = [r.status for r in result.records]
            report["generation"] = _add_generation_graphs(optimized, source, pipeline, ctx, on_error, forward_status)
        except KeyboardInterrupt:  # the forward pipeline completed: keep it (the step graphs are set last, if at all)
            report["interrupted"] = report["generation"] = "interrupted while building the generation graphs"
            stopped = PipelineInterrupted(report["interrupted"], partial=result)
            stopped.optimized = optimized
            raise stopped from None
        except (CaptureError, PassFailure, GenerationMismatch) as exc:  # keep the forward graph, without generate()
            if isinstance(exc, PassFailure) and not isinstance(exc.__cause__, PreconditionError):
                raise  # a pass broke: the failure policy decides, as for the forward graph
            # a capture that failed, or a pass that cannot apply to a step graph (pruning kv heads: the cache)
            warnings.warn(f"no generation graphs for {source.name}: {exc}", stacklevel=2)
            report["generation"] = {"error": str(exc)}
    return optimized


def _source_for(
    model: torch.nn.Module | str | os.PathLike[str] | None, example_inputs: Sequence[torch.Tensor] | None, seq_len: int
) -> ModelSource:
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise ModelError("optimize(module) needs example_inputs, e.g. (torch.randint(0, V, (1, 64)),)")
        from passforge.models.llama import Llama

        if isinstance(model, Llama):
            from passforge.models import tokenizer

            byte_level = model.config.vocab_size >= tokenizer.VOCAB_SIZE
            return ModelSource(
                "Llama", model, tuple(example_inputs), is_lm=True, kv_model=model,
                encode=tokenizer.encode if byte_level else None, decode=tokenizer.decode if byte_level else None,
            )
        return ModelSource(type(model).__name__, model, tuple(example_inputs), is_lm=False)
    source = resolve(model, seq_len=seq_len)
    if example_inputs is not None:  # the caller's examples win over the ones made up for a file or folder
        source.example_inputs = tuple(example_inputs)
    return source


def data_tokens(
    source: ModelSource, path: str | os.PathLike[str] | None, bundled_text: str | None
) -> torch.Tensor | None:
    """The user's data file as tokens (see ``read_tokens``), else the model's bundled text, else None."""
    if path:
        return read_tokens(path, source)
    if bundled_text is None or source.encode is None:
        return None
    return torch.tensor(source.encode(bundled_text), dtype=torch.long)


class GenerationMismatch(RuntimeError):
    """A pass ran on the forward graph but not on a generation step (or the other way round, under
    ``on_error="skip"``): generate() would run another model than the forward graph."""


def _add_generation_graphs(
    optimized: Optimized, source: ModelSource, pipeline: str, ctx: Context, on_error: OnError,
    forward_status: Sequence[str],
) -> dict[str, list[dict[str, object]]]:
    """Capture the prefill and one-token decode steps and run the same pipeline on each (verified, with the
    same failure policy); returns each graph's pass statuses for the report. ``source.kv_model`` is passforge's
    Llama or anything with its ``prefill``/``decode``/``new_kv_cache`` and ``config.max_seq_len`` (a Hugging
    Face causal LM through ``models.hf_kv.HFKVModel``)."""
    from passforge.models.llama import DecodeStep, PrefillStep

    model = source.kv_model
    prefill_len = min(PREFILL_LEN, model.config.max_seq_len)
    prefill_in = (torch.zeros(1, prefill_len, dtype=torch.long),)
    token, pos = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    decode_in = (token, pos, *model.new_kv_cache(1))
    graphs, statuses = [], {}
    for label, step, inputs in (("prefill", PrefillStep(model), prefill_in), ("decode", DecodeStep(model), decode_in)):
        gm = capture(step, inputs, name=f"{source.name}:{label}")
        step_ctx = Context(
            example_inputs=inputs, device=ctx.device, calib_tokens=ctx.calib_tokens, repro_dir=ctx.repro_dir,
            role=label, memo=ctx.memo,
        )
        manager = PassManager.parse(pipeline, hooks=[VerifyHook()], on_error=on_error)
        result: PipelineResult = manager.run(gm, step_ctx)
        for forward, record in zip(forward_status, result.records, strict=True):
            if (forward == "ok") != (record.status == "ok"):
                raise GenerationMismatch(
                    f"'{record.spec}' was {forward} on the forward graph but {record.status} on the {label} graph"
                    f"{f' ({record.error})' if record.error else ''}; generate() would run a different model, so "
                    "there is none"
                )
        graphs.append(result.graph)
        statuses[label] = [{"spec": r.spec, "status": r.status, "error": r.error} for r in result.records]
    optimized.prefill, optimized.decode = graphs
    optimized.max_seq_len = model.config.max_seq_len
    return statuses
