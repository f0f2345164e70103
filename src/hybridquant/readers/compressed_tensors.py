"""compressed-tensors exports read back with the compressed-tensors library's own decompression (its
per-module compressors, chosen by the config's groups, targets and ignore list, not by anything of the
exporter). transformers' compressed-tensors integration cannot be the reader for Nemotron-H: its
routed experts are fused 3-D parameters there, which the library never attaches to (FP8 experts load
as raw codes without scales, NVFP4 experts not at all), so each module is decompressed here instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from hybridquant.readers.modelopt import read_tensors

_QPARAMS = ("weight_scale", "weight_zero_point", "weight_global_scale", "input_scale", "input_global_scale",
            "input_zero_point", "weight_packed", "weight_shape")


def is_export(path: Path) -> bool:
    path = Path(path)
    config = path / "config.json"
    if not (path.is_dir() and config.is_file() and (path / "model.safetensors.index.json").is_file()):
        return False
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == "compressed-tensors"


def matches(module: str, targets: list[str]) -> bool:
    """compressed-tensors' (and vLLM's) rule: 're:' targets by re.match, others by name or the class Linear."""
    for target in targets:
        if target.startswith("re:"):
            if re.match(target[3:], module):
                return True
        elif target == module or target == "Linear":
            return True
    return False


def schemes_of(quant: dict) -> tuple[list, list[str]]:
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(quant)
    return list(config.config_groups.values()), list(config.ignore or [])


def read(directory: Path, dtype=torch.float32) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights under the Hub's names in ``dtype``, the scheme each was stored in, the config without
    its quantization_config). A module whose tensors are quantized but that no group targets, or one
    that a group targets but whose tensors are not quantized, is an error."""
    from compressed_tensors.compressors import BaseCompressor

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    quant = config.pop("quantization_config")
    groups, ignore = schemes_of(quant)
    tensors = read_tensors(directory)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, _, local = name.rpartition(".")
        modules.setdefault(module, {})[local] = tensor
    weights, formats = {}, {}
    for module, state in sorted(modules.items()):
        compressed = "weight_packed" in state or state.get("weight", torch.empty(0)).dtype == torch.float8_e4m3fn
        linear = "weight_packed" in state or ("weight" in state and state["weight"].dim() == 2
                                              and "embeddings" not in module)
        group = None
        if linear and not matches(module, ignore):
            group = next((g for g in groups if matches(module, g.targets)), None)
        # a group's "Linear" target takes every linear; what the exporter left dense must then be ignored
        if compressed and group is None:
            raise ValueError(f"{module} is stored quantized but no config group targets it")
        if group is not None and not compressed:
            raise ValueError(f"{module} is targeted by a {group.format} group but stored unquantized")
        if group is None:
            for local, tensor in state.items():
                if local in ("k_scale", "v_scale"):
                    continue
                weights[f"{module}.{local}"] = tensor.to(dtype)
                formats[f"{module}.{local}"] = "unquantized"
            continue
        local_state = {k: v for k, v in state.items() if k in (*_QPARAMS, "weight")}
        if group.format == "nvfp4-pack-quantized":
            weight = _nvfp4_float32(local_state, group)
        else:
            compressor = BaseCompressor.get_value_from_registry(group.format)
            if local_state["weight_scale"].dtype != torch.float8_e4m3fn:
                local_state["weight_scale"] = local_state["weight_scale"].float()
            weight = compressor.decompress(local_state, group)["weight"]
        weights[f"{module}.weight"] = weight.to(dtype)
        formats[f"{module}.weight"] = group.format
        for local, tensor in state.items():
            if local not in (*_QPARAMS, "weight"):
                weights[f"{module}.{local}"] = tensor.to(dtype)
                formats[f"{module}.{local}"] = "unquantized"
    return weights, formats, config


def _nvfp4_float32(state: dict[str, torch.Tensor], group) -> torch.Tensor:
    """The library's NVFP4 decompression (its unpacking and dequantize), in float32: its compressor's
    ``decompress`` computes in bfloat16, which would round every weight once more."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    packed = state["weight_packed"]
    values = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
    return dequantize(x_q=values, scale=state["weight_scale"].float(), args=group.weights,
                      global_scale=state.get("weight_global_scale"), dtype=torch.float32)
