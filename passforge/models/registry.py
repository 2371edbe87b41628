"""Resolve what the user names as MODEL — a preset, a Hugging Face folder, a ``.pt2``, an ``.onnx`` — into something
to capture.

A :class:`ModelSource` bundles the eager module (the accuracy reference), example inputs, whether it is a
language model, its tokenizer, and for language models with a KV cache (our LLaMA, Hugging Face causal LMs) the
prefill/decode steps used for generation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_MODEL = "tiny-lm"
DEFAULT_SEQ_LEN = 128


class ModelError(ValueError):
    """MODEL does not name anything passforge can load."""


@dataclass
class ModelSource:
    name: str
    module: torch.nn.Module | None  # None for a loaded .pt2 (the graph is its own reference)
    example_inputs: tuple[torch.Tensor, ...]
    is_lm: bool
    encode: Callable[[str], list[int]] | None = None
    decode: Callable[[list[int]], str] | None = None
    eval_text: str | None = None
    calib_text: str | None = None
    # prefill/decode graphs for generate(): a model with prefill(tokens), decode(token, pos, k, v),
    # new_kv_cache(batch) and config.max_seq_len — passforge's Llama, or models.hf_kv.HFKVModel
    kv_model: torch.nn.Module | None = None
    pt2_path: Path | None = None
    onnx_path: Path | None = None  # an .onnx file, imported by passforge.ir.onnx_import (module is None)
    extra: dict[str, object] = field(default_factory=dict)


def example_tokens(vocab_size: int, seq_len: int, batch: int = 1) -> tuple[torch.Tensor]:
    """Seeded example ``input_ids`` (ids below 256, so byte-level and real vocabularies both accept them)."""
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, min(vocab_size, 256), (batch, seq_len), generator=generator),)


def _llama_source(name: str, model: torch.nn.Module, seq_len: int, **extra: object) -> ModelSource:
    from passforge.models import tokenizer

    seq_len = min(seq_len, model.config.max_seq_len)
    return ModelSource(
        name=name,
        module=model,
        example_inputs=example_tokens(model.config.vocab_size, seq_len),
        is_lm=True,
        encode=tokenizer.encode,
        decode=tokenizer.decode,
        kv_model=model,
        **extra,
    )


def preset_names() -> list[str]:
    from passforge.models.llama import PRESETS
    from passforge.models.nanogpt import PRESETS as GPT_PRESETS

    return [DEFAULT_MODEL, *PRESETS, *(f"nanogpt-{p}" for p in GPT_PRESETS)]


def resolve(model: str | os.PathLike[str] | None, *, seq_len: int = DEFAULT_SEQ_LEN) -> ModelSource:
    """``None``/``"tiny-lm"`` → the bundled trained LM; a preset name; an HF folder; a ``.pt2`` or ``.onnx`` file."""
    spec = str(model) if model is not None else DEFAULT_MODEL
    path = Path(spec)
    if spec == DEFAULT_MODEL:
        from passforge.models import bundled

        return _llama_source(
            DEFAULT_MODEL, bundled.load_tiny_lm(), seq_len,
            eval_text=bundled.eval_text(), calib_text=bundled.calib_text(),
        )
    from passforge.models import llama, nanogpt

    if spec in llama.PRESETS:
        _require_memory(spec, llama.PRESETS[spec])
        return _llama_source(spec, llama.build(spec), seq_len)
    if spec.startswith("nanogpt-") and spec.removeprefix("nanogpt-") in nanogpt.PRESETS:
        from passforge.models import tokenizer

        gpt = nanogpt.build(spec.removeprefix("nanogpt-")).eval()
        cfg = gpt.config
        return ModelSource(
            spec, gpt, example_tokens(cfg.vocab_size, min(seq_len, cfg.block_size)), True,
            tokenizer.encode, tokenizer.decode,
        )
    if path.is_dir():
        return _hf_source(path, seq_len)
    if path.suffix == ".pt2":
        if not path.is_file():
            raise ModelError(f"{path}: no such file")
        return ModelSource(path.name, None, (), is_lm=False, pt2_path=path)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise ModelError(f"{path}: no such file")
        return _onnx_source(path, seq_len)
    if path.exists():
        raise ModelError(f"{path}: not a model passforge reads (expected a Hugging Face folder, a .pt2 or .onnx file)")
    raise ModelError(
        f"unknown model '{spec}': not a preset ({', '.join(preset_names())}), a folder, or a .pt2 or .onnx file"
    )


def _onnx_source(path: Path, seq_len: int) -> ModelSource:
    """An ONNX file, imported later (``onnx_path``): example inputs from its input types; a language model when
    it reads like one (one int64 (B, T) input, (B, T, V) logits), with the byte-level tokenizer when V is 256."""
    from passforge.ir import onnx_import
    from passforge.models import tokenizer

    proto = onnx_import.load_model(path, load_weights=False)
    vocab = onnx_import.language_model_vocab(proto)
    byte_level = vocab == tokenizer.VOCAB_SIZE
    return ModelSource(
        path.name, None, onnx_import.example_inputs_for(proto, seq_len=seq_len), is_lm=vocab is not None,
        encode=tokenizer.encode if byte_level else None, decode=tokenizer.decode if byte_level else None,
        onnx_path=path,
    )  # fmt: skip


def _require_memory(name: str, cfg: object) -> None:
    """Refuse presets whose fp32 weights would not fit in half of this machine's memory."""
    from passforge.models.llama import Llama

    with torch.device("meta"):
        needed = 4 * Llama(cfg).num_params()
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > total // 2:
        raise ModelError(
            f"preset '{name}' needs {needed / 2**30:.0f} GiB of fp32 weights; this machine has "
            f"{total / 2**30:.0f} GiB. Build it on the meta device for graph-only work "
            "(passforge.models.llama.build(name, device='meta'); see benchmarks/passes_scale.py)."
        )


