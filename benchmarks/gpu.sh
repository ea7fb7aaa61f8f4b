#!/usr/bin/env bash
# The GPU checks behind BENCHMARKS.md's GPU tables, as run on a lent H100 (see that file):
#   benchmarks/gpu.sh tests   boothkit's CPU-sized train/generate/export/SDXL tests, on CUDA
#   benchmarks/gpu.sh speed   `boothkit bench speed` at 512 px on sd15-shape, every GPU configuration
#   benchmarks/gpu.sh whole   one whole run as a user starts it: 100 class images + 1000 LoRA steps
# Results go to $OUT (default gpu-out/). Expects torch with CUDA and boothkit's dependencies importable.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export BOOTHKIT_HOME=${BOOTHKIT_HOME:-$PWD/.gpu-home}
for what in "$@"; do
  case $what in
    tests)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
      python3 -c "import torch, diffusers, transformers, peft, accelerate as a; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, \
'accelerate', a.__version__)" | tee -a "$OUT/gpu.txt"
      # two processes on one GPU is not a configuration (NCCL refuses a duplicate GPU): that test is CPU-only
      timeout "${TEST_SECONDS:-170}" python3 -m pytest -q -rfE -p no:cacheprovider --durations=5 \
        -k "not two_processes" tests/test_train.py tests/test_generate.py tests/test_sdxl.py tests/test_export.py \
        tests/test_prior.py 2>&1 | tail -60 | tee "$OUT/tests.txt" ;;
    speed)
      python3 -m boothkit bench speed --resolution 512 --steps 10 --warmup 3 --class-images 8 \
        --out "$OUT/speed" 2>&1 | tee "$OUT/speed.log" ;;
    whole)
      python3 -m boothkit bench speed --resolution 512 --steps 10 --warmup 3 --class-images 8 \
        --only "without class images" --end-to-end 1000 --out "$OUT/whole" 2>&1 | tee "$OUT/whole.log" ;;
    *) echo "unknown: $what (tests, speed, whole)"; exit 2 ;;
  esac
done
