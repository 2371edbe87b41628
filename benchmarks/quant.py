"""Does weight quantization make the ~100M LLaMA preset smaller and faster on this machine?

For each pipeline: weight bytes, prefill latency (batch 1, --prefill tokens) and decode tokens/s (greedy, batch 1,
KV cache), side by side with eager PyTorch fp32 and torch.ao's ``quantize_dynamic`` (int8 dynamic, eager) as
the peer. All latencies are medians; graph variants are timed round-robin so machine noise hits them alike.

    python benchmarks/quant.py [--prefill 512] [--new-tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from passforge.api import optimize
from passforge.ir.graph import param_stats
from passforge.models.llama import build
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
    "passforge w4 g128 (no kernel yet)": "cleanup,quantize(scheme=w4),fold-quant",
}


def eager_decode_tokens_per_s(model: torch.nn.Module, new_tokens: int) -> float:
    cfg = model.config  # new_kv_cache() reads lm_head.weight, which quantize_dynamic turns into a method
    k = torch.zeros(cfg.n_layers, 1, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
    v = torch.zeros_like(k)
    token = torch.zeros(1, 1, dtype=torch.long)
    with torch.inference_mode():
        model.decode(token, torch.tensor([0]), k, v)  # warm-up
        start = time.perf_counter()
        for pos in range(1, new_tokens + 1):
            logits, k, v = model.decode(token, torch.tensor([pos]), k, v)
            token = logits[:, -1].argmax(-1, keepdim=True)
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)

    model = build("llama-100m").eval()
    tokens = torch.randint(0, 256, (1, args.prefill))
    prompt = tokens[:, :16]
    rows: dict[str, dict[str, float]] = {}
    graphs = {}
    for label, spec in PIPELINES.items():
        opt = optimize(model, (tokens,), pipeline=spec, profile=False)
        graphs[label] = opt
        decode = [opt.generate(prompt, args.new_tokens)[1].decode_tokens_per_s for _ in range(args.repeats)]
        rows[label] = {"MB": param_stats(opt.graph)[1] / 2**20, "decode tok/s": statistics.median(decode)}
    dynamic = torch.ao.quantization.quantize_dynamic(build("llama-100m").eval(), {torch.nn.Linear}, torch.qint8)
    peers = {"eager fp32": model, "torch.ao quantize_dynamic (eager)": dynamic}
    for label, peer in peers.items():
        decode = [eager_decode_tokens_per_s(peer, args.new_tokens) for _ in range(args.repeats)]
        rows[label] = {"MB": float("nan"), "decode tok/s": statistics.median(decode)}
    rows["eager fp32"]["MB"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    callables = {**{label: opt.graph for label, opt in graphs.items()}, **peers}
    latencies = interleaved_latency_ms(
        [lambda f=f: f(tokens) for f in callables.values()], device=torch.device("cpu"),
        repeats=args.repeats, warmup=1, min_total_s=0.0,
    )
    for label, ms in zip(callables, latencies):
        rows[label][f"prefill {args.prefill} ms"] = ms

    base = rows["eager fp32"]
    print(f"| variant | weights MB | prefill {args.prefill} ms | × eager | decode tok/s | × eager |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, row in rows.items():
        prefill = row[f"prefill {args.prefill} ms"]
        print(f"| {label} | {row['MB']:.0f} | {prefill:.0f} | {base[f'prefill {args.prefill} ms'] / prefill:.2f} | "
              f"{row['decode tok/s']:.1f} | {row['decode tok/s'] / base['decode tok/s']:.2f} |")


if __name__ == "__main__":
    main()
