"""A small, export-friendly LLaMA-style decoder.

The model is the reference workload for passforge's graph passes, so it is written to be
captured cleanly by ``torch.export``: no data-dependent Python control flow, static shapes on
the decode path and no in-place mutation of inputs. Three entry points are exposed:

* ``Llama.forward(tokens)``: plain causal LM forward, no cache (evaluation, default capture).
* ``Llama.prefill(tokens)``: forward that also returns a filled, statically-shaped KV cache.
* ``Llama.decode(token, pos, k_cache, v_cache)``: one generation step that returns *new* caches
  (functional, like gpt-fast's static cache but without buffers mutated in place).

``PrefillStep`` / ``DecodeStep`` wrap the latter two as ``nn.Module``s so each can be exported.

RoPE uses the *rotate-half* convention (the Hugging Face LLaMA layout): a head vector is split
into two halves ``(x1, x2)`` and rotated as ``(x1*cos - x2*sin, x2*cos + x1*sin)``. It keeps the
op sequence to slices, a cat and elementwise math, which is easy for passes to pattern-match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from passforge.models.presets import build_seeded


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters; frozen so a config can key caches and presets safely."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotate-half RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


PRESETS: dict[str, LlamaConfig] = {
    # Byte-level model small enough to train on 2 CPU cores in ~15 minutes (~2.5M params).
    "tiny": LlamaConfig(
        vocab_size=256, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=512, max_seq_len=256
    ),
    # ~99.5M params. 12 layers at ffn 2048 would be ~125M (the untied 32k-vocab embedding and
    # head alone are 49M), so depth is cut to 8 to keep LLaMA's ffn ~= 8/3 * dim ratio.
    "llama-100m": LlamaConfig(
        vocab_size=32000, dim=768, n_layers=8, n_heads=12, n_kv_heads=4, ffn_dim=2048, max_seq_len=2048
    ),
    # LLaMA-1/2 7B shapes (~6.74B params); only ever built on the meta device / fake tensors.
    "llama-7b": LlamaConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, max_seq_len=4096
    ),
}


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32 so bf16/fp16 activations do not lose the mean-square."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """Return ``(cos, sin)`` of shape ``(max_seq_len, head_dim)`` in rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (S, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (S, hs)
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, h, T, hs) by per-position ``cos``/``sin`` tables of shape (T, hs)."""
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """Expand (B, n_kv, T, hs) to (B, n_kv * n_rep, T, hs); query head h reads kv head h // n_rep."""
    if n_rep == 1:
        return x
    B, n_kv, T, hs = x.shape
    return x[:, :, None].expand(B, n_kv, n_rep, T, hs).reshape(B, n_kv * n_rep, T, hs)


