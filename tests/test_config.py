"""Every config in every group composes against the schemas; a missing recipe is a one-line error."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hybridquant import recipes, schema
from launch import error_lines, run_python

schema.register()


def _groups(repo, group):
    return sorted(p.stem for p in (repo / "conf" / group).glob("*.yaml"))


def test_every_recipe_and_model_composes(repo):
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        for model in _groups(repo, "model"):
            # model=auto takes any checkpoint, and its name from the checkpoint's directory
            path, name = (["model.path=/models/My-Nemotron-H/"], "My-Nemotron-H") if model == "auto" else ([], model)
            for recipe in recipes.available():  # conf/quant/file.yaml is the entry for recipe files
                cfg = compose("quantize", overrides=[f"+quant={recipe}", f"model={model}", *path])
                assert cfg.quant.name == recipe
                assert cfg.model.name == name
                assert OmegaConf.to_container(cfg, resolve=True)["run_name"].startswith(name)
                assert recipes.modelopt_config(cfg.quant)["quant_cfg"]


def test_every_group_member_composes(repo):
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        for group in ("calib", "parallel", "cluster"):
            for name in _groups(repo, group):
                cfg = compose("quantize", overrides=["+quant=mamba_moe_fp8_conservative", f"{group}={name}"])
                assert cfg[group] is not None


def test_unknown_key_is_rejected(repo):
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        with pytest.raises(Exception, match="calib.num_sample"):
            compose("quantize", overrides=["+quant=mamba_moe_fp8_conservative", "calib.num_sample=3"])


def test_recipes_name_modelopt_presets_without_copying_them(repo):
    for name in recipes.available():
        with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
            cfg = compose("quantize", overrides=[f"+quant={name}"])
        preset = recipes.preset_config(cfg.quant)["quant_cfg"]
        resolved = recipes.modelopt_config(cfg.quant)["quant_cfg"]
        # the preset's entries come first, in order; options may only change their settings
        assert [e["quantizer_name"] for e in resolved[: len(preset)]] == [e["quantizer_name"] for e in preset]
        if cfg.quant.activations is None and cfg.quant.algorithm is None:
            assert resolved[: len(preset)] == preset, name


def test_missing_recipe_is_one_line_error_listing_recipes(repo, tmp_path):
    proc = run_python("pipeline/quantize.py", [f"output_root={tmp_path}"])
    assert proc.returncode != 0
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr[-2000:]
    for name in ("mamba_moe_fp8_aggressive", "mamba_moe_fp8_conservative", "mamba_moe_nvfp4_aggressive",
                 "mamba_moe_nvfp4_conservative"):
        assert name in errors[0]
    assert "+quant=" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("report.json"))


@pytest.mark.parametrize("model", ["nemotron_3_nano_30b_a3b", "nemotron_cascade_2_30b_a3b"])
def test_real_configs_have_the_published_architecture(repo, model):
    import yaml

    from hybridquant import modules

    arch = yaml.safe_load((repo / "conf" / "model" / f"{model}.yaml").read_text())["arch"]
    pattern = arch["hybrid_override_pattern"]
    assert len(pattern) == arch["num_hidden_layers"] == 52
    assert (pattern.count("M"), pattern.count("E"), pattern.count("*")) == (23, 23, 6)
    # The Mamba layers the Cascade-2 FP8 release keeps in BF16 follow from the pattern.
    assert modules.adjacent_to_attention(pattern) == [4, 11, 18, 25, 32, 41]
