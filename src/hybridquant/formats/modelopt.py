"""ModelOpt's Hugging Face format (what vLLM and SGLang load with ``quantization=modelopt``).

    config.json                     the source config + quantization_config (quant_method: modelopt)
    hf_quant_config.json            ModelOpt's quantization description (formats, exclude_modules, KV)
    model-0000K-of-0000N.safetensors  one file per decoder layer (more where a layer exceeds max_shard_size)
    model.safetensors.index.json, tokenizer files, generation_config.json, chat_template.jinja

FP8: weight float8_e4m3fn + weight_scale (fp32 scalar); NVFP4: weight uint8 (two E2M1 codes a byte)
+ weight_scale (float8_e4m3fn per 16-block) + weight_scale_2 (fp32 scalar); input_scale where the
activations are quantized; k_scale/v_scale on k_proj/v_proj for a quantized KV cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hybridquant import export, formats

QUANT_CONFIG = "hf_quant_config.json"


def nvfp4_block_scale(weight: torch.Tensor, meta: export.WeightMeta,
                      block_scale: torch.Tensor | None) -> torch.Tensor:
    """The per-16 block scales of an NVFP4 weight: the calibrated ones (MSE, static) where given, else the
    ones ModelOpt's fake quantization computes from the weight and its weight_scale_2."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    if block_scale is not None:
        return block_scale
    scale_2 = meta.scales["weight_scale_2"].to(weight.device)
    return NVFP4QTensor.get_weights_scaling_factor(weight, meta.block_size, scale_2)[0]


def quantize_weight(name: str, weight: torch.Tensor, meta: export.WeightMeta,
                    block_scale: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor]]:
    """ModelOpt's deployment tensors for one full weight: the weight and its scales (REFERENCE format)."""
    from modelopt.torch.export.quant_utils import QUANTIZATION_FP8, QUANTIZATION_NVFP4, to_quantized_weight

    base = name[: -len(".weight")]
    weight = weight.detach()
    if meta.qformat == "fp8":
        scale = meta.scales["weight_scale"]
        out = [(name, to_quantized_weight(weight, scale.to(weight.device), QUANTIZATION_FP8)),
               (f"{base}.weight_scale", scale)]
    else:
        scale_2 = meta.scales["weight_scale_2"]
        block_scale = nvfp4_block_scale(weight, meta, block_scale)
        packed = to_quantized_weight(weight, block_scale.to(weight.device), QUANTIZATION_NVFP4,
                                     scale_2.to(weight.device), meta.block_size)
        out = [(name, packed), (f"{base}.weight_scale", block_scale), (f"{base}.weight_scale_2", scale_2)]
    if "input_scale" in meta.scales:
        out.append((f"{base}.input_scale", meta.scales["input_scale"]))
    return [(n, t.detach().cpu().contiguous()) for n, t in out]


def hf_quant_config(plan: export.Plan) -> dict[str, Any]:
    """ModelOpt's hf_quant_config.json, from ModelOpt's own per-layer summariser, with clean HF names."""
    import modelopt
    from modelopt.torch.export.quant_utils import process_layer_quant_config

    layers: dict[str, Any] = {}
    for module in plan.linear_modules:
        meta = plan.metas.get(module + ".weight")
        layers[f"{module}.quantization"] = meta.qformat if meta else None
        layers[f"{module}.awq_block_size"] = meta.block_size if meta else 0
    quantization: dict[str, Any] = {"quant_algo": None, "kv_cache_quant_algo": None}
    quantization.update(process_layer_quant_config(layers))
    if plan.kv_format:
        quantization["kv_cache_quant_algo"] = plan.kv_format
    return {"producer": {"name": "modelopt", "version": modelopt.__version__}, "quantization": quantization}


def kv_scales_of(plan: export.Plan, group: str) -> dict[str, torch.Tensor]:
    return {name: scale for name, scale in plan.kv_scales.items() if export.group_of(name) == group}


class Format(formats.Format):
    name = "modelopt"

    def weight(self, hf_name, tensor, meta, block_scale):
        if meta is None:
            yield hf_name, tensor.detach().cpu().contiguous()
        else:
            yield from quantize_weight(hf_name, tensor, meta, block_scale)

    def group(self, group, tensors):
        return {**tensors, **kv_scales_of(self.plan, group)}

    def finish(self, directory: Path, shards):
        from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

        quant_config = hf_quant_config(self.plan)
        export.write_json(directory / QUANT_CONFIG, quant_config)
        count = export.hf_layout(directory, shards, self.source_hf,
                                 {"quantization_config": convert_hf_quant_config_format(quant_config)})
        return {"quantization": quant_config["quantization"].get("quant_algo"), "tensors": count}
