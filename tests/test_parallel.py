"""Parallel layouts with real ranks (torchrun, gloo): validation, experts, failures (layout parity:
tests/test_layout_parity.py)."""

from __future__ import annotations

import json
import time

import pytest

from hybridquant import parallel
from hybridquant.parallel import Layout, LayoutError
from launch import REPO, error_lines, run_stage, torchrun

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


# --- experts ---------------------------------------------------------------------------------

@pytest.mark.distributed
def test_all_expert_dispatch_keeps_routed_outputs_at_ep2(tmp_path):
    out = tmp_path / "all_experts.json"
    proc = torchrun(REPO / "tests" / "workers" / "all_experts.py", ["2", str(out)], nproc=2, timeout=300)
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
