"""Compressed storage for sparse weights: the non-zero values plus a bitmask of where they sit.

A weight with half its entries zero still takes its full dense size in a checkpoint. Stored as its non-zero
values (row-major, in the weight's dtype) and one bit per entry (``1``: a value is there; packed eight to a
byte, element ``8b + i`` in bit ``i`` of byte ``b``), a 50% sparse fp32 weight takes 0.5 + 1/32 of its dense
bytes and a bf16 one 0.5 + 1/16. The layout is the one sparse-storage formats share (values + bitmask, as
in compressed-tensors' ``sparse-bitmask``); it is for *size*: the graph still runs dense weights, so nothing
here is faster.

:func:`save_compressed` writes every tensor a graph reads to one safetensors file (atomically): the weights
of linears ``sparsify`` marked as ``NAME.values`` / ``NAME.bitmask`` (shape in the file's metadata), every
other tensor as it is. :func:`load_compressed` reads it back to dense tensors by name.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import fx

from passforge.ir.graph import tensor_attrs

SPARSIFIED_META = "passforge.sparsified"
"""``node.meta`` key on a linear whose weight ``sparsify`` pruned (value: the pass's spec)."""
FORMAT = "passforge-sparse-bitmask-v1"
_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)  # bit i of a byte <-> element 8b + i


def pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, bitmask)``: ``w``'s non-zero entries in row-major order (1-D, ``w``'s dtype) and a uint8
    bitmask of ``ceil(w.numel() / 8)`` bytes marking where they were (``-0.0`` counts as zero)."""
    flat = w.detach().reshape(-1)
    present = flat != 0
    values = flat[present]
    bits = torch.nn.functional.pad(present.to(torch.int32), (0, -flat.numel() % 8)).view(-1, 8)  # (bytes, 8)
    bitmask = (bits * _BIT_WEIGHTS.to(bits.device)).sum(dim=1).to(torch.uint8)
    return values, bitmask


def unpack(values: torch.Tensor, bitmask: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The dense tensor of ``shape`` that :func:`pack` made ``(values, bitmask)`` from."""
    numel = math.prod(shape)
    bits = ((bitmask.to(torch.int32)[:, None] // _BIT_WEIGHTS.to(bitmask.device)) % 2).reshape(-1)  # (bytes*8,)
    present = bits[:numel].bool()
    if int(present.sum()) != values.numel() or bool(bits[numel:].any()):
        raise ValueError(
            f"bitmask marks {int(present.sum())} entries (and {int(bits[numel:].sum())} padding bits) for "
            f"{values.numel()} values: not a pair made by pack()"
        )
    dense = torch.zeros(numel, dtype=values.dtype, device=values.device)
    dense[present] = values
    return dense.view(tuple(shape))


def packed_nbytes(w: torch.Tensor) -> int:
    """Bytes :func:`pack` stores for ``w``: its non-zero values plus one bit per entry."""
    return int((w != 0).sum()) * w.element_size() + (w.numel() + 7) // 8


def sparsified_weights(gm: fx.GraphModule) -> list[str]:
    """Names of the weights read by linears that ``sparsify`` marked (each once, in graph order)."""
    names: list[str] = []
    for node in gm.graph.nodes:
        if node.meta.get(SPARSIFIED_META):
            weight = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target not in names:
                names.append(weight.target)
    return names


def compressed_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the tensors :func:`save_compressed` writes for ``gm`` (sparsified weights packed, the rest
    dense, storage shared by two names once): compare with ``ir.graph.param_stats(gm)[1]``."""
    packed = set(sparsified_weights(gm))
    total, seen = 0, set()
    for name, tensor in tensor_attrs(gm):
        if name in packed:
            total += packed_nbytes(_dense(tensor))
        elif _storage_key(tensor) not in seen:
            seen.add(_storage_key(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def save_compressed(gm: fx.GraphModule, path: str | os.PathLike[str]) -> None:
    """Write every tensor ``gm`` reads to the safetensors file ``path`` (atomically: a failed write leaves
    any previous file intact); sparsified weights as values + bitmask, the others dense."""
    from safetensors.torch import save_file

    from passforge.ir.serialize import atomic_path

    packed = set(sparsified_weights(gm))
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    aliases: dict[str, str] = {}
    first_reader: dict[tuple, str] = {}
    for name, original in tensor_attrs(gm):
        # the alias key comes from the graph's own tensor: a temporary copy (.cpu() of a CUDA tensor) is freed
        # at the next step and its address reused, which would make two weights look like one
        key = (_storage_key(original), original.storage_offset(), tuple(original.shape), original.stride(),
               original.dtype)
        tensor = _dense(original).cpu()
        if name in packed:
            tensors[f"{name}.values"], tensors[f"{name}.bitmask"] = pack(tensor)
            shapes[name] = list(tensor.shape)
            continue
        if key in first_reader:
            aliases[name] = first_reader[key]  # a tied weight: stored once
            continue
        first_reader[key] = name
        tensors[name] = tensor.contiguous().clone()  # safetensors refuses tensors sharing storage
    metadata = {"format": FORMAT, "packed_shapes": json.dumps(shapes), "aliases": json.dumps(aliases)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_compressed(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """What :func:`save_compressed` wrote, as dense tensors by name (aliases share one tensor)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a passforge compressed checkpoint (format {metadata.get('format')!r})")
        stored = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
    try:
        shapes: dict[str, list[int]] = json.loads(metadata["packed_shapes"])
        aliases: dict[str, str] = json.loads(metadata["aliases"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: damaged passforge compressed checkpoint (metadata: {exc})") from None
    tensors = {name: _unpack_checked(path, name, stored, shape) for name, shape in shapes.items()}
    tensors.update(stored)
    for name, target in aliases.items():
        if target not in tensors:
            raise ValueError(f"{path}: '{name}' is stored as an alias of '{target}', which the file does not hold")
        tensors[name] = tensors[target]
    return tensors


def _unpack_checked(path: object, name: str, stored: dict[str, torch.Tensor], shape: list[int]) -> torch.Tensor:
    """One packed weight, after checking that its entries fit together (else a ValueError naming it)."""
    values, bitmask = stored.pop(f"{name}.values", None), stored.pop(f"{name}.bitmask", None)
    if values is None or bitmask is None:
        problem = "its values or bitmask are missing"
    elif not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        problem = f"its shape {shape!r} is not a list of sizes"
    elif bitmask.dtype != torch.uint8 or bitmask.dim() != 1 or bitmask.numel() != -(-math.prod(shape) // 8):
        problem = f"its bitmask ({bitmask.dtype}, {bitmask.numel()} bytes) does not cover shape {shape}"
    elif values.dim() != 1:
        problem = "its values are not 1-D"
    else:
        try:
            return unpack(values, bitmask, shape)
        except ValueError as exc:
            problem = str(exc)
    raise ValueError(f"{path}: damaged passforge compressed checkpoint: '{name}': {problem}")


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or the dense value of a weight ``to_semi_structured`` swapped in."""
    from torch.sparse import SparseSemiStructuredTensor

    return tensor.to_dense() if isinstance(tensor, SparseSemiStructuredTensor) else tensor


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
