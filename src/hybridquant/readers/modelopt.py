"""ModelOpt-HF exports read back independently: safetensors + the published format, no ModelOpt and
nothing of the exporter. Every weight is dequantized the way a serving engine's reference kernels
would (the evaluate stage scores exported checkpoints this way; the export tests use it as a reader).

FP8:   weight (float8_e4m3fn [out, in]) × weight_scale (fp32 scalar)
NVFP4: weight (uint8 [out, in/2], two E2M1 codes per byte, low nibble first)
       × weight_scale (float8_e4m3fn [out, in/16], one per block of 16) × weight_scale_2 (fp32 scalar)
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch

# E2M1 code -> value: sign bit 3, exponent bits 2-1, mantissa bit 0.
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale", ".v_scale")


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    directory = Path(directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(directory / file), framework="pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == file, f"{name} is in {file}, the index says otherwise"
                tensors[name] = f.get_tensor(name)
    assert set(tensors) == set(index["weight_map"]), "index and files disagree"
    return tensors


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    codes = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return E2M1[codes.long()]


def dequantize(tensors: dict[str, torch.Tensor], dtype=torch.float32) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's weights in ``dtype`` and, per weight name, the format it was stored in."""
    weights, formats = {}, {}
    for name, t in tensors.items():
        if not name.endswith(".weight") and name.endswith(SCALE_SUFFIXES):
            continue
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if t.dtype == torch.float8_e4m3fn:
            scale = tensors[f"{base}.weight_scale"]
            assert scale.dtype == torch.float32 and scale.numel() == 1
            weights[name], formats[name] = t.float() * scale.float(), "fp8"
        elif t.dtype == torch.uint8:
            block = tensors[f"{base}.weight_scale"]
            scale_2 = tensors[f"{base}.weight_scale_2"]
            assert block.dtype == torch.float8_e4m3fn and scale_2.numel() == 1
            values = unpack_e2m1(t)
            group = values.shape[-1] // block.shape[-1]
            weights[name] = values * block.float().repeat_interleave(group, dim=-1) * scale_2.float()
            formats[name] = f"nvfp4/{group}"
        else:
            weights[name], formats[name] = t, "unquantized"
        weights[name] = weights[name].to(dtype)
    return weights, formats


def is_export(path: Path) -> bool:
    path = Path(path)
    return (path / "hf_quant_config.json").is_file() and (path / "model.safetensors.index.json").is_file()


def read(directory: Path, dtype=torch.float32) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights under the Hub's names in ``dtype``, the format of each, the model's config.json without
    its quantization_config)."""
    weights, formats = dequantize(read_tensors(directory), dtype)
    config = json.loads((Path(directory) / "config.json").read_text())
    config.pop("quantization_config")  # the weights are dequantized here
    return weights, formats, config


def excluded(name: str, exclude_modules: list[str]) -> bool:
    """vLLM's rule: a module is left unquantized when its name matches an exclude pattern."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in exclude_modules)
