"""compressed-tensors (llm-compressor's format, what vLLM loads with ``quant_method: compressed-tensors``).

The Hugging Face layout of the ModelOpt format (per-decoder-layer safetensors files, index, the source's
tokenizer files), with every quantized linear written by the compressed-tensors library's own
compressors from the weight and the recipe's calibrated scales, and the config written by its
``ModelCompressor``:

    FP8 (static):   weight float8_e4m3fn, weight_scale [1], input_scale [1]   (scales = amax / 448)
    FP8 (dynamic):  weight float8_e4m3fn, weight_scale [out, 1] per channel, no input scale
                    (export.options.compressed_tensors.fp8_activations=dynamic: per-token at run time)
    NVFP4:          weight_packed uint8, weight_scale float8_e4m3fn per 16-block,
                    weight_global_scale [1] = 1 / ModelOpt's weight_scale_2, input_global_scale [1]
    KV cache FP8:   k_scale / v_scale [1] on the attention module (backbone.layers.N.mixer.k_scale)

Routed experts are per-expert linears (``mixer.experts.E.up_proj``), as vLLM's Nemotron-H loader reads
them. Modules the recipe leaves unquantized (routers, lm_head, excluded layers) are in ``ignore``;
targets are anchored regexes that hold under both the checkpoint's (``backbone.``) and vLLM's
(``model.``) module names. Several schemes make a ``mixed-precision`` config, one group per scheme.
"""

from __future__ import annotations

import re
from pathlib import Path


from hybridquant import export, formats
from hybridquant.errors import UserError
from hybridquant.formats.modelopt import kv_scales_of, nvfp4_block_scale

_EXPERTS = re.compile(r"^(.*\.mixer\.experts)\.\d+\.(up|down)_proj$")
_KV = re.compile(r"^(.*\.mixer)\.([kv])_proj\.([kv])_scale$")
# CT scheme name -> its on-disk format
SCHEMES = {"FP8": "float-quantized", "FP8_DYNAMIC": "float-quantized", "FP8_WEIGHT": "naive-quantized",
           "NVFP4": "nvfp4-pack-quantized", "NVFP4A16": "nvfp4-pack-quantized"}


def _scheme_name(meta: export.WeightMeta, fp8_activations: str) -> str:
    if meta.qformat == "fp8":
        if fp8_activations == "dynamic":
            return "FP8_DYNAMIC"
        return "FP8" if "input_scale" in meta.scales else "FP8_WEIGHT"
    return "NVFP4" if "input_scale" in meta.scales else "NVFP4A16"


def scheme(name: str, targets: list[str]):
    """The library's preset (FP8_WEIGHT: FP8's weights without its activations), on ``targets``."""
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    preset = preset_name_to_scheme("FP8" if name == "FP8_WEIGHT" else name, targets)
    return QuantizationScheme(targets=targets, weights=preset.weights,
                              input_activations=None if name == "FP8_WEIGHT" else preset.input_activations,
                              format=SCHEMES[name])


def target_of(module: str) -> str:
    """The target for one module: an anchored regex that holds under the checkpoint's (backbone.) and vLLM's
    (model.) names; routed experts as one block per layer, the module vLLM looks them up as."""
    m = _EXPERTS.match(module)
    if m:
        module = m.group(1)
    if not module.startswith(("backbone.", "model.")):
        return module  # lm_head
    rest = module.split(".", 1)[1]
    return "re:^(backbone|model)\\." + re.escape(rest) + ("\\..*$" if m else "$")


