"""The export stage run as users run it (torchrun), its output read back by an independent reader
(tests/hf_reader.py: safetensors + transformers, no ModelOpt). Layout independence and determinism:
tests/test_export_layouts.py; bad input: tests/test_export_errors.py (split for pytest-xdist's balance;
the exports are shared, conftest ``export_of``)."""

from __future__ import annotations

import json

import pytest
import torch

import hf_reader
import weight_only
from export_settings import RECIPES

pytestmark = pytest.mark.distributed

TOLERANCE = 1e-3  # relative L2 error of the logits, weight-only; measured ~1e-6 (float32 rounding)


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
