"""GGUF exports judged by real llama.cpp (llama-cpp-python's bundled llama.cpp): the float files run by
llama.cpp against transformers on the source; each quantized file dequantized by llama.cpp itself and
run by llama.cpp against transformers on the same dequantized weights (raw quantized logits of a random
tiny MoE move with routing flips, so they are reported, not gated: bench/export_formats.py); llama.cpp's
per-tensor K-quant types on a model whose rows fit 256-blocks and its fallbacks on one whose rows do
not; names, metadata and tokenizer; the same bytes from two layouts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from export_settings import FP8, export_in_process
from hybridquant import llamacpp
from hybridquant.errors import UserError

pytestmark = pytest.mark.distributed

# A model whose rows are multiples of 256 (conf/model/tiny_wide.yaml), all four types in one export.
WIDE = ("mamba_moe_fp8_conservative", "model=tiny_wide", "calib.num_samples=4", "calib.max_seq_len=64")
TYPES = ("F32", "F16", "Q8_0", "Q4_K_M")
GGUF = ("export.format=gguf", f"export.options.gguf.types=[{','.join(TYPES)}]")
TEXT = ("<|im_start|>user\nWhat does a Mamba layer keep between tokens? 12,345 tokens!<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>A fixed-size state, updated per token.")


@pytest.fixture(scope="module")
def wide(exported):
    run_dir, out, stdout = exported(*WIDE, export_args=GGUF)
    meta = json.loads((run_dir / "checkpoint" / "hybridquant.json").read_text())
    return run_dir, out, stdout, meta["source"]


@pytest.fixture(scope="module")
def source_model(wide):
    from hybridquant import hf_reference

    return hf_reference.load(wide[3], max_seq_len=256, dtype=torch.float32, strict=True)


@pytest.fixture(scope="module")
def ids(wide):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(wide[3])
    return tok(TEXT, add_special_tokens=False)["input_ids"]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _top1(a, b):
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


def test_float_files_in_llama_cpp_reproduce_transformers(wide, source_model, ids):
    from hybridquant.readers import gguf as reader

    _, out, stdout, _ = wide
    assert "as gguf (F32,F16,Q8_0,Q4_K_M)" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    with torch.no_grad():
        reference = source_model(torch.tensor([ids])).logits[0]
    bounds = {"F32": 1e-3, "F16": 2e-2}  # measured: F32 ~5e-5, F16 ~4e-3
    for gguf_type, bound in bounds.items():
        path = out / manifest["gguf"][gguf_type]["file"]
        logits = llamacpp.logits(path, ids)
        rel, top1 = _rel(logits, reference), _top1(logits, reference)
        print(f"GGUF {gguf_type} in llama.cpp vs transformers on the source: rel L2 {rel:.2e}, top-1 {top1:.3f}")
        assert rel < bound and top1 == 1.0, gguf_type
    # The reader's dequantization of the F32 file is the source itself, every tensor.
    from safetensors import safe_open

    weights, _, _ = reader.read(out / manifest["gguf"]["F32"]["file"])
    with safe_open(f"{wide[3]}/model.safetensors", framework="pt") as f:
        assert sorted(weights) == sorted(f.keys())
        for name in f.keys():
            assert torch.allclose(weights[name], f.get_tensor(name).float(), rtol=1e-6, atol=0), name


@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_K_M"])
def test_quantized_file_dequantized_by_llama_cpp_runs_like_transformers(gguf_type, wide, ids, tmp_path):
    from hybridquant import readers
    from hybridquant.readers import gguf as reader

    _, out, _, _ = wide
    manifest = json.loads((out / "manifest.json").read_text())
    path = out / manifest["gguf"][gguf_type]["file"]
    dequantized = llamacpp.dequantize(path, tmp_path / "dequantized.gguf")
    # The reader dequantizes exactly as llama.cpp does.
    ours, formats, _ = reader.read(path)
    theirs, _, _ = reader.read(dequantized)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert {f for f in formats.values()} - {"F32"}, "nothing was quantized"
    model, _ = readers.build_model(dequantized, tmp_path / "hf")
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    logits = llamacpp.logits(dequantized, ids)
    rel, top1 = _rel(logits, expected), _top1(logits, expected)
    print(f"GGUF {gguf_type} dequantized by llama.cpp, llama.cpp vs transformers: rel L2 {rel:.2e}, top-1 {top1:.3f}")
    assert rel < 1e-3 and top1 >= 0.98


def test_k_quant_types_as_llama_cpp_assigns_them(wide, exported):
    from hybridquant.readers import gguf as reader

    _, out, _, _ = wide
    manifest = json.loads((out / "manifest.json").read_text())
    types = reader.tensor_types(out / manifest["gguf"]["Q4_K_M"]["file"])
    # Rows of 256: real K-quants, Q6_K where llama.cpp's Q4_K_M mixture puts more bits (output, ffn_down).
    assert types["output.weight"] == "Q6_K"
    assert types["blk.1.ffn_up_exps.weight"] == "Q4_K" and types["blk.0.ssm_in.weight"] == "Q4_K"
    assert "Q6_K" in {types["blk.1.ffn_down_exps.weight"], types["blk.4.ffn_down_exps.weight"]}
    # What llama.cpp never quantizes stays F32 in every type.
    for gguf_type in TYPES:
        t = reader.tensor_types(out / manifest["gguf"][gguf_type]["file"])
        for name in ("blk.1.ffn_gate_inp.weight", "blk.0.ssm_a", "blk.0.ssm_d", "blk.0.ssm_conv1d.weight",
                     "blk.0.ssm_norm.weight", "output_norm.weight", "blk.1.exp_probs_b.bias"):
            assert t[name] == "F32", (gguf_type, name)
        assert manifest["gguf"][gguf_type]["tensor_types"] == dict(sorted(
            {v: list(t.values()).count(v) for v in set(t.values())}.items()))
    assert set(reader.tensor_types(out / manifest["gguf"]["Q8_0"]["file"]).values()) == {"F32", "Q8_0"}
    # Rows of 128 (the tiny model): no K-quant fits; llama.cpp falls back per tensor (Q4_K -> Q5_0, Q6_K -> Q8_0).
    _, narrow, _ = exported(*FP8, export_args=("export.format=gguf",))
    narrow_types = set(reader.tensor_types(narrow).values())
    assert not narrow_types & {"Q4_K", "Q6_K"} and {"Q5_0", "Q8_0"} <= narrow_types


def test_names_metadata_and_tokenizer_are_llama_cpps(wide, ids):
    from transformers import AutoTokenizer

    from hybridquant import export as export_lib
    from hybridquant.readers import gguf as reader

    _, out, _, source = wide
    manifest = json.loads((out / "manifest.json").read_text())
    assert export_lib.verify(out) == [] and manifest["export_format"] == "gguf"
    path = out / manifest["gguf"]["Q4_K_M"]["file"]
    config = json.loads((Path(source) / "config.json").read_text())
    meta = reader.metadata(path)
    assert meta["general.architecture"] == "nemotron_h_moe" and meta["general.file_type"] == 15
    assert meta["nemotron_h_moe.block_count"] == 5
    assert meta["nemotron_h_moe.attention.head_count_kv"] == [0, 0, 0, 2, 0]
    assert meta["nemotron_h_moe.feed_forward_length"] == [0, 256, 0, 0, 256]
    assert meta["nemotron_h_moe.expert_count"] == 6 and meta["nemotron_h_moe.expert_used_count"] == 2
    assert meta["nemotron_h_moe.ssm.inner_size"] == 256 and meta["nemotron_h_moe.ssm.group_count"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.merges"] == ["\u0100 \u0100"]
    tok = AutoTokenizer.from_pretrained(source)
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    # The HF config rebuilt from the metadata alone is the source's architecture.
    rebuilt = reader.config_from_metadata(__import__("gguf").GGUFReader(str(path)))
    for key in ("hybrid_override_pattern", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "n_routed_experts",
                "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
                "routed_scaling_factor", "norm_topk_prob", "conv_kernel"):
        assert rebuilt[key] == config[key], key
    types = reader.tensor_types(path)
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i, kind in enumerate("MEM*E"):
        expected.add(f"blk.{i}.attn_norm.weight")
        expected |= {"M": {f"blk.{i}.ssm_{n}" for n in ("in.weight", "conv1d.weight", "conv1d.bias", "dt.bias", "a", "d",
                                                         "norm.weight", "out.weight")},
                     "E": {f"blk.{i}.{n}" for n in ("ffn_gate_inp.weight", "exp_probs_b.bias", "ffn_up_exps.weight",
                                                    "ffn_down_exps.weight", "ffn_up_shexp.weight",
                                                    "ffn_down_shexp.weight")},
                     "*": {f"blk.{i}.attn_{n}.weight" for n in ("q", "k", "v", "output")}}[kind]
    assert set(types) == expected
    # llama.cpp tokenizes like the Hugging Face tokenizer, special tokens included.
    assert llamacpp.tokenize(path, TEXT) == ids
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{manifest['gguf']['F32']['file']}\n") and "<|im_end|>" in modelfile


def test_every_type_is_the_same_bytes_from_another_layout(wide, exported):
    _, out, _, _ = wide
    _, other, stdout = exported(*WIDE, export_args=(*GGUF, "parallel.ep=2"), export_nproc=2)
    assert "at tp1_pp1_ep2" in stdout  # the experts gathered from two ranks
    a = json.loads((out / "manifest.json").read_text())["files"]
    b = json.loads((other / "manifest.json").read_text())["files"]
    ggufs = sorted(n for n in a if n.endswith(".gguf"))
    assert len(ggufs) == len(TYPES) and ggufs == sorted(n for n in b if n.endswith(".gguf"))
    for name in ggufs:
        assert a[name]["sha256"] == b[name]["sha256"] == hashlib.sha256((other / name).read_bytes()).hexdigest(), name


@pytest.mark.parametrize("overrides, message", [
    (("export.options.gguf.types=[Q3_K_Z]",), "'Q3_K_Z' is not a GGUF type"),
    (("export.options.gguf.types=[]",), "must be a non-empty list"),
    (("export.options.gguf.types=[Q8_0,Q8_0]",), "lists a type twice"),
    (("+export.options.gguf.imatrix=x",), "has no option 'imatrix'"),
    (("export.format=onnx",), "export.format='onnx' is not a format (one of: compressed_tensors, gguf, modelopt)"),
    (("export.format=compressed_tensors", "+export.options.compressed_tensors.fp8_activations=sometimes"),
     "is not static or dynamic"),
])
def test_bad_format_options_are_one_line_errors(overrides, message, quantized, tmp_path):
    overrides = overrides if overrides[0].startswith("export.format") else ("export.format=gguf", *overrides)
    with pytest.raises(UserError) as info:
        export_in_process(quantized(*FP8), tmp_path / "out", *overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_dense_and_moe_layers_together_have_no_gguf_form(quantized, tmp_path):
    """llama.cpp's nemotron_h_moe takes every FFN layer as MoE: a pattern with both is refused, not written
    (by the stage before any process group: the checkpoint's config is read first)."""
    import shutil

    from hybridquant.formats import gguf

    ckpt = tmp_path / "ckpt"
    shutil.copytree(quantized(*FP8) / "checkpoint", ckpt)
    config = json.loads((ckpt / "hf" / "config.json").read_text())
    config["hybrid_override_pattern"] = config["hybrid_override_pattern"][:-1] + "-"
    (ckpt / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="cannot hold dense MLP layers") as info:
        export_in_process(ckpt, tmp_path / "out", "export.format=gguf")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()

    with pytest.raises(UserError, match="cannot hold dense MLP layers") as info:
        gguf.architecture({"hybrid_override_pattern": "ME*M-"})
    assert "\n" not in str(info.value)
    assert gguf.architecture({"hybrid_override_pattern": "M-*M-"}) == "nemotron_h"
    assert gguf.architecture({"layers_block_type": ["mamba", "moe", "attention"]}) == "nemotron_h_moe"


def test_a_model_without_experts_is_llama_cpps_nemotron_h(exported):
    """Dense MLP layers ('-') and no experts: architecture nemotron_h, ffn_up/ffn_down, run by llama.cpp."""
    from transformers import AutoTokenizer

    from hybridquant import hf_reference
    from hybridquant.readers import gguf as reader

    dense = ("mamba_moe_fp8_aggressive", "model=tiny_wide", "model.arch.hybrid_override_pattern=M-*M-",
             "calib.num_samples=2", "calib.max_seq_len=64")
    run_dir, out, _ = exported(*dense, export_args=("export.format=gguf", "export.options.gguf.types=[F32]"))
    path = reader.gguf_file(out)
    meta = reader.metadata(path)
    assert meta["general.architecture"] == "nemotron_h"
    assert meta["nemotron_h.feed_forward_length"] == [0, 256, 0, 0, 256]
    assert {"blk.1.ffn_up.weight", "blk.1.ffn_down.weight"} <= set(reader.tensor_types(path))
    source = json.loads((run_dir / "checkpoint" / "hybridquant.json").read_text())["source"]
    ids = AutoTokenizer.from_pretrained(source)(TEXT, add_special_tokens=False)["input_ids"]
    model = hf_reference.load(source, max_seq_len=256, dtype=torch.float32, strict=True)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0]
    logits = llamacpp.logits(path, ids)
    print(f"GGUF F32 nemotron_h (dense) in llama.cpp vs transformers: rel L2 {_rel(logits, reference):.2e}")
    assert _rel(logits, reference) < 1e-3 and _top1(logits, reference) == 1.0
