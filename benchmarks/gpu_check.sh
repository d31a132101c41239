#!/usr/bin/env bash
# The GPU check for the gpu-fast preset, sized for a 15-minute lease on one H100:
# installs the project, records the GPU, runs the side-by-side bench, then times the preset to
# its whole-val-split loss. Needs the corpus at $TINYGPT_DATA_DIR/tinyshakespeare/input.txt (or
# input.txt in the working directory). Writes everything under ${OUT:-gpu-check}/.
set -euo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
python -m pip install -q -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
export PYTHONUNBUFFERED=1
timeout 180 tinygpt bench --preset lecture --iters 20 --repeats 3 --compile --json "$out/bench.json" | tee "$out/bench.md"
timeout 300 python benchmarks/time_to_loss.py --runs 1 --json "$out/ttl.json" -- \
  tinygpt train --preset gpu-fast --sample-chars 0 | tee "$out/ttl.md"
