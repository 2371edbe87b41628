"""Hugging Face models from a local folder: never the hub, never pickled weights.

A causal LM (``*ForCausalLM``, ``*LMHeadModel``) is wrapped as ``input_ids (B, T) -> logits (B, T, V)`` (no
cache, no output dict) so it captures to the same IR as passforge's own models; :func:`kv_model` gives it the
prefill/decode steps generation runs (``models.hf_kv``). Any other architecture (BERT-style encoders, a bare
``*Model``) is loaded with ``AutoModel`` and wrapped as ``input_ids (B, T) -> last_hidden_state (B, T, C)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import torch
from torch import fx

from passforge.ir.capture import CaptureError, capture
from passforge.models.registry import example_tokens

MAX_CACHE_LEN = 2048
"""The static KV cache of the generation graphs holds this many positions at most (or the model's
``max_position_embeddings`` when smaller): a 128k-context model would otherwise allocate its whole context."""

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
ModelKind = Literal["causal-lm", "encoder"]


class LogitsOnly(torch.nn.Module):
    """Adapter: a Hugging Face causal LM as ``tokens (B, T) -> logits (B, T, V)``, no cache, no dict."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        super().__init__()
        self.model = hf_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False, return_dict=True).logits


class HiddenStates(torch.nn.Module):
    """Adapter: a Hugging Face encoder as ``input_ids (B, T) [, attention_mask (B, T)] -> last_hidden_state``.

    Captured with ``input_ids`` alone the graph attends every token (no padding); capture it with an
    ``attention_mask`` example too to get a graph that takes one.
    """

    def __init__(self, hf_model: torch.nn.Module) -> None:
        super().__init__()
        self.model = hf_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


def _checked_folder(path: str | os.PathLike[str]) -> Path:
    """The folder, once it has a config.json and safetensors weights and transformers is importable."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CaptureError(f"{folder}: not a Hugging Face model folder (no config.json); pass the folder path.")
    if not any(folder.glob("*.safetensors")):
        raise CaptureError(
            f"{folder}: no *.safetensors weights. passforge does not unpickle .bin checkpoints; convert them "
            "once in a trusted environment with model.save_pretrained(dir, safe_serialization=True)."
        )
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise CaptureError("loading Hugging Face folders needs transformers: pip install 'passforge[hf]'") from exc
    return folder


def model_kind(path: str | os.PathLike[str]) -> ModelKind:
    """``"causal-lm"`` when the folder's ``architectures`` name a causal-LM head (or, without that field, its
    ``model_type`` has only causal-LM heads); ``"encoder"`` otherwise. Encoder-decoder models are refused."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    folder = _checked_folder(path)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("is_encoder_decoder"):
        raise CaptureError(
            f"{folder}: {config.get('model_type')} is an encoder-decoder model; passforge captures causal LMs and "
            "encoders. Save the encoder or the decoder on its own to optimize it."
        )
    architectures = config.get("architectures") or []
    if architectures:
        return "causal-lm" if any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures) else "encoder"
    model_type = config.get("model_type")
    causal_only = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return "causal-lm" if causal_only and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "encoder"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars, load reports or warnings while loading (e.g. a masked-LM head left unused by ``AutoModel``
    is expected here, not news); transformers' own settings are put back afterwards."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def refuse_remote_code(folder: Path) -> None:
    """A folder whose config names its own Python classes (``auto_map``) is refused: loading it would run that
    code (transformers asks, and a piped "y" says yes). passforge never runs a model folder's code."""
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file() and '"auto_map"' in path.read_text(encoding="utf-8", errors="replace"):
            raise CaptureError(
                f"{path}: names custom code (auto_map); passforge never runs a model folder's code "
                "(trust_remote_code). Use a model whose architecture transformers ships."
            )


