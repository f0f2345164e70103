"""On a CUDA GPU (skipped without one; bench/gpu_check.sh runs them on a lent machine): the Mamba scan
megatron runs there (mamba-ssm's Triton kernels, with the convolution in torch where causal-conv1d's
compiled kernel is absent: compat/gpu.py) against the chunked scan, and the quantize and export stages
run with CUDA and NCCL (world size 1) against the same runs on the CPU.

The GPU runs here use IEEE float32 throughout (``NVIDIA_TF32_OVERRIDE=0`` for cuBLAS/cuDNN,
``TRITON_F32_DEFAULT=ieee`` for Triton's dot products), so GPU and CPU differ by float32 summation
order only; the default (TF32) numerics are bench/gpu_check.sh's business, with looser bounds."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.distributed]

IEEE = {"NVIDIA_TF32_OVERRIDE": "0", "TRITON_F32_DEFAULT": "ieee"}
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
FP8 = ["+quant=mamba_moe_fp8_conservative", "calib.num_samples=8", "quant.kv_cache=fp8"]
# GPU vs CPU in IEEE float32: another summation order in every GEMM and in the scan
SCAN_BOUND = 1e-5        # max |Δ| / max |reference| of the scan outputs
AMAX_BOUND = 1e-4        # max relative amax difference over all quantizers
LOGIT_BOUND = 1e-4       # relative L2 of the probe logits before quantization
QUANTIZED_BOUND = 1e-2   # ... after: an activation on an FP8 rounding boundary may round the other way
                         # (the CPU alone, bench_medium at 4 threads vs 1: 1.7e-3)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_triton_split_scan_matches_the_chunked_scan():
    from hybridquant.compat import cpu, gpu, ssd

    cpu.apply()  # on CUDA: gpu.apply(), with the inert extensions where they are missing
    g = torch.Generator().manual_seed(0)
    batch, length, nheads, headdim, ngroups, dstate, width = 2, 300, 8, 16, 2, 16, 4
    dim = nheads * headdim
    conv_dim = dim + 2 * ngroups * dstate
    zxbcdt = torch.randn(batch, length, 2 * dim + 2 * ngroups * dstate + nheads, generator=g)
    args = dict(conv1d_weight=torch.randn(conv_dim, width, generator=g) * 0.5,
                conv1d_bias=torch.randn(conv_dim, generator=g) * 0.1,
                dt_bias=torch.randn(nheads, generator=g) * 0.5,
                A=-torch.exp(torch.rand(nheads, generator=g) * 3 - 1), D=torch.randn(nheads, generator=g))
    cuda = {k: v.cuda() for k, v in args.items()}
    with torch.no_grad():
        want = ssd.split_conv1d_scan(zxbcdt, chunk_size=64, headdim=headdim, ngroups=ngroups, **args)
        got = gpu.triton_split_conv1d_scan(zxbcdt.cuda(), chunk_size=64, headdim=headdim, ngroups=ngroups, **cuda)
        chunked_cuda = ssd.split_conv1d_scan(zxbcdt.cuda(), chunk_size=64, headdim=headdim, ngroups=ngroups, **cuda)
    err = ((got.cpu().double() - want.double()).abs().max() / want.double().abs().max()).item()
    err_chunked = ((chunked_cuda.cpu().double() - want.double()).abs().max() / want.double().abs().max()).item()
    print(f"Triton split scan on CUDA vs chunked on CPU: {err:.2e}; chunked on CUDA vs CPU: {err_chunked:.2e}")
    # TF32 may be on for Triton's dots here (this process sets nothing): 2^-11 relative per product
    assert err < (SCAN_BOUND if os.environ.get("TRITON_F32_DEFAULT") == "ieee" else 5e-3)
    assert err_chunked < 5e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny model quantized (FP8 experts, FP8 KV cache) and exported on CUDA and on the CPU."""
    from launch import run_stage

    out = {}
    for device, env in (("cuda", IEEE), ("cpu", CPU_ONLY)):
        root = tmp_path_factory.mktemp(device)
        proc = run_stage("quantize", [*FP8, f"output_root={root}"], extra_env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run_dir,) = (root / "quantize").iterdir()
        export = root / "export"
        proc = run_stage("export", [f"checkpoint={run_dir}", f"output_dir={export}"], extra_env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[device] = (run_dir, export)
    return out


def test_cuda_quantize_matches_cpu(runs):
    (gpu_run, _), (cpu_run, _) = runs["cuda"], runs["cpu"]
    gpu_report, cpu_report = (json.loads((r / "report.json").read_text()) for r in (gpu_run, cpu_run))
    assert gpu_report["versions"] == cpu_report["versions"]
    gpu_amax = {(q["name"], q["role"]): q["amax"] for q in gpu_report["quantizers"]}
    cpu_amax = {(q["name"], q["role"]): q["amax"] for q in cpu_report["quantizers"]}
    assert gpu_amax.keys() == cpu_amax.keys() and len(gpu_amax) >= 100
    worst = 0.0
    for key, want in cpu_amax.items():
        got = gpu_amax[key]
        assert (got is None) == (want is None), key
        if want is None:
            continue
        diff = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(got, want))
        if key[1] == "weight":  # an abs-max of the same weights: exact in any order
            assert diff == 0.0, key
        worst = max(worst, diff)
    gpu_probe, cpu_probe = (torch.load(r / "probe.pt", map_location="cpu") for r in (gpu_run, cpu_run))
    assert torch.equal(gpu_probe["input_ids"], cpu_probe["input_ids"])
    before = rel(gpu_probe["logits_before"], cpu_probe["logits_before"])
    after = rel(gpu_probe["logits_after"], cpu_probe["logits_after"])
    print(f"CUDA vs CPU: max relative amax difference {worst:.2e}; probe logits before {before:.2e}, after {after:.2e}")
    assert worst <= AMAX_BOUND and before <= LOGIT_BOUND and after <= QUANTIZED_BOUND


def test_cuda_export_matches_cpu(runs):
    from safetensors.torch import load_file

    (_, gpu_export), (_, cpu_export) = runs["cuda"], runs["cpu"]
    files = sorted(p.name for p in cpu_export.glob("*.safetensors"))
    assert files == sorted(p.name for p in gpu_export.glob("*.safetensors"))
    compared = 0
    for name in files:
        want, got = load_file(str(cpu_export / name)), load_file(str(gpu_export / name))
        assert want.keys() == got.keys(), name
        for key, w in want.items():
            g = got[key]
            assert g.dtype == w.dtype and g.shape == w.shape, key
            if key.endswith("input_scale") or key.endswith("k_scale") or key.endswith("v_scale"):
                assert rel(g.float(), w.float()) <= AMAX_BOUND, key  # from activation amax
            elif w.dtype == torch.float8_e4m3fn:  # the same weights and weight amax: the same FP8 bytes
                assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), key
            else:
                assert torch.equal(g, w), key
            compared += 1
    assert compared > 100
