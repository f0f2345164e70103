"""The export stage run as users run it (torchrun), its output read back by an independent reader
(tests/hf_reader.py: safetensors + transformers, no ModelOpt), layout independence, determinism and
bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import hf_reader
import weight_only
from launch import error_lines, run_stage

pytestmark = pytest.mark.distributed

FP8 = ("mamba_moe_fp8_conservative", "calib.num_samples=8", "quant.kv_cache=none")
NVFP4 = ("mamba_moe_nvfp4_aggressive", "calib.num_samples=8", "quant.kv_cache=fp8")
SELECTIVE = ("cascade2_fp8_selective", "calib.num_samples=4", "calib.max_seq_len=64")
# MSE-calibrated (static) NVFP4 experts + FP8 elsewhere, calibrated with the experts split over 2 ranks.
STATIC_ETP2 = ("super_nvfp4_mixed", "calib.num_samples=2", "calib.max_seq_len=64", "parallel.etp=2")
RECIPES = {"fp8": (FP8, 1, "FP8"), "nvfp4": (NVFP4, 1, "NVFP4"), "selective": (SELECTIVE, 1, "FP8"),
           "static_mixed": (STATIC_ETP2, 2, "MIXED_PRECISION")}
TOLERANCE = 1e-3  # relative L2 error of the logits, weight-only; measured ~1e-6 (float32 rounding)


def export(checkpoint, out, nproc=1, *overrides, env=None):
    return run_stage("export", [f"checkpoint={checkpoint}", f"output_dir={out}", *overrides], nproc=nproc,
                     extra_env=env)


@pytest.fixture(scope="module")
def export_of(exported):
    """Each recipe's checkpoint exported once, at its calibration layout (shared with other files)."""
    def get(key):
        args, nproc, _ = RECIPES[key]
        return exported(*args, nproc=nproc)
    return get