def _from_pretrained(auto_class: type, folder: Path, dtype: torch.dtype, attn_implementation: str | None) -> object:
    from safetensors import SafetensorError

    refuse_remote_code(folder)
    refuse_outside_weights(folder)
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        with _quiet_transformers():
            model = auto_class.from_pretrained(
                folder, local_files_only=True, use_safetensors=True, dtype=dtype, trust_remote_code=False, **options
            )
    except SafetensorError as exc:  # truncated, corrupt, or another format renamed .safetensors (never unpickled)
        raise CaptureError(
            f"{folder}: a *.safetensors weights file is not readable ({exc}); it is truncated, corrupt or not "
            "safetensors at all. Copy or re-save the weights with model.save_pretrained(dir, safe_serialization=True)."
        ) from None
    return model.eval()


def refuse_outside_weights(folder: Path) -> None:
    """Every weight file the folder points at — each ``*.safetensors`` (links resolved) and each shard named in a
    ``*.safetensors.index.json`` weight map — lies inside the folder: a crafted index (``../x.safetensors``, an
    absolute path) or a link would otherwise make loading read files elsewhere on the machine."""
    root = folder.resolve()

    def inside(path: Path) -> bool:
        resolved = path.resolve()
        return resolved != root and root in resolved.parents

    for file in folder.glob("*.safetensors"):
        if not inside(file):
            raise CaptureError(f"{file} links to {file.resolve()}, outside the model folder {root}; refusing it")
    for index in folder.glob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (ValueError, AttributeError) as exc:
            raise CaptureError(f"{index}: not a readable weight index ({exc})") from None
        for shard in set(weight_map.values()) if isinstance(weight_map, dict) else ():
            if not isinstance(shard, str) or "\0" in shard or Path(shard).is_absolute() or not inside(root / shard):
                raise CaptureError(
                    f"{index}: shard {shard!r} lies outside the model folder {root}; refusing to read it"
                )


def load_causal_lm(
    path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
) -> torch.nn.Module:
    """Load a causal LM from ``path`` in eval mode. Only ``*.safetensors`` weights are accepted: pickled
    ``.bin`` checkpoints can run code when loaded. ``attn_implementation`` ("eager", "sdpa") overrides the
    folder's config."""
    import transformers

    folder = _checked_folder(path)
    model = _from_pretrained(transformers.AutoModelForCausalLM, folder, dtype, attn_implementation)
    return static_rope(conv1d_as_linear(model))


def static_rope(model: torch.nn.Module) -> torch.nn.Module:
    """Rotary embeddings whose frequencies change with the sequence length (``longrope``: Phi-3/3.5/4 128k;
    ``dynamic`` NTK) swap their ``inv_freq`` buffer inside forward, which torch.export refuses (a buffer written
    in place; data-dependent for ``dynamic``). Below ``original_max_position_embeddings`` both use the original
    frequencies, so those are fixed here and the switch bypassed, and ``passforge_max_positions`` caps the
    positions passforge's graphs and cache use at that length: exact for every position they can see."""
    for module in model.modules():
        rope_type = getattr(module, "rope_type", None)
        if not isinstance(rope_type, str) or not ("longrope" in rope_type or "dynamic" in rope_type):
            continue
        forward = getattr(type(module).forward, "__wrapped__", None)
        original = getattr(module, "original_inv_freq", None)
        limit = _original_max_positions(model.config)
        if forward is None or original is None or limit is None:
            continue
        module.register_buffer("inv_freq", original.clone(), persistent=False)
        module.forward = types.MethodType(forward, module)
        model.passforge_max_positions = limit
    return model


def _original_max_positions(config: object) -> int | None:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    value = rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None
    value = value or getattr(config, "original_max_position_embeddings", None)
    value = value or getattr(config, "max_position_embeddings", None)  # dynamic NTK's default original length
    return int(value) if value else None


def load_encoder(
    path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
) -> torch.nn.Module:
    """Load the base model of an encoder folder (``BertModel`` from a ``BertForMaskedLM`` checkpoint too) in eval
    mode; safetensors only, as :func:`load_causal_lm`."""
    import transformers

    folder = _checked_folder(path)
    return conv1d_as_linear(_from_pretrained(transformers.AutoModel, folder, dtype, attn_implementation))


