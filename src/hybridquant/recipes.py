"""Quantization recipes: a named ModelOpt preset plus the differences a recipe states.

A recipe (``conf/quant/NAME.yaml``) never copies a preset's body. It names the preset, either an
attribute of ``modelopt.torch.quantization`` (``MAMBA_MOE_FP8_CONSERVATIVE_CFG``) or a recipe file
shipped in ModelOpt's ``modelopt_recipes`` package (``modelopt_recipes:models/.../nvfp4-mse``),
and states only what it changes. The options compose with any preset:

* ``kv_cache``: ``fp8`` adds ModelOpt's FP8 KV-cache quantizers, ``none`` disables them, ``null``
  keeps the preset's choice.
* ``activations``: ``dynamic_per_token`` or ``static_per_tensor`` scaling for every FP8 activation
  quantizer the preset configures (NVFP4 activations are unaffected); ``null`` keeps the preset's.
* ``algorithm``: ``max`` or ``mse``; with ``mse`` NVFP4 weights get static per-block scales chosen
  by ModelOpt's FP8 scale sweep, with ``max`` their block scales are the block maxima. ``null``
  keeps the preset's algorithm.
* ``keep_bf16``: module kinds left unquantized in some layers, e.g. the Mamba layers adjacent to an
  attention layer. Layers are derived from the model's hybrid pattern and translated to the
  rank-local layer indices ModelOpt sees (pipeline stages number their layers from 0).
* ``router_dtype``: ``fp32`` runs the MoE router (logits, top-k, expert weighting) in FP32; ``null``
  keeps megatron-bridge's setting for the model (fp32 for Nemotron-H, as transformers and vLLM route).
* ``overrides``: raw ModelOpt ``quant_cfg`` entries, appended last (later entries win).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from hybridquant import modules
from hybridquant.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
RECIPE_FILE_PREFIX = "modelopt_recipes:"

FP8 = (4, 3)
ACTIVATION_SCALING = {
    "static_per_tensor": {"num_bits": FP8, "axis": None},
    # ModelOpt's FP8 per-token activation format (FP8_PER_CHANNEL_PER_TOKEN_CFG's input quantizer).
    "dynamic_per_token": {"num_bits": FP8, "axis": None, "type": "dynamic", "block_sizes": {-1: None}},
}
ALGORITHMS = ("max", "mse")
LAYER_RULES = {"adjacent_to_attention": modules.adjacent_to_attention}


def available(conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / "quant").glob("*.yaml"))


def require_recipe(cfg: DictConfig) -> DictConfig:
    """The recipe chosen with ``+quant=NAME``, or a one-line error listing the recipes."""
    quant = cfg.get("quant")
    if quant is None or not quant.get("name"):
        raise UserError(
            "no quantization recipe chosen: add +quant=NAME, one of: " + ", ".join(available())
        )
    return quant


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) or OmegaConf.is_list(value) else value


def preset_config(recipe: Mapping[str, Any]) -> dict:
    """The ModelOpt config the recipe's ``preset`` names, as plain ``quant_cfg`` + ``algorithm``."""
    import modelopt.torch.quantization as mtq

    name = recipe["preset"]
    if name.startswith(RECIPE_FILE_PREFIX):
        from modelopt.recipe.loader import load_recipe

        try:
            quantize = load_recipe(name[len(RECIPE_FILE_PREFIX):]).quantize
        except (ValueError, FileNotFoundError, AttributeError) as exc:
            raise UserError(f"recipe {recipe['name']!r}: ModelOpt recipe {name!r} cannot be loaded ({exc})") from None
        return copy.deepcopy(quantize.model_dump(exclude_unset=True))
    if not hasattr(mtq, name):
        raise UserError(f"recipe {recipe['name']!r} names ModelOpt preset {name!r}, which this ModelOpt does not have")
    return copy.deepcopy(getattr(mtq, name))


def _is_fp8_per_tensor_input(entry: Mapping[str, Any]) -> bool:
    cfg = entry.get("cfg")
    return (isinstance(cfg, Mapping) and entry.get("quantizer_name", "").endswith("input_quantizer")
            and tuple(cfg.get("num_bits") or ()) == FP8 and not cfg.get("block_sizes"))


def _is_nvfp4_weight(entry: Mapping[str, Any]) -> bool:
    cfg = entry.get("cfg")
    blocks = cfg.get("block_sizes") if isinstance(cfg, Mapping) else None
    return (entry.get("quantizer_name", "").endswith("weight_quantizer") and bool(blocks)
            and tuple(cfg.get("num_bits") or ()) == (2, 1) and tuple(blocks.get("scale_bits") or ()) == FP8)