class Format(formats.Format):
    name = "compressed_tensors"

    @classmethod
    def check(cls, options, source_hf):
        unknown = sorted(set(options) - {"fp8_activations"})
        if unknown:
            raise UserError(f"export.options.compressed_tensors has no option {unknown[0]!r} "
                            f"(options: fp8_activations)")
        if options.get("fp8_activations", "static") not in ("static", "dynamic"):
            raise UserError(f"export.options.compressed_tensors.fp8_activations={options['fp8_activations']!r} "
                            f"is not static or dynamic")

    def __init__(self, options, plan, source_hf, model_name):
        super().__init__(options, plan, source_hf, model_name)
        self.fp8_activations = self.options.get("fp8_activations", "static")
        if self.fp8_activations == "dynamic" and not any(m.qformat == "fp8" for m in plan.metas.values()):
            raise UserError("export.options.compressed_tensors.fp8_activations=dynamic, but the recipe quantizes "
                            "no layer in FP8")
        self.schemes = {name: _scheme_name(meta, self.fp8_activations) for name, meta in plan.metas.items()}
        self._presets = {}

    def _preset(self, name: str):
        if name not in self._presets:
            self._presets[name] = scheme(name, ["Linear"])
        return self._presets[name]

    def weight(self, hf_name, tensor, meta, block_scale):
        from compressed_tensors.compressors import FloatQuantizationCompressor, NVFP4PackedCompressor

        if meta is None:
            yield hf_name, tensor.detach().cpu().contiguous()
            return
        base = hf_name[: -len(".weight")]
        w = tensor.detach().float()
        name = self.schemes[hf_name]
        if name.startswith("FP8"):
            if name == "FP8_DYNAMIC":  # per-channel weight scales from the weight, as the library computes them
                from compressed_tensors.quantization.utils import calculate_qparams

                amax = w.abs().amax(dim=1, keepdim=True)
                scale, _ = calculate_qparams(-amax, amax, self._preset(name).weights)
                state = {"weight": w, "weight_scale": scale.float()}
            else:
                state = {"weight": w, "weight_scale": meta.scales["weight_scale"].float().reshape(1)}
                if name == "FP8":
                    state["input_scale"] = meta.scales["input_scale"].float().reshape(1)
            out = FloatQuantizationCompressor.compress(state, self._preset(name))
        else:
            scale_2 = meta.scales["weight_scale_2"].float()
            state = {"weight": w, "weight_scale": nvfp4_block_scale(w, meta, block_scale).float(),
                     "weight_global_scale": (1.0 / scale_2).reshape(1)}
            if name == "NVFP4":
                state["input_global_scale"] = (1.0 / meta.scales["input_scale"].float()).reshape(1)
            out = NVFP4PackedCompressor.compress(state, self._preset(name))
        for key, value in out.items():
            if key.endswith("zero_point"):
                continue
            yield f"{base}.{key}", value.detach().cpu().contiguous()

    def group(self, group, tensors):
        out = dict(tensors)
        for name, value in kv_scales_of(self.plan, group).items():
            m = _KV.match(name)
            out[f"{m.group(1)}.{m.group(3)}_scale"] = value.float().reshape(1)
        return out

    def finish(self, directory: Path, shards):
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationStatus

        by_scheme: dict[str, set[str]] = {}
        for weight_name, name in self.schemes.items():
            by_scheme.setdefault(name, set()).add(target_of(weight_name[: -len(".weight")]))
        quantized = {n[: -len(".weight")] for n in self.schemes}
        ignore = sorted({target_of(m) for m in self.plan.linear_modules if m not in quantized})
        clash = set(ignore) & {t for targets in by_scheme.values() for t in targets}
        if clash or len({t for ts in by_scheme.values() for t in ts}) != sum(len(ts) for ts in by_scheme.values()):
            raise UserError(f"experts of one layer are quantized differently ({sorted(clash)[:1]}); compressed-tensors "
                            f"and vLLM take one scheme per layer's experts")
        if not by_scheme:
            raise UserError("the checkpoint has no quantized layer: a compressed-tensors export would be the BF16 model")
        groups = {f"group_{i}": scheme(name, sorted(targets))
                  for i, (name, targets) in enumerate(sorted(by_scheme.items()))}
        kinds = {SCHEMES[name] for name in by_scheme}
        kv = None
        if self.plan.kv_format:
            if self.plan.kv_format != "FP8":
                raise UserError(f"a {self.plan.kv_format} KV cache has no compressed-tensors scheme here (FP8 only)")
            kv = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
        config = QuantizationConfig(config_groups=groups, ignore=ignore, kv_cache_scheme=kv,
                                    format=kinds.pop() if len(kinds) == 1 else "mixed-precision",
                                    quantization_status=QuantizationStatus.COMPRESSED)
        count = export.hf_layout(directory, shards, self.source_hf, {})
        ModelCompressor(quantization_config=config).update_config(str(directory))
        return {"quantization": ",".join(sorted(by_scheme)) + (" + FP8 KV cache" if kv else ""), "tensors": count}