def conv1d_as_linear(model: torch.nn.Module) -> torch.nn.Module:
    """Replace GPT-2's ``Conv1D`` (``addmm(b, x, W)`` with W stored (in, out)) by the ``nn.Linear`` it is, weight
    transposed once here: passes that read linears (quantize, fuse-linears, smooth-quant) match ``aten.linear``.

        %y = aten.addmm(%bias, aten.view(%x, [-1, in]), %W)     →     %y = aten.linear(%x, %W_t, %bias)

    The model was loaded by passforge for this run, so replacing its modules changes nothing of the user's."""
    from transformers.pytorch_utils import Conv1D

    convs = [(name, module) for name, module in model.named_modules() if isinstance(module, Conv1D)]
    for name, conv in convs:
        linear = torch.nn.Linear(conv.nx, conv.nf, device="meta")
        linear.weight = torch.nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=False)
        linear.bias = torch.nn.Parameter(conv.bias.detach(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(path: str | os.PathLike[str]) -> object | None:
    """The folder's tokenizer (``AutoTokenizer``, local files only), or None when it has none. The files are looked
    for first: for some model types (Qwen2) ``AutoTokenizer`` builds an empty-vocabulary tokenizer from the config
    alone, which would turn text into nothing but special tokens."""
    if not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
        return None
    refuse_remote_code(Path(path))
    try:
        from transformers import AutoTokenizer

        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ImportError, OSError, ValueError):
        return None  # no tokenizer files (or none transformers can build offline): token ids only


def tokenizer_codec(tokenizer: object) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """``(encode, decode)`` over a Hugging Face tokenizer, in the shape of ``passforge.models.tokenizer``."""
    return (lambda text: list(tokenizer(text)["input_ids"])), tokenizer.decode


def kv_model(hf_model: torch.nn.Module) -> torch.nn.Module | None:
    """The prefill/decode entry points generation captures (``models.hf_kv.HFKVModel``), with a static cache of
    ``min(max_position_embeddings, MAX_CACHE_LEN)`` positions; None before transformers 5 (no per-layer ``Cache``
    API to stand in for), where the forward graph is still captured but ``generate()`` is not available."""
    try:
        from passforge.models.hf_kv import HFKVModel
    except ImportError:
        return None

    max_positions = int(getattr(hf_model.config, "max_position_embeddings", MAX_CACHE_LEN) or MAX_CACHE_LEN)
    max_positions = min(max_positions, getattr(hf_model, "passforge_max_positions", max_positions))
    return HFKVModel(hf_model, min(max_positions, MAX_CACHE_LEN)).eval()


def capture_hf(
    path: str | os.PathLike[str], *, seq_len: int = 16, batch: int = 1, attn_implementation: str | None = None
) -> tuple[fx.GraphModule, torch.nn.Module, tuple[torch.Tensor]]:
    """Capture a local causal LM or encoder; returns ``(graph, eager reference in eval mode, example_inputs)``."""
    if model_kind(path) == "encoder":
        hf_model = load_encoder(path, attn_implementation=attn_implementation)
        wrapped: torch.nn.Module = HiddenStates(hf_model).eval()
    else:
        hf_model = load_causal_lm(path, attn_implementation=attn_implementation)
        wrapped = LogitsOnly(hf_model).eval()
    example = example_ids(hf_model, seq_len, batch)
    return capture(wrapped, example, name=f"hf:{Path(path).name}"), wrapped, example


def example_ids(hf_model: torch.nn.Module, seq_len: int, batch: int = 1) -> tuple[torch.Tensor]:
    """Seeded example ``input_ids`` of ``seq_len`` tokens, cut to what the model's position embeddings cover."""
    config = hf_model.config
    seq_len = min(seq_len, int(getattr(config, "max_position_embeddings", seq_len) or seq_len))
    seq_len = min(seq_len, getattr(hf_model, "passforge_max_positions", seq_len))
    return example_tokens(int(getattr(config, "vocab_size", 256)), seq_len, batch)