@pytest.mark.parametrize("key", list(RECIPES))
def test_independent_reader_reproduces_the_fake_quant_logits(key, export_of, world1):
    run_dir, out, stdout = export_of(key)
    _, _, quant_algo = RECIPES[key]
    assert "exported tiny" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    from hybridquant import export as export_lib

    assert export_lib.verify(out) == []
    for name in ("config.json", "hf_quant_config.json", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert name in manifest["files"], name
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    config = json.loads((out / "config.json").read_text())
    assert hf_quant["quant_algo"] == quant_algo
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert config["quantization_config"]["quant_algo"] == quant_algo

    model, formats = hf_reader.build_model(out, out.parent / f"{key}-dequantized")
    tensors = hf_reader.read_tensors(out)
    # Per-expert names, as vLLM's Nemotron-H loader expects them.
    assert "backbone.layers.1.mixer.experts.7.down_proj.weight" in formats
    # What is stored quantized is what the config says is quantized (vLLM's fnmatch rules).
    linear = {n[: -len(".weight")]: f for n, f in formats.items()
              if n.endswith(".weight") and "embeddings" not in n and tensors[n].dim() == 2}
    for module, fmt in linear.items():
        if quant_algo == "MIXED_PRECISION":
            layer = hf_quant["quantized_layers"].get(module)
            assert (layer is None) == (fmt == "unquantized"), module
            if layer:
                assert layer["quant_algo"] == ("FP8" if fmt == "fp8" else "NVFP4"), module
        else:
            assert "\x00" not in json.dumps(hf_quant["exclude_modules"])
            assert hf_reader.excluded(module, hf_quant["exclude_modules"]) == (fmt == "unquantized"), module
    if key == "nvfp4":
        assert hf_quant["kv_cache_quant_algo"] == "FP8"
        for attn in (5, 10):
            for kv in ("k", "v"):
                scale = tensors[f"backbone.layers.{attn}.mixer.{kv}_proj.{kv}_scale"]
                assert scale.dtype == torch.float32 and scale.numel() == 1 and scale.item() > 0
        assert formats["backbone.layers.1.mixer.experts.0.up_proj.weight"] == "nvfp4/16"
    if key == "static_mixed":
        assert formats["backbone.layers.1.mixer.experts.0.up_proj.weight"] == "nvfp4/16"
        assert formats["backbone.layers.0.mixer.in_proj.weight"] == "fp8"

    probe = torch.load(run_dir / "probe.pt")
    ids = probe["input_ids"]
    reference = weight_only.logits(run_dir, world1, ids)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    rel = ((logits - reference).norm() / reference.norm()).item()
    print(f"{key}: weight-only logits, independent reader vs Megatron fake quant: rel {rel:.2e}")
    assert rel <= TOLERANCE
    assert not torch.equal(logits, probe["logits_before"])


def _shard_digests(directory):
    manifest = json.loads((directory / "manifest.json").read_text())
    return {name: entry["sha256"] for name, entry in manifest["files"].items() if name.endswith(".safetensors")}


def test_export_at_tp2_ep2_writes_the_same_bytes(export_of, tmp_path):
    """The same calibration exported by 2 ranks and by one: at TP2×EP2 every dense weight is gathered
    over TP and every expert over EP (PP2, where every layer comes from one of two stages: below)."""
    run_dir, single, _ = export_of("fp8")
    proc = export(run_dir, tmp_path / "out", 2, "parallel.tp=2", "parallel.ep=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _shard_digests(tmp_path / "out") == _shard_digests(single)
    assert (tmp_path / "out" / "manifest.json").read_bytes() == (single / "manifest.json").read_bytes()


def test_static_nvfp4_export_gathers_block_scales_at_any_layout(export_of, tmp_path):
    """MSE block scales are not a function of the weight: exported at ETP2 (their calibration layout)
    and by one process (resharded on load), they must be the same bytes."""
    run_dir, sharded, _ = export_of("static_mixed")
    proc = export(run_dir, tmp_path / "single", 1, "parallel.etp=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _shard_digests(tmp_path / "single") == _shard_digests(sharded)


def test_missing_checkpoint_is_one_line_error(tmp_path):
    proc = export(tmp_path / "nowhere", tmp_path / "out")
    errors = error_lines(proc)
    assert proc.returncode != 0 and len(errors) == 1 and "does not exist" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_damaged_checkpoint_is_one_line_error_and_no_export(quantized, tmp_path):
    run_dir = quantized(*FP8)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoint", ckpt)
    (data,) = ckpt.glob("*.distcp")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    proc = export(ckpt, tmp_path / "out")
    errors = error_lines(proc)
    assert proc.returncode != 0 and len(errors) == 1 and "cannot be loaded" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_checkpoint_of_another_model_cannot_be_loaded(quantized, world1, tmp_path):
    """The files of this checkpoint, the config of a wider model: refused on load, in one line (what the
    export stage prints, as for the corrupt checkpoint above)."""
    from hybridquant import checkpoint
    from hybridquant.errors import UserError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(quantized(*FP8) / "checkpoint", ckpt)
    config = json.loads((ckpt / "hf" / "config.json").read_text())
    config["hidden_size"], config["head_dim"] = 64, 16
    (ckpt / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="cannot be loaded") as info:
        checkpoint.load_quantized(ckpt, world1)
    assert "\n" not in str(info.value)


def test_non_empty_output_dir_needs_overwrite_and_pp2_writes_the_same_files(export_of, tmp_path):
    """A non-empty output directory is refused without export.overwrite=true and replaced with it; the
    export written there by 2 pipeline stages (every layer from one of them) is the one-process export,
    every file byte for byte."""
    run_dir, reference, _ = export_of("fp8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = export(run_dir, out)
    errors = error_lines(proc)
    assert proc.returncode != 0 and len(errors) == 1 and "export.overwrite=true" in errors[0], proc.stderr[-2000:]
    assert (out / "notes.txt").read_text() == "mine"
    proc = export(run_dir, out, 2, "parallel.pp=2", "export.overwrite=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "notes.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def test_disk_full_is_one_line_error_and_no_export(quantized, tmp_path):
    env = {"HYBRIDQUANT_FAULT": "0:export.write", "HYBRIDQUANT_FAULT_KIND": "enospc"}
    proc = export(quantized(*FP8), tmp_path / "out", env=env)
    errors = error_lines(proc)
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
    assert "writing the export to" in errors[0] and "No space left on device" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_disk_full_on_one_rank_is_an_error_and_no_export(quantized, tmp_path):
    """Rank 1 of 2 finds the disk full while writing its first file; rank 0 is mid-export."""
    run_dir = quantized(*FP8)
    env = {"HYBRIDQUANT_FAULT": "1:export.write", "HYBRIDQUANT_FAULT_KIND": "enospc"}
    proc = export(run_dir, tmp_path / "out", 2, "parallel.ep=2", env=env)
    errors = error_lines(proc)
    assert proc.returncode != 0, proc.stdout[-2000:]
    # rank 1's own line names the cause; rank 0 may report too before torchrun stops it (the order of
    # the lines depends on the schedule): then it says a peer failed first, if its write hit the removal
    (cause,) = [e for e in errors if "[rank 1]" in e]
    assert "writing the export to" in cause and "No space left on device" in cause, proc.stderr[-2000:]
    for other in (e for e in errors if e != cause):
        assert "[rank 0]" in other and "No space left on device" not in other, other
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob("manifest.json"))
