"""Building a model from a named preset or a config, the same way for every model family."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

Config = TypeVar("Config")
Model = TypeVar("Model", bound=torch.nn.Module)


def build_seeded(
    model_cls: Callable[[Config], Model],
    presets: Mapping[str, Config],
    preset: str | Config,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Model:
    """Build ``model_cls`` from a preset name or config, with seeded weights.

    Weights are drawn on the CPU (so a seed gives the same weights on every device) inside a forked RNG,
    leaving the caller's global RNG untouched. ``device="meta"`` allocates nothing (how 7B-sized presets are
    meant to be used for graph-only work).
    """
    if isinstance(preset, str):
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r}; available presets: {', '.join(sorted(presets))}")
        cfg = presets[preset]
    else:
        cfg = preset
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            model = model_cls(cfg)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(cfg)
    return model.to(device=device, dtype=dtype)
