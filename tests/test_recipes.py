"""Each recipe quantizes exactly the modules it means, checked by name against the model, and its
options compose; the recipe table shows the same on the tiny model and on the real architectures."""

from __future__ import annotations

import copy

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hybridquant import model, modules, quantization, recipe_table, recipes, schema
from hybridquant.stages.quantize import check_recipe

schema.register()

EXPERTS = ("routed_expert.fc1", "routed_expert.fc2", "shared_expert.fc1", "shared_expert.fc2")
MAMBA = ("mamba.in_proj", "mamba.out_proj")
NEVER = {"attention.qkv", "attention.proj", "mamba.conv1d", "router", "embedding", "lm_head",
         "moe_latent.fc1", "moe_latent.fc2"}
# What each recipe means, written out here (not read from its YAML): kind -> (weight, activation)
# format; which kinds are BF16 next to attention; whether the KV cache is FP8.
SPEC = {
    "mamba_moe_fp8_conservative": ({k: ("FP8", "FP8") for k in EXPERTS}, (), False),
    "mamba_moe_fp8_aggressive": ({k: ("FP8", "FP8") for k in EXPERTS + MAMBA}, (), False),
    "mamba_moe_nvfp4_conservative": ({k: ("NVFP4", "NVFP4") for k in EXPERTS}, (), False),
    "mamba_moe_nvfp4_aggressive": ({k: ("NVFP4", "NVFP4") for k in EXPERTS + MAMBA}, (), False),
    "cascade2_fp8_selective": ({k: ("FP8", "FP8") for k in EXPERTS + MAMBA}, MAMBA, True),
    "super_nvfp4_mixed": ({"routed_expert.fc1": ("NVFP4", "NVFP4"), "routed_expert.fc2": ("NVFP4", "NVFP4"),
                           "shared_expert.fc1": ("FP8", "FP8"), "shared_expert.fc2": ("FP8", "FP8"),
                           "mamba.in_proj": ("FP8", "FP8"), "mamba.out_proj": ("FP8", "FP8")}, (), True),
}
CASCADE2_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


def _cfg(repo, name, *overrides):
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        return compose("quantize", overrides=[f"+quant={name}", *overrides])


def _expected(name: str, kind: str | None, layer: int | None, pattern: str) -> tuple[str, str]:
    kinds, next_to_attention_bf16, _ = SPEC[name]
    if kind not in kinds or (kind in next_to_attention_bf16 and layer in modules.adjacent_to_attention(pattern)):
        return ("BF16", "BF16")
    return kinds[kind]


def test_every_recipe_has_a_specification_here(repo):
    assert sorted(recipes.available()) == sorted(SPEC)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_recipe_quantizes_exactly_its_modules(name, repo, world1, tiny_checkpoint, calib_batches):
    recipe = _cfg(repo, name).quant
    loaded = model.load_hf(str(tiny_checkpoint), world1, "float32", "local", router_dtype=recipes.router_dtype(recipe))
    pattern = loaded.provider.hybrid_layer_pattern
    # Expected, from the model alone (no ModelOpt): every module with a weight GEMM, by name.
    expected = {modules.global_name(n): _expected(name, modules.kind_of(n), modules.layer_index(n), pattern)
                for n, _ in loaded.module.named_modules() if modules.kind_of(n) in modules.GEMM_KINDS}
    assert {w for w, _ in expected.values()} - {"BF16"}, "the tiny model has modules the recipe quantizes"

    quantization.quantize(loaded.chunks, recipes.modelopt_config(recipe, pattern), calib_batches[:2])
    records = quantization.inventory(loaded.chunks)

    weights = {r.name: r.format for r in records if r.role == "weight"}
    inputs = {r.name: r.format for r in records if r.role == "input"}
    # every module has a quantizer for what the recipe quantizes (the embedding has none: ModelOpt leaves it)
    assert {n for n, (w, a) in expected.items() if w != "BF16"} <= set(weights) and set(weights) <= set(expected)
    assert {n for n, (w, a) in expected.items() if a != "BF16"} <= set(inputs) and set(inputs) <= set(expected)
    assert weights == {n: expected[n][0] for n in weights}
    assert inputs == {n: expected[n][1] for n in inputs}
    for r in records:
        if r.role == "weight" and r.format != "BF16":
            assert r.amax is not None and max(r.amax) > 0, r
        if r.kind in NEVER:
            assert r.format == "BF16", f"{r.name}.{r.role} must not be quantized by {name}"
    kv = {r.format for r in records if r.role in ("k_bmm", "v_bmm")}
    assert kv == ({"FP8"} if SPEC[name][2] else {"BF16"})
    check_recipe(recipe, records, pattern)  # the recipe's own declaration agrees


