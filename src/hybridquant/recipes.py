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
* ``layers``: the weight format of each module kind in each (global) layer, e.g.
  ``{"3": {"mamba.in_proj": FP8, "mamba.out_proj": NVFP4}}``, with ``formats`` naming the ModelOpt
  preset whose weight and input quantizers each format stands for (``{FP8: FP8_DEFAULT_CFG}``);
  ``BF16`` leaves the module unquantized. This is what ``pipeline/autoquant.py`` writes: the preset
  and the options above still apply to everything the per-layer entries do not name.
* ``overrides``: raw ModelOpt ``quant_cfg`` entries, appended last (later entries win).

A recipe may also live in a file outside ``conf/quant`` (an autoquant run writes one):
``+quant=file quant.path=FILE`` takes the whole recipe from FILE.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

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
    """The named recipes (``file`` is the entry for recipes kept in files, not a recipe)."""
    return sorted(p.stem for p in (conf_dir / "quant").glob("*.yaml") if p.stem != "file")


def require_recipe(cfg: DictConfig) -> DictConfig:
    """The recipe chosen with ``+quant=NAME`` (or ``+quant=file quant.path=FILE``), or a one-line error."""
    quant = cfg.get("quant")
    if quant is not None and quant.get("path"):
        return from_file(quant)
    if quant is None or not quant.get("name"):
        raise UserError(
            "no quantization recipe chosen: add +quant=NAME, one of: " + ", ".join(available())
        )
    return quant


def _read_recipe_file(path: str) -> DictConfig:
    from hybridquant.schema import QuantConf

    file = Path(path)
    if not file.is_file():
        raise UserError(f"quant.path={path}: no such recipe file")
    try:
        loaded = OmegaConf.load(file)
        return OmegaConf.merge(OmegaConf.structured(QuantConf), loaded)
    except Exception as exc:  # noqa: BLE001 - a broken file: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"quant.path={path} is not a recipe: {first}") from None


def file_recipe_name(path: str) -> str:
    """The ``name`` inside a recipe file (run directories are named after it)."""
    return str(_read_recipe_file(path).name)


def from_file(quant: DictConfig) -> DictConfig:
    """The recipe in ``quant.path``; any other ``quant.*`` set next to it would be silently replaced."""
    from hybridquant.schema import QuantConf

    defaults = OmegaConf.merge(OmegaConf.structured(QuantConf), OmegaConf.load(CONF_DIR / "quant" / "file.yaml"))
    changed = sorted(k for k in quant if k not in ("path", "name") and _plain(quant.get(k)) != _plain(defaults.get(k)))
    if changed:
        raise UserError(f"quant.path takes the whole recipe from {quant.path}; quant.{changed[0]} cannot be set "
                        "next to it (edit the file instead)")
    recipe = _read_recipe_file(str(quant.path))
    recipe.path = str(quant.path)
    return recipe


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

    per_layer = layer_formats(recipe)
    if per_layer:
        quantizers = {name: format_quantizers(recipe, name) for name in
                      sorted({f for kinds in per_layer.values() for f in kinds.values()} - {BF16})}
        layers = list(range(len(modules.decoder_symbols(pattern)))) if local_layers is None else list(local_layers)
        for local, layer in enumerate(layers):
            for kind, name in sorted(per_layer.get(layer, {}).items()):
                if name == BF16:
                    entries.append({"quantizer_name": modules.quantizer_pattern(kind, local), "enable": False})
                    continue
                for quantizer, cfg in quantizers[name].items():
                    entries.append({"quantizer_name": modules.quantizer_pattern(kind, local, quantizer),
                                    "cfg": copy.deepcopy(cfg), "enable": True})

    entries += copy.deepcopy(list(recipe.get("overrides") or []))
    return {"quant_cfg": entries, "algorithm": algorithm}


BF16 = "BF16"
_FORMAT_QUANTIZERS = ("weight_quantizer", "input_quantizer")


def layer_formats(recipe: Mapping[str, Any]) -> dict[int, dict[str, str]]:
    """Global layer -> module kind -> format name, from the recipe's ``layers`` (validated)."""
    recipe = _plain(recipe)
    named = set(recipe.get("formats") or {}) | {BF16}
    out: dict[int, dict[str, str]] = {}
    for layer, kinds in (recipe.get("layers") or {}).items():
        try:
            index = int(layer)
        except (TypeError, ValueError):
            raise UserError(f"recipe {recipe.get('name')!r}: layers keys are layer indices, got {layer!r}") from None
        for kind, name in (kinds or {}).items():
            if kind not in modules.LAYER_KINDS:
                raise UserError(f"recipe {recipe.get('name')!r}: layer {index}: {kind!r} is not a per-layer module "
                                f"kind ({', '.join(modules.LAYER_KINDS)})")
            if name not in named:
                raise UserError(f"recipe {recipe.get('name')!r}: layer {index} {kind}: format {name!r} is not in "
                                f"its formats ({', '.join(sorted(named))})")
            out.setdefault(index, {})[kind] = name
    return out


def format_quantizers(recipe: Mapping[str, Any], name: str) -> dict[str, dict]:
    """quantizer attribute -> cfg of format ``name`` (the weight and input quantizers of the ModelOpt
    preset the recipe's ``formats`` names for it)."""
    recipe = _plain(recipe)
    preset = (recipe.get("formats") or {}).get(name)
    if not preset:
        raise UserError(f"recipe {recipe.get('name')!r}: format {name!r} names no ModelOpt preset in its formats")
    config = preset_config({"name": recipe.get("name"), "preset": preset})
    out = {}
    for entry in config["quant_cfg"]:
        quantizer = entry.get("quantizer_name", "")
        for attr in _FORMAT_QUANTIZERS:
            if quantizer == f"*{attr}" and entry.get("cfg") is not None and entry.get("enable", True):
                out[attr] = entry["cfg"]
    if "weight_quantizer" not in out:
        raise UserError(f"recipe {recipe.get('name')!r}: ModelOpt preset {preset!r} configures no weight quantizer")
    return out


def declared_formats(recipe: Mapping[str, Any], pattern: str) -> Callable[[str | None, int | None], str]:
    """``format(kind, layer)``: the weight format the recipe declares for a module of ``kind`` in
    global ``layer`` (the recipe's rules are resolved once, against the model's pattern)."""
    declared = dict(recipe.get("quantized_kinds") or {})
    kept = {kind: set(layers) for kind, layers in kept_bf16(recipe, pattern).items()}
    per_layer = layer_formats(recipe)

    def format_of(kind: str | None, layer: int | None) -> str:
        if layer in per_layer and kind in per_layer[layer]:
            return per_layer[layer][kind]
        if kind not in declared or layer in kept.get(kind, ()):
            return "BF16"
        return declared[kind]

    return format_of


def router_dtype(recipe: Mapping[str, Any]) -> str | None:
    value = recipe.get("router_dtype")
    if value not in (None, "fp32"):
        raise UserError(f"quant.router_dtype must be fp32 or null, got {value!r}")
    return value
