#!/usr/bin/env bash
# The GPU check of the fast path: the GPU-marked tests, then bench.py at the paper's CIFAR10
# sizes, in one run of at most 10 minutes on one H200. Everything it prints also goes to
# $OUT/gpu_check.log when OUT is set, else to ./gpu_check.log. Run it after the README's
# set-up command (see BENCHMARKS.md, "Running the GPU checks").
set -o pipefail
log="${OUT:-.}/gpu_check.log"
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  timeout 270 python3 -m pytest -q -m gpu tests/test_gpu.py
  timeout 300 python3 -m bench.training
} 2>&1 | tee "$log"
