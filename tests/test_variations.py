"""Nemotron-H checkpoints unlike the tiny model, each written by transformers itself and taken with
``model=auto``: quantized at a multi-rank layout, exported, and read back by the independent reader.

Variants (tests/variants.py; features that need the same layout share one checkpoint): attention as
the first layer, a dense MLP layer (``-``) and a vocabulary of 1000 (not a multiple of 64) at TP2;
Mamba with one group and tied embeddings at PP2; six experts with top-3 routing at EP2; bfloat16
weights at EP2. Three comparisons on the quantize run's held-out probe tokens:

* the Megatron model as loaded at the multi-rank layout (before quantization) vs transformers (float32)
  on the source checkpoint: the load is exact (float32 rounding). The bf16 variant computes in
  bfloat16 (``dtype: auto``), whose rounding on a random tiny MoE (routing flips) moves logits by
  0.1-0.3 (transformers' own bfloat16 run is 0.25 away from its float32 one): its bound only tells a
  wrong weight (error ~1) from rounding. That its bf16 tensors load exactly is shown by the same
  checkpoint loaded in float32 (in process) against transformers: float32 rounding;
* the export, read back by the independent reader, vs the quantized Megatron model with only its
  weight quantizers on (what the export holds): float32 rounding;
* the export vs transformers on the source checkpoint: the FP8 quantization error alone (a weight
  that was not loaded, such as random embeddings, gives a relative error near 1 or more).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import hf_reader
import variants
import weight_only
from hybridquant import hf_reference
from launch import run_stage

pytestmark = pytest.mark.distributed

RECIPE = ["+quant=mamba_moe_fp8_conservative", "calib.num_samples=4", "calib.max_seq_len=64"]
LOAD_BOUND = {"float32": 1e-4, "bfloat16": 0.4}  # Megatron as loaded vs transformers (relative L2)
EXPORT_BOUND = {"float32": 1e-3, "bfloat16": 0.4}  # reader (float32) vs Megatron weight-only fake quant
QUANTIZED_BOUND = 0.6      # reader vs transformers on the source: FP8 error on a random tiny MoE


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("name", list(variants.VARIANTS))
def test_variant_quantizes_exports_and_reads_back(name, world1, tmp_path):
    arch_changes, dtype, layout = variants.VARIANTS[name]
    source = variants.write(tmp_path / f"nemotron-h-{name}", arch_changes, dtype)
    with safe_open(str(source / "model.safetensors"), framework="pt") as f:
        assert "backbone.embedding.weight" in f.keys()  # transformers' spelling, not the Hub's

    proc = run_stage("quantize", [*RECIPE, "model=auto", f"model.path={source}", f"output_root={tmp_path}/runs",
                                  *layout], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "quantize").iterdir()
    assert run_dir.name.startswith(f"nemotron-h-{name}-mamba_moe_fp8_conservative-")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["model"] == f"nemotron-h-{name}" and report["layout"]["world_size"] == 2

    out = tmp_path / "export"
    proc = run_stage("export", [f"checkpoint={run_dir}", f"output_dir={out}", "parallel.tp=1", "parallel.pp=1",
                                "parallel.ep=1"], nproc=1)  # resharded to one process on load
    assert proc.returncode == 0, proc.stderr[-3000:]

    probe = torch.load(run_dir / "probe.pt")
    ids = probe["input_ids"]
    source_logits = hf_reference.logits(hf_reference.load(source, ids.shape[1]), ids)
    reader, _ = hf_reader.build_model(out, tmp_path / "dequantized", max_seq_len=ids.shape[1])
    with torch.no_grad():
        exported = reader(ids, use_cache=False).logits
    megatron_weight_only = weight_only.logits(run_dir, world1, ids)

    loaded_vs_source = _rel(probe["logits_before"], source_logits)
    export_vs_megatron = _rel(exported, megatron_weight_only)
    export_vs_source = _rel(exported, source_logits)
    top1 = float((exported.argmax(-1) == source_logits.argmax(-1)).float().mean())
    print(f"{name} ({' '.join(layout)}, {dtype}): loaded vs transformers {loaded_vs_source:.2e}; export (reader) "
          f"vs weight-only Megatron {export_vs_megatron:.2e}; export vs transformers on the source "
          f"{export_vs_source:.3f} (top-1 {top1:.3f})")
    assert loaded_vs_source < LOAD_BOUND[dtype]
    saved = json.loads((run_dir / "checkpoint" / "hybridquant.json").read_text())
    assert saved["dtype"] == dtype and saved["router_dtype"] == "fp32"  # the checkpoint's dtype, FP32 routing
    if dtype != "float32":  # the same tensors, computed in float32: exact
        from hybridquant import forward, model

        loaded = model.load_hf(str(source), world1, "float32", "local")
        exact = _rel(forward.run(loaded.chunks, [ids], loaded.hf_vocab_size)[0], source_logits)
        print(f"{name}: loaded in float32 vs transformers {exact:.2e}")
        assert exact < LOAD_BOUND["float32"]
    assert export_vs_megatron < EXPORT_BOUND[dtype]
    assert export_vs_source < QUANTIZED_BOUND
