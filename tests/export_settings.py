"""Settings and the launcher the export test files share (tests/test_export*.py): each recipe's
checkpoint is quantized and exported once per session (conftest ``export_of``) and read by all of them."""

from __future__ import annotations

from launch import run_stage

FP8 = ("mamba_moe_fp8_conservative", "calib.num_samples=8", "quant.kv_cache=none")
NVFP4 = ("mamba_moe_nvfp4_aggressive", "calib.num_samples=8", "quant.kv_cache=fp8")
SELECTIVE = ("cascade2_fp8_selective", "calib.num_samples=4", "calib.max_seq_len=64")
# MSE-calibrated (static) NVFP4 experts + FP8 elsewhere, calibrated with the experts split over 2 ranks.
STATIC_ETP2 = ("super_nvfp4_mixed", "calib.num_samples=2", "calib.max_seq_len=64", "parallel.etp=2")
RECIPES = {"fp8": (FP8, 1, "FP8"), "nvfp4": (NVFP4, 1, "NVFP4"), "selective": (SELECTIVE, 1, "FP8"),
           "static_mixed": (STATIC_ETP2, 2, "MIXED_PRECISION")}


def export(checkpoint, out, nproc=1, *overrides, env=None):
    return run_stage("export", [f"checkpoint={checkpoint}", f"output_dir={out}", *overrides], nproc=nproc,
                     extra_env=env)


def export_in_process(checkpoint, out, *overrides):
    """The export stage called in this process, for what it refuses before any process group exists
    (the launched stage prints the same message as its one error line: tests/test_export_errors.py)."""
    from hydra import compose, initialize_config_dir

    from hybridquant import recipes, schema
    from hybridquant.stages import export as export_stage

    schema.register()
    with initialize_config_dir(config_dir=str(recipes.CONF_DIR), version_base="1.3"):
        cfg = compose("export", overrides=[f"checkpoint={checkpoint}", f"output_dir={out}", *overrides])
    return export_stage.run(cfg)
