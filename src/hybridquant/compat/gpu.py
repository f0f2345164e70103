"""Run megatron-core's HybridModel on a CUDA machine that has neither Transformer-Engine nor the
compiled extensions of mamba-ssm and causal-conv1d (a GPU machine with only what wheels bring:
docs/gpu.md). ``cpu.apply()`` calls ``apply()`` when CUDA is available; each change is applied once
and only where the piece it stands in for is missing:

* **No Transformer-Engine**: ``HybridStack.final_norm`` and ModelOpt's TE-free hybrid spec build TE
  norms unconditionally; they get megatron's ``WrappedTorchNorm`` (as on CPU). The MoE latent
  projections (Nemotron-3-Super) are TE-only; they get the plain duplicated linear of ``cpu.py``.
* **mamba-ssm / causal-conv1d installed with their CUDA build skipped** (``*_SKIP_CUDA_BUILD=TRUE``):
  both packages import their compiled extensions (``selective_scan_cuda``, ``causal_conv1d_cuda``) at
  module level, so megatron's ``MambaMixer`` would find no mamba-ssm and refuse to build. Inert
  modules stand in for the extensions so the packages import; nothing megatron calls on this path
  uses them except mamba-ssm's fused ``mamba_split_conv1d_scan_combined`` (the calibration forward),
  whose convolution is causal-conv1d's compiled kernel. In its place the mixer gets the same
  computation with the convolution in torch (a depthwise ``F.conv1d``, as causal-conv1d's reference)
  and mamba-ssm's Triton ``mamba_chunk_scan_combined`` for the scan; its prefill path runs its own
  ``nn.Conv1d``. The gated RMSNorm, the prefill scan and the one-token decode step (megatron's own
  ``selective_state_update`` / ``causal_conv1d_update``) are Triton already and stay.
* ``HYBRIDQUANT_MAMBA_SCAN=chunked`` set when this runs: the plain-torch chunked scan (``ssd.py``)
  replaces the kernels (both scan entry points).

ModelOpt's FP8 fake quantization on CUDA JIT-builds a CUDA extension with nvcc at its first use (a
minute or more, once per machine); ``HYBRIDQUANT_MODELOPT_CUDA_EXT=0`` makes it use its own
plain-torch path (the one it takes on CPU; the same arithmetic) instead (``apply_modelopt``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

from hybridquant.compat import ssd

EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda")
MODELOPT_EXT_ENV = "HYBRIDQUANT_MODELOPT_CUDA_EXT"
_APPLIED = False


class _InertExtension(types.ModuleType):
    """A compiled extension that is not there: importable, any use raises ImportError."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"{self.__name__}.{name}: {self.__name__} was not built (installed with its CUDA "
                          "build skipped); hybridquant.compat.gpu routes megatron around it")


def missing_extensions() -> list[str]:
    """The compiled Mamba extensions that are not installed (inert stand-ins count as missing)."""
    missing = []
    for name in EXTENSIONS:
        module = sys.modules.get(name)
        if module is not None:
            if isinstance(module, _InertExtension) or not getattr(module, "__file__", None):
                missing.append(name)
        elif importlib.util.find_spec(name) is None:
            missing.append(name)
    return missing


def triton_split_conv1d_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, **kwargs):
    """mamba-ssm's ``mamba_split_conv1d_scan_combined`` without causal-conv1d's compiled kernel: the
    convolution in torch, the scan by mamba-ssm's Triton ``mamba_chunk_scan_combined``."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return ssd.split_conv1d_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                 scan=mamba_chunk_scan_combined, **kwargs)


def _route_around_missing_extensions() -> None:
    for name in missing_extensions():
        if name not in sys.modules:
            sys.modules[name] = _InertExtension(name)
    import megatron.core.ssm.mamba_mixer as mamba_mixer

    mamba_mixer.mamba_split_conv1d_scan_combined = triton_split_conv1d_scan
    mamba_mixer.causal_conv1d_fn = None  # the prefill path then runs the mixer's own nn.Conv1d


def _select_chunked_scan() -> None:
    """On GPU megatron keeps the Triton kernels unless ``HYBRIDQUANT_MAMBA_SCAN=chunked``."""
    if ssd.mode(default="kernels") != "chunked":
        return
    import megatron.core.ssm.mamba_mixer as mamba_mixer

    mamba_mixer.mamba_split_conv1d_scan_combined = ssd.split_conv1d_scan
    mamba_mixer.mamba_chunk_scan_combined = ssd.chunk_scan


def apply() -> bool:
    """Apply what this CUDA machine lacks, once. Returns True when anything was changed."""
    global _APPLIED
    if _APPLIED:
        return True
    from hybridquant.compat import cpu
    from hybridquant.compat.bridge_import import te_available

    changed = False
    if missing_extensions():  # first: megatron's Mamba modules must import with the stand-ins
        _route_around_missing_extensions()
        changed = True
    if not te_available():
        cpu._patch_te_norms()
        cpu._patch_moe_latent_projections()
        changed = True
    if ssd.mode(default="kernels") == "chunked":
        _select_chunked_scan()
        changed = True
    _APPLIED = True
    return changed


def apply_modelopt() -> None:
    """``HYBRIDQUANT_MODELOPT_CUDA_EXT=0``: ModelOpt's FP8 fake quantization without its JIT-built CUDA
    extension (plain torch, as on CPU)."""
    if os.environ.get(MODELOPT_EXT_ENV, "").strip() != "0":
        return
    from modelopt.torch.quantization import extensions

    extensions.get_cuda_ext_fp8.extension = None
