"""Write a pruned (or distilled, sparsified) Hugging Face model back as a Hugging Face folder, with its config
rewritten to the new sizes, so ``from_pretrained`` loads it anywhere — or say exactly why it cannot.

Structured pruning changes sizes a config states once for all layers (``intermediate_size``, the head counts,
``hidden_size``): :func:`save_hf` reads the new sizes off the graph's weights, builds the architecture from the
rewritten config, fills it with the graph's tensors (GPT-2's ``Conv1D`` weights transposed back), checks that
the rebuilt model's logits equal the graph's, and only then writes ``config.json`` + ``model.safetensors``
(+ the tokenizer) into a folder that is swapped in whole. It refuses, with :class:`HFSaveError` naming the
tensor or size, what the architecture cannot express: per-layer sizes (``scope=global`` pruning gives each
layer its own width; a Llama config has one ``intermediate_size``), a hidden size GPT-2's heads cannot follow
(its ``head_dim`` is ``n_embd / n_head``), integer (quantized) weights, or a graph that no longer computes what
the architecture does (the logits check): passforge's own format (``Optimized.save``) holds all of those.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from torch import fx

from passforge.ir.graph import tensor_attrs
from passforge.ir.serialize import staging_folder, swap_in_folder


class HFSaveError(RuntimeError):
    """The graph cannot be written as its Hugging Face architecture (the message says which size or tensor)."""


MARKER = "passforge.json"
_LLAMA_LIKE = {"llama", "qwen2", "mistral", "phi3"}


def save_hf(
    graph: fx.GraphModule,
    hf_model: torch.nn.Module,
    folder: str | os.PathLike[str],
    example_inputs: tuple[torch.Tensor, ...],
    *,
    tokenizer: object | None = None,
    prefix: str = "model.",
    provenance: dict[str, object] | None = None,
) -> Path:
    """Write ``graph`` (captured from ``hf_model`` through a wrapper whose attribute ``prefix`` leads to it) as
    a Hugging Face folder of ``hf_model``'s architecture, with ``passforge.json`` (``provenance``: the pipeline
    that made it) beside the weights. An existing folder is replaced only when it is empty or a folder this
    function wrote (it holds ``passforge.json``). Raises :class:`HFSaveError` when it cannot."""
    target = Path(folder).resolve()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MARKER).is_file())):
        raise HFSaveError(f"{target} exists and is not a folder passforge wrote; choose a new or empty folder")
    read = {n.target for n in graph.graph.nodes if n.op == "get_attr" and n.users}  # not a stale tied alias
    weights = {name.removeprefix(prefix): t for name, t in tensor_attrs(graph) if name in read}
    config = resized_config(hf_model.config, weights)
    rebuilt = _rebuild(hf_model, config, weights)
    with torch.inference_mode():
        expected = graph(*example_inputs)
        actual = rebuilt(input_ids=example_inputs[0], use_cache=False, return_dict=True).logits
    if expected.shape != actual.shape or not torch.allclose(actual, expected, rtol=1e-4, atol=1e-4):
        err = float((actual - expected).abs().max()) if expected.shape == actual.shape else float("nan")
        raise HFSaveError(
            f"the graph no longer computes what {type(hf_model).__name__} computes (max |logit difference| "
            f"{err:.3g}): a pass changed its operations, not only its sizes; save passforge's format instead"
        )
    staging = staging_folder(target)
    try:
        rebuilt.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps(provenance or {}, indent=2) + "\n", encoding="utf-8")
        swap_in_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resized_config(config: object, weights: dict[str, torch.Tensor]) -> object:
    """A copy of ``config`` with the sizes the weights now have; :class:`HFSaveError` for per-layer sizes."""
    config = copy.deepcopy(config)
    kind = getattr(config, "model_type", "")
    if kind in _LLAMA_LIKE:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        config.hidden_size = _one_size(weights, "embed_tokens.weight", 1, "hidden_size")
        config.intermediate_size = _one_size(weights, "mlp.down_proj.weight", 1, "intermediate_size")
        if any(name.endswith("self_attn.o_proj.weight") for name in weights):
            config.num_attention_heads = _one_size(weights, "self_attn.o_proj.weight", 1, "heads") // head_dim
        if any(name.endswith("self_attn.k_proj.weight") for name in weights):
            config.num_key_value_heads = _one_size(weights, "self_attn.k_proj.weight", 0, "kv heads") // head_dim
        elif any(name.endswith("self_attn.qkv_proj.weight") for name in weights):  # Phi-3: q, k, v fused
            rows = _one_size(weights, "self_attn.qkv_proj.weight", 0, "q/k/v rows") // head_dim
            config.num_key_value_heads = (rows - config.num_attention_heads) // 2
        config.head_dim = head_dim  # explicit: hidden_size / heads need not give it any more
    elif kind == "gpt2":
        config.n_embd = _one_size(weights, "ln_f.weight", 0, "n_embd")
        config.n_inner = _one_size(weights, "mlp.c_fc.weight", 0, "n_inner")  # (out, in) in passforge's graph
    else:
        raise HFSaveError(f"writing {kind or type(config).__name__} folders is not supported (Llama, Qwen2, Mistral, "
                          "Phi-3 and GPT-2 are); save passforge's format instead")
    return config


def _one_size(weights: dict[str, torch.Tensor], suffix: str, dim: int, field: str) -> int:
    sizes = {name: int(t.shape[dim]) for name, t in weights.items() if name.endswith(suffix)}
    if not sizes:
        raise HFSaveError(f"no '*{suffix}' tensor in the graph to read {field} from")
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{name}: {size}" for name, size in list(sizes.items())[:6])
        raise HFSaveError(
            f"layers have different {field} ({detail}); a Hugging Face config states one for all layers — prune "
            "with scope=local for an HF folder, or save passforge's format"
        )
    return next(iter(sizes.values()))


def _rebuild(hf_model: torch.nn.Module, config: object, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The architecture built from ``config`` holding the graph's tensors (every one of them used)."""
    from transformers.pytorch_utils import Conv1D

    try:
        model = type(hf_model)(config).eval()
    except (ValueError, AssertionError) as exc:  # e.g. GPT-2's n_embd no longer divisible by n_head
        raise HFSaveError(f"{type(hf_model).__name__} cannot be built with the pruned sizes: {exc}") from exc
    if getattr(hf_model, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(hf_model.generation_config)  # eos ids, sampling defaults
    transposed = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Conv1D)}
    state = model.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}  # tied tensors (GPT-2's wte and lm_head): the graph keeps one of the names
    for key, param in state.items():
        names.setdefault(id(param), []).append(key)
    buffers = {name for name, _ in model.named_buffers()}
    filled: set[int] = set()
    for key, param in state.items():
        if id(param) in filled:  # tied to a tensor filled already
            continue
        source = next((weights[name] for name in names[id(param)] if name in weights), None)
        if source is None:
            if key in buffers:
                continue  # a buffer the model computes itself (rotary inv_freq)
            raise HFSaveError(f"the graph has no tensor for {key}")
        if not source.is_floating_point():
            raise HFSaveError(f"{key} is {source.dtype} in the graph (quantized): a quantized graph saves in "
                              "passforge's format")
        value = source.t() if key in transposed else source
        if tuple(value.shape) != tuple(param.shape):
            raise HFSaveError(
                f"{key}: the graph's tensor is {tuple(value.shape)}, {type(model).__name__} with the rewritten config "
                f"builds {tuple(param.shape)}; the architecture cannot express this shape"
            )
        with torch.no_grad():
            param.copy_(value)
        filled.add(id(param))
    return model
