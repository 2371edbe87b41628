#!/usr/bin/env bash
# The one prepared GPU check (for a session lent a GPU; < 8 minutes): install, GPU-path tests, then benchmarks.
# It uses the machine's own CUDA build of torch (no pin). Output goes to stdout and, when $OUT is set, to files.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/passforge-gpu}"
mkdir -p "$OUT"
python3 -m pip install --quiet --no-deps -e . 2>&1 | tail -2 || true
python3 -m pip install --quiet safetensors rich tqdm matplotlib pytest triton 2>&1 | tail -2 || true  # no network: what is there
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"

# Most valuable first (device time is short): the Triton kernels have never been compiled on a GPU.
# Worst case: 120 + 75 + 90 + 60 + 30 + 45 + 60 s = 8 minutes plus the installs.

# 1. Triton kernels, compiled (on CPU the same tests run them under TRITON_INTERPRET; with a GPU tests/kernels'
#    conftest leaves it unset): their tests, then kernel vs reference vs cuBLAS bf16 times at decode and prefill
#    shapes of llama-100m and llama-7b. The first call per shape autotunes (not timed).
python3 -c "import triton; print('triton', triton.__version__)"
timeout 120 env -u TRITON_INTERPRET python3 -m pytest -q tests/kernels 2>&1 | tail -5 | tee "$OUT/kernel-tests.txt" || true
timeout 75 python3 benchmarks/kernels.py --quick | tee "$OUT/kernels.md" || true

# 1b. Attention: Triton forward TFLOP/s vs SDPA flash / cuDNN / efficient, flash-decoding vs SDPA, sliding window.
timeout 90 python3 benchmarks/attention_gpu.py --quick | tee "$OUT/attention.md" || true

# 2. The lowering on CUDA (speed guard, int8 / int4 / static / fp8 ops through lower-quant) and the runtime.
timeout 60 python3 -m pytest -q -x tests/passes/quantize/test_lower.py tests/passes/quantize/test_lower_static.py \
    tests/runtime 2>&1 | tail -5 | tee "$OUT/tests.txt" || true
# 2b. 2:4 weights swapped to torch's semi-structured sparse tensors, and pruning with CUDA tensors.
timeout 30 python3 -m pytest -q tests/passes/prune -k "cuda or semi_structured" 2>&1 | tail -5 \
    | tee "$OUT/sparse-tests.txt" || true

# 3. The default pipeline on the bundled LM and a quantized one on the ~100M preset, on CUDA.
timeout 45 python3 -m passforge.tools.cli optimize --device cuda --out "$OUT/tiny-lm" | tee "$OUT/tiny-lm.txt" || true
timeout 60 python3 -m passforge.tools.cli optimize llama-100m --device cuda --seq-len 512 --out "$OUT/llama-100m" \
    --pipeline "cleanup,cast(dtype=bf16),quantize(scheme=w8a8,decode_scheme=w4),fold-quant,lower-quant" \
    | tee "$OUT/llama-100m.txt" || true
