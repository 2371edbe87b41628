"""Hugging Face causal LMs from a local folder: never the hub, never pickled weights.

A model is wrapped as ``input_ids (B, T) -> logits (B, T, V)`` (no cache, no output dict) so it captures
to the same IR as passforge's own models.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import fx

from passforge.ir.capture import CaptureError, capture
from passforge.models.registry import example_tokens


class LogitsOnly(torch.nn.Module):
    """Adapter: a Hugging Face causal LM as ``tokens (B, T) -> logits (B, T, V)``, no cache, no dict."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        super().__init__()
        self.model = hf_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False, return_dict=True).logits


def load_causal_lm(
    path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
) -> torch.nn.Module:
    """Load a causal LM from ``path`` in eval mode. Only ``*.safetensors`` weights are accepted: pickled
    ``.bin`` checkpoints can run code when loaded. ``attn_implementation`` ("eager", "sdpa") overrides the
    folder's config."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CaptureError(f"{folder}: not a Hugging Face model folder (no config.json); pass the folder path.")
    if not any(folder.glob("*.safetensors")):
        raise CaptureError(
            f"{folder}: no *.safetensors weights. passforge does not unpickle .bin checkpoints; convert them "
            "once in a trusted environment with model.save_pretrained(dir, safe_serialization=True)."
        )
    try:
        import transformers
    except ImportError as exc:
        raise CaptureError("loading Hugging Face folders needs transformers: pip install 'passforge[hf]'") from exc
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, dtype=dtype, **options
        )
    return model.eval()


def capture_hf(
    path: str | os.PathLike[str], *, seq_len: int = 16, batch: int = 1, attn_implementation: str | None = None
) -> tuple[fx.GraphModule, torch.nn.Module, tuple[torch.Tensor]]:
    """Capture a local causal LM; returns ``(graph, eager reference in eval mode, example_inputs)``."""
    hf_model = load_causal_lm(path, attn_implementation=attn_implementation)
    wrapped = LogitsOnly(hf_model).eval()
    max_len = int(getattr(hf_model.config, "max_position_embeddings", seq_len) or seq_len)
    example = example_tokens(int(getattr(hf_model.config, "vocab_size", 256)), min(seq_len, max_len), batch)
    return capture(wrapped, example, name=f"hf:{Path(path).name}"), wrapped, example
