#!/usr/bin/env bash
# Fill wheels/gpu/ with exactly the wheels a lent single-GPU machine needs to run bench/gpu_check.sh:
# the project's pinned packages that its image lacks or holds at another version. Run here (with
# network access to the package index), before the machine is lent; the folder then travels with the
# working tree (it is git-ignored: name `wheels` in the run's carry list; 64 MiB per run in all).
#
#   bash bench/gpu_wheels.sh            # downloads/builds into wheels/gpu/, prints each wheel's size
#
# The GPU image (see docs/gpu.md) already has torch 2.11 (CUDA), triton 3.6, safetensors 0.8, numpy,
# scipy, matplotlib, psutil, requests, rich, einops, huggingface-hub, pyyaml, regex, tqdm and
# nvidia-ml-py, so those are not carried; torch above all (GBs). transformers (5.17 there) and
# tokenizers (0.23 there) are carried at the project's pins, 5.12.1 and 0.22.2: megatron-bridge 0.6.2
# requires transformers <= 5.12.1. mamba-ssm and causal-conv1d are built here from their sources with
# the CUDA build skipped: their Mamba2 scan is Triton, which needs no compiled extension.
set -euo pipefail
cd "$(dirname "$0")/.."

out=wheels/gpu
py=${PYTHON:-.venv/bin/python}
rm -rf "$out"
mkdir -p "$out"

# Binary wheels for the GPU machine's Python (3.12, x86-64 Linux), whatever this machine is.
binary=(
  "transformers==5.12.1" "tokenizers==0.22.2"
  "megatron-core==0.19.2" "megatron-bridge==0.6.2" "nvidia-modelopt==0.47.0"
  "hydra-core==1.3.8" "omegaconf==2.3.1" "submitit==1.5.4" "hydra-submitit-launcher==1.2.0"
  # nvidia-modelopt's own needs that the image lacks (its optimizer imports pulp at module level)
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  "pulp==3.3.2"
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$out" "${binary[@]}"

# Pure-Python packages published as source only, and the two Mamba packages without their CUDA build.
"$py" -m pip wheel --quiet --no-deps -w "$out" "antlr4-python3-runtime==4.9.3"
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
  "$py" -m pip wheel --quiet --no-deps --no-build-isolation -w "$out" "mamba-ssm==2.3.2.post1" "causal-conv1d==1.7.0"

# One version of each, and no compiled Mamba extension (the point of the build above).
for whl in "$out"/*.whl; do
  if unzip -l "$whl" | grep -qE '(selective_scan_cuda|causal_conv1d_cuda).*\.so'; then
    echo "error: $whl holds a compiled CUDA extension; build it with the *_SKIP_CUDA_BUILD variables" >&2
    exit 1
  fi
done
dupes=$(ls "$out" | sed -E 's/-[0-9][^-]*-.*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "error: more than one wheel of: $dupes" >&2
  exit 1
fi

ls -l "$out" | awk 'NR > 1 {printf "%8.1f KiB  %s\n", $5 / 1024, $9}'
du -sb "$out" | awk '{printf "total: %.1f MiB in '"$out"' (the limit per run is 64 MiB, working tree included)\n", $1 / 1048576}'
