"""KV-cache generation steps for Hugging Face causal LMs, in the calling convention of passforge's own LLaMA.

``generate()`` runs two graphs (``runtime.executor.KVGenerator``)::

    prefill(tokens (1, T))                     -> (logits (1, T, V), k_cache, v_cache)
    decode(token (1, 1), pos (1,), k_cache, v_cache) -> (logits (1, 1, V), k_cache, v_cache)

with caches ``(L, B, nkv, S, hs)`` of a static size ``S``. A Hugging Face model keeps its cache in a ``Cache``
object it updates in place (``StaticLayer.update`` calls ``index_copy_``), which capture refuses: passes re-run
graphs freely only when they are functions of their inputs. :class:`StepCache` is the functional stand-in the
model is run with instead: its layers hold the tensors passed in and answer ``update`` with *new* tensors, so
the exported decode step is exactly passforge's own (which ``runtime.kv_cache.donate_kv_cache`` turns back into
an in-place update at run time)::

    %k_i = aten.select(%k_cache, 0, i)
    %u_i = aten.index_copy(%k_i, 2, %pos, %k_new_i)      # StepCacheLayer.update
    ... the model's own attention over %u_i, under the model's own mask (causal, sliding window) ...
    return (%logits, aten.stack([%u_0, ..., %u_L]), ...)

Positions and attention stay the model's code, and so do masks wherever the model windows its attention: the
cache answers the questions the mask builders ask (``get_mask_sizes``: S keys; ``get_seq_length``: the query is
at ``pos``), so a sliding window (Mistral) or learned positions (GPT-2, through the explicit ``position_ids``) come
out as Hugging Face computes them. A model with full causal attention under SDPA gets the decode mask passed in
instead, spelled as passforge's own (``arange(S) <= pos``, keys up to the query), which the model uses as is; that
spelling is what ``local-attention`` windows and ``runtime.kv_cache.ring_kv_cache`` bounds.
Written against the transformers 5 ``Cache``/``CacheLayerMixin`` API.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin


class StepCacheLayer(CacheLayerMixin):
    """One layer's keys and values for one step, updated out of place.

    Prefill (``pos is None``): ``update`` keeps this call's keys, so attention is over the T prompt keys exactly as
    without a cache (the caller pads them to S). Decode: ``update`` writes the new key at ``pos`` of a copy of the
    (B, nkv, S, hs) cache and attention is over all S slots, the mask hiding those after ``pos``.
    """

    is_compileable = True  # static shapes: the mask builders then always materialise the decode mask
    is_sliding = False  # every layer keeps all S slots; a window is the mask's job

    def __init__(self, keys: Tensor | None = None, values: Tensor | None = None, pos: Tensor | None = None) -> None:
        super().__init__()
        self.keys, self.values, self.pos = keys, values, pos
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to allocate: the tensors come from the step's inputs."""

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        if self.pos is None:
            self.keys, self.values = key_states, value_states  # (B, nkv, T, hs)
        else:
            self.keys = self.keys.index_copy(2, self.pos, key_states)  # (B, nkv, S, hs)
            self.values = self.values.index_copy(2, self.pos, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the mask builders."""
        return (query_length, 0) if self.pos is None else (self.keys.shape[2], 0)

    def get_seq_length(self) -> int | Tensor:
        """Tokens before the query: the mask builders offset query positions by it."""
        return 0 if self.pos is None else self.pos

    def get_max_length(self) -> int:
        return -1 if self.keys is None else self.keys.shape[2]


class StepCache(Cache):
    """A ``Cache`` of :class:`StepCacheLayer`s: for prefill (no tensors) or one decode step (the given caches)."""

    def __init__(self, n_layers: int, k_cache: Tensor | None = None, v_cache: Tensor | None = None,
                 pos: Tensor | None = None) -> None:
        if k_cache is None or v_cache is None:
            layers = [StepCacheLayer() for _ in range(n_layers)]
        else:
            layers = [StepCacheLayer(k_cache[i], v_cache[i], pos) for i in range(n_layers)]
        super().__init__(layers=layers)

    def stacked(self) -> tuple[Tensor, Tensor]:
        """Every layer's keys and values as ``(L, B, nkv, *, hs)``."""
        return torch.stack([layer.keys for layer in self.layers]), torch.stack([layer.values for layer in self.layers])


@dataclass(frozen=True)
class StepConfig:
    """What the generation code reads from a step model's ``config`` (as from passforge's ``LlamaConfig``)."""

    max_seq_len: int
    n_layers: int


class HFKVModel(nn.Module):
    """A Hugging Face causal LM with passforge LLaMA's generation entry points: ``prefill``, ``decode``,
    ``new_kv_cache`` and ``config.max_seq_len`` (so ``PrefillStep``/``DecodeStep`` wrap it unchanged).

    ``max_seq_len`` is the static cache size S; positions past the model's ``max_position_embeddings`` are
    refused up front, as a learned position table (GPT-2) has no row for them.
    """

    def __init__(self, hf_model: nn.Module, max_seq_len: int) -> None:
        super().__init__()
        hf_config = hf_model.config
        max_positions = int(getattr(hf_config, "max_position_embeddings", max_seq_len) or max_seq_len)
        if not 2 <= max_seq_len <= max_positions:
            raise ValueError(f"max_seq_len={max_seq_len} must be in 2..{max_positions} (max_position_embeddings)")
        self.model = hf_model
        self.config = StepConfig(max_seq_len=max_seq_len, n_layers=int(hf_config.num_hidden_layers))
        # transformers 5.x renamed the forward argument past_key_values to cache (the old name warns)
        parameters = inspect.signature(hf_model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self._own_decode_mask = getattr(hf_config, "_attn_implementation", None) == "sdpa" and not _windowed(hf_config)

    def _run(self, tokens: Tensor, positions: Tensor, cache: StepCache, mask: Tensor | None = None) -> Tensor:
        out = self.model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True,
                         return_dict=True, **{self._cache_arg: cache})
        return out.logits.float()  # (B, T, V), fp32 like passforge's Llama

    def prefill(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Logits for ``tokens`` (B, T) and k/v caches (L, B, nkv, S, hs), zero at positions >= T."""
        B, T = tokens.shape
        if self.config.max_seq_len < T:
            raise ValueError(f"prompt of {T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        cache = StepCache(self.config.n_layers)
        positions = torch.arange(T, device=tokens.device).unsqueeze(0).expand(B, T)
        logits = self._run(tokens, positions, cache)
        pad = (0, 0, 0, self.config.max_seq_len - T)  # pad the seq dim up to S
        k_cache, v_cache = cache.stacked()  # (L, B, nkv, T, hs)
        return logits, F.pad(k_cache, pad), F.pad(v_cache, pad)

    def decode(self, token: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One step: ``token`` (B, 1) at ``pos`` (shape (1,), int64) -> (logits (B, 1, V), new k, new v)."""
        cache = StepCache(self.config.n_layers, k_cache, v_cache, pos)
        mask = None
        if self._own_decode_mask:  # keys up to pos: (1, 1, 1, S), True = attend (SDPA's boolean mask)
            mask = torch.arange(self.config.max_seq_len, device=pos.device).view(1, 1, 1, -1) <= pos
        logits = self._run(token, pos.view(1, 1).expand(token.shape[0], 1), cache, mask)
        return (logits, *cache.stacked())

    def new_kv_cache(self, batch: int = 1) -> tuple[Tensor, Tensor]:
        """Zero k/v caches (L, B, nkv, S, hs). Their shape is read off a one-token prefill rather than the config:
        head counts and head sizes are spelled differently per architecture (n_head, num_key_value_heads,
        head_dim, partial fused projections), the cache the model writes is not."""
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            _, k_cache, v_cache = self.prefill(torch.zeros(batch, 1, dtype=torch.long, device=device))
        return torch.zeros_like(k_cache), torch.zeros_like(v_cache)


def _windowed(hf_config: object) -> bool:
    """Whether any layer attends through a sliding window or chunks (the model's mask builders must then run)."""
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        return any(kind != "full_attention" for kind in layer_types)
    windows = (getattr(hf_config, "sliding_window", None), getattr(hf_config, "attention_chunk_size", None))
    return any(size is not None for size in windows)
