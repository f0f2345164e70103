"""Quantize -> dequantize error within each format's bound; MSE block scales beat max; the NVFP4 values
the CPU computes with are exactly what ModelOpt's exporter packs (read back here without ModelOpt)."""

from __future__ import annotations

import pytest
import torch

E4M3_MAX, E2M1_MAX = 448.0, 6.0
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "normal": torch.randn(64, 256, generator=g),
        "heavy_tailed": torch.distributions.StudentT(2.0).sample((64, 256)),
        "outlier_rows": torch.randn(64, 256, generator=g) * torch.logspace(-3, 1, 64).unsqueeze(1),
    }


def _linear_model(weight: torch.Tensor, weight_cfg: dict, algorithm, inputs: bool = False):
    import modelopt.torch.quantization as mtq

    from hybridquant.compat import patch_modelopt

    patch_modelopt()
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data.copy_(weight)
    net = torch.nn.Sequential(lin)
    cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                         {"quantizer_name": "*weight_quantizer", "cfg": weight_cfg, "enable": True}],
           "algorithm": algorithm}
    x = torch.randn(8, weight.shape[1], generator=torch.Generator().manual_seed(1))
    return mtq.quantize(net, cfg, lambda m: m(x))[0]


NVFP4_STATIC = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3)}}
NVFP4_DYNAMIC = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}


@pytest.mark.parametrize("name", list(_tensors()))
def test_fp8_per_tensor_error_is_within_half_an_e4m3_step(name):
    x = _tensors()[name]
    lin = _linear_model(x, {"num_bits": (4, 3), "axis": None}, "max")
    q = lin.weight_quantizer(lin.weight).detach()
    scale = x.abs().max() / E4M3_MAX
    # E4M3: 3 mantissa bits (relative half step 2^-4) for normals, absolute step 2^-9 below 2^-6
    bound = x.abs() * 2.0 ** -4 + scale * 2.0 ** -10
    assert ((q - x).abs() <= bound * (1 + 1e-6)).all()
    assert (q - x).abs().max() > 0


@pytest.mark.parametrize("name", list(_tensors()))
@pytest.mark.parametrize("weight_cfg", [NVFP4_DYNAMIC, NVFP4_STATIC], ids=["dynamic", "static"])
def test_nvfp4_error_is_within_one_block_scale(name, weight_cfg):
    x = _tensors()[name]
    lin = _linear_model(x, weight_cfg, "max")
    q = lin.weight_quantizer(lin.weight).detach().reshape(-1, 16)
    blocks = x.reshape(-1, 16)
    block_scale = blocks.abs().amax(dim=1, keepdim=True) / E2M1_MAX
    # |x/s| <= 6 rounds to the E2M1 grid (largest half gap: 1); the block scale itself is rounded to
    # E4M3 (relative 2^-4), which at most costs a clamp of 0.4 s: |x - q(x)| <= s (1 + 2^-4).
    assert ((q - blocks).abs() <= block_scale * (1 + 2.0 ** -4) + 1e-12).all()
    rel = ((q - blocks).norm() / blocks.norm()).item()
    assert 0.01 < rel < 0.2, rel


def test_mse_block_scales_reconstruct_weights_better_than_max():
    for name, w in _tensors().items():
        err = {}
        for algorithm in ("max", {"method": "mse", "fp8_scale_sweep": True}):
            lin = _linear_model(w, NVFP4_STATIC, algorithm)
            err[str(algorithm)] = (lin.weight_quantizer(lin.weight).detach() - w).pow(2).sum().item()
        mse, mx = err[str({"method": "mse", "fp8_scale_sweep": True})], err["max"]
        assert mse < mx * 0.95, (name, mse, mx)  # measured: 9 % (heavy-tailed) to 30 % lower


def _unpack_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor):
    """The exported representation, decoded independently: two E2M1 codes per byte (low nibble first);
    each element is its E2M1 value times the FP8 block scale times the FP32 global scale."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    values = E2M1[codes].reshape(packed.shape[0], -1, 16)
    scale = (block_scale.float() * global_scale.float()).unsqueeze(-1)
    return values, scale


@pytest.mark.parametrize("weight_cfg,algorithm", [(NVFP4_STATIC, {"method": "mse", "fp8_scale_sweep": True}),
                                                  (NVFP4_DYNAMIC, "max")], ids=["static-mse", "dynamic-max"])
def test_cpu_nvfp4_equals_the_exported_packed_weights(weight_cfg, algorithm):
    from modelopt.torch.export.quant_utils import (get_weight_scaling_factor, get_weight_scaling_factor_2,
                                                   to_quantized_weight)

    w = _tensors()["outlier_rows"]
    lin = _linear_model(w, weight_cfg, algorithm)
    fake = lin.weight_quantizer(lin.weight).detach().reshape(64, 16, 16)
    scale, scale2 = get_weight_scaling_factor(lin), get_weight_scaling_factor_2(lin)
    packed = to_quantized_weight(lin.weight.detach(), scale, "nvfp4", scale2, 16)
    assert packed.dtype == torch.uint8 and packed.shape == (64, 128)
    assert scale.dtype == torch.float8_e4m3fn and scale.shape == (64, 16)
    values, block = _unpack_nvfp4(packed, scale, scale2)
    # the same E2M1 code and the same FP8 block scale for every element ...
    assert torch.equal(torch.round(fake / block * 2) / 2, values)
    # ... so the values agree up to the order of the two scale multiplications (1 float32 ulp)
    torch.testing.assert_close(values * block, fake, rtol=2.0 ** -22, atol=0)
