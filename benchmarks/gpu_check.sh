#!/usr/bin/env bash
# The prepared GPU check (issue 8), one script, <= 8 minutes on a bare GPU machine with PyTorch
# and no network. Run from the repository root:   OUT=gpu-check bash benchmarks/gpu_check.sh
# It installs tinygpt without touching torch, records the GPU, runs the side-by-side bench
# (training: plain, fast, compiled; sampling at batch 1 and 64 through the decode engine), then
# times `tinygpt train --preset gpu-fast` to its whole-val-split loss; then (issue 18) the
# training step in float32, bfloat16 and float16 side by side with the dtype `auto` picks and
# why, 300 steps of gpu-fast in float16 with loss scaling (its loss scale and skipped steps), and
# sampling in float16 through the decode engine's CUDA graph; and writes a markdown report to
# $OUT/report.md. Needs Tiny Shakespeare at $TINYGPT_DATA_DIR/tinyshakespeare/input.txt
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
  echo
  echo "## dtypes: tinygpt bench --preset lecture --skip-plain --iters 10 --dtypes float32,bfloat16,float16"
  echo
  timeout 150 tinygpt bench --preset lecture --skip-plain --iters 10 --repeats 2 --dtypes float32,bfloat16,float16 \
    --json "$out/bench-dtypes.json" 2>&1 | grep -v "^figures written"
  echo
  echo "## float16 training with loss scaling: tinygpt train --preset gpu-fast --dtype float16 --max-iters 300"
  echo
  echo '```'
  timeout 120 tinygpt train --preset gpu-fast --dtype float16 --max-iters 300 --early-stop 0 --out "$out/fp16" \
    --quiet 2>&1 | tail -6
  grep loss_scale "$out/fp16/metrics.jsonl" | tail -2
  echo '```'
  echo
  echo "## float16 sampling through the decode engine"
  echo
  echo '```'
  timeout 60 tinygpt sample --ckpt "$out/fp16" --dtype float16 --prompt "ROMEO:" --max-new-tokens 200 2>&1 | tail -8
  echo '```'
} | tee "$out/report.md"
