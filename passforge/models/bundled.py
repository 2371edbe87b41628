"""Access to the tiny byte-level LM and texts that ship inside the package.

A trained (not random) model is what makes pass evaluation meaningful: perplexity and KL
changes on random weights say little about real numerical damage. The artefacts are produced
by ``python -m passforge.models.train_tiny`` and read here through ``importlib.resources`` so
they work from a source checkout and an installed wheel alike.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING

from safetensors.torch import load_file

from passforge.models.llama import Llama, LlamaConfig

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

WEIGHTS = "tiny_lm.safetensors"
METADATA = "tiny_lm.json"
EVAL_TEXT = "eval.txt"
CALIB_TEXT = "calib.txt"


def _data(name: str) -> Traversable:
    path = resources.files("passforge.models").joinpath("data", name)
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled tiny LM file {name!r} is missing; "
            "run `python -m passforge.models.train_tiny --out passforge/models/data` to create it"
        )
    return path


def tiny_lm_metadata() -> dict:
    """The config and training record written next to the weights."""
    return json.loads(_data(METADATA).read_text(encoding="utf-8"))


def load_tiny_lm() -> Llama:
    """The bundled trained tiny LM (fp32, CPU, eval mode)."""
    cfg = LlamaConfig(**tiny_lm_metadata()["config"])
    model = Llama(cfg)
    with resources.as_file(_data(WEIGHTS)) as path:
        state = load_file(str(path))
    model.load_state_dict(state, strict=True)
    return model.eval()


def eval_text() -> str:
    """~64 KiB of held-out stdlib source (files never seen in training)."""
    return _data(EVAL_TEXT).read_text(encoding="utf-8")


def calib_text() -> str:
    """~32 KiB of training text, for calibrating quantization passes without touching eval data."""
    return _data(CALIB_TEXT).read_text(encoding="utf-8")


__all__ = ["calib_text", "eval_text", "load_tiny_lm", "tiny_lm_metadata"]