class Attention(nn.Module):
    """Grouped-query attention; returns the post-RoPE, un-repeated k/v so callers can cache them."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _out(self, y: Tensor) -> Tensor:
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh * hs)
        return self.o_proj(y)  # (B, T, C)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Causal self-attention over ``x`` (B, T, C); returns (out, k, v)."""
        q, k, v = self._qkv(x, cos, sin)
        n_rep = self.n_heads // self.n_kv_heads
        y = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=True)
        return self._out(y), k, v  # y: (B, nh, T, hs)

    def decode(
        self, x: Tensor, pos: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Attend one new token ``x`` (B, 1, C) at ``pos`` over a (B, nkv, S, hs) cache.

        The cache is updated out-of-place and every one of the S slots is attended under ``mask``
        (1, S), so shapes never depend on the position.
        """
        q, k_new, v_new = self._qkv(x, cos, sin)  # q: (B, nh, 1, hs), k/v: (B, nkv, 1, hs)
        k = k_cache.index_copy(2, pos, k_new)  # (B, nkv, S, hs)
        v = v_cache.index_copy(2, pos, v_new)  # (B, nkv, S, hs)
        n_rep = self.n_heads // self.n_kv_heads
        y = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)
        return self._out(y), k, v  # y: (B, nh, 1, hs)


class FeedForward(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block; attention also hands back its k/v for the cache."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h, k, v = self.attention(self.attention_norm(x), cos, sin)
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x)), k, v

    def decode(
        self, x: Tensor, pos: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        h, k, v = self.attention.decode(self.attention_norm(x), pos, cos, sin, k_cache, v_cache, mask)
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x)), k, v


class Llama(nn.Module):
    """LLaMA-style decoder with untied embedding / LM head."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Derived from the config, so not persisted: checkpoints hold only learned weights.
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (S, hs)
        self.register_buffer("rope_sin", sin, persistent=False)  # (S, hs)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _check_len(self, T: int) -> None:
        if self.config.max_seq_len < T:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")

    def _run(self, tokens: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        T = tokens.shape[1]
        self._check_len(T)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hs)
        x = self.tok_embeddings(tokens)  # (B, T, C)
        ks, vs = [], []
        for layer in self.layers:
            x, k, v = layer(x, cos, sin)  # k, v: (B, nkv, T, hs)
            ks.append(k)
            vs.append(v)
        return self.lm_head(self.norm(x)).float(), ks, vs  # logits: (B, T, V)

    def forward(self, tokens: Tensor) -> Tensor:
        """Causal LM logits (B, T, V) in fp32 for int64 ``tokens`` (B, T); no cache."""
        logits, _, _ = self._run(tokens)
        return logits

    def prefill(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Like ``forward`` but also return k/v caches (L, B, nkv, S, hs), zero at positions >= T."""
        logits, ks, vs = self._run(tokens)
        pad = (0, 0, 0, self.config.max_seq_len - tokens.shape[1])  # pad the seq dim up to S
        k_cache = torch.stack([F.pad(k, pad) for k in ks])  # (L, B, nkv, S, hs)
        v_cache = torch.stack([F.pad(v, pad) for v in vs])  # (L, B, nkv, S, hs)
        return logits, k_cache, v_cache

    def decode(
        self, token: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One step: ``token`` (B, 1) at position ``pos`` (shape (1,), int64) -> (logits (B, 1, V), k, v).

        Returns new caches with this step's k/v written at ``pos``; the inputs are not mutated.
        """
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (1, hs)
        mask = torch.arange(self.config.max_seq_len, device=pos.device).view(1, -1) <= pos  # (1, S)
        x = self.tok_embeddings(token)  # (B, 1, C)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer.decode(x, pos, cos, sin, k_cache[i], v_cache[i], mask)  # k, v: (B, nkv, S, hs)
            ks.append(k)
            vs.append(v)
        return self.lm_head(self.norm(x)).float(), torch.stack(ks), torch.stack(vs)

    def new_kv_cache(self, batch: int = 1) -> tuple[Tensor, Tensor]:
        """Zero k/v caches (L, B, nkv, S, hs) matching this model's device and dtype."""
        cfg = self.config
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
        w = self.lm_head.weight
        return w.new_zeros(shape), w.new_zeros(shape)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class PrefillStep(nn.Module):
    """Exportable wrapper: ``forward(tokens) -> (logits, k_cache, v_cache)``."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.model.prefill(tokens)


class DecodeStep(nn.Module):
    """Exportable wrapper: ``forward(token, pos, k_cache, v_cache) -> (logits, k_cache, v_cache)``."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, token: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.model.decode(token, pos, k_cache, v_cache)


def example_prefill_inputs(
    cfg: LlamaConfig, batch: int = 1, seq: int = 16, *, device: torch.device | str | None = None
) -> tuple[Tensor]:
    """Deterministic example ``(tokens,)`` for exporting ``forward`` / ``PrefillStep``."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    return (tokens.to(device),)


def example_decode_inputs(model: Llama, batch: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Example ``(token, pos, k_cache, v_cache)`` for exporting ``DecodeStep``; caches are empty."""
    device = model.lm_head.weight.device
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    return (token, pos, *model.new_kv_cache(batch))


def build(
    preset: str | LlamaConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Llama:
    """Build a seeded ``Llama`` from a preset name or config (see :func:`passforge.models.presets.build_seeded`)."""
    return build_seeded(Llama, PRESETS, preset, device=device, dtype=dtype, seed=seed)


__all__ = [
    "PRESETS",
    "Block",
    "DecodeStep",
    "Llama",
    "LlamaConfig",
    "PrefillStep",
    "build",
    "example_decode_inputs",
    "example_prefill_inputs",
]
