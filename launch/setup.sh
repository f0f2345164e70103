#!/usr/bin/env bash
# Create .venv (Python 3.12) with the pinned CPU/GPU-neutral stack. Idempotent: does nothing when the
# environment already matches pyproject.toml and this script. See docs/install.md for why the
# install has three steps.
set -euo pipefail
cd "$(dirname "$0")/.."

stamp_key=$(cat pyproject.toml launch/setup.sh | sha256sum | cut -c1-16)
stamp=".venv/.setup-${stamp_key}"
if [ -x .venv/bin/python ] && [ -f "$stamp" ]; then
  exit 0
fi

find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for candidate in python3.12 "$(command -v pyenv >/dev/null 2>&1 && pyenv root)/versions/3.12.1/bin/python" \
                   /root/.pyenv/versions/3.12.1/bin/python "$HOME/.pyenv/versions/3.12.1/bin/python"; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 \
       && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  for candidate in "$(pyenv root 2>/dev/null)"/versions/3.12.*/bin/python; do
    [ -x "$candidate" ] && { echo "$candidate"; return; }
  done
  echo "error: Python 3.12 not found (megatron-core >= 0.17 and megatron-bridge need it); set PYTHON=/path/to/python3.12" >&2
  exit 1
}

LLAMA_CPP_PYTHON=0.3.36
py=$(find_python)
echo "setup: creating .venv with $py" >&2
rm -rf .venv
"$py" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install --quiet --upgrade "pip>=25"
# 1. the project and its pinned dependencies (torch 2.11.0 = the GPU machines' version)
$pip install --quiet -e ".[test]"
# 2. megatron-bridge without its declared dependencies: they fail to build without a GPU toolchain
#    (fast-hadamard-transform needs torch at build time) and pull training-only packages; the HF<->Megatron
#    conversion needs only what step 1 installed.
$pip install --quiet --no-deps "megatron-bridge==0.6.2"
# 3. mamba-ssm / causal-conv1d from source with the CUDA build skipped: megatron-core's MambaMixer needs
#    the packages, and on CPU we run their pure-torch reference ops (hybridquant/compat/cpu.py).
#    On a CUDA machine, drop the *_SKIP_CUDA_BUILD variables to compile the real kernels.
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
  $pip install --quiet --no-build-isolation --no-deps "mamba-ssm==2.3.2.post1" "causal-conv1d==1.7.0"
# 4. llama.cpp (the GGUF export's quantizer and the tests' judge) through llama-cpp-python, which PyPI has
#    only as source: built once (8-22 min on 2 cores) into a wheel cache outside the checkout, then
#    installed from it in seconds by every later set-up and CI run on this machine.
llama_wheel_dir="${HYBRIDQUANT_WHEELS:-${HYBRIDQUANT_CACHE:-$HOME/.cache/hybridquant}/wheels}"
llama_wheel=$(ls "$llama_wheel_dir"/llama_cpp_python-${LLAMA_CPP_PYTHON}-*.whl 2>/dev/null | head -1 || true)
if [ -z "$llama_wheel" ]; then
  echo "setup: building llama-cpp-python ${LLAMA_CPP_PYTHON} once into $llama_wheel_dir (CPU, AVX2; 8-22 min)" >&2
  mkdir -p "$llama_wheel_dir"
  build_dir=$(mktemp -d)
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) $pip wheel --quiet --no-deps "llama-cpp-python==${LLAMA_CPP_PYTHON}" -w "$build_dir"
  mv "$build_dir"/llama_cpp_python-*.whl "$llama_wheel_dir"/
  rm -rf "$build_dir"
  llama_wheel=$(ls "$llama_wheel_dir"/llama_cpp_python-${LLAMA_CPP_PYTHON}-*.whl | head -1)
fi
$pip install --quiet --no-deps "$llama_wheel" "diskcache==5.6.3"
.venv/bin/python - <<'PY'
import importlib.util
import hybridquant, megatron.core, modelopt.torch.quantization  # noqa: F401
import llama_cpp  # noqa: F401 - the shared library loads
for name in ("megatron.bridge", "mamba_ssm", "causal_conv1d", "gguf", "compressed_tensors"):
    assert importlib.util.find_spec(name) is not None, f"{name} is not installed"
PY
touch "$stamp"
echo "setup: done" >&2
