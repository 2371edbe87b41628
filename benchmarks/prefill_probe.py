"""What is left for issue 3's prefill target beyond the int8 GEMMs? Two levers, timed alone on llama-100m's
shapes at 512 tokens (bf16, batch 1), round-robin medians:

- attention: SDPA's CPU kernel with ``is_causal`` against the same causal attention computed in query blocks,
  each block attending only the keys up to its end (an explicit bottom-right causal mask), so the masked
  upper triangle is not computed; and against non-causal SDPA (the same work, no mask) for scale;
- the LM head (512 × 768 → 32000): the bf16 GEMM plus the fp32 logits passforge returns, against
  ``torch._int_mm`` (int8 activations × int8 weights) in column blocks of 4096 with the dequantizing
  multiply written into the fp32 logits, and ``_int_mm`` alone; and against passforge's w8a8-static op
  (``int8_static_linear``, x quantized per tensor) where it runs oneDNN's u8 × s8 linear (VNNI CPUs: the
  epilogue inside the GEMM, bf16 out, then the fp32 logits), and that oneDNN call alone.

Each figure is one layer's attention (12 heads of 64) or the one LM head; multiply the attention by the
model's 8 layers to compare with a whole prefill. Max errors are against an fp32 reference.

    python benchmarks/prefill_probe.py [--repeats 9] [--threads N]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from passforge.kernels.ops import onednn_int8_exact, quantize_per_tensor_uint8
from passforge.kernels.prepack import onednn_int8_weight
from passforge.runtime.profile import interleaved_latency_ms

T, HEADS, HEAD_DIM, DIM, VOCAB = 512, 12, 64, 768, 32000


def causal_in_query_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: int) -> torch.Tensor:
    """Causal attention with block i of the queries attending keys [0, end_i) only (bottom-right mask)."""
    size = q.shape[2] // blocks
    outs = []
    for i in range(blocks):
        end = (i + 1) * size
        mask = torch.ones(size, end, dtype=torch.bool).tril(end - size)
        outs.append(F.scaled_dot_product_attention(q[:, :, i * size:end], k[:, :, :end], v[:, :, :end],
                                                   attn_mask=mask))
    return torch.cat(outs, dim=2)


def int8_head_in_blocks(x8: torch.Tensor, w8t: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 logits of an int8 × int8 LM head, ``block`` vocabulary columns per ``_int_mm``."""
    out = torch.empty(x8.shape[0], w8t.shape[1])
    for j in range(0, w8t.shape[1], block):
        torch.mul(torch._int_mm(x8, w8t[:, j:j + block]), scales[:, j:j + block], out=out[:, j:j + block])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, T, HEAD_DIM, generator=g, dtype=torch.bfloat16) for _ in range(3))
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    x = torch.randn(T, DIM, generator=g, dtype=torch.bfloat16)
    w = torch.randn(VOCAB, DIM, generator=g, dtype=torch.bfloat16) / DIM**0.5
    x_scale = x.float().abs().amax(dim=1, keepdim=True) / 127
    w_scale = w.float().abs().amax(dim=1) / 127
    x8 = torch.round(x.float() / x_scale).to(torch.int8)
    w8t = torch.round(w.float() / w_scale[:, None]).to(torch.int8).t().contiguous()
    scales = x_scale * w_scale  # (T, VOCAB) fp32: the dequantizing multiply
    logits = x.float() @ w.float().t()
    w8 = w8t.t().contiguous()  # (VOCAB, DIM): the op's weight layout
    s_x = float(x.float().abs().max()) / 127  # one calibrated scale for the tensor, zero point 0

    rows: dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor | None]] = {
        "attention: SDPA is_causal": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reference),
        "attention: 4 query blocks": (lambda: causal_in_query_blocks(q, k, v, 4), reference),
        "attention: 8 query blocks": (lambda: causal_in_query_blocks(q, k, v, 8), reference),
        "attention: SDPA, no mask (not causal)": (lambda: F.scaled_dot_product_attention(q, k, v), None),
        "LM head: bf16 linear + fp32 logits": (lambda: F.linear(x, w).float(), logits),
        "LM head: int8 _int_mm, 4096-column blocks, fp32 logits": (
            lambda: int8_head_in_blocks(x8, w8t, scales, 4096), logits),
        "LM head: int8 _int_mm alone (int32 out)": (lambda: torch._int_mm(x8, w8t), None),
    }
    if onednn_int8_exact():
        packed, zero_points = onednn_int8_weight(w8)
        xu8 = quantize_per_tensor_uint8(x, s_x, 0)
        rows["LM head: passforge int8_static_linear (oneDNN u8 linear, bf16 out), fp32 logits"] = (
            lambda: torch.ops.passforge.int8_static_linear(x, s_x, 0, w8, w_scale, None).float(), logits)
        rows["LM head: oneDNN u8 linear alone (bf16 out)"] = (
            lambda: torch.ops.onednn.qlinear_pointwise(xu8, s_x, 128, packed, w_scale, zero_points, None, 1.0, 0,
                                                       torch.bfloat16, "none", [], ""), None)
    with torch.inference_mode():
        errors = {}
        for label, (fn, expected) in rows.items():
            out = fn()
            errors[label] = (float((out.float() - expected).abs().max() / expected.abs().max())
                             if expected is not None else None)
        medians = interleaved_latency_ms([fn for fn, _ in rows.values()], device=torch.device("cpu"),
                                         repeats=args.repeats, warmup=1, min_total_s=0.0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, T={T}, bf16\n")
    print("| what | ms | rel err |\n|---|---:|---:|")
    for (label, err), ms in zip(errors.items(), medians):
        print(f"| {label} | {ms:.2f} | {'—' if err is None else f'{err:.1e}'} |")


if __name__ == "__main__":
    main()