def test_cascade2_keeps_the_mamba_layers_next_to_attention_in_bf16_on_the_real_pattern(repo):
    recipe = _cfg(repo, "cascade2_fp8_selective", "model=nemotron_cascade_2_30b_a3b").quant
    kept = recipes.kept_bf16(recipe, CASCADE2_PATTERN)
    assert kept == {"mamba.in_proj": [4, 11, 18, 25, 32, 41], "mamba.out_proj": [4, 11, 18, 25, 32, 41]}


def test_per_layer_rules_use_the_rank_local_layer_index(repo):
    """ModelOpt matches rank-local module names: a pipeline stage holding layers 26..51 calls layer 32 '6'."""
    recipe = _cfg(repo, "cascade2_fp8_selective").quant
    second_stage = recipes.modelopt_config(recipe, CASCADE2_PATTERN, range(26, 52))["quant_cfg"]
    disabled = [e["quantizer_name"] for e in second_stage if e.get("enable") is False and "layers." in e["quantizer_name"]]
    assert disabled == [f"*decoder.layers.{i - 26}.{p}.*" for i in (32, 41) for p in ("mixer.in_proj", "mixer.out_proj")]


def test_options_compose_with_any_recipe(repo):
    def config(name, **options):
        recipe = OmegaConf.to_container(_cfg(repo, name).quant)
        recipe.update(options)
        return recipes.modelopt_config(recipe, CASCADE2_PATTERN)

    def inputs(cfg):
        return [e["cfg"] for e in cfg["quant_cfg"] if e["quantizer_name"].endswith("input_quantizer") and "cfg" in e]

    per_token = config("mamba_moe_fp8_conservative", activations="dynamic_per_token")
    assert all(c["type"] == "dynamic" and c["block_sizes"] == {-1: None} for c in inputs(per_token))
    static = config("cascade2_fp8_selective", activations="static_per_tensor")
    assert all("type" not in c and c["axis"] is None for c in inputs(static))
    nvfp4 = config("mamba_moe_nvfp4_aggressive", activations="dynamic_per_token")
    assert all(c["num_bits"] == (2, 1) for c in inputs(nvfp4)), "NVFP4 activations are not FP8 activations"

    mse = config("mamba_moe_nvfp4_aggressive", algorithm="mse")
    assert mse["algorithm"] == {"method": "mse", "fp8_scale_sweep": True}
    weights = [e["cfg"] for e in mse["quant_cfg"] if e["quantizer_name"] == "*weight_quantizer"]
    assert weights and all(c["block_sizes"]["type"] == "static" for c in weights)
    max_calib = config("super_nvfp4_mixed", algorithm="max")
    assert max_calib["algorithm"] == "max"
    assert all(e["cfg"]["block_sizes"]["type"] == "dynamic" for e in max_calib["quant_cfg"]
               if e["quantizer_name"].endswith("weight_quantizer") and e.get("cfg", {}).get("block_sizes"))

    assert config("super_nvfp4_mixed", kv_cache="none")["quant_cfg"][-1] == {
        "quantizer_name": "*[kv]_bmm_quantizer", "enable": False}
    for bad in ({"kv_cache": "int8"}, {"activations": "per_channel"}, {"algorithm": "awq"}):
        with pytest.raises(recipes.UserError):
            config("mamba_moe_fp8_conservative", **bad)


