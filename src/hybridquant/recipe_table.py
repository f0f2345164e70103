"""What a recipe does to a model, module kind by layer, without loading weights.

The model is built from its architecture alone on the meta device (no storage: a 120B model costs
nothing), and ModelOpt inserts and configures its quantizers exactly as ``mtq.quantize`` would for
that recipe; nothing is calibrated. The formats are therefore ModelOpt's own decision, read back
from the quantizers, not a re-statement of the recipe. Unquantized modules show the model dtype;
the router shows FP32 when the recipe runs it in FP32. This table is what model cards quote.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

from hybridquant import model, modules, parallel, quantization, recipes, source

DTYPE_LABEL = {"bfloat16": "BF16", "float16": "FP16", "float32": "FP32"}
LAYER_TYPES = {"M": "Mamba", "*": "Attention", "E": "MoE", "-": "MLP"}


@dataclass
class RecipeTable:
    recipe: str
    model: str
    pattern: str
    cells: dict[tuple[int, str], str]          # (layer, kind) -> format
    model_cells: dict[str, str]                # embedding / lm_head -> format
    activations: dict[str, str] = field(default_factory=dict)  # kind -> activation quantization

    def kinds(self) -> list[str]:
        present = {kind for _, kind in self.cells}
        return [k for k in modules.LAYER_KINDS if k in present]

    def by_kind(self) -> dict[str, dict[str, list[int]]]:
        """kind -> format -> layers."""
        out: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for (layer, kind), fmt in sorted(self.cells.items()):
            out[kind][fmt].append(layer)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "model": self.model, "pattern": self.pattern,
                "layers": {str(layer): {k: f for (l, k), f in self.cells.items() if l == layer}
                           for layer in sorted({l for l, _ in self.cells})},
                "model_modules": self.model_cells, "activations": self.activations,
                "by_kind": {k: dict(v) for k, v in self.by_kind().items()}}


def _label(formats: Counter) -> str:
    if len(formats) == 1:
        return next(iter(formats))
    return ", ".join(f"{fmt}×{n}" for fmt, n in formats.most_common())


def _activation(quantizer) -> str:
    """How an enabled input quantizer scales activations."""
    fmt = quantization.format_of(quantizer)
    blocks = quantizer.block_sizes or {}
    if blocks and blocks.get(-1) is None:
        return f"{fmt} dynamic per-token"
    if blocks:
        return f"{fmt} blocks of {blocks[-1]} ({blocks.get('type', 'static')} block scales)"
    return f"{fmt} static per-tensor"


def build(recipe: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> RecipeTable:
    """The table for ``recipe`` on the model ``model_cfg`` (its ``arch``). Needs a world of one process."""
    import torch
    from modelopt.torch.opt.conversion import apply_mode
    from modelopt.torch.quantization.mode import QuantizeModeRegistry
    from modelopt.torch.quantization.nn import TensorQuantizer

    from hybridquant import tiny
    from hybridquant.compat import patch_modelopt

    if model_cfg.get("arch"):  # a named model: its declared architecture, no checkpoint needed
        arch, hf_config = dict(model_cfg["arch"]), tiny.hf_config(model_cfg["arch"])
        dtype = model_cfg.get("dtype", "bfloat16")
    else:  # model=auto: the checkpoint's config.json
        from transformers import AutoConfig

        prepared, checkpoint_cfg = source.prepare(dict(model_cfg))
        arch, dtype = source.architecture(prepared, checkpoint_cfg), prepared["dtype"]
        hf_config = AutoConfig.from_pretrained(str(source.resolve(prepared)))
    pattern = arch["hybrid_override_pattern"]
    provider = model.provider_from_config(hf_config, parallel.Layout(), dtype, "local",
                                          router_dtype=recipes.router_dtype(recipe))
    router_dtype = provider.moe_router_dtype  # the recipe's, else the bridge's for the model
    net = model.build_on_meta(provider)
    patch_modelopt()
    with torch.no_grad():
        net = apply_mode(net, mode=[("quantize", recipes.modelopt_config(recipe, pattern))],
                         registry=QuantizeModeRegistry)

    high = DTYPE_LABEL[dtype]
    formats: dict[tuple[int | None, str], Counter] = defaultdict(Counter)
    activations: dict[str, Counter] = defaultdict(Counter)
    for name, module in net.named_modules():
        kind = modules.kind_of(name)
        if kind is None and isinstance(getattr(module, "conv1d_weight", None), torch.Tensor):
            kind, name = "mamba.conv1d", name + ".conv1d"  # megatron keeps the conv as a mixer parameter
        if kind is None or name.startswith("mtp"):
            continue
        key = (modules.layer_index(name), kind)
        weight_q = getattr(module, "weight_quantizer", None)
        if kind == "attention.core":
            k_q = getattr(module, "k_bmm_quantizer", None)
            fmt = quantization.format_of(k_q) if isinstance(k_q, TensorQuantizer) and k_q.is_enabled else high
            formats[key][f"KV {fmt}"] += 1
        elif kind == "router":
            formats[key]["FP32" if router_dtype == "fp32" else high] += 1
        elif isinstance(weight_q, TensorQuantizer) and weight_q.is_enabled:
            formats[key][quantization.format_of(weight_q)] += 1
            input_q = getattr(module, "input_quantizer", None)
            if isinstance(input_q, TensorQuantizer):
                activations[kind][_activation(input_q) if input_q.is_enabled else high] += 1
        else:
            formats[key][high] += 1
    cells = {(layer, kind): _label(c) for (layer, kind), c in formats.items() if layer is not None}
    model_cells = {kind: _label(c) for (layer, kind), c in formats.items() if layer is None}
    return RecipeTable(recipe=recipe["name"], model=model_cfg["name"], pattern=pattern, cells=cells,
                       model_cells=model_cells, activations={k: _label(v) for k, v in activations.items()})


def _ranges(layers: list[int]) -> str:
    out, start, prev = [], None, None
    for i in layers:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(out)


def markdown(table: RecipeTable, per_layer: bool = True) -> str:
    """Module kind × format (with the layers in each format), then the per-layer grid."""
    lines = [f"Recipe `{table.recipe}` on `{table.model}` ({len(modules.decoder_symbols(table.pattern))} layers)",
             "", "| module kind | format | layers | activations |", "|---|---|---|---|"]
    for kind in table.kinds():
        for fmt, layers in sorted(table.by_kind()[kind].items(), key=lambda kv: kv[1][0]):
            lines.append(f"| {kind} | {fmt} | {_ranges(layers)} ({len(layers)}) | "
                         f"{table.activations.get(kind, '') if fmt not in DTYPE_LABEL.values() else ''} |")
    for kind, fmt in table.model_cells.items():
        lines.append(f"| {kind} | {fmt} | model | |")
    if per_layer:
        kinds = table.kinds()
        lines += ["", "| layer | type | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        symbols = modules.decoder_symbols(table.pattern)
        for layer, symbol in enumerate(symbols):
            row = [table.cells.get((layer, kind), "") for kind in kinds]
            lines.append(f"| {layer} | {LAYER_TYPES.get(symbol, symbol)} | " + " | ".join(row) + " |")
    return "\n".join(lines)
