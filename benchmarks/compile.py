"""Is torch.compile(backend="passforge") faster than plain inductor? The ~100M LLaMA preset, prefill and decode, CPU.

Rows, timed round-robin in one run (medians; ratios to eager fp32), with the table and measurement code of
``benchmarks/quant.py``:

- eager fp32 and eager bf16;
- ``torch.compile`` (inductor, ``freezing=True``) of the fp32 and the bf16 model — the issue's best peer;
- ``torch.compile(backend="passforge", options={"pipeline": ..., "inductor": True})``: passforge's passes on
  dynamo's graph, then inductor's code generation; and the same pipelines run by passforge's runtime
  (``inductor: False``).

The prefill (``model(tokens)``) and the decode step (``model.decode(token, pos, k, v)``) are compiled
separately, each with its own pipeline: the prefill's quantization is int8 for the compute-bound GEMMs, the
decode step's is int4 weight-only for the bandwidth-bound ones (the forward pipeline's ``decode_scheme`` is
for ``passforge optimize``'s own decode graphs; under torch.compile each function gets what suits it).
Calibration-driven passes read the bundled calibration text (``calib_data``).

    python benchmarks/compile.py [--prefill 512] [--new-tokens 32] [--repeats 5] [--only REGEX]
    python benchmarks/compile.py --model tiny --prefill 64 --new-tokens 4 --repeats 2   # smoke test
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant
from quant import (
    BASELINE,
    BF16_NOTE,
    Setup,
    Variant,
    bundled_calib_path,
    compiled,
    eager_bf16,
    eager_fp32,
    module_variant,
)

from passforge.models.registry import read_tokens

W8A8 = "cleanup,fuse-attention,cast(dtype=bf16),quantize(scheme=w8a8),fold-quant,lower-quant"
STATIC = "cleanup,fuse-attention,cast(dtype=bf16),smooth-quant,quantize(scheme=w8a8-static),fold-quant,lower-quant"
W4 = "cleanup,fuse-attention,cast(dtype=bf16),quantize(scheme=w4),fold-quant,lower-quant"
W8 = "cleanup,fuse-attention,cast(dtype=bf16),quantize(scheme=w8),fold-quant,lower-quant"
BF16 = "cleanup,fuse-attention,cast(dtype=bf16)"
W8A8_HEAD = "cleanup,fuse-attention,cast(dtype=bf16),quantize(scheme=w8a8,skip=''),fold-quant,lower-quant"
STATIC_HEAD = ("cleanup,fuse-attention,cast(dtype=bf16),smooth-quant,quantize(scheme=w8a8-static,skip=''),fold-quant,"
               "lower-quant")

# label -> (prefill pipeline, decode pipeline, hand to inductor, compile the bf16 model instead of the fp32 one)
BACKEND_ROWS: dict[str, tuple[str, str, bool, bool]] = {
    "passforge backend bf16 + fuse-attention, inductor": (BF16, BF16, True, False),
    "passforge backend w8a8 / w4 + bf16 + fuse-attention, inductor": (W8A8, W4, True, False),
    "passforge backend smooth + w8a8-static / w4 + bf16 + fuse-attention, inductor": (STATIC, W4, True, False),
    "passforge backend smooth + w8a8-static / w8 + bf16 + fuse-attention, inductor": (STATIC, W8, True, False),
    "passforge backend w8a8 / w4 + bf16 + fuse-attention, passforge runtime": (W8A8, W4, False, False),
    # the same bf16 model torch.compile bf16 compiles: bf16 logits out, as that row returns (cast is a no-op)
    "passforge backend on the bf16 model, w8a8 / w4 + fuse-attention, inductor": (W8A8, W4, True, True),
    "passforge backend on the bf16 model, smooth + w8a8-static / w4 + fuse-attention, inductor":
        (STATIC, W4, True, True),
    # the LM head in int8 too (dynamic: column blocks; static: oneDNN's u8 linear), the speed guard on
    "passforge backend on the bf16 model, w8a8 lm_head too / w4 + fuse-attention, inductor":
        (W8A8_HEAD, W4, True, True),
    "passforge backend on the bf16 model, smooth + w8a8-static lm_head too / w4 + fuse-attention, inductor":
        (STATIC_HEAD, W4, True, True),
}


def backend_row(prefill_spec: str, decode_spec: str, inductor: bool, bf16_model: bool) -> Callable[[Setup], Variant]:
    def build_row(setup: Setup) -> Variant:
        calib = calibration_ids()

        def options(spec: str) -> dict[str, object]:
            return {"pipeline": spec, "inductor": inductor, "calib_data": calib}

        model = setup.bf16 if bf16_model else setup.model
        return module_variant(
            model,
            prefill=torch.compile(model, backend="passforge", options=options(prefill_spec)),
            decode=torch.compile(model.decode, backend="passforge", options=options(decode_spec)),
            notes=[f"prefill: {prefill_spec}; decode: {decode_spec}; "
                   f"{'inductor' if inductor else 'passforge runtime'}; weights MB columns are the "
                   f"{'bf16' if bf16_model else 'fp32'} model's"],
        )

    return build_row


def calibration_ids() -> list[int]:
    """64 Ki byte ids of the bundled calibration text: a list, not a tensor (``torch.compile`` compares option
    dicts with ``==``)."""
    return read_tokens(bundled_calib_path(), _byte_source())[:65536].tolist()


def _byte_source() -> object:
    from passforge.models import tokenizer
    from passforge.models.registry import ModelSource

    return ModelSource("bytes", None, (), is_lm=True, encode=tokenizer.encode)


ROWS: dict[str, Callable[[Setup], Variant]] = {
    BASELINE: eager_fp32,
    "eager bf16": eager_bf16,
    "torch.compile fp32": lambda setup: compiled(setup.model, []),
    "torch.compile bf16": lambda setup: compiled(setup.bf16, [BF16_NOTE]),
    **{label: backend_row(*row) for label, row in BACKEND_ROWS.items()},
}


def main() -> None:
    quant.main(ROWS, __doc__)  # the same table, measurement and options as benchmarks/quant.py


if __name__ == "__main__":
    main()
