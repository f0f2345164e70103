"""Parallel layouts with real ranks (torchrun, gloo): validation, parity, experts, failures."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from hybridquant import parallel
from hybridquant.parallel import Layout, LayoutError
from launch import REPO, VENV_BIN, error_lines, free_port, run_stage

sys.path.insert(0, str(REPO / "bench"))
import layout_parity  # noqa: E402

FP8 = "+quant=mamba_moe_fp8_conservative"


# --- validation, before any process group ----------------------------------------------------

@pytest.mark.parametrize("layout,arch_change,message", [
    (Layout(tp=2, pp=2, world_size=2), {}, "world size 2 is not divisible by tp*pp = 2*2 = 4"),
    (Layout(ep=4, pp=2, world_size=4), {}, "world size 4 is not divisible by etp*ep*pp = 1*4*2 = 8"),
    (Layout(tp=8, world_size=8), {}, "tp=8 does not divide num_attention_heads=4"),
    (Layout(tp=4, world_size=4), {"num_key_value_heads": 3, "num_attention_heads": 12},
     "tp=4 and num_key_value_heads=3 (KV groups): neither divides the other"),
    (Layout(tp=4, world_size=4), {"mamba_num_heads": 6}, "tp=4 does not divide mamba_num_heads=6"),
    (Layout(tp=4, world_size=4), {"n_groups": 2}, "tp=4 does not divide Mamba n_groups=2"),
    (Layout(ep=3, world_size=3), {}, "ep=3 does not divide n_routed_experts=8"),
    (Layout(ep=2, etp=2, world_size=4), {"moe_intermediate_size": 63}, "etp=2 does not divide moe_intermediate_size=63"),
    (Layout(pp=13, world_size=13), {}, "pp=13 is larger than the number of layers (12)"),
])
def test_impossible_layout_names_the_rule_and_numbers(tiny_model_cfg, layout, arch_change, message):
    with pytest.raises(LayoutError) as err:
        parallel.validate(layout, {**tiny_model_cfg["arch"], **arch_change})
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize("model,layout", [
    ("nemotron_3_nano_30b_a3b", Layout(tp=8, pp=2, ep=8, world_size=16)),  # 2 KV heads, replicated at TP8
    ("nemotron_cascade_2_30b_a3b", Layout(tp=4, ep=8, world_size=8)),
    ("nemotron_3_super_120b_a12b", Layout(tp=8, pp=4, ep=16, world_size=64)),
])
def test_real_models_accept_cluster_layouts(repo, model, layout):
    import yaml

    parallel.validate(layout, yaml.safe_load((repo / "conf" / "model" / f"{model}.yaml").read_text())["arch"])


@pytest.mark.distributed
def test_bad_layout_is_one_line_error_before_process_groups(tmp_path):
    t0 = time.monotonic()
    proc = run_stage("quantize", [FP8, f"output_root={tmp_path}", "parallel.tp=2", "parallel.pp=2"], nproc=2)
    assert proc.returncode != 0
    errors = error_lines(proc)
    # Each rank checks the layout first; torchrun may stop the other rank before it prints.
    assert 1 <= len(errors) <= 2 and all("LayoutError: world size 2 is not divisible by tp*pp = 2*2 = 4" in e
                                    for e in errors), proc.stderr[-2000:]
    # torchrun reports its failed children with its own traceback; ours stays one line
    assert f'File "{REPO / "src"}' not in proc.stderr and f'File "{REPO / "pipeline"}' not in proc.stderr
    assert not list(tmp_path.rglob("*")), "nothing is written for a layout that cannot run"
    assert time.monotonic() - t0 < 60


def test_run_directory_clean_up_finishes_what_a_peer_started(tmp_path):
    """Two ranks failing before the process group both clean up their (shared) run directory. The
    first to get there removes it and may be stopped by torchrun before it reaches the parents; the
    second, finding it gone, must still remove the empty parents (it used to stop there, leaving an
    empty ``quantize/``)."""
    from hybridquant import rundir

    (tmp_path / "quantize").mkdir()  # the peer removed quantize/<run> and was stopped
    rundir.remove_if_empty(tmp_path / "quantize" / "tiny-run", stop=tmp_path)
    assert not list(tmp_path.iterdir())
    (tmp_path / "quantize" / "other-run").mkdir(parents=True)  # a directory in use stays
    rundir.remove_if_empty(tmp_path / "quantize" / "tiny-run", stop=tmp_path)
    assert (tmp_path / "quantize" / "other-run").is_dir()


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
                                 overrides=["calib.num_samples=5", "calib.max_seq_len=64"])


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


# --- experts ---------------------------------------------------------------------------------

@pytest.mark.distributed
def test_all_expert_dispatch_keeps_routed_outputs_at_ep2(tmp_path):
    out = tmp_path / "all_experts.json"
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests" / "workers" / "all_experts.py"), "2", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    tokens = sum(r["tokens"] for r in result["ranks"])
    for r in result["ranks"]:
        assert r["max_abs_diff"] <= 1e-5 and r["restored_equal"], r
    routed, seen = result["coverage"]["tokens_per_expert"], result["coverage"]["tokens_seen_per_expert"]
    assert len(routed) == 5  # the tiny model's MoE layers
    for layer in routed:
        assert sum(routed[layer]) == 2 * tokens, layer  # the router's own top-2 choice is reported
        assert seen[layer] == [tokens] * 8, (layer, seen[layer])  # every token reached every expert
    assert result["coverage"]["experts_without_tokens"] == {}


@pytest.mark.distributed
def test_experts_without_tokens_still_get_scales_at_ep2(tmp_path):
    # 1 sample of 3 tokens, top-2 of 8 experts: most experts of each layer see no token.
    proc = run_stage("quantize", [FP8, f"output_root={tmp_path}", "parallel.ep=2", "calib.num_samples=1",
                                  "calib.max_seq_len=3"], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(tmp_path.rglob("report.json")).read_text())
    cov = report["expert_coverage"]
    idle = cov["experts_without_tokens"]
    assert sum(len(v) for v in idle.values()) >= 5 * 8 - 5 * 2 * 3  # at most 6 routings per layer
    assert "layer_max" in cov["input_amax_policy"]
    amax = {(q["name"], q["role"]): q["amax"] for q in report["quantizers"]}
    for layer, experts in idle.items():
        for e in experts:
            for fc in ("linear_fc1", "linear_fc2"):
                name = f"decoder.layers.{layer}.mlp.experts.experts.{e}.{fc}"
                assert max(amax[(name, "weight")]) > 0 and max(amax[(name, "input")]) > 0, name
    assert "experts received calibration tokens" in proc.stdout


# --- failures --------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.parametrize("point,kind,extra", [
    ("calibrate", "raise", []),           # an exception while the peer is inside a TP collective
    ("save", "raise", []),                # ... while the peer writes the distributed checkpoint
    ("calibrate", "kill", []),            # killed without a word (the OOM killer)
    ("calibrate", "hang", ["cluster.timeout_s=15"]),  # stuck: the peer's collective times out
])
def test_one_failing_rank_ends_every_rank_quickly(tmp_path, point, kind, extra):
    """The job ends soon after the fault: at once for an exception or a killed rank, one collective
    timeout (cluster.timeout_s) after a hang. Timed from the fault itself, so that a slow start on a
    loaded machine (imports, loading) is not counted against the failure handling."""
    mark = tmp_path.parent / f"{tmp_path.name}.fault"
    proc = run_stage("quantize", [FP8, f"output_root={tmp_path}", "parallel.tp=2", "calib.num_samples=2", *extra],
                     nproc=2, timeout=240,
                     extra_env={"HYBRIDQUANT_FAULT": f"1:{point}", "HYBRIDQUANT_FAULT_KIND": kind,
                                "HYBRIDQUANT_FAULT_MARK": str(mark)})
    after_fault = time.time() - float(mark.read_text())
    assert proc.returncode != 0
    # a hang: 15 s of collective timeout; all: up to 30 s for a torn-down rank to exit on a loaded machine
    assert after_fault < (15 if kind == "hang" else 0) + 30, f"ended {after_fault:.0f} s after the fault"
    if kind == "raise":
        assert any("[rank 1]" in e and f"injected fault at {point}" in e for e in error_lines(proc)), proc.stderr[-2000:]
    assert not list(tmp_path.rglob("report.json"))
    assert not [p for p in tmp_path.rglob("checkpoint") if p.is_dir()]
