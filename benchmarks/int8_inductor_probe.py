"""Probe for issue 3's prefill target: int8 linears written as plain ATen ops, compiled by inductor.

passforge's ``lower-quant`` emits opaque ``passforge::int8_*`` ops, which inductor calls as externs and
cannot fuse with the norm before them or the ops after them. This probe asks what the other route is
worth before it is built: every ``nn.Linear`` of the ~100M LLaMA preset (bf16, random weights) becomes
per-token dynamic int8 written in ATen — ``amax → round → clamp → int8 → torch._int_mm → scales`` — and the
model is compiled by inductor beside the issue's best peer, inductor bf16 (``freezing=True``).

It also shows a trap found on the way: with ``torch._inductor.config.freezing = True`` one such layer runs in
seconds instead of milliseconds on this CPU, so the int8 row is compiled without freezing.

    python benchmarks/int8_inductor_probe.py [--prefill 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from passforge.models.llama import build


class AtenInt8Linear(nn.Module):
    """``x @ w.T`` with w int8 per output channel and x int8 per token (symmetric), in ATen ops only."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        self.register_buffer("w_t", torch.round(w / scale).clamp(-127, 127).to(torch.int8).t().contiguous())
        self.register_buffer("w_scale", scale.t().contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        x_scale = (rows.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
        q = torch.round(rows / x_scale).clamp(-127, 127).to(torch.int8)
        y = (torch._int_mm(q, self.w_t).float() * x_scale * self.w_scale).to(x.dtype)
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def int8_everywhere(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, AtenInt8Linear(child))
        else:
            int8_everywhere(child)
    return model


def median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def compiled(model: nn.Module, tokens: torch.Tensor, *, freezing: bool) -> tuple[Callable[[], object], float]:
    torch._inductor.config.freezing = freezing  # read when the first call compiles
    fn = torch.compile(model)
    start = time.perf_counter()
    fn(tokens)
    return (lambda: fn(tokens)), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.no_grad():
        layer_x = torch.randn(1, args.prefill, 768, dtype=torch.bfloat16)
        layer = AtenInt8Linear(nn.Linear(768, 2048).bfloat16())
        for freezing in (True, False):
            torch._dynamo.reset()
            run, _ = compiled(layer, layer_x, freezing=freezing)
            print(f"one int8 layer 768->2048, M={args.prefill}, inductor freezing={freezing}: "
                  f"{median_ms(run, 5):.1f} ms")
        torch._dynamo.reset()

        model = build("llama-100m").eval()
        tokens = torch.randint(0, model.config.vocab_size, (1, args.prefill))
        reference = model(tokens)
        bf16 = copy.deepcopy(model).bfloat16()
        int8 = int8_everywhere(copy.deepcopy(model).bfloat16())
        rows: dict[str, Callable[[], object]] = {"eager bf16": lambda: bf16(tokens)}
        rows["inductor bf16 (freezing)"], bf16_s = compiled(bf16, tokens, freezing=True)
        rows["inductor int8 ATen, lm_head too (no freezing)"], int8_s = compiled(int8, tokens, freezing=False)
        error = (int8(tokens).float() - reference).abs().max() / reference.abs().max()
        print(f"compile s: bf16 {bf16_s:.1f}, int8 {int8_s:.1f}; int8 logits rel err vs fp32 {error:.3f}")
        samples: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.repeats):  # round-robin: machine noise hits every row alike
            for name, run in rows.items():
                samples[name].append(median_ms(run, 3))
        base = sorted(samples["inductor bf16 (freezing)"])[args.repeats // 2]
        print(f"\n| variant | prefill {args.prefill} ms | × inductor bf16 |\n|---|---:|---:|")
        for name, values in samples.items():
            ms = sorted(values)[args.repeats // 2]
            print(f"| {name} | {ms:.1f} | {base / ms:.2f} |")
        print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
