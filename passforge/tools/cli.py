"""``passforge`` command line: optimize | convert | passes | explain | profile | replay.

Exit codes: 0 success, 2 usage error (bad arguments, pipeline spec, model name or input), 1 failure (a pass
failed, capture failed) — always with a short message saying what to do, never a bare traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from passforge.ir.onnx_export import ATTENTION_FORMS
from passforge.models.registry import DEFAULT_MODEL

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130  # 130: killed by SIGINT, as shells say


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"passforge: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from passforge.api import DEFAULT_PIPELINE

    parser = _Parser(prog="passforge", description="Compiler-style graph optimization for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    opt = sub.add_parser("optimize", help="capture MODEL, run a pipeline, write the model and per-pass report")
    opt.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"preset name, Hugging Face folder, .pt2 or "
                     f".onnx file (default: {DEFAULT_MODEL}, the bundled LM)")
    opt.add_argument("--pipeline", default=DEFAULT_PIPELINE, help=f"pass pipeline (default: {DEFAULT_PIPELINE})")
    opt.add_argument("--out", default="passforge-out", help="output folder (default: passforge-out)")
    opt.add_argument("--calib-data", help="UTF-8 text file for calibration-driven passes")
    opt.add_argument("--eval-data", help="UTF-8 text file for perplexity (default: the bundled held-out text)")
    opt.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    opt.add_argument("--dump-dir", help="write the IR before the first pass and after every pass here")
    opt.add_argument("--on-error", default="stop", choices=("stop", "skip"),
                     help="a failing pass is rolled back; then stop (default) or skip it and go on")
    opt.add_argument("--seq-len", type=_length, default=128, help="example input length (default: 128)")
    opt.add_argument("--no-profile", action="store_true", help="skip latency/accuracy figures per pass")
    opt.add_argument("--hf-out", help="also write a Hugging Face folder (config rewritten to pruned sizes) here; "
                     "a Hugging Face input only")

    passes = sub.add_parser("passes", help="list the registered passes with their options and docs")
    passes.add_argument("--json", action="store_true", help="machine-readable output")

    explain = sub.add_parser("explain", help="why a pattern pass's rules do or do not fire on a model")
    explain.add_argument("pass_name", metavar="PASS")
    explain.add_argument("model", nargs="?", default=DEFAULT_MODEL)

    prof = sub.add_parser("profile", help="per-node time of a model's graph, by op and by creating pass; or "
                          "with --sensitivity, what quantizing each layer costs and which layers to skip")
    prof.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    prof.add_argument("--pipeline", default="", help="optimize with this pipeline first (default: none)")
    prof.add_argument("--top", type=int, default=15, help="rows per table (default: 15)")
    prof.add_argument("--seq-len", type=_length, default=128)
    sens = prof.add_argument_group("sensitivity search")
    sens.add_argument("--sensitivity", action="store_true",
                      help="rank layers by the perplexity the recipe costs each, and propose a skip list")
    sens.add_argument("--recipe", default="quantize(scheme=w4)",
                      help="quantization pipeline, starting with quantize(...) (default: quantize(scheme=w4))")
    sens.add_argument("--max-ppl-increase", type=_increase, default=0.01, metavar="BUDGET",
                      help="perplexity budget, e.g. 1%% or 0.01 (default: 1%%)")
    sens.add_argument("--time-budget", type=float, default=600.0, metavar="SECONDS",
                      help="stop with the best candidate so far after this long (default: 600)")
    sens.add_argument("--eval-windows", type=int, default=16, help="perplexity windows per evaluation (default: 16)")
    sens.add_argument("--calib-data", help="calibration data: UTF-8 text, or token ids (.json list, .safetensors)")
    sens.add_argument("--eval-data", help="evaluation data (default: the model's bundled held-out text)")
    sens.add_argument("--out", default="sensitivity.json", help="where the search state and its best candidate "
                      "are written after every step (default: sensitivity.json)")

    replay = sub.add_parser("replay", help="rerun the failing pass of a reproducer folder")
    replay.add_argument("reproducer", type=Path)

    conv = sub.add_parser("convert", help="import an ONNX model, run a pipeline (verified), write the result as ONNX")
    conv.add_argument("model", type=Path, help=".onnx file (external data beside it is read, never written)")
    conv.add_argument("--pipeline", required=True, help="pass pipeline, e.g. 'cleanup,quantize(scheme=w8a8)'")
    conv.add_argument("-o", "--out", type=Path, required=True, help="the ONNX file to write (not the input)")
    conv.add_argument("--calib-data", help="calibration data for calibrated passes (text or token ids)")
    conv.add_argument("--on-error", default="stop", choices=("stop", "skip"),
                      help="a failing pass is rolled back; then stop (default) or skip it and go on")
    conv.add_argument("--seq-len", type=_length, default=128,
                      help="example sequence length for a language model (default: 128)")
    conv.add_argument("--static", action="store_true", help="fix every dim at the example's size (fused attention "
                      "needs it, except plain causal or masked calls with --attention onnx)")
    conv.add_argument("--attention", default="decompose", choices=ATTENTION_FORMS,
                      help="fused attention as standard ops (default), ONNX's Attention op (opset 23), or ONNX "
                      "Runtime's com.microsoft.GroupQueryAttention; calls a form cannot express are decomposed")
    conv.add_argument("--opset", type=int, help="ONNX opset of the output (default: 21, or 23 with --attention onnx)")
    return parser


def _increase(text: str) -> float:
    from passforge.eval.sensitivity import parse_increase

    try:
        return parse_increase(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _length(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 tokens, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from passforge.ir.capture import CaptureError
    from passforge.ir.onnx_export import OnnxExportError
    from passforge.models.registry import ModelError
    from passforge.passes.base import PassError
    from passforge.passes.spec import SpecError
    from passforge.runtime.executor import InputError

    handlers = {"optimize": _optimize, "passes": _passes, "explain": _explain, "profile": _profile, "replay": _replay,
                "convert": _convert}
    try:
        return handlers[args.command](args)
    except (SpecError, ModelError, InputError) as exc:
        print(f"passforge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (PassError, CaptureError, OnnxExportError, FileNotFoundError, PermissionError, OSError) as exc:
        print(f"passforge: failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("passforge: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if os.environ.get("PASSFORGE_TRACEBACK"):
            raise
        print(f"passforge: internal error: {type(exc).__name__}: {exc}\n"
              "  rerun with PASSFORGE_TRACEBACK=1 for the traceback, and please report it", file=sys.stderr)
        return EXIT_FAILURE


def _optimize(args: argparse.Namespace) -> int:
    from passforge.api import Optimized, check_output_folder, optimize
    from passforge.ir.serialize import write_text_atomic
    from passforge.passes.manager import PassFailure, PipelineInterrupted
    from passforge.passes.spec import parse_pipeline
    from passforge.runtime.executor import resolve_device
    from passforge.tools.progress import OptimizeProgress
    from passforge.tools.report import build_report, render_html, render_table

    n_passes = len(parse_pipeline(args.pipeline))  # a bad spec or output folder: usage errors before slow work
    out = Path(args.out)
    check_output_folder(out, model=args.model)
    steps = 2 + n_passes + 1 + 1  # load, capture, the passes, timing, generation graphs
    try:
        with OptimizeProgress(steps) as progress:
            optimized = optimize(
                args.model, pipeline=args.pipeline, device=args.device, calib_data=args.calib_data,
                eval_data=args.eval_data, dump_dir=args.dump_dir, repro_dir=out / "reproducers",
                on_error=args.on_error, profile=not args.no_profile, seq_len=args.seq_len, hooks=[progress],
                on_stage=progress.stage,
            )
    except PassFailure as failure:
        report = build_report(failure.partial, model=str(args.model), device=resolve_device(args.device))
        print(render_table(report))
        raise
    except PipelineInterrupted as interrupted:  # keep what completed beside the output, never over it
        if not isinstance(interrupted.optimized, Optimized):
            raise
        partial = out.resolve().with_name(f"{out.resolve().name}.interrupted")  # `--out .` has no name of its own
        print(render_table(interrupted.optimized.report))
        interrupted.optimized.save(partial)
        print(f"passforge: {interrupted}; saved that graph to {partial} (no model written to {out})", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(render_table(optimized.report))
    optimized.save(out)
    write_text_atomic(out / "report.html", render_html(optimized.report))
    if optimized.prefill is not None and optimized.has_tokenizer:  # a sample needs text in and out
        text, stats = optimized.generate("def main(", 48)
        print(f"generate (greedy, {stats.new_tokens} tokens, {stats.decode_tokens_per_s:.1f} tok/s decode):")
        print("  " + repr(text))
    print(f"wrote {out / 'model.pt2'}, {out / 'report.json'}, {out / 'report.html'}")
    if args.hf_out:
        from passforge.models.hf_save import HFSaveError

        try:
            print(f"wrote Hugging Face folder {optimized.save_hf(args.hf_out)}")
        except HFSaveError as exc:
            print(f"no Hugging Face folder: {exc} (passforge's format is in {out})")
            return EXIT_FAILURE
    return EXIT_OK


def _convert(args: argparse.Namespace) -> int:
    """ONNX in, ONNX out: ``optimize`` (import, the pipeline under the verifier, no profiling), then
    ``export_onnx``, which writes atomically."""
    from passforge.api import optimize
    from passforge.ir.onnx_export import ATTENTION_OPSET, MIN_OPSET, export_onnx
    from passforge.ir.onnx_import import external_data_files
    from passforge.ir.serialize import unwritable_reason
    from passforge.models.registry import ModelError
    from passforge.passes.spec import parse_pipeline
    from passforge.tools.report import render_table

    parse_pipeline(args.pipeline)  # a bad spec is a usage error before any slow work
    if args.model.suffix != ".onnx":
        raise ModelError(f"{args.model}: convert reads .onnx files (passforge optimize takes the other models)")
    if not args.model.is_file():
        raise ModelError(f"{args.model}: no such file")
    same = args.out.resolve() == args.model.resolve() or (args.out.exists() and args.out.samefile(args.model))
    if same:
        raise ModelError(f"-o {args.out} is the input model; the input is never overwritten, choose another path")
    if args.out.is_dir():
        raise ModelError(f"-o {args.out} is a folder; name the .onnx file to write")
    if args.out.resolve() in external_data_files(args.model):
        raise ModelError(f"-o {args.out} holds the input model's weights (external data); choose another path")
    if (problem := unwritable_reason(args.out)) is not None:
        raise ModelError(f"-o {args.out}: {problem}; choose another path")
    if args.opset is not None and args.opset < MIN_OPSET:
        raise ModelError(f"--opset {args.opset}: the QDQ forms need opset {MIN_OPSET} or newer")
    if args.attention == "onnx" and args.opset is not None and args.opset < ATTENTION_OPSET:
        raise ModelError(f"--attention onnx writes ONNX's Attention op: it needs --opset {ATTENTION_OPSET} or newer")
    optimized = optimize(
        args.model, pipeline=args.pipeline, calib_data=args.calib_data, on_error=args.on_error, profile=False,
        generation=False, seq_len=args.seq_len, dynamic_shapes=False if args.static else None,
    )  # fmt: skip
    print(render_table(optimized.report))
    path = export_onnx(
        optimized.graph, args.out, optimized.example_inputs, opset=args.opset, attention=args.attention
    )
    print(f"wrote {path}")
    return EXIT_OK


def _passes(args: argparse.Namespace) -> int:
    from passforge.passes.registry import available

    listing = []
    for name, cls in available().items():
        hints = typing.get_type_hints(cls)
        options = [
            {"name": f.name, "type": _type_name(hints[f.name]), "default": f.default}
            for f in dataclasses.fields(cls) if f.init
        ]
        listing.append({"name": name, "lossy": cls.lossy, "doc": cls.doc(), "options": options})
    if args.json:
        print(json.dumps(listing, indent=2, default=str))
        return EXIT_OK
    for entry in listing:
        opts = ", ".join(f"{o['name']}: {o['type']} = {o['default']}" for o in entry["options"]) or "no options"
        print(f"{entry['name']}{' (lossy)' if entry['lossy'] else ''} — {opts}")
        for line in entry["doc"].splitlines():
            print(f"    {line}")
    return EXIT_OK


def _type_name(annotation: object) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _explain(args: argparse.Namespace) -> int:
    from passforge.ir.capture import capture
    from passforge.ir.serialize import load_graph
    from passforge.models.registry import resolve
    from passforge.passes.registry import available, lookup
    from passforge.passes.rewrite import explain
    from passforge.passes.spec import SpecError, suggest

    cls = lookup(args.pass_name)
    if cls is None:
        raise SpecError(args.pass_name, 0, f"unknown pass '{args.pass_name}'{suggest(args.pass_name, available())}")
    rules, own_explain = getattr(cls, "rules", None), getattr(cls, "explain", None)
    if rules is None and own_explain is None:
        print(f"{args.pass_name} is not a pattern pass (it has no rules to explain)")
        return EXIT_OK
    source = resolve(args.model)
    if source.pt2_path is not None:
        gm = load_graph(source.pt2_path)
    elif source.onnx_path is not None:
        from passforge.ir.onnx_import import import_onnx

        gm = import_onnx(source.onnx_path, source.example_inputs)
    else:
        gm = capture(source.module, source.example_inputs, name=source.name)
    if own_explain is not None:  # a matcher pass (fuse-attention) explains itself
        print("\n".join(own_explain(gm)))
        return EXIT_OK
    for report in explain(gm, rules()):
        print("\n".join(report.lines()))
    return EXIT_OK


def _profile(args: argparse.Namespace) -> int:
    from passforge.api import optimize
    from passforge.runtime.profile import profile_nodes

    if args.sensitivity:
        return _sensitivity(args)

    optimized = optimize(args.model, pipeline=args.pipeline or "cleanup", profile=False, generation=False,
                         seq_len=args.seq_len)
    result = profile_nodes(optimized.graph, optimized.example_inputs)
    print(f"{args.model}: {len(result.by_node)} nodes, {result.total_ms:.2f} ms interpreted (median of 5)")
    for title, table in (("by op", result.by_op), ("by pass", result.by_pass), ("slowest nodes", result.by_node)):
        print(f"\n{title}:")
        for key, ms in list(table.items())[: args.top]:
            print(f"  {ms:9.3f} ms  {100 * ms / max(result.total_ms, 1e-9):5.1f}%  {key}")
    print("\nallocated by op:")
    for key, nbytes in list(result.bytes_by_op.items())[: args.top]:
        print(f"  {nbytes / 2**20:9.3f} MB  {key}")
    return EXIT_OK


def _sensitivity(args: argparse.Namespace) -> int:
    from passforge.api import data_tokens
    from passforge.eval.sensitivity import recipe_passes, sensitivity_search
    from passforge.ir.capture import capture
    from passforge.models.registry import ModelError, resolve
    from passforge.passes.base import Context
    from passforge.passes.manager import PassManager

    recipe_passes(args.recipe)  # a bad recipe is a usage error before any slow work
    source = resolve(args.model, seq_len=args.seq_len)
    if source.module is None:
        raise ModelError(f"{args.model}: the sensitivity search needs a model to capture, not a saved graph")
    example = source.example_inputs
    ctx = Context(
        example_inputs=example,
        calib_tokens=data_tokens(source, args.calib_data, source.calib_text),
        eval_tokens=data_tokens(source, args.eval_data, source.eval_text),
    )
    if ctx.eval_tokens is None:
        raise ModelError(f"{args.model}: no evaluation text to measure perplexity on; pass --eval-data FILE")
    gm = capture(source.module, example, name=source.name)
    gm = PassManager.parse(args.pipeline or "cleanup").run(gm, ctx).graph
    result = sensitivity_search(
        gm, ctx, args.recipe, seq_len=example[0].shape[-1], max_increase=args.max_ppl_increase,
        eval_windows=args.eval_windows, time_budget_s=args.time_budget, out=Path(args.out),
        on_progress=lambda message: print(message, flush=True),
    )
    print(f"\nfloat perplexity {result.float_ppl:.4f}; most sensitive layers for {result.recipe}:")
    for name, increase in result.ranking[: args.top]:
        print(f"  {100 * increase:+8.3f}%  {name}")
    if result.stopped_early:
        why = "interrupted (Ctrl-C)" if result.interrupted else "time budget spent"
        print(f"{why}: {len(result.unranked)} layer(s) unranked (kept in float), best so far below")
    best = result.best
    if best is not None:
        verdict = "within" if best.increase <= result.max_increase else "NOT within"
        print(f"\nbest: skip {len(best.skip)} layer(s), {100 * best.increase:+.3f}% ({verdict} the "
              f"{100 * result.max_increase:g}% budget)\n  --pipeline \"{best.pipeline}\"")
    print(f"wrote {args.out}")
    return EXIT_INTERRUPTED if result.interrupted else EXIT_OK


def _replay(args: argparse.Namespace) -> int:
    from passforge.passes.repro import replay

    replay(args.reproducer)
    print(f"{args.reproducer}: the pass now succeeds")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
