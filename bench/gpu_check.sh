#!/usr/bin/env bash
# The GPU check, as one command on a lent single-GPU machine (docs/gpu.md):
#
#   bash bench/gpu_check.sh                 # from the repository root there; wheels/gpu/ carried
#
# 1. installs wheels/gpu/ (made here beforehand by bench/gpu_wheels.sh) into a private target folder
#    put first on PYTHONPATH: the machine's own torch (CUDA) and the rest of its image stay as they are;
# 2. bench/gpu_check.py: quantize -> export -> evaluate of bench_medium on the GPU (NCCL, world size 1)
#    against the same runs on the CPU, tokens/s, TFLOP/s and peak GPU memory;
# 3. the gpu-marked tests (tests/test_gpu.py) in IEEE float32.
# Everything within about 8 minutes; writes under $OUT (or /tmp/gpu-check). Exit status 0 only if all passed.
set -uo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
budget=${HQ_GPU_BUDGET_S:-470}
py=${PYTHON:-python3}
site=${HQ_SITE:-/tmp/hybridquant-site}
out=${OUT:-/tmp}/gpu-check
mkdir -p "$out"

if ! ls wheels/gpu/*.whl >/dev/null 2>&1; then
  echo "error: wheels/gpu/ has no wheels: run 'bash bench/gpu_wheels.sh' here first and carry 'wheels'" >&2
  exit 2
fi
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  wheels/gpu/*.whl || { echo "error: installing wheels/gpu/ failed" >&2; exit 2; }
export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TRITON_CACHE_AUTOTUNING=1    # Triton's autotuning results reused by the later processes
echo "installed $(ls wheels/gpu/*.whl | wc -l) wheels into $site in $((SECONDS - start)) s"

timeout $((budget - 120 - (SECONDS - start))) "$py" bench/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
check=${PIPESTATUS[0]}

left=$((budget - (SECONDS - start)))
tests=1
if [ "$left" -gt 30 ]; then
  NVIDIA_TF32_OVERRIDE=0 TRITON_F32_DEFAULT=ieee timeout "$left" "$py" -m pytest tests/test_gpu.py -m gpu \
    -p no:cacheprovider -q -rA 2>&1 | tee "$out/test_gpu.log"
  tests=${PIPESTATUS[0]}
else
  echo "no time left for tests/test_gpu.py (${left} s)"
fi
echo "gpu check: exit ${check}, gpu tests: exit ${tests}, $((SECONDS - start)) s in all"
[ "$check" -eq 0 ] && [ "$tests" -eq 0 ]
