"""The autoquant stage run as users run it (torchrun): one allocation at every layout, resumable scores,
re-solving without rescoring, the recipe it writes reproducing its checkpoint, the MIXED_PRECISION
export read back independently; and its one-line errors (in process)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import hf_reader
import weight_only
from aq_settings import BASE, FAST, PATTERN, read
from launch import run_stage
from hybridquant import autoquant, recipes
from hybridquant.errors import UserError

def autoquant_run(root, *overrides, nproc=1, env=None):
    proc = run_stage("autoquant", [f"+quant={BASE}", f"output_root={root}", *FAST, *overrides], nproc=nproc,
                     extra_env=env)
    dirs = [d for d in (root / "autoquant").iterdir() if d.name != "scores"] if (root / "autoquant").is_dir() else []
    return proc, dirs


def amax_of(report):
    return {(q["name"], q["role"]): (q["format"], q["amax"], q["blocks"]) for q in report["quantizers"]}


@pytest.mark.distributed
def test_single_process_run_writes_recipe_table_plot_and_checkpoint(runs):
    run_dir = runs("single")
    report, recipe, rows = read(run_dir)
    aq = report["autoquant"]
    assert report["stage"] == "autoquant" and aq["base_recipe"] == BASE and aq["method"] == "gradient"
    assert aq["satisfied"] and 4.5 <= aq["effective_bits"] <= 6.0
    # Both candidates are used at this budget, and the most sensitive layers get the wider format.
    assert set(aq["decisions"]) == {"NVFP4", "FP8"}
    for name in ("checkpoint/hybridquant.json", "probe.pt", "autoquant.md", "config.yaml"):
        assert (run_dir / name).exists(), name
    # Attention, conv1d, router, embeddings and lm_head stay as the base recipe has them: not searched.
    kinds = {r["kind"] for r in rows}
    assert kinds == {"mamba.in_proj", "mamba.out_proj", "routed_expert", "shared_expert.fc1", "shared_expert.fc2"}
    for row in rows:
        c = row["candidates"]
        assert c["NVFP4"]["score"] > c["FP8"]["score"] > c["BF16"]["score"] == 0.0
        assert c["NVFP4"]["cost"] < c["FP8"]["cost"] < c["BF16"]["cost"]
        assert recipe["layers"][str(row["layer"])][row["kind"] if row["kind"] != "routed_expert"
                                                   else "routed_expert.fc1"] == row["format"]
    # The checkpoint holds exactly the recipe's formats (checked by the stage; read back here).
    declared = recipes.declared_formats(OmegaConf.create(recipe), PATTERN)
    for q in report["quantizers"]:
        if q["role"] == "weight":
            assert q["format"] == declared(q["kind"], q["layer"]), q["name"]
    # Effective bits recomputed from the table: chosen cost / BF16 cost over the searched weights.
    chosen = sum(r["candidates"][r["format"]]["cost"] for r in rows)
    full = sum(r["candidates"]["BF16"]["cost"] for r in rows)
    assert aq["effective_bits"] == pytest.approx(16 * chosen / full, rel=1e-9)
    assert report["timings_s"]["scoring_s"] > 0 and aq["also_solved"]["5"]["effective_bits"] <= 5.0


@pytest.mark.distributed
def test_killed_after_scoring_resumes_without_rescoring_and_resolves_other_budgets(runs, tmp_path):
    ref_report, ref_recipe, _ = read(runs("single"))
    env = {"HYBRIDQUANT_FAULT": "0:scored", "HYBRIDQUANT_FAULT_KIND": "kill"}
    proc, killed = autoquant_run(tmp_path, env=env)
    assert proc.returncode != 0
    scores = tmp_path / "autoquant" / "scores"
    (score_dir,) = scores.iterdir()
    assert (score_dir / "scores0.pth").is_file() and (score_dir / "meta.json").is_file()
    assert all(not (d / "report.json").exists() for d in killed)

    proc, (run_dir,) = autoquant_run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report, recipe, _ = read(run_dir)
    assert report["autoquant"]["scores_restored"] and report["timings_s"]["scoring_s"] == 0.0
    assert recipe["layers"] == ref_recipe["layers"]
    assert amax_of(report) == amax_of(ref_report)

    # Another budget: the same scores, solved again (what the first run's also_solve predicted).
    proc, dirs = autoquant_run(tmp_path, "autoquant.effective_bits=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (five,) = [d for d in dirs if d.name != run_dir.name]
    report5, recipe5, _ = read(five)
    assert report5["autoquant"]["scores_restored"] and report5["autoquant"]["effective_bits"] <= 5.0
    assert recipe5["layers"] == ref_report["autoquant"]["also_solved"]["5"]["layers"]


@pytest.mark.distributed
def test_recipe_file_reproduces_the_checkpoint(runs, tmp_path):
    run_dir = runs("single")
    ref_report, _, _ = read(run_dir)
    proc = run_stage("quantize", ["+quant=file", f"quant.path={run_dir / 'recipe.yaml'}", f"output_root={tmp_path}",
                                  "calib.num_samples=4", "calib.max_seq_len=48", "probe_samples=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (quantize_dir,) = (tmp_path / "quantize").iterdir()
    report = json.loads((quantize_dir / "report.json").read_text())
    assert report["recipe"]["name"] == ref_report["recipe"]["name"]
    assert amax_of(report) == amax_of(ref_report)


@pytest.mark.distributed
def test_export_is_mixed_precision_and_reads_back(runs, tmp_path, world1):
    run_dir = runs("single")
    _, recipe, _ = read(run_dir)
    out = tmp_path / "export"
    proc = run_stage("export", [f"checkpoint={run_dir}", f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    from hybridquant import export as export_lib

    assert export_lib.verify(out) == []
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["quant_algo"] == "MIXED_PRECISION"
    model, formats = hf_reader.build_model(out, tmp_path / "dequantized")
    hf_names = {"mamba.in_proj": "mixer.in_proj", "mamba.out_proj": "mixer.out_proj",
                "shared_expert.fc1": "mixer.shared_experts.up_proj", "shared_expert.fc2": "mixer.shared_experts.down_proj",
                "routed_expert.fc1": "mixer.experts.0.up_proj", "routed_expert.fc2": "mixer.experts.0.down_proj"}
    want = {"FP8": "fp8", "NVFP4": "nvfp4/16", "BF16": "unquantized"}
    for layer, kinds in recipe["layers"].items():
        for kind, fmt in kinds.items():
            module = f"backbone.layers.{layer}.{hf_names[kind]}"
            assert formats[f"{module}.weight"] == want[fmt], module
            assert hf_quant["quantized_layers"][module]["quant_algo"] == fmt, module
    ids = torch.load(run_dir / "probe.pt")["input_ids"]
    reference = weight_only.logits(run_dir, world1, ids)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    assert ((logits - reference).norm() / reference.norm()).item() <= 1e-3


# ------------------------------------------------------------------------------------------------
# In process: settings and recipe files.

def _conf(**changes):
    conf = OmegaConf.load(recipes.CONF_DIR / "autoquant" / "default.yaml")
    conf.scores_dir = "unused"
    for key, value in changes.items():
        conf[key] = value
    return conf


@pytest.mark.parametrize("changes, message", [
    ({"effective_bits": 4.0}, "autoquant budget 4 effective bits is outside [4.5, 16]"),
    ({"also_solve": [17.0]}, "autoquant budget 17 effective bits is outside"),
    ({"formats": ["INT4"]}, "autoquant.formats: 'INT4' is not in autoquant.presets"),
    ({"formats": []}, "autoquant.formats is empty"),
    ({"method": "hessian"}, "autoquant.method must be one of gradient, kl_div"),
    ({"cost_model": "flops"}, "autoquant.cost_model must be one of weight, active_moe"),
    ({"score_samples": 64}, "autoquant.score_samples=64 must be between 1 and calib.num_samples=32"),
])
def test_bad_settings_are_one_line_errors(changes, message):
    with pytest.raises(UserError, match=None) as err:
        autoquant.options(_conf(**changes), calib_samples=32)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_active_moe_ratio_comes_from_the_megatron_config():
    assert autoquant.active_expert_ratio(SimpleNamespace(num_moe_experts=128, moe_router_topk=6)) == 6 / 128
    with pytest.raises(UserError, match="needs a MoE model"):
        autoquant.active_expert_ratio(SimpleNamespace(num_moe_experts=None, moe_router_topk=None))
    # ModelOpt's active_moe cost model recognises Megatron's routed experts (not the shared ones).
    from modelopt.torch.quantization._auto_quantize_cost import get_auto_quantize_cost_model

    cost = get_auto_quantize_cost_model("active_moe")
    ratio = {"active_moe_expert_ratio": 0.25}
    routed = [f"decoder.layers.1.mlp.experts.local_experts.{i}.linear_fc{j}" for i in range(4) for j in (1, 2)]
    assert cost.module_cost_weight(routed, ratio) == 0.25
    assert cost.module_cost_weight(["decoder.layers.1.mlp.shared_experts.linear_fc1"], ratio) == 1.0
    assert cost.module_cost_weight(["decoder.layers.0.mixer.in_proj"], ratio) == 1.0


def test_scores_made_for_other_settings_are_refused(tmp_path):
    """Every rank checks before any process group exists (stages.autoquant.run); the main rank claims."""
    from hybridquant.stages.autoquant import check_scores_dir, claim_scores_dir

    assert not check_scores_dir(tmp_path / "s", {"calib": {"seed": 0}, "method": "gradient"})
    claim_scores_dir(tmp_path / "s", {"calib": {"seed": 0}, "method": "gradient"})
    assert check_scores_dir(tmp_path / "s", {"calib": {"seed": 0}, "method": "gradient"})  # the same: reused
    for wanted, differs in (({"calib": {"seed": 1}, "method": "gradient"}, "calib"),
                            ({"calib": {"seed": 0}, "method": "kl_div"}, "method")):
        with pytest.raises(UserError) as err:
            check_scores_dir(tmp_path / "s", wanted)
        assert f"holds scores computed with other settings ({differs})" in str(err.value)
        assert "\n" not in str(err.value)


def _per_layer(tmp_path, layers, formats=None, **extra):
    doc = {"name": "per-layer", "preset": "MAMBA_MOE_NVFP4_AGGRESSIVE_CFG", "quantized_kinds": {},
           "formats": formats if formats is not None else {"FP8": "FP8_DEFAULT_CFG", "NVFP4": "NVFP4_DEFAULT_CFG"},
           "layers": layers, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _file_quant(path, **others):
    from hybridquant.schema import QuantConf

    return OmegaConf.merge(OmegaConf.structured(QuantConf), {"name": "x", "path": str(path),
                                                             "preset": "(from quant.path)", **others})


def test_per_layer_formats_become_modelopt_entries_on_the_ranks_holding_the_layer(tmp_path):
    path = _per_layer(tmp_path, {"2": {"mamba.in_proj": "FP8", "mamba.out_proj": "BF16"}, "3": {"routed_expert.fc1": "NVFP4"}})
    recipe = recipes.require_recipe(OmegaConf.create({"quant": _file_quant(path)}))
    assert recipe.name == "per-layer" and recipe.path == str(path)
    entries = recipes.modelopt_config(recipe, PATTERN, local_layers=[2, 3])["quant_cfg"]
    tail = {e["quantizer_name"]: e for e in entries[-5:]}
    assert tail["*decoder.layers.0.mixer.in_proj.weight_quantizer"]["cfg"]["num_bits"] == (4, 3)
    assert tail["*decoder.layers.0.mixer.in_proj.input_quantizer"]["cfg"]["num_bits"] == (4, 3)
    assert tail["*decoder.layers.0.mixer.out_proj.*"] == {"quantizer_name": "*decoder.layers.0.mixer.out_proj.*",
                                                         "enable": False}
    assert "*decoder.layers.1.mlp.experts.local_experts.*.linear_fc1.weight_quantizer" in tail
    declared = recipes.declared_formats(recipe, PATTERN)
    assert (declared("mamba.in_proj", 2), declared("mamba.out_proj", 2), declared("mamba.in_proj", 4)) == \
        ("FP8", "BF16", "BF16")


@pytest.mark.parametrize("case, message", [
    ("missing", "no such recipe file"),
    ("other_key", "quant.kv_cache cannot be set next to it"),
    ("kind", "'mamba.mixer' is not a per-layer module kind"),
    ("format", "format 'INT4' is not in its formats"),
    ("preset", "format 'FP8' names no ModelOpt preset"),
])
def test_bad_recipe_files_are_one_line_errors(case, message, tmp_path):
    layers = {"0": {"mamba.in_proj": "FP8"}}
    path = tmp_path / "absent.yaml"
    others = {}
    if case == "other_key":
        path, others = _per_layer(tmp_path, layers), {"kv_cache": "fp8"}
    elif case == "kind":
        path = _per_layer(tmp_path, {"0": {"mamba.mixer": "FP8"}})
    elif case == "format":
        path = _per_layer(tmp_path, {"0": {"mamba.in_proj": "INT4"}})
    elif case == "preset":
        path = _per_layer(tmp_path, layers, formats={"FP8": ""})
    with pytest.raises(UserError) as err:
        recipe = recipes.require_recipe(OmegaConf.create({"quant": _file_quant(path, **others)}))
        recipes.modelopt_config(recipe, PATTERN)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_release_preset_runs_autoquant_as_its_quantize_stage(tmp_path):
    from hydra import compose, initialize_config_dir

    from hybridquant import release, schema

    schema.register()
    with initialize_config_dir(config_dir=str(recipes.CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="release", overrides=["experiment=tiny_autoquant"])
    quantize, *_ = release.plan(cfg, tmp_path)
    assert quantize.script == "autoquant" and quantize.command()["script"] == "autoquant"
    assert f"+quant={BASE}" in quantize.overrides and "autoquant.effective_bits=6.0" in quantize.overrides
    assert f"autoquant.scores_dir={tmp_path / 'autoquant_scores'}" in quantize.overrides


EXPERT_PATHS = ["mlp.experts.local_experts.*.linear_fc1", "mlp.experts.local_experts.*.linear_fc2",
                "mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"]


def test_search_space_is_what_the_base_recipe_quantizes():
    """Kinds the recipe keeps in high precision, and the layers its keep_bf16 rule names (Cascade-2: the
    Mamba layers next to attention), are not searched and cost nothing."""
    recipe = OmegaConf.load(recipes.CONF_DIR / "quant" / "cascade2_fp8_selective.yaml")
    pattern = "MEM*EMEM"
    layers = list(range(len(pattern)))
    searched, excluded = autoquant.search_space(recipe, pattern, layers)
    mamba = ["mixer.in_proj", "mixer.out_proj"]
    want = {0: mamba, 1: EXPERT_PATHS, 4: EXPERT_PATHS, 5: mamba, 6: EXPERT_PATHS, 7: mamba}  # 2: next to '*'
    assert searched == [f"*decoder.layers.{i}.{p}" for i, paths in want.items() for p in paths]
    assert "*decoder.layers.2.mixer.in_proj" in excluded and "*decoder.layers.2.mixer.out_proj" in excluded
    assert "*decoder.layers.3.self_attention.linear_qkv" in excluded and "*output_layer" in excluded
    # On a later pipeline stage the same global layers get rank-local names (global 4-7 -> local 0-3).
    searched_pp, _ = autoquant.search_space(recipe, pattern, [4, 5, 6, 7])
    assert searched_pp == [*[f"*decoder.layers.0.{p}" for p in EXPERT_PATHS], "*decoder.layers.1.mixer.in_proj",
                           "*decoder.layers.1.mixer.out_proj", *[f"*decoder.layers.2.{p}" for p in EXPERT_PATHS],
                           "*decoder.layers.3.mixer.in_proj", "*decoder.layers.3.mixer.out_proj"]
    with pytest.raises(UserError, match="quantizes no per-layer module kind"):
        autoquant.search_space(OmegaConf.create({"name": "none", "quantized_kinds": {}}), pattern, layers)
