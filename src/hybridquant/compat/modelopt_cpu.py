"""NVFP4 fake quantization on CPU for ModelOpt 0.47.

ModelOpt's dynamic block quantization (the NVFP4 weight and activation quantizers of the
MAMBA_MOE_NVFP4_* presets) asserts ``amax.is_cuda`` and then dispatches to a CUDA extension or a
Triton kernel, so any quantized forward of an NVFP4 model fails on CPU. ModelOpt also ships a
pure-torch NVFP4 codec (``NVFP4QTensor``, the one its exporter uses to pack weights); on CPU the
fake-quant op is routed through that codec, so what the model computes with during calibration
and evaluation is exactly what the exported checkpoint holds. CUDA tensors and every other format
keep ModelOpt's own kernels.

Static NVFP4 (per-block amax fixed by calibration, e.g. chosen by the MSE FP8-scale sweep of the
Nemotron-3-Super recipe) goes through ``static_blockwise_fp4_fake_quant``, which exists only as a
Triton kernel. On CPU it is computed from ModelOpt's own block-scale function
(``compute_fp4_scales``: amax/6 rounded to E4M3 under the global scale) and ModelOpt's E2M1
rounding (``NVFP4QTensor._cast_fp4``, the exporter's), with the kernel's zero-scale rule.
"""

from __future__ import annotations

import torch

_APPLIED = False
E2M1_MAX = 6.0
E4M3_MAX = 448.0


def nvfp4_fake_quant(inputs: torch.Tensor, block_size: int, amax: torch.Tensor | None) -> torch.Tensor:
    """Quantize to NVFP4 (E2M1 values, E4M3 per-block scales, FP32 global scale) and dequantize."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    global_scale = None
    if amax is not None:
        global_scale = (amax.float().amax() / (E2M1_MAX * E4M3_MAX)).to(inputs.device)
    packed, block_scale, global_scale = NVFP4QTensor.quantize(inputs, block_size, weights_scaling_factor_2=global_scale)
    return packed.dequantize(dtype=inputs.dtype, scale=block_scale, double_scale=global_scale,
                             block_sizes={-1: block_size})


def static_nvfp4_fake_quant(x: torch.Tensor, amax: torch.Tensor, global_amax: torch.Tensor | None,
                            quantize_block_scales: bool = True, fp8_max_for_normalization: float = E4M3_MAX,
                            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Static NVFP4 fake quantization: one stored amax per block of ``x.numel() // amax.numel()``."""
    from modelopt.torch.kernels.quantization.gemm.fp4_kernel import compute_fp4_scales
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    blocks = amax.numel()
    if x.numel() % blocks:
        raise ValueError(f"x.numel() ({x.numel()}) is not a multiple of amax.numel() ({blocks})")
    scale = compute_fp4_scales(amax, global_amax, quantize_block_scales,
                               fp8_max_for_normalization=fp8_max_for_normalization).reshape(blocks, 1)
    xb = x.float().reshape(blocks, -1)
    safe = torch.where((scale == 0) | ~torch.isfinite(scale), torch.ones_like(scale), scale)
    codes = NVFP4QTensor._cast_fp4(xb / safe)  # 4-bit E2M1 codes, sign in bit 3
    out = NVFP4QTensor.get_e2m1_values(xb.device)[codes.long()] * safe
    out = torch.where(scale == 0, torch.zeros_like(out), out)
    return out.reshape(x.shape).to(out_dtype or x.dtype)


def apply() -> bool:
    """Route CPU NVFP4 fake quantization through ModelOpt's torch codec. Idempotent."""
    global _APPLIED
    if _APPLIED:
        return True
    import modelopt.torch.quantization.tensor_quant as tensor_quant

    modelopt_op = tensor_quant.dynamic_block_quantize_op

    def dynamic_block_quantize_op(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits,
                                  scale_exponent_bits):
        is_nvfp4 = (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4)
        if inputs.is_cuda or not is_nvfp4:
            return modelopt_op(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits,
                               scale_exponent_bits)
        return nvfp4_fake_quant(inputs, block_size, amax)

    tensor_quant.dynamic_block_quantize_op = dynamic_block_quantize_op

    import modelopt.torch.quantization.nn.modules.tensor_quantizer as tensor_quantizer

    modelopt_static = tensor_quantizer.static_blockwise_fp4_fake_quant

    def static_blockwise_fp4_fake_quant(x, amax, global_amax=None, quantize_block_scales=True,
                                        fp8_max_for_normalization=E4M3_MAX, out_dtype=None,
                                        pass_through_bwd=False):
        if x.is_cuda:
            return modelopt_static(x, amax, global_amax, quantize_block_scales, fp8_max_for_normalization,
                                   out_dtype, pass_through_bwd)
        return static_nvfp4_fake_quant(x, amax, global_amax, quantize_block_scales, fp8_max_for_normalization,
                                       out_dtype)

    tensor_quantizer.static_blockwise_fp4_fake_quant = static_blockwise_fp4_fake_quant
    _APPLIED = True
    return True
