"""Layout parity with real ranks (torchrun, gloo): every quantizer's amax under TP/PP/EP/ETP/DP layouts
against one process (bench/layout_parity.py). Its own file so that pytest-xdist can run it beside the
other parallel tests (tests/test_parallel.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from launch import REPO, torchrun

sys.path.insert(0, str(REPO / "bench"))
import layout_parity  # noqa: E402

# --- layout parity ---------------------------------------------------------------------------

# dpN fixes the world size (tp2dp1: 2 processes); without it a layout fills 4 processes with data parallelism.
# Only the layouts that need 4 ranks get them (TP2×PP2, PP2×EP2, EP2×ETP2); data parallelism has its own
# layouts (dp2, ep2dp2) and 4-way DP is the ETP2 layout's.
ALL_LAYOUTS = ["tp2dp1", "pp2dp1", "ep2dp2", "dp2", "tp2ep2dp1", "tp2pp2", "pp2ep2", "ep2etp2"]
# Every layout with one recipe; every quantizer format and quantized module kind with tensor and with
# expert parallelism (all recipes on all layouts: bench/layout_parity.py). The FP8-aggressive and
# NVFP4-conservative presets add no format or module kind to these four.
PARITY_CASES = {
    "mamba_moe_fp8_conservative": ALL_LAYOUTS,
    # dynamic NVFP4 on experts and Mamba in/out_proj
    "mamba_moe_nvfp4_aggressive": ["tp2dp1", "ep2dp2"],
    # per-layer BF16 rule (rank-local layer indices under PP), FP8 KV cache, dynamic per-token activations
    "cascade2_fp8_selective": ["tp2dp1", "ep2dp2", "pp2dp1"],
    # static NVFP4 block scales by MSE, also with the experts split over ranks (ETP2)
    "super_nvfp4_mixed": ["tp2dp1", "ep2dp2", "ep2etp2"],
}


@pytest.fixture(scope="module")
def parity_rows():
    return layout_parity.measure(PARITY_CASES, nproc=4, separate=False,  # 5 samples: uneven over DP2 and DP4
                                 overrides=["calib.num_samples=5", "calib.max_seq_len=64"],
                                 run=lambda nproc, args: torchrun(Path(layout_parity.__file__), args, nproc, timeout=900))


@pytest.mark.distributed
@pytest.mark.parametrize("recipe", list(PARITY_CASES))
def test_every_layout_calibrates_the_same_amax(parity_rows, recipe):
    rows = parity_rows[recipe]
    print("\n" + layout_parity.table(recipe, rows))
    reference = rows["1x1x1"]
    assert reference["matched"] >= 100
    for spec in PARITY_CASES[recipe]:
        row = rows[spec]
        assert row["missing"] == [] and row["extra"] == [], (spec, row["missing"][:3], row["extra"][:3])
        assert row["matched"] == reference["matched"], spec
        assert row["coverage_equal"], f"{spec}: tokens per expert differ from one process"
        assert row["max_abs_logit_diff_unquantized"] <= 1e-4, spec
        # per-block weight scales (static NVFP4) depend on the weights only: identical whatever the split
        assert row["blocks_identical"] == row["blocks_matched"] == reference["blocks_matched"], spec
        layout = row["layout"]
        if layout["tp"] == layout["etp"] == layout["ep"] == layout["dp"] == 1:
            # Pipeline stages only: every GEMM sees the same rows, in the same order, as one process.
            assert row["identical"] == row["matched"], f"{spec}: {row['worst']} differs"
        elif layout["tp"] == 1 and layout["etp"] == 1:
            # Expert/data parallelism changes how many tokens an expert GEMM gets at once, and the CPU
            # BLAS picks its kernel by row count (MKL on AVX-512: a row's result can change in the last
            # bit with M): float32 rounding, nothing more.
            assert row["max_rel_amax_diff"] <= 1e-6, f"{spec}: {row['worst']}"
        else:
            # Tensor-parallel GEMMs reduce partial sums across ranks (another float summation order).
            assert row["max_rel_amax_diff"] <= 1e-5, f"{spec}: {row['worst']}"
