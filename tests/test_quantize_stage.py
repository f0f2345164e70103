"""The quantize stage run as users run it (torchrun), its outputs read back, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from launch import error_lines, run_stage

pytestmark = pytest.mark.distributed


STATIC_ETP2 = ("calib.num_samples=2", "calib.max_seq_len=64", "parallel.etp=2")


@pytest.mark.parametrize("recipe,kv_cache", [("mamba_moe_fp8_conservative", "none"),
                                             ("mamba_moe_nvfp4_aggressive", "fp8")])
def test_quantize_saves_a_checkpoint_that_reproduces_the_quantized_logits(recipe, kv_cache, quantized, world1):
    overrides = ("calib.num_samples=8", f"quant.kv_cache={kv_cache}")
    run_dir = quantized(recipe, *overrides)
    assert run_dir.name == f"tiny-{recipe}-tp1pp1ep1etp1"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["recipe"]["name"] == recipe and report["calibration"]["samples"] == 8
    assert report["summary"]["routed_expert.fc1"]["modules"] == 40
    assert f"quantized tiny with {recipe}" in quantized.stdout(recipe, *overrides)
    assert not (run_dir / "checkpoint.partial").exists()

    from hybridquant import checkpoint, forward

    loaded, meta = checkpoint.load_quantized(run_dir / "checkpoint", world1)
    assert meta["recipe"] == recipe
    probe = torch.load(run_dir / "probe.pt")
    logits = forward.run(loaded.chunks, [probe["input_ids"]], loaded.hf_vocab_size)[0]
    assert torch.equal(logits, probe["logits_after"])
    assert not torch.equal(logits, probe["logits_before"])  # it is the quantized model
    records = {(r["name"], r["role"]): r for r in report["quantizers"]}
    from hybridquant import quantization

    restored = quantization.inventory(loaded.chunks)
    for rec in restored:
        assert records[(rec.name, rec.role)]["amax"] == rec.amax
    kv = [r for r in restored if r.role in ("k_bmm", "v_bmm") and r.format != "BF16"]
    assert len(kv) == (4 if kv_cache == "fp8" else 0)  # k and v of the 2 attention layers
    assert all(r.format == "FP8" and r.amax for r in kv)


def test_bad_calibration_file_is_one_line_error(repo, world1, tmp_path):
    """Raised by the stage's calibration step (in this process: no ranks needed) as the one line the
    entry point prints; a run that fails there leaves no report or checkpoint (test_parallel's
    failure tests)."""
    from hydra import compose, initialize_config_dir

    from hybridquant import schema
    from hybridquant.errors import UserError
    from hybridquant.stages import quantize

    schema.register()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        cfg = compose("quantize", overrides=["+quant=mamba_moe_fp8_conservative", f"calib.path={bad}"])
    with pytest.raises(UserError) as info:
        quantize.calibrate(cfg, quantize.plan(cfg, world1))
    assert "bad.jsonl:2" in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_of_another_model_is_refused(tmp_path, tiny_model_cfg):
    from hybridquant import tiny

    other = dict(tiny_model_cfg["arch"], hidden_size=64, head_dim=16)
    path = tiny.materialize(other, 7, root=tmp_path / "cache")
    proc = run_stage("quantize", ["+quant=mamba_moe_fp8_conservative", f"output_root={tmp_path}",
                                  f"model.path={path}"])
    assert proc.returncode != 0
    errors = error_lines(proc)
    assert len(errors) == 1 and "hidden_size" in errors[0] and "not tiny" in errors[0], proc.stderr[-2000:]


def test_static_nvfp4_block_scales_split_over_ranks_reload_whole(quantized, world1):
    """Experts split over 2 ranks (ETP2): each rank calibrates the MSE block scales of its half; the
    checkpoint holds both halves and a single process gets the whole grid back, bit for bit."""
    run_dir = quantized("super_nvfp4_mixed", *STATIC_ETP2, nproc=2)
    assert run_dir.name == "tiny-super_nvfp4_mixed-tp1pp1ep1etp2"
    report = json.loads((run_dir / "report.json").read_text())
    saved = {(r["name"], r["role"]): r for r in report["quantizers"]}

    from hybridquant import checkpoint, quantization

    loaded, meta = checkpoint.load_quantized(run_dir / "checkpoint", world1)
    # the routing precision the model ran with is recorded: megatron-bridge's FP32 for Nemotron-H
    assert meta["router_dtype"] == "fp32" and meta["layout"]["etp"] == 2
    restored = quantization.inventory(loaded.chunks)
    blocks = [r for r in restored if r.blocks is not None]
    assert len(blocks) == 2 * 5 * 8  # fc1 and fc2 of the 8 experts of the 5 MoE layers
    for rec in restored:
        assert saved[(rec.name, rec.role)]["amax"] == rec.amax, rec.name
        assert saved[(rec.name, rec.role)]["blocks"] == rec.blocks, rec.name
        assert saved[(rec.name, rec.role)]["replicas_agree"], rec.name


def test_bfloat16_models_are_wrapped_and_still_calibrate_save_and_load(tiny_checkpoint, world1, tmp_path):
    """The real models run in bfloat16, where megatron wraps each chunk in a Float16Module: every
    helper that walks the decoder, and checkpoint loading, must see through it."""
    import modelopt.torch.quantization as mtq

    from hybridquant import checkpoint, coverage, model, modules, quantization

    loaded = model.load_hf(str(tiny_checkpoint), world1, "bfloat16")
    chunk = loaded.chunks[0]
    assert type(chunk).__name__ == "Float16Module"
    assert modules.global_layers(chunk) == list(range(12))
    with coverage.ExpertCoverage(loaded.chunks, all_experts=False) as cov:
        quantization.quantize(loaded.chunks, mtq.MAMBA_MOE_FP8_CONSERVATIVE_CFG, [torch.tensor([[5, 6, 7, 8]])])
    assert cov.counts
    checkpoint.save(loaded.chunks, tmp_path / "ckpt", str(tiny_checkpoint),
                    {"model": "tiny", "dtype": "bfloat16", "layout": {"tp": 1, "pp": 1, "ep": 1, "etp": 1}})
    restored, meta = checkpoint.load_quantized(tmp_path / "ckpt", world1)
    assert meta["dtype"] == "bfloat16" and type(restored.chunks[0]).__name__ == "Float16Module"
