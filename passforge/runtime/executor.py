"""Run a lowered graph on CPU or CUDA, and generate text with prefill + one-token decode graphs.

The graph is a ``GraphModule`` (its generated Python calls ATen ops and passforge's custom ops directly);
the executor places it on the device, checks inputs against what the graph was captured for, and runs it
without autograd.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from passforge.ir.graph import copy_graph_module, describe_val, to_device
from passforge.runtime import allocator
from passforge.runtime.kv_cache import RingCache


class InputError(ValueError):
    """The inputs do not match what the graph was captured for."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A concrete device (``cuda`` → ``cuda:N`` of the current device, so tensors compare equal to it)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device 'cuda' requested but CUDA is not available here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def direct_cpu_calls(gm: fx.GraphModule) -> fx.GraphModule:
    """For running on CPU only: a copy of ``gm`` whose passforge op calls are plain calls of the ops' CPU
    implementations (``kernels.ops.CPU_KERNELS``), skipping the dispatcher's per-call cost::

        %y = passforge.int8_weight_linear.default(%x, %w, %s, None)   →   %y = _int8_weight_linear_cpu(%x, %w, %s, None)

    Same functions, same results; ``gm`` itself (what is saved, exported, compiled) is left as it is."""
    from passforge.kernels.ops import CPU_KERNELS

    if not any(node.target in CPU_KERNELS for node in gm.graph.nodes):
        return gm
    direct = copy_graph_module(gm)
    for node in direct.graph.nodes:
        if node.target in CPU_KERNELS:
            node.target = CPU_KERNELS[node.target]
    direct.recompile()
    return direct


class Executor:
    """A graph bound to a device: ``Executor(gm, "cuda")(tokens)``."""

    def __init__(
        self, gm: fx.GraphModule, device: str | torch.device | None = None, *,
        runner: Callable[[fx.GraphModule], Callable[..., object]] | None = None, keep_freed_memory: bool = True,
    ) -> None:
        """``runner``: what runs the graph once it is on the device (e.g. ``runtime.compiled_decode``'s
        compiled step); by default the graph itself, on CPU with passforge's ops called directly.
        ``keep_freed_memory``: on CPU, have glibc keep freed memory for reuse (``runtime.allocator``)."""
        self.device = resolve_device(device)
        if keep_freed_memory and self.device.type == "cpu":
            allocator.keep_freed_memory()
        placed = to_device(gm, self.device)
        if runner is not None:
            self.gm = runner(placed)
        else:
            self.gm = direct_cpu_calls(placed) if self.device.type == "cpu" else placed
        self._expected = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]

    def check_inputs(self, inputs: Sequence[object]) -> None:
        if len(inputs) != len(self._expected):
            raise InputError(f"the graph takes {len(self._expected)} inputs, got {len(inputs)}")
        for i, (value, want) in enumerate(zip(inputs, self._expected)):
            if not isinstance(want, torch.Tensor):
                continue
            if not isinstance(value, torch.Tensor):
                raise InputError(f"input {i}: expected a tensor {describe_val(want)}, got {type(value).__name__}")
            ok_rank = value.dim() == want.dim()
            ok_dims = ok_rank and all(not isinstance(d, int) or d == v for d, v in zip(want.shape, value.shape))
            if value.dtype != want.dtype or not ok_dims:
                raise InputError(f"input {i}: expected {describe_val(want)}, got {describe_val(value)}")

    def __call__(self, *inputs: object) -> object:
        self.check_inputs(inputs)
        moved = [x.to(self.device) if isinstance(x, torch.Tensor) else x for x in inputs]
        with torch.inference_mode():
            return self.gm(*moved)


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode graph alone (the first new token comes from prefill)."""
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


class KVGenerator:
    """Greedy (or sampled) generation from a prefill graph and a one-token decode graph.

    ``prefill(tokens (1, T)) -> (logits, k_cache, v_cache)`` with caches ``(L, B, nkv, S, hs)``;
    ``decode(token (1, 1), pos (1,), k_cache, v_cache) -> (logits, k_cache, v_cache)``.
    The prefill graph is captured for one prompt length; shorter prompts are left-aligned and the decode
    graph's position input makes the cache positions after the prompt irrelevant; a longer prompt is
    prefilled up to that length and the rest fed through decode steps, one token each (slower per token, and
    the same cache as a longer prefill would write).
    """

    def __init__(
        self, prefill: Executor, decode: Executor, *, max_seq_len: int, prefill_len: int, ring: RingCache | None = None
    ) -> None:
        self.prefill = prefill
        self.decode = decode
        self.max_seq_len = max_seq_len
        self.prefill_len = prefill_len
        self.ring = ring  # the decode graph's cache is a ring of ring.slots (see runtime.kv_cache)

    def generate(
        self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, seed: int = 0
    ) -> tuple[torch.Tensor, GenerationStats]:
        """Return ``(tokens (1, T + new), stats)``; ``temperature=0`` is greedy."""
        if prompt.dim() != 2 or prompt.shape[0] != 1:
            raise InputError(f"prompt must be int64 (1, T), got {describe_val(prompt)}")
        n_prompt = prompt.shape[1]
        if n_prompt < 1:
            raise InputError("the prompt is empty; give at least one token")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        max_new_tokens = min(max_new_tokens, self.max_seq_len - n_prompt)
        if max_new_tokens < 1:
            raise InputError(f"the prompt fills the model's context ({self.max_seq_len} tokens); shorten it")
        generator = torch.Generator().manual_seed(seed)
        prefilled = min(n_prompt, self.prefill_len)
        padded = torch.zeros(1, self.prefill_len, dtype=torch.long)
        padded[:, :prefilled] = prompt[:, :prefilled]
        start = time.perf_counter()
        logits, k_cache, v_cache = self.prefill(padded)
        if self.ring is not None:
            k_cache, v_cache = self.ring.from_full(k_cache, prefilled), self.ring.from_full(v_cache, prefilled)
        last = logits[:, prefilled - 1]
        for pos in range(prefilled, n_prompt):  # the rest of a long prompt, one decode step per token
            logits, k_cache, v_cache = self.decode(prompt[:, pos:pos + 1], torch.tensor([pos]), k_cache, v_cache)
            last = logits[:, -1]
        next_token = _pick(last, temperature, generator)
        prefill_s = time.perf_counter() - start
        out = [prompt[0].tolist(), [int(next_token)]]
        start = time.perf_counter()
        for pos in range(n_prompt, n_prompt + max_new_tokens - 1):
            token = torch.tensor([[int(next_token)]], dtype=torch.long)
            logits, k_cache, v_cache = self.decode(token, torch.tensor([pos]), k_cache, v_cache)
            next_token = _pick(logits[:, -1], temperature, generator)
            out[1].append(int(next_token))
        decode_s = time.perf_counter() - start
        tokens = torch.tensor([out[0] + out[1]], dtype=torch.long)
        return tokens, GenerationStats(n_prompt, len(out[1]), prefill_s, decode_s)


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    logits = logits.float().cpu()
    if temperature <= 0:
        return logits.argmax(-1)[0]
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0, 0]
