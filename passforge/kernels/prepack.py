"""Weight layouts a kernel wants but a saved model must not hold, derived once per process and cached.

- ``int8_row_sums(w (N, K) int8) -> (N,) int32``: the w8a8 zero-point correction ``z_x * sum_k w[n, k]``. A full
  pass over the weight, as many bytes as the GEMM itself reads at one token: once per weight, not per call.
- ``onednn_int8_weight(w (N, K) int8)``: oneDNN's prepacked (blocked, CPU-specific) layout of an int8 weight for
  ``onednn.qlinear_pointwise``, the u8 × s8 linear of the w8a8-static op on x86 CPUs with VNNI. Like the int4
  layout below, it is held beside the graph's own weight: the int8 weights' bytes twice in memory.
- ``cpu_int4_layout(packed (N, K/2) uint8, scales (N, K/g), zero_points (N, K/g), dtype)``: the tile layout of
  ``aten._convert_weight_to_int4pack_for_cpu`` and its ``(K/g, N, 2)`` scales-and-zeros. That layout depends on
  the CPU the process runs on (64-column blocks on AVX-512, 32 on AVX2, plain pairs elsewhere), so a model saved
  with it would compute garbage on another machine; the graph keeps the portable two-per-byte layout
  (``pack_int4``) and each process repacks once (61 ms for a 4096 x 4096 weight, measured on a
  2-core AVX-512 machine).

Entries are keyed by the source tensors' identities, weakly (an entry goes when its weight goes), never by data
pointer, which a new tensor can reuse after a free. Each entry is stamped with its sources' version counters and
storage (data pointer, strides, offset: for a tensor that is alive, a safe witness), so a tensor written in
place or given new ``.data`` is derived again, and the new value replaces the old (one entry per weight and
kind). Inference-mode tensors have no version counter; passes never write tensors in place (IR invariant 5),
so they count as version 0.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

_DERIVED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> {key: (weak refs of the other sources, value)}


def _stamp(tensor: torch.Tensor) -> tuple[object, ...]:
    """What changes when a tensor's values may have: its version counter and where its data lives."""
    version = 0 if tensor.is_inference() else tensor._version
    return version, tensor.data_ptr(), tensor.stride(), tensor.storage_offset()


def _derived(
    weight: torch.Tensor, others: tuple[torch.Tensor, ...], key: tuple[object, ...], make: Callable[[], object]
) -> object:
    """``make()``, cached on ``weight`` under ``key`` while ``weight`` and ``others`` are alive and unchanged."""
    entries = _DERIVED.get(weight)
    if entries is None:
        entries = _DERIVED[weight] = {}
    stamps = tuple(_stamp(t) for t in (weight, *others))
    cached = entries.get(key)
    if cached is not None and cached[0] == stamps and all(ref() is t for ref, t in zip(cached[1], others)):
        return cached[2]
    value = make()
    entries[key] = (stamps, tuple(weakref.ref(t) for t in others), value)
    return value


def int8_row_sums(w: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 -> (N,) int32: each output channel's sum of weights."""
    return _derived(w, (), ("row_sums",), lambda: w.sum(dim=1, dtype=torch.int32))


def onednn_int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) int8 -> (the opaque oneDNN tensor ``onednn.qlinear_prepack`` makes of it, a layout for this CPU;
    its (N,) int32 zero points, all zero). The prepack reads the weight's storage as row-major whatever its
    strides, so a strided weight goes in contiguous."""
    return _derived(w, (), ("onednn_int8",), lambda: (
        torch.ops.onednn.qlinear_prepack(w.contiguous(), None), torch.zeros(w.shape[0], dtype=torch.int32)))


def cpu_int4_layout(
    packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The operands of ``aten._weight_int4pack_mm_for_cpu`` for a ``quantize_per_channel_group`` uint4 weight.

    packed (N, K/2) uint8, low nibble first; scales, zero_points (N, K/g) -> (CPU tiles (N, K/2) uint8,
    scales_and_zeros (K/g, N, 2) in ``dtype``). The kernel computes ``w = (q - 8) * s + z`` (it reads nibbles
    as signed int4); torch's asymmetric uint4 is ``w = (q - zp) * s``. So ``z = (8 - zp) * s``, taken from the
    scale as rounded to ``dtype``: then a weight equal to its zero point stays exactly 0 and the only change
    from the fake-quant graph is the rounding of ``s`` and ``z`` to ``dtype`` (none in fp32).
    """

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.ops.passforge.unpack_int4(packed).to(torch.int32)  # (N, K) in [0, 15]
        tiles = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.contiguous(), 1)
        scale = scales.to(dtype).float()
        zero = ((8 - zero_points.float()) * scale).to(dtype)
        scales_and_zeros = torch.stack([scale.to(dtype), zero], dim=-1).transpose(0, 1).contiguous()  # (K/g, N, 2)
        return tiles, scales_and_zeros

    return _derived(packed, (scales, zero_points), ("cpu_int4", dtype), make)
