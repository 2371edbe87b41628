#!/usr/bin/env bash
# The one prepared GPU check (for a session lent a GPU; < 8 minutes): install, GPU-path tests, then benchmarks.
# It uses the machine's own CUDA build of torch (no pin). Output goes to stdout and, when $OUT is set, to files.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/passforge-gpu}"
mkdir -p "$OUT"
python3 -m pip install --quiet --no-deps -e . 2>&1 | tail -2
python3 -m pip install --quiet safetensors rich tqdm matplotlib pytest 2>&1 | tail -2
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"

# 1. Tests (CPU-correct everywhere; the GPU run also exercises the CUDA executor and profiler paths below).
timeout 240 python3 -m pytest -q -x tests 2>&1 | tail -5 | tee "$OUT/tests.txt"

# 2. The default pipeline on the bundled LM and on the ~100M preset, on CUDA: per-pass table, JSON report.
timeout 90 python3 -m passforge.tools.cli optimize --device cuda --out "$OUT/tiny-lm" | tee "$OUT/tiny-lm.txt"
timeout 150 python3 -m passforge.tools.cli optimize llama-100m --device cuda --seq-len 512 --out "$OUT/llama-100m" \
    | tee "$OUT/llama-100m.txt"
