#!/usr/bin/env bash
# The prepared GPU check (issue 8), one script, <= 8 minutes on a bare GPU machine with PyTorch
# and no network. Run from the repository root:   OUT=gpu-check bash benchmarks/gpu_check.sh
# It installs tinygpt without touching torch, records the GPU, runs the side-by-side bench
# (training: plain, fast, compiled; sampling at batch 1 and 64 through the decode engine), then
# times `tinygpt train --preset gpu-fast` to its whole-val-split loss, and writes a markdown
# report to $OUT/report.md. Needs Tiny Shakespeare at $TINYGPT_DATA_DIR/tinyshakespeare/input.txt
# (or input.txt in the working directory).
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
{
  echo "# tinygpt GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/GPU: /'
  python -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}')"
  echo
  echo "## tinygpt bench --preset lecture --compile --iters 20 --repeats 3"
  echo
  timeout 240 tinygpt bench --preset lecture --iters 20 --repeats 3 --compile --sample-batch 64 \
    --json "$out/bench.json" 2>&1 | grep -v "^figures written"
  echo
  echo "## tinygpt train --preset gpu-fast"
  echo
  echo '```'
  /usr/bin/time -f "wall %e s" timeout 240 tinygpt train --preset gpu-fast --out "$out/gpu-fast" --quiet 2>&1 | tail -25
  echo '```'
  echo
  echo "metrics.jsonl: $out/gpu-fast/metrics.jsonl"
} | tee "$out/report.md"