def _hf_source(path: Path, seq_len: int) -> ModelSource:
    """A causal LM (forward graph, prefill/decode steps for generation, the folder's tokenizer if it has one) or an
    encoder (``input_ids -> last_hidden_state``, compared by cosine similarity and max error, no perplexity)."""
    from passforge.models import hf

    name = f"hf:{path.name}"
    if hf.model_kind(path) == "encoder":
        encoder = hf.load_encoder(path)
        return ModelSource(name, hf.HiddenStates(encoder).eval(), hf.example_ids(encoder, seq_len), is_lm=False)
    hf_model = hf.load_causal_lm(path)
    tokenizer = hf.load_tokenizer(path)
    encode, decode = hf.tokenizer_codec(tokenizer) if tokenizer is not None else (None, None)
    return ModelSource(
        name=name,
        module=hf.LogitsOnly(hf_model).eval(),
        example_inputs=hf.example_ids(hf_model, seq_len),
        is_lm=True,
        encode=encode,
        decode=decode,
        kv_model=hf.kv_model(hf_model),
        extra={"hf_folder": path, **({"hf_tokenizer": tokenizer} if tokenizer is not None else {})},
    )


def read_tokens(path: str | os.PathLike[str], source: ModelSource) -> torch.Tensor:
    """A data file as a 1-D int64 token stream: token ids already (a ``.json`` list of integers, or a
    ``.safetensors`` file holding one integer tensor, flattened), or UTF-8 text through the model's
    tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such data file")
    if path.suffix in (".json", ".safetensors"):
        return _read_token_ids(path)
    if source.encode is None:
        raise ModelError(f"{path}: model {source.name} has no tokenizer to read text data with")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    ids = source.encode(text)
    if len(ids) < 2:
        raise ModelError(f"{path}: holds {len(ids)} tokens; need at least a sequence's worth")
    return torch.tensor(ids, dtype=torch.long)


def _read_token_ids(path: Path) -> torch.Tensor:
    if path.suffix == ".json":
        import json

        try:
            ids = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path}: not a JSON list of token ids ({exc})") from None
        if not (isinstance(ids, list) and ids and all(type(i) is int and i >= 0 for i in ids)):
            raise ModelError(f"{path}: expected a JSON list of non-negative integers (token ids)")
        return torch.tensor(ids, dtype=torch.long)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None
    ids = next(iter(tensors.values())) if len(tensors) == 1 else None
    if ids is None or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ModelError(f"{path}: expected exactly one integer tensor of token ids, found {sorted(tensors)}")
    if ids.numel() == 0 or bool((ids < 0).any()):
        raise ModelError(f"{path}: token ids must be non-negative integers (and at least one)")
    return ids.reshape(-1).long()


def check_token_ids(tokens: torch.Tensor | None, gm: torch.fx.GraphModule, path: object) -> None:
    """Refuse token ids the model's embedding table has no row for (data tokenized for another model): they
    would fail inside the first pass that runs the graph on them, blamed on that pass. The table is the one
    an input placeholder indexes with ``aten.embedding``; without one nothing is checked."""
    if tokens is None or tokens.numel() == 0:
        return
    rows = None
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.embedding.default:
            weight, ids = node.args[0], node.args[1]
            val = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
            if isinstance(ids, torch.fx.Node) and ids.op == "placeholder" and val is not None:
                rows = int(val.shape[0])
                break
    top = int(tokens.max())
    if rows is not None and top >= rows:
        raise ModelError(
            f"{path or 'the data'}: token id {top} is outside the model's vocabulary ({rows} ids, 0..{rows - 1}); "
            "tokenize the data with this model's tokenizer"
        )

