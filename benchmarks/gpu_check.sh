#!/usr/bin/env bash
# The one prepared GPU check, for a session lent a GPU (8.5 minutes at most; about 6 when no step hits its cap):
# the Triton kernels' tests compiled, the kernel benchmarks, the CLI on CUDA, then the whole suite with a GPU
# present.
#   bash benchmarks/gpu_check.sh          (ATTENTION=1 adds the attention benchmark, 60 s more)
# It uses the machine's own CUDA build of torch (no pin) and runs from the checkout (PYTHONPATH; the editable
# install below only registers the entry points: the machine has no network). A package the machine lacks
# travels as a wheel in .whl/ (git-ignored; name it in the device call's carry), installed to /tmp/site; the
# ONNX tests need onnx-graphsurgeon there:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl onnx-graphsurgeon==0.6.1
# Each step writes to $OUT as it goes (unbuffered), so a step cut off by its timeout still reports.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/passforge-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The torch.compile backend is found by name through the package's entry point: that needs an install (offline:
# the machine's own setuptools). Without it the backend tests fail with InvalidBackend (seen 2026-11-27).
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 || true
PYTEST=(python3 -m pytest -o addopts= -p no:cacheprovider -p no:benchmark --tb=short -rfE --timeout 120)

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      torch.cuda.get_device_name(0), torch.cuda.get_device_capability())"; } 2>&1 | tee "$OUT/env.txt"

# 1. The Triton kernels compiled for the first time (on CPU the same tests run under TRITON_INTERPRET; with a
#    GPU tests/kernels' conftest leaves it unset), spread over workers since each config compiles.
timeout 80 "${PYTEST[@]}" -q -n 8 --dist load tests/kernels 2>&1 | tee "$OUT/kernel-tests.txt"

# 2. Kernel vs reference vs cuBLAS bf16 at decode and prefill shapes of llama-7b and llama-100m (the first
#    call per shape autotunes, untimed): the GPU's time alone (CUDA graph replay), then the 7B shapes timed per
#    call from the host, launches included; attention (ATTENTION=1): Triton forward vs SDPA, flash-decoding.
timeout 150 python3 benchmarks/kernels.py --quick --timer graph --presets llama-7b,llama-100m 2>&1 \
    | tee "$OUT/kernels-graph.md"
timeout 50 python3 benchmarks/kernels.py --quick --presets llama-7b 2>&1 | tee "$OUT/kernels-launch.md"
if [[ "${ATTENTION:-0}" == 1 ]]; then
    timeout 60 python3 benchmarks/attention_gpu.py --quick 2>&1 | tee "$OUT/attention.md"
fi

# 3. A quantized pipeline on the ~100M preset, end to end on CUDA, through the CLI.
timeout 75 python3 -m passforge.tools.cli optimize llama-100m --device cuda --seq-len 512 --out /tmp/llama-100m \
    --pipeline "cleanup,cast(dtype=bf16),quantize(scheme=w8a8,decode_scheme=w4),fold-quant,lower-quant" \
    2>&1 | tee "$OUT/cli.txt"
# 4. Everything else with CUDA present: the lowering's CUDA candidates, 2:4 semi-structured weights, the
#    runtime, and the whole suite on this machine's torch (older than CI's pin; pyproject's range admits it).
#    -v: each test's result is in the log even if the step is cut off.
timeout 140 "${PYTEST[@]}" -v -n 14 --dist loadfile --ignore=tests/kernels tests 2>&1 | tee "$OUT/tests.txt"

exit 0