def test_static_per_tensor_activations_calibrate_an_amax(repo, world1, tiny_checkpoint, calib_batches):
    recipe = copy.deepcopy(_cfg(repo, "cascade2_fp8_selective").quant)
    loaded = model.load_hf(str(tiny_checkpoint), world1, "float32", "local", router_dtype="fp32")
    pattern = loaded.provider.hybrid_layer_pattern
    for activations, calibrated in (("dynamic_per_token", False), ("static_per_tensor", True)):
        recipe.activations = activations
        fresh = model.load_hf(str(tiny_checkpoint), world1, "float32", "local") if calibrated else loaded
        quantization.quantize(fresh.chunks, recipes.modelopt_config(recipe, pattern), calib_batches[:1])
        fp8_inputs = [r for r in quantization.inventory(fresh.chunks) if r.role == "input" and r.format == "FP8"]
        assert fp8_inputs and all((r.amax is not None) == calibrated for r in fp8_inputs), activations


@pytest.mark.parametrize("name", sorted(SPEC))
def test_recipe_table_on_the_tiny_model_matches_the_specification(name, repo, world1, tiny_model_cfg):
    table = recipe_table.build(_cfg(repo, name).quant, {"name": "tiny", **tiny_model_cfg})
    pattern = tiny_model_cfg["arch"]["hybrid_override_pattern"]
    symbols = modules.decoder_symbols(pattern)
    for (layer, kind), fmt in table.cells.items():
        if kind in modules.GEMM_KINDS:
            want = _expected(name, kind, layer, pattern)[0]
            assert fmt == ("FP32" if want == "BF16" else want), (layer, kind, fmt)  # tiny runs in float32
        elif kind == "attention.core":
            assert fmt == ("KV FP8" if SPEC[name][2] else "KV FP32")
    assert {layer for layer, kind in table.cells if kind == "mamba.conv1d"} == {i for i, c in enumerate(symbols) if c == "M"}
    assert table.model_cells == {"embedding": "FP32", "lm_head": "FP32"}


def test_recipe_table_of_the_real_cascade2_architecture(repo, world1):
    cfg = _cfg(repo, "cascade2_fp8_selective", "model=nemotron_cascade_2_30b_a3b")
    table = recipe_table.build(cfg.quant, OmegaConf.to_container(cfg.model, resolve=True))
    by_kind = table.by_kind()
    moe = [i for i, c in enumerate(CASCADE2_PATTERN) if c == "E"]
    mamba = [i for i, c in enumerate(CASCADE2_PATTERN) if c == "M"]
    attention = [i for i, c in enumerate(CASCADE2_PATTERN) if c == "*"]
    assert (len(moe), len(mamba), len(attention)) == (23, 23, 6)
    for kind in EXPERTS:
        assert by_kind[kind] == {"FP8": moe}
    assert by_kind["router"] == {"FP32": moe}
    for kind in MAMBA:
        assert by_kind[kind] == {"FP8": [i for i in mamba if i not in (4, 11, 18, 25, 32, 41)],
                                 "BF16": [4, 11, 18, 25, 32, 41]}
    assert by_kind["mamba.conv1d"] == {"BF16": mamba}
    assert by_kind["attention.qkv"] == by_kind["attention.proj"] == {"BF16": attention}
    assert by_kind["attention.core"] == {"KV FP8": attention}
    assert table.activations["routed_expert.fc1"] == "FP8 dynamic per-token"
    assert table.model_cells == {"embedding": "BF16", "lm_head": "BF16"}
    text = recipe_table.markdown(table)
    assert "| mamba.in_proj | BF16 | 4,11,18,25,32,41 (6) |" in text


def test_recipe_table_of_a_latent_moe_architecture(repo, world1, tiny_model_cfg):
    """Nemotron-3-Super's MoE runs its experts in a latent space; on CPU the latent projections are
    built without Transformer-Engine, and every recipe leaves them in high precision."""
    arch = dict(tiny_model_cfg["arch"], moe_latent_size=32)
    table = recipe_table.build(_cfg(repo, "super_nvfp4_mixed").quant, {"name": "tiny_latent", "dtype": "bfloat16",
                                                                       "arch": arch})
    moe = [i for i, c in enumerate(arch["hybrid_override_pattern"]) if c == "E"]
    by_kind = table.by_kind()
    assert by_kind["moe_latent.fc1"] == by_kind["moe_latent.fc2"] == {"BF16": moe}
    assert by_kind["routed_expert.fc1"] == {"NVFP4": moe} and by_kind["shared_expert.fc2"] == {"FP8": moe}
