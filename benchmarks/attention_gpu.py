"""passforge's Triton attention kernels against torch SDPA's backends on a CUDA GPU (bf16).

Three tables, each timed with ``triton.testing.do_bench`` (median ms; the first call per shape compiles and is
not timed), every kernel checked against SDPA's output first (max abs error printed):

1. Forward TFLOP/s at T = 1k … 16k, head dim 64 and 128, causal and not; batch × heads sized like the
   FlashAttention benchmarks (B·T = 16k tokens, H·D = 2048). FLOPs = 4·B·H·T²·D, halved when causal.
   Rows: passforge Triton forward, SDPA flash, SDPA cuDNN, SDPA memory-efficient.
2. Decode: one query token, B = 1, 32 query heads on 8 kv heads (GQA), D = 128, cache 1k … 32k: passforge
   flash_decode vs SDPA (``enable_gqa``); µs and the K/V bytes read per µs (GB/s).
3. Sliding window (W = 1024, 4 sinks) vs full causal at T = 4k, 16k: passforge with ``window`` vs SDPA with the
   equivalent boolean mask (the only way SDPA takes a window) and SDPA full causal.

    python benchmarks/attention_gpu.py [--quick]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPE = torch.bfloat16


def bench(fn: Callable[[], torch.Tensor]) -> float:
    import triton.testing

    fn()  # compile / autotune outside the timing
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def sdpa(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> Callable:
    def run() -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, **kw)

    return run


def try_time(fn: Callable[[], torch.Tensor], reference: torch.Tensor) -> tuple[float, float] | None:
    try:
        err = (fn().float() - reference.float()).abs().max().item()
        return bench(fn), err
    except RuntimeError:  # this SDPA backend does not take the shape/dtype on this GPU
        return None


def forward_table(lengths: list[int]) -> None:
    from passforge.kernels.flash_attention import flash_attention_forward

    print("| D | causal | T | kernel | TFLOP/s | ms | max err vs SDPA flash |")
    print("|---:|---|---:|---|---:|---:|---:|")
    for d in (64, 128):
        for causal in (False, True):
            for t in lengths:
                b, h = max(1, 16384 // t), 2048 // d
                q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=DTYPE) for _ in range(3))
                flops = 4 * b * h * t * t * d / (2 if causal else 1)
                reference = sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, is_causal=causal)()
                rows = {
                    "passforge triton": lambda q=q, k=k, v=v, c=causal: flash_attention_forward(q, k, v, causal=c),
                    "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, is_causal=causal),
                    "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, is_causal=causal),
                    "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION, q, k, v, is_causal=causal),
                }
                for name, fn in rows.items():
                    timed = try_time(fn, reference)
                    if timed is None:
                        print(f"| {d} | {causal} | {t} | {name} | n/a | n/a | |")
                        continue
                    ms, err = timed
                    print(f"| {d} | {causal} | {t} | {name} | {flops / ms / 1e9:.0f} | {ms:.3f} | {err:.1e} |",
                          flush=True)


def decode_table(lengths: list[int]) -> None:
    from passforge.kernels.flash_attention import flash_decode

    print("\n| cache | kernel | µs | K/V GB/s | max err vs SDPA |")
    print("|---:|---|---:|---:|---:|")
    hq, hkv, d = 32, 8, 128
    for s in lengths:
        q = torch.randn(1, hq, 1, d, device="cuda", dtype=DTYPE)
        k, v = (torch.randn(1, hkv, s, d, device="cuda", dtype=DTYPE) for _ in range(2))
        kv_bytes = 2 * hkv * s * d * q.element_size()
        reference = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        rows = {
            "passforge flash_decode": lambda q=q, k=k, v=v: flash_decode(q, k, v),
            "sdpa (enable_gqa)": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        }
        for name, fn in rows.items():
            ms, err = try_time(fn, reference) or (float("nan"), float("nan"))
            print(f"| {s} | {name} | {ms * 1e3:.1f} | {kv_bytes / ms / 1e6:.0f} | {err:.1e} |", flush=True)


def window_table(lengths: list[int], window: int = 1024, sinks: int = 4) -> None:
    from passforge.kernels.attention import allowed
    from passforge.kernels.flash_attention import flash_attention_forward

    print(f"\n| T | kernel (window {window}, {sinks} sinks) | ms | max err vs SDPA masked |")
    print("|---:|---|---:|---:|")
    h, d = 16, 128
    for t in lengths:
        q, k, v = (torch.randn(1, h, t, d, device="cuda", dtype=DTYPE) for _ in range(3))
        band = allowed(t, t, causal=True, window=window, sinks=sinks, device=q.device)
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
        rows = {
            "passforge triton, window": lambda q=q, k=k, v=v: flash_attention_forward(
                q, k, v, causal=True, window=window, sinks=sinks),
            "sdpa, band mask": lambda q=q, k=k, v=v, m=band: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
            "sdpa flash, full causal (not the same result)": sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, is_causal=True),
        }
        for name, fn in rows.items():
            ms, err = try_time(fn, reference) or (float("nan"), float("nan"))
            print(f"| {t} | {name} | {ms:.3f} | {err:.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer lengths (gpu_check.sh)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_gpu.py needs a CUDA GPU (the CPU side is benchmarks/attention.py)")
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16")
    forward_table([1024, 4096, 16384] if args.quick else [1024, 2048, 4096, 8192, 16384])
    decode_table([1024, 8192, 32768] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768])
    window_table([4096, 16384])


if __name__ == "__main__":
    main()
