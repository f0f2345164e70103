"""compressed-tensors exports read back by the compressed-tensors library's own decompression
(hybridquant.readers.compressed_tensors): the weight-only fake-quant logits reproduced, the same
dequantized weights as the ModelOpt export of the same checkpoint, the config vLLM reads (schemes,
per-expert names, ignore list, KV-cache scheme), and the same bytes from two layouts."""

from __future__ import annotations

import json

import pytest
import torch

import weight_only
from export_settings import RECIPES

pytestmark = pytest.mark.distributed

CT = ("export.format=compressed_tensors",)
TOLERANCE = 1e-3  # relative L2 of the logits vs Megatron's weight-only fake quant; measured ~1e-6
FORMATS = {"fp8": "float-quantized", "nvfp4": "nvfp4-pack-quantized", "static_mixed": "mixed-precision"}


@pytest.mark.parametrize("key", list(FORMATS))
def test_library_decompression_reproduces_the_fake_quant_logits(key, export_of, world1):
    from hybridquant import export as export_lib
    from hybridquant import readers
    from hybridquant.readers import compressed_tensors as ct_reader
    from hybridquant.readers import modelopt as mo_reader

    run_dir, out, stdout = export_of(key, *CT)
    assert "as compressed_tensors" in stdout and export_lib.verify(out) == []
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["quantization_status"] == "compressed"
    assert quant["format"] == FORMATS[key]
    assert all(g["format"] for g in quant["config_groups"].values())  # vLLM reads each group's own format
    assert "lm_head" in quant["ignore"]
    groups, ignore = ct_reader.schemes_of(quant)
    weights, formats, _ = ct_reader.read(out)
    # Per-expert modules, as vLLM's Nemotron-H loader reads them; routers never quantized.
    assert formats["backbone.layers.1.mixer.experts.7.down_proj.weight"] != "unquantized"
    assert formats["backbone.layers.1.mixer.gate.weight"] == "unquantized"
    assert ct_reader.matches("backbone.layers.1.mixer.gate", ignore) and ct_reader.matches("model.layers.1.mixer.gate", ignore)
    # Each quantized module is targeted by exactly one group, under the checkpoint's and vLLM's names.
    for name, fmt in formats.items():
        if fmt != "unquantized":
            module = name[: -len(".weight")]
            for prefixed in (module, module.replace("backbone.", "model.", 1)):
                assert sum(ct_reader.matches(prefixed, g.targets) for g in groups) == 1, prefixed
    # The same quantized weights as the ModelOpt export of the same checkpoint.
    _, modelopt_out, _ = export_of(key)
    reference_weights, _, _ = mo_reader.read(modelopt_out)
    assert sorted(reference_weights) == sorted(weights)
    worst = max(float((weights[k] - reference_weights[k]).abs().max()) for k in weights)
    assert worst < 1e-6, worst
    if key == "nvfp4":
        assert quant["kv_cache_scheme"]["num_bits"] == 8 and quant["kv_cache_scheme"]["type"] == "float"
        tensors = mo_reader.read_tensors(out)
        for attn in (5, 10):
            for kv in ("k", "v"):
                assert tensors[f"backbone.layers.{attn}.mixer.{kv}_scale"].shape == (1,)
        packed = tensors["backbone.layers.1.mixer.experts.0.up_proj.weight_packed"]
        assert packed.dtype == torch.uint8
        assert tensors["backbone.layers.1.mixer.experts.0.up_proj.weight_global_scale"].dtype == torch.float32
    model, _ = readers.build_model(out, out.parent / f"{key}-ct-dequantized")
    probe = torch.load(run_dir / "probe.pt")
    reference = weight_only.logits(run_dir, world1, probe["input_ids"])
    with torch.no_grad():
        logits = model(probe["input_ids"], use_cache=False).logits
    rel = ((logits - reference).norm() / reference.norm()).item()
    print(f"{key}: compressed-tensors, library decompression vs Megatron weight-only fake quant: rel {rel:.2e}")
    assert rel <= TOLERANCE


def test_fp8_dynamic_activations_are_per_channel_weights_without_input_scales(export_of):
    from safetensors import safe_open

    from hybridquant.readers import compressed_tensors as ct_reader
    from hybridquant.readers import modelopt as mo_reader

    run_dir, out, _ = export_of("fp8", *CT, "+export.options.compressed_tensors.fp8_activations=dynamic")
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = quant["config_groups"].values()
    assert group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"
    tensors = mo_reader.read_tensors(out)
    name = "backbone.layers.1.mixer.experts.0.up_proj"
    assert tensors[f"{name}.weight_scale"].shape == (tensors[f"{name}.weight"].shape[0], 1)
    assert not any(n.endswith(".input_scale") for n in tensors)
    # Per-channel FP8 of the checkpoint's weights: each within half an E4M3 step of the source (3 mantissa
    # bits: 2^-4 relative; subnormals: 2^-10 of the row's scale).
    weights, formats, _ = ct_reader.read(out)
    source = json.loads((run_dir / "checkpoint" / "hybridquant.json").read_text())["source"]
    checked = 0
    with safe_open(f"{source}/model.safetensors", framework="pt") as f:
        for n, fmt in formats.items():
            if fmt == "float-quantized":
                src = f.get_tensor(n).float()
                scale = src.abs().amax(dim=1, keepdim=True) / 448
                assert ((weights[n] - src).abs() <= torch.maximum(src.abs() / 16, scale / 1024) * 1.001 + 1e-12).all(), n
                checked += 1
    assert checked > 0


def test_same_bytes_from_another_layout(export_of):
    """static_mixed is calibrated on 2 ranks (experts split over ETP2): exported there and on one rank."""
    _, out, _ = export_of("static_mixed", *CT)
    _, other, stdout = export_of("static_mixed", *CT, "parallel.etp=1", export_nproc=1)
    assert "at tp1_pp1_ep1" in stdout
    a = json.loads((out / "manifest.json").read_text())["files"]
    b = json.loads((other / "manifest.json").read_text())["files"]
    assert {n: e["sha256"] for n, e in a.items()} == {n: e["sha256"] for n, e in b.items()}
    assert RECIPES["static_mixed"][1] == 2
