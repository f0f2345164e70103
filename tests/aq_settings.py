"""Settings and readers the autoquant test files share (tests/test_autoquant*.py)."""

from __future__ import annotations

import json

import yaml
from omegaconf import OmegaConf

from hybridquant import recipes

BASE = "mamba_moe_nvfp4_aggressive"
# Small enough for the suite; the scores still separate the layers by orders of magnitude.
FAST = ["calib.num_samples=4", "calib.max_seq_len=48", "autoquant.score_samples=2", "probe_samples=1",
        "autoquant.effective_bits=6", "autoquant.also_solve=[5.0]", "autoquant.plot=false"]
LAYOUTS = {"tp2": (["parallel.tp=2"], 2), "ep2": (["parallel.ep=2"], 2), "pp2": (["parallel.pp=2"], 2),
           "pp2ep2": (["parallel.pp=2", "parallel.ep=2"], 4)}
PATTERN = OmegaConf.load(recipes.CONF_DIR / "model" / "tiny.yaml").arch.hybrid_override_pattern
SCORE_RTOL = 1e-3  # scores of one decision at two layouts (measured <= 5e-5: float summation order)


def read(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    rows = json.loads((run_dir / "autoquant.json").read_text())["rows"]
    return report, recipe, rows