def _layers(rule: Any, pattern: str) -> list[int]:
    if isinstance(rule, str):
        if rule not in LAYER_RULES:
            raise UserError(f"keep_bf16 layers must be a list of layer indices or one of {sorted(LAYER_RULES)}, got {rule!r}")
        return LAYER_RULES[rule](pattern)
    return [int(i) for i in rule]


def kept_bf16(recipe: Mapping[str, Any], pattern: str) -> dict[str, list[int]]:
    """Module kind -> global layer indices the recipe keeps unquantized, from the model's pattern."""
    out: dict[str, set[int]] = {}
    for rule in recipe.get("keep_bf16") or []:
        layers = _layers(rule["layers"], pattern)
        for kind in rule["kinds"]:
            if kind not in modules.LAYER_KINDS:
                raise UserError(f"keep_bf16: {kind!r} is not a per-layer module kind ({', '.join(modules.LAYER_KINDS)})")
            out.setdefault(kind, set()).update(layers)
    return {kind: sorted(layers) for kind, layers in out.items()}


def modelopt_config(recipe: Mapping[str, Any], pattern: str = "", local_layers: Iterable[int] | None = None) -> dict:
    """The ``mtq.quantize`` config a recipe stands for, on the rank that holds ``local_layers``.

    ``pattern`` is the model's hybrid layer pattern; ``local_layers`` the global indices of this
    rank's decoder layers in order (default: all of them)."""
    import modelopt.torch.quantization as mtq

    recipe = _plain(recipe)
    config = preset_config(recipe)
    entries = list(config["quant_cfg"])
    algorithm = recipe.get("algorithm") or config.get("algorithm", "max")

    activations = recipe.get("activations")
    if activations is not None:
        if activations not in ACTIVATION_SCALING:
            raise UserError(f"quant.activations must be one of {sorted(ACTIVATION_SCALING)} or null, got {activations!r}")
        entries = [{**e, "cfg": copy.deepcopy(ACTIVATION_SCALING[activations])} if _is_fp8_per_tensor_input(e) else e
                   for e in entries]

    if recipe.get("algorithm") is not None:
        if algorithm not in ALGORITHMS:
            raise UserError(f"quant.algorithm must be one of {list(ALGORITHMS)} or null, got {algorithm!r}")
        block_type = "static" if algorithm == "mse" else "dynamic"
        entries = [{**e, "cfg": {**e["cfg"], "block_sizes": {**e["cfg"]["block_sizes"], "type": block_type}}}
                   if _is_nvfp4_weight(e) else e for e in entries]
        if algorithm == "mse":
            algorithm = {"method": "mse", "fp8_scale_sweep": any(_is_nvfp4_weight(e) for e in entries)}

    kv_cache = recipe.get("kv_cache")
    if kv_cache == "fp8":
        entries += copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    elif kv_cache == "none":
        entries.append({"quantizer_name": "*[kv]_bmm_quantizer", "enable": False})
    elif kv_cache is not None:
        raise UserError(f"quant.kv_cache must be fp8, none or null, got {kv_cache!r}")

    kept = kept_bf16(recipe, pattern)
    if kept:
        layers = list(range(len(modules.decoder_symbols(pattern)))) if local_layers is None else list(local_layers)
        for local, layer in enumerate(layers):
            for kind, excluded in kept.items():
                if layer in excluded:
                    entries.append({"quantizer_name": modules.quantizer_pattern(kind, local), "enable": False})

    entries += copy.deepcopy(list(recipe.get("overrides") or []))
    return {"quant_cfg": entries, "algorithm": algorithm}


def declared_formats(recipe: Mapping[str, Any], pattern: str) -> Callable[[str | None, int | None], str]:
    """``format(kind, layer)``: the weight format the recipe declares for a module of ``kind`` in
    global ``layer`` (the recipe's rules are resolved once, against the model's pattern)."""
    declared = dict(recipe.get("quantized_kinds") or {})
    kept = {kind: set(layers) for kind, layers in kept_bf16(recipe, pattern).items()}

    def format_of(kind: str | None, layer: int | None) -> str:
        if kind not in declared or layer in kept.get(kind, ()):
            return "BF16"
        return declared[kind]

    return format_of


def router_dtype(recipe: Mapping[str, Any]) -> str | None:
    value = recipe.get("router_dtype")
    if value not in (None, "fp32"):
        raise UserError(f"quant.router_dtype must be fp32 or null, got {value!r}")
    return value
